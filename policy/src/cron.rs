//! Velero Schedule expressions, read and advanced exactly as Velero does it: with
//! robfig/cron v3 `ParseStandard` and `Schedule.Next` (Velero v1.18:
//! pkg/controller/schedule_controller.go `parseCronSchedule`, `getNextRunTime`).
//!
//! This is a port of robfig/cron v3.0.1 parser.go (`ParseStandard`: 5 fields,
//! descriptors, `@every`, a `TZ=`/`CRON_TZ=` prefix), spec.go (`SpecSchedule.Next`) and
//! constantdelay.go (`@every`), on jiff. Why a port and not a cron crate: six crates were
//! run against robfig's answers here (croner 4, cron-parser, cron, cronexpr, saffron,
//! cronp); none reads ParseStandard's grammar (croner takes `7`, `L`, `#`, six fields, and
//! rejects `0/15`; others need seconds or AND the day fields), and their DST rules differ
//! (croner runs a daily job once in a repeated hour, robfig twice). croner matched only
//! behind a full robfig parser of our own plus a trick on its job classification, and
//! still not in zones that change clocks at midnight, where robfig's answers are odd but
//! are Velero's. Velero runs robfig, so a Schedule's tick must be robfig's, quirks
//! included. policy/tests/cron_robfig.rs checks this port against robfig's own test tables and
//! 2,169 answers robfig computed here (scripts/robfig-truth/check.sh recomputes them).
//!
//! Go's `time.Date` (which robfig calls to truncate and to step over days) is followed
//! too: a wall time in a gap or a fold resolves as Go resolves it.

use std::fmt;

use jiff::civil::{Date, DateTime};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};

/// A parsed Schedule expression.
#[derive(Clone, Debug)]
pub enum CronSchedule {
    /// `@every <duration>`: `Next(t)` is `t + delay`, on whole seconds.
    Every(SignedDuration),
    Spec(Box<Spec>),
}

/// robfig's `SpecSchedule`: one bit per allowed value, plus the star bit.
#[derive(Clone, Debug)]
pub struct Spec {
    minute: u64,
    hour: u64,
    dom: u64,
    month: u64,
    dow: u64,
    /// The `TZ=` zone, or the zone of Velero's process (`Local`) when there is none.
    location: TimeZone,
}

const STAR_BIT: u64 = 1 << 63;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CronError(String);

impl fmt::Display for CronError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CronError {}

fn err<T>(msg: impl Into<String>) -> Result<T, CronError> {
    Err(CronError(msg.into()))
}

struct Bounds {
    min: u32,
    max: u32,
    names: &'static [(&'static str, u32)],
}

const MINUTES: Bounds = Bounds {
    min: 0,
    max: 59,
    names: &[],
};
const HOURS: Bounds = Bounds {
    min: 0,
    max: 23,
    names: &[],
};
const DOM: Bounds = Bounds {
    min: 1,
    max: 31,
    names: &[],
};
const MONTHS: Bounds = Bounds {
    min: 1,
    max: 12,
    names: &[
        ("jan", 1),
        ("feb", 2),
        ("mar", 3),
        ("apr", 4),
        ("may", 5),
        ("jun", 6),
        ("jul", 7),
        ("aug", 8),
        ("sep", 9),
        ("oct", 10),
        ("nov", 11),
        ("dec", 12),
    ],
};
const DOW: Bounds = Bounds {
    min: 0,
    max: 6,
    names: &[
        ("sun", 0),
        ("mon", 1),
        ("tue", 2),
        ("wed", 3),
        ("thu", 4),
        ("fri", 5),
        ("sat", 6),
    ],
};

impl CronSchedule {
    /// `cron.ParseStandard(spec)`. `local` is the zone of Velero's process, used when the
    /// expression has no `TZ=` prefix (Velero's image sets none: UTC).
    pub fn parse_in(spec: &str, local: &TimeZone) -> Result<Self, CronError> {
        if spec.is_empty() {
            return err("empty spec string");
        }
        let mut spec = spec;
        let mut location = local.clone();
        if spec.starts_with("TZ=") || spec.starts_with("CRON_TZ=") {
            // robfig slices to the first space; without one it panics, and Velero
            // reports the recovered panic as an invalid schedule.
            let (Some(space), Some(eq)) = (spec.find(' '), spec.find('=')) else {
                return err("invalid schedule: a TZ= prefix needs a space after the zone");
            };
            let name = &spec[eq + 1..space];
            location = load_location(name, local).ok_or_else(|| {
                CronError(format!(
                    "provided bad location {name}: unknown time zone {name}"
                ))
            })?;
            spec = spec[space..].trim();
        }
        if spec.starts_with('@') {
            return parse_descriptor(spec, location);
        }
        let fields: Vec<&str> = spec.split_whitespace().collect();
        if fields.len() != 5 {
            return err(format!(
                "expected exactly 5 fields, found {}: {spec}",
                fields.len()
            ));
        }
        Ok(Self::Spec(Box::new(Spec {
            minute: get_field(fields[0], &MINUTES)?,
            hour: get_field(fields[1], &HOURS)?,
            dom: get_field(fields[2], &DOM)?,
            month: get_field(fields[3], &MONTHS)?,
            dow: get_field(fields[4], &DOW)?,
            location,
        })))
    }

    /// [`Self::parse_in`] with UTC as Velero's local zone.
    pub fn parse(spec: &str) -> Result<Self, CronError> {
        Self::parse_in(spec, &TimeZone::UTC)
    }

    /// The first tick strictly after `t` (`Schedule.Next`); `None` where robfig returns
    /// the zero time (nothing within five years, e.g. `0 0 30 2 *`).
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match self {
            Self::Every(delay) => {
                let nanos = SignedDuration::from_nanos(i64::from(t.subsec_nanosecond()));
                t.checked_add(*delay - nanos).ok()
            }
            Self::Spec(spec) => spec.next(t),
        }
    }
}

/// `time.LoadLocation`: `""` and `UTC` are UTC, `Local` is Velero's local zone, else an
/// IANA name.
fn load_location(name: &str, local: &TimeZone) -> Option<TimeZone> {
    match name {
        "" | "UTC" => Some(TimeZone::UTC),
        "Local" => Some(local.clone()),
        _ => TimeZone::get(name).ok(),
    }
}

fn parse_descriptor(descriptor: &str, location: TimeZone) -> Result<CronSchedule, CronError> {
    let all = |b: &Bounds| bits(b.min, b.max, 1) | STAR_BIT;
    let spec = |minute, hour, dom, month, dow| {
        Ok(CronSchedule::Spec(Box::new(Spec {
            minute,
            hour,
            dom,
            month,
            dow,
            location: location.clone(),
        })))
    };
    match descriptor {
        "@yearly" | "@annually" => spec(1, 1, 1 << 1, 1 << 1, all(&DOW)),
        "@monthly" => spec(1, 1, 1 << 1, all(&MONTHS), all(&DOW)),
        "@weekly" => spec(1, 1, all(&DOM), all(&MONTHS), 1),
        "@daily" | "@midnight" => spec(1, 1, all(&DOM), all(&MONTHS), all(&DOW)),
        "@hourly" => spec(1, all(&HOURS), all(&DOM), all(&MONTHS), all(&DOW)),
        _ => match descriptor.strip_prefix("@every ") {
            Some(d) => {
                let d = parse_go_duration(d)
                    .ok_or_else(|| CronError(format!("failed to parse duration {descriptor}")))?;
                // constantdelay.go `Every`: at least a second, whole seconds.
                let d = d.max(SignedDuration::from_secs(1));
                Ok(CronSchedule::Every(SignedDuration::from_secs(d.as_secs())))
            }
            None => err(format!("unrecognized descriptor: {descriptor}")),
        },
    }
}

fn get_field(field: &str, b: &Bounds) -> Result<u64, CronError> {
    let mut out = 0;
    for expr in field.split(',').filter(|e| !e.is_empty()) {
        out |= get_range(expr, b)?;
    }
    Ok(out)
}

fn get_range(expr: &str, b: &Bounds) -> Result<u64, CronError> {
    let range_and_step: Vec<&str> = expr.split('/').collect();
    let low_and_high: Vec<&str> = range_and_step[0].split('-').collect();
    let single = low_and_high.len() == 1;
    let (start, mut end, mut extra);
    if low_and_high[0] == "*" || low_and_high[0] == "?" {
        (start, end, extra) = (b.min, b.max, STAR_BIT);
    } else {
        start = parse_int_or_name(low_and_high[0], b.names)?;
        end = match low_and_high.len() {
            1 => start,
            2 => parse_int_or_name(low_and_high[1], b.names)?,
            _ => return err(format!("too many hyphens: {expr}")),
        };
        extra = 0;
    }
    let step = match range_and_step.len() {
        1 => 1,
        2 => {
            let step = must_parse_int(range_and_step[1])?;
            // "N/step" means "N-max/step".
            if single {
                end = b.max;
            }
            if step > 1 {
                extra = 0;
            }
            step
        }
        _ => return err(format!("too many slashes: {expr}")),
    };
    if start < b.min {
        return err(format!(
            "beginning of range ({start}) below minimum ({}): {expr}",
            b.min
        ));
    }
    if end > b.max {
        return err(format!(
            "end of range ({end}) above maximum ({}): {expr}",
            b.max
        ));
    }
    if start > end {
        return err(format!(
            "beginning of range ({start}) beyond end of range ({end}): {expr}"
        ));
    }
    if step == 0 {
        return err(format!("step of range should be a positive number: {expr}"));
    }
    Ok(bits(start, end, step) | extra)
}

fn bits(min: u32, max: u32, step: u32) -> u64 {
    (min..=max)
        .step_by(step as usize)
        .fold(0, |acc, i| acc | 1 << i)
}

fn parse_int_or_name(expr: &str, names: &[(&str, u32)]) -> Result<u32, CronError> {
    let lower = expr.to_ascii_lowercase();
    match names.iter().find(|(n, _)| *n == lower) {
        Some((_, v)) => Ok(*v),
        None => must_parse_int(expr),
    }
}

/// `strconv.Atoi` (an optional sign, decimal digits), then "no negative numbers".
fn must_parse_int(expr: &str) -> Result<u32, CronError> {
    let (negative, digits) = match expr.as_bytes().first() {
        Some(b'+') => (false, &expr[1..]),
        Some(b'-') => (true, &expr[1..]),
        _ => (false, expr),
    };
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return err(format!("failed to parse int from {expr}"));
    }
    if negative && digits.bytes().any(|c| c != b'0') {
        return err(format!("negative number ({expr}) not allowed: {expr}"));
    }
    // Larger than any field's maximum either way; Go's error text differs, the outcome not.
    Ok(digits.parse::<u32>().unwrap_or(u32::MAX))
}

/// Go's `time.ParseDuration`: `[-+]` then one or more `<decimal><unit>`, units `ns`,
/// `us`/`µs`/`μs`, `ms`, `s`, `m`, `h`; `0` alone is allowed.
fn parse_go_duration(s: &str) -> Option<SignedDuration> {
    let (negative, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(SignedDuration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: i128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        if number.is_empty() || number == "." || number.matches('.').count() > 1 {
            return None;
        }
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let nanos_per: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        let whole: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut value = whole.checked_mul(nanos_per)?;
        let mut scale = nanos_per;
        for d in frac.bytes() {
            scale /= 10;
            value += i128::from(d - b'0') * scale;
        }
        total = total.checked_add(value)?;
        if total > i128::from(i64::MAX) {
            return None;
        }
        rest = tail;
    }
    let total = if negative { -total } else { total };
    Some(SignedDuration::from_nanos(i64::try_from(total).ok()?))
}

impl Spec {
    fn day_matches(&self, t: &Zoned) -> bool {
        let dom = self.dom & (1 << t.day()) != 0;
        let dow = self.dow & (1 << t.weekday().to_sunday_zero_offset()) != 0;
        if self.dom & STAR_BIT != 0 || self.dow & STAR_BIT != 0 {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// spec.go `Next`, step for step.
    fn next(&self, t: Timestamp) -> Option<Timestamp> {
        let loc = &self.location;
        let hour = SignedDuration::from_hours(1);
        // Start at the earliest possible time (the upcoming second).
        let t0 = t
            .checked_add(
                SignedDuration::from_secs(1)
                    - SignedDuration::from_nanos(i64::from(t.subsec_nanosecond())),
            )
            .ok()?;
        let mut t = t0.to_zoned(loc.clone());
        let mut added = false;
        let year_limit = t.year() + 5;
        'wrap: loop {
            if t.year() > year_limit {
                return None;
            }
            while self.month & (1 << t.month()) == 0 {
                if !added {
                    added = true;
                    t = go_date(loc, t.year(), t.month().into(), 1, 0, 0)?;
                }
                t = go_date(
                    loc,
                    t.year(),
                    i32::from(t.month()) + 1,
                    t.day().into(),
                    t.hour().into(),
                    t.minute().into(),
                )?;
                if t.month() == 1 {
                    continue 'wrap;
                }
            }
            while !self.day_matches(&t) {
                if !added {
                    added = true;
                    t = go_date(loc, t.year(), t.month().into(), t.day().into(), 0, 0)?;
                }
                t = go_date(
                    loc,
                    t.year(),
                    t.month().into(),
                    i32::from(t.day()) + 1,
                    t.hour().into(),
                    t.minute().into(),
                )?;
                // Notice if the hour is no longer midnight due to DST.
                if t.hour() != 0 {
                    let h = i64::from(t.hour());
                    let shift = if h > 12 { 24 - h } else { -h };
                    t = t.checked_add(SignedDuration::from_hours(shift)).ok()?;
                }
                if t.day() == 1 {
                    continue 'wrap;
                }
            }
            while self.hour & (1 << t.hour()) == 0 {
                if !added {
                    added = true;
                    t = go_date(
                        loc,
                        t.year(),
                        t.month().into(),
                        t.day().into(),
                        t.hour().into(),
                        0,
                    )?;
                }
                t = t.checked_add(hour).ok()?;
                if t.hour() == 0 {
                    continue 'wrap;
                }
            }
            while self.minute & (1 << t.minute()) == 0 {
                if !added {
                    added = true;
                    t = truncate(&t, 60)?;
                }
                t = t.checked_add(SignedDuration::from_mins(1)).ok()?;
                if t.minute() == 0 {
                    continue 'wrap;
                }
            }
            // ParseStandard's seconds field is always 0.
            while t.second() != 0 {
                if !added {
                    added = true;
                    t = truncate(&t, 1)?;
                }
                t = t.checked_add(SignedDuration::from_secs(1)).ok()?;
                if t.second() == 0 {
                    continue 'wrap;
                }
            }
            return Some(t.timestamp());
        }
    }
}

/// `time.Time.Truncate(d)` for whole seconds: on absolute time, not the wall clock.
fn truncate(t: &Zoned, secs: i64) -> Option<Zoned> {
    let s = t.timestamp().as_second();
    let ts = Timestamp::from_second(s - s.rem_euclid(secs)).ok()?;
    Some(ts.to_zoned(t.time_zone().clone()))
}

/// Go's `time.Date(year, month, day, hour, min, 0, 0, loc)`: out-of-range months and days
/// carry over; a wall time in a gap or fold takes the offset Go's algorithm picks (the
/// offset in force at the wall time read as UTC, corrected once if that instant is not
/// in its period).
fn go_date(
    loc: &TimeZone,
    year: i16,
    month: i32,
    day: i32,
    hour: i32,
    minute: i32,
) -> Option<Zoned> {
    let (carry, month) = ((month - 1).div_euclid(12), (month - 1).rem_euclid(12) + 1);
    let first = Date::new(
        year.checked_add(i16::try_from(carry).ok()?)?,
        i8::try_from(month).ok()?,
        1,
    )
    .ok()?;
    let date = first
        .checked_add(SignedDuration::from_hours(24 * i64::from(day - 1)))
        .ok()?;
    let wall = DateTime::from_parts(date, jiff::civil::Time::midnight())
        .checked_add(
            SignedDuration::from_hours(i64::from(hour))
                + SignedDuration::from_mins(i64::from(minute)),
        )
        .ok()?;
    let as_utc = wall.to_zoned(TimeZone::UTC).ok()?.timestamp();
    let offset = loc.to_offset(as_utc);
    let utc = as_utc
        .checked_sub(SignedDuration::from_secs(offset.seconds().into()))
        .ok()?;
    let offset = match loc.to_offset(utc) {
        o if o == offset => offset,
        other => other,
    };
    let ts = as_utc
        .checked_sub(SignedDuration::from_secs(offset.seconds().into()))
        .ok()?;
    Some(ts.to_zoned(loc.clone()))
}
