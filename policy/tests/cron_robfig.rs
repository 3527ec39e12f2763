//! Our Schedule expressions against robfig/cron v3.0.1's own tests (the library Velero
//! parses Schedules with). Every expected value below is copied from robfig/cron at tag
//! v3.0.1 (commit bc59245fe10efaed9d51b56900192527ed733435); the file and test name are
//! given per table. TestNext uses robfig's 6-field parser: its cases whose seconds field
//! is `0` are kept with that field dropped (ParseStandard has none); the six `15/35`
//! seconds cases are left out.

use k8s_openapi::jiff::tz::{Offset, TimeZone};
use k8s_openapi::jiff::{self, SignedDuration, Timestamp};
use velero_jupyterhub_policy::cron::CronSchedule;

/// robfig's `getTime`: "Mon Jan 2 15:04[:05[.fff]] 2006" or "2006-01-02T15:04:05-0700",
/// optionally prefixed "TZ=<zone> ", read in `local` (the test machine's zone: we use UTC).
/// Returns the instant and the location the time is "in" (robfig's Next uses it when
/// the expression has no TZ= prefix).
fn go_time(value: &str, local: &TimeZone) -> (Timestamp, TimeZone) {
    let (prefixed, zone, value) = match value.strip_prefix("TZ=") {
        Some(rest) => {
            let (name, v) = rest.split_once(' ').expect("TZ=zone value");
            (true, TimeZone::get(name).expect("zone"), v)
        }
        None => (false, local.clone(), value),
    };
    if let Some((date_time, offset)) = value
        .rsplit_once(['+', '-'])
        .filter(|(d, _)| d.contains('T'))
    {
        let sign = if value.as_bytes()[date_time.len()] == b'-' {
            -1
        } else {
            1
        };
        let hours: i32 = offset[..2].parse().expect("hh");
        let minutes: i32 = offset[2..].parse().expect("mm");
        let offset = Offset::from_seconds(sign * (hours * 3600 + minutes * 60)).expect("offset");
        let dt: jiff::civil::DateTime = date_time.parse().expect("date time");
        let ts = offset.to_timestamp(dt).expect("timestamp");
        // time.ParseInLocation: the location given, if the offset is its offset then;
        // otherwise a fixed zone of that offset.
        let loc = if prefixed || offset == zone.to_offset(ts) {
            zone
        } else {
            TimeZone::fixed(offset)
        };
        return (ts, loc);
    }
    // "Mon Jul 9 14:45 2012"
    let parts: Vec<&str> = value.split_whitespace().collect();
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[1])
    .expect("month") as i8
        + 1;
    let day: i8 = parts[2].parse().expect("day");
    let year: i16 = parts[4].parse().expect("year");
    let mut hms = parts[3].split(':');
    let h: i8 = hms.next().expect("h").parse().expect("h");
    let m: i8 = hms.next().expect("m").parse().expect("m");
    let (s, nanos) = match hms.next() {
        Some(sec) => {
            let (s, frac) = sec.split_once('.').unwrap_or((sec, ""));
            let nanos = format!("{frac:0<9}").parse::<i32>().expect("ns");
            (s.parse::<i8>().expect("s"), nanos)
        }
        None => (0, 0),
    };
    let dt = jiff::civil::date(year, month, day).at(h, m, s, nanos);
    (dt.to_zoned(zone.clone()).expect("zoned").timestamp(), zone)
}

fn check(start: &str, spec: &str, expected: &str, source: &str) {
    let utc = TimeZone::UTC;
    let (t, loc) = go_time(start, &utc);
    let schedule = CronSchedule::parse_in(spec, &loc)
        .unwrap_or_else(|e| panic!("{source}: {spec:?} does not parse: {e}"));
    let got = schedule.next_after(t);
    let want = (!expected.is_empty()).then(|| go_time(expected, &utc).0);
    assert_eq!(got, want, "{source}: {spec:?} after {start}");
}

/// spec_test.go `TestNext`, seconds field `0` dropped.
#[test]
fn robfig_test_next() {
    let runs = [
        (
            "Mon Jul 9 14:45 2012",
            "0/15 * * * *",
            "Mon Jul 9 15:00 2012",
        ),
        (
            "Mon Jul 9 14:59 2012",
            "0/15 * * * *",
            "Mon Jul 9 15:00 2012",
        ),
        (
            "Mon Jul 9 14:59:59 2012",
            "0/15 * * * *",
            "Mon Jul 9 15:00 2012",
        ),
        (
            "Mon Jul 9 15:45 2012",
            "20-35/15 * * * *",
            "Mon Jul 9 16:20 2012",
        ),
        (
            "Mon Jul 9 23:46 2012",
            "*/15 * * * *",
            "Tue Jul 10 00:00 2012",
        ),
        (
            "Mon Jul 9 23:45 2012",
            "20-35/15 * * * *",
            "Tue Jul 10 00:20 2012",
        ),
        (
            "Mon Jul 9 23:35 2012",
            "0 0 9 Apr-Oct ?",
            "Thu Aug 9 00:00 2012",
        ),
        (
            "Mon Jul 9 23:35 2012",
            "0 0 */5 Apr,Aug,Oct Mon",
            "Tue Aug 1 00:00 2012",
        ),
        (
            "Mon Jul 9 23:35 2012",
            "0 0 */5 Oct Mon",
            "Mon Oct 1 00:00 2012",
        ),
        (
            "Mon Jul 9 23:35 2012",
            "0 0 * Feb Mon",
            "Mon Feb 4 00:00 2013",
        ),
        (
            "Mon Jul 9 23:35 2012",
            "0 0 * Feb Mon/2",
            "Fri Feb 1 00:00 2013",
        ),
        (
            "Mon Dec 31 23:59:45 2012",
            "* * * * *",
            "Tue Jan 1 00:00:00 2013",
        ),
        (
            "Mon Jul 9 23:35 2012",
            "0 0 29 Feb ?",
            "Mon Feb 29 00:00 2016",
        ),
        // Daylight savings time 2am EST (-5) -> 3am EDT (-4)
        (
            "2012-03-11T00:00:00-0500",
            "TZ=America/New_York 30 2 11 Mar ?",
            "2013-03-11T02:30:00-0400",
        ),
        // hourly job
        (
            "2012-03-11T00:00:00-0500",
            "TZ=America/New_York 0 * * * ?",
            "2012-03-11T01:00:00-0500",
        ),
        (
            "2012-03-11T01:00:00-0500",
            "TZ=America/New_York 0 * * * ?",
            "2012-03-11T03:00:00-0400",
        ),
        (
            "2012-03-11T03:00:00-0400",
            "TZ=America/New_York 0 * * * ?",
            "2012-03-11T04:00:00-0400",
        ),
        (
            "2012-03-11T04:00:00-0400",
            "TZ=America/New_York 0 * * * ?",
            "2012-03-11T05:00:00-0400",
        ),
        // hourly job using CRON_TZ
        (
            "2012-03-11T00:00:00-0500",
            "CRON_TZ=America/New_York 0 * * * ?",
            "2012-03-11T01:00:00-0500",
        ),
        (
            "2012-03-11T01:00:00-0500",
            "CRON_TZ=America/New_York 0 * * * ?",
            "2012-03-11T03:00:00-0400",
        ),
        (
            "2012-03-11T03:00:00-0400",
            "CRON_TZ=America/New_York 0 * * * ?",
            "2012-03-11T04:00:00-0400",
        ),
        (
            "2012-03-11T04:00:00-0400",
            "CRON_TZ=America/New_York 0 * * * ?",
            "2012-03-11T05:00:00-0400",
        ),
        // 1am nightly job
        (
            "2012-03-11T00:00:00-0500",
            "TZ=America/New_York 0 1 * * ?",
            "2012-03-11T01:00:00-0500",
        ),
        (
            "2012-03-11T01:00:00-0500",
            "TZ=America/New_York 0 1 * * ?",
            "2012-03-12T01:00:00-0400",
        ),
        // 2am nightly job (skipped)
        (
            "2012-03-11T00:00:00-0500",
            "TZ=America/New_York 0 2 * * ?",
            "2012-03-12T02:00:00-0400",
        ),
        // Daylight savings time 2am EDT (-4) => 1am EST (-5)
        (
            "2012-11-04T00:00:00-0400",
            "TZ=America/New_York 30 2 04 Nov ?",
            "2012-11-04T02:30:00-0500",
        ),
        (
            "2012-11-04T01:45:00-0400",
            "TZ=America/New_York 30 1 04 Nov ?",
            "2012-11-04T01:30:00-0500",
        ),
        // hourly job
        (
            "2012-11-04T00:00:00-0400",
            "TZ=America/New_York 0 * * * ?",
            "2012-11-04T01:00:00-0400",
        ),
        (
            "2012-11-04T01:00:00-0400",
            "TZ=America/New_York 0 * * * ?",
            "2012-11-04T01:00:00-0500",
        ),
        (
            "2012-11-04T01:00:00-0500",
            "TZ=America/New_York 0 * * * ?",
            "2012-11-04T02:00:00-0500",
        ),
        // 1am nightly job (runs twice)
        (
            "2012-11-04T00:00:00-0400",
            "TZ=America/New_York 0 1 * * ?",
            "2012-11-04T01:00:00-0400",
        ),
        (
            "2012-11-04T01:00:00-0400",
            "TZ=America/New_York 0 1 * * ?",
            "2012-11-04T01:00:00-0500",
        ),
        (
            "2012-11-04T01:00:00-0500",
            "TZ=America/New_York 0 1 * * ?",
            "2012-11-05T01:00:00-0500",
        ),
        // 2am nightly job
        (
            "2012-11-04T00:00:00-0400",
            "TZ=America/New_York 0 2 * * ?",
            "2012-11-04T02:00:00-0500",
        ),
        (
            "2012-11-04T02:00:00-0500",
            "TZ=America/New_York 0 2 * * ?",
            "2012-11-05T02:00:00-0500",
        ),
        // 3am nightly job
        (
            "2012-11-04T00:00:00-0400",
            "TZ=America/New_York 0 3 * * ?",
            "2012-11-04T03:00:00-0500",
        ),
        (
            "2012-11-04T03:00:00-0500",
            "TZ=America/New_York 0 3 * * ?",
            "2012-11-05T03:00:00-0500",
        ),
        // The same, with the zone from the time ("Local" is the time's location).
        (
            "TZ=America/New_York 2012-11-04T00:00:00-0400",
            "0 * * * ?",
            "2012-11-04T01:00:00-0400",
        ),
        (
            "TZ=America/New_York 2012-11-04T01:00:00-0400",
            "0 * * * ?",
            "2012-11-04T01:00:00-0500",
        ),
        (
            "TZ=America/New_York 2012-11-04T01:00:00-0500",
            "0 * * * ?",
            "2012-11-04T02:00:00-0500",
        ),
        (
            "TZ=America/New_York 2012-11-04T00:00:00-0400",
            "0 1 * * ?",
            "2012-11-04T01:00:00-0400",
        ),
        (
            "TZ=America/New_York 2012-11-04T01:00:00-0400",
            "0 1 * * ?",
            "2012-11-04T01:00:00-0500",
        ),
        (
            "TZ=America/New_York 2012-11-04T01:00:00-0500",
            "0 1 * * ?",
            "2012-11-05T01:00:00-0500",
        ),
        (
            "TZ=America/New_York 2012-11-04T00:00:00-0400",
            "0 2 * * ?",
            "2012-11-04T02:00:00-0500",
        ),
        (
            "TZ=America/New_York 2012-11-04T02:00:00-0500",
            "0 2 * * ?",
            "2012-11-05T02:00:00-0500",
        ),
        (
            "TZ=America/New_York 2012-11-04T00:00:00-0400",
            "0 3 * * ?",
            "2012-11-04T03:00:00-0500",
        ),
        (
            "TZ=America/New_York 2012-11-04T03:00:00-0500",
            "0 3 * * ?",
            "2012-11-05T03:00:00-0500",
        ),
        // Unsatisfiable
        ("Mon Jul 9 23:35 2012", "0 0 30 Feb ?", ""),
        ("Mon Jul 9 23:35 2012", "0 0 31 Apr ?", ""),
        // Monthly job
        (
            "TZ=America/New_York 2012-11-04T00:00:00-0400",
            "0 3 3 * ?",
            "2012-12-03T03:00:00-0500",
        ),
        // DST making midnight not a valid time (robfig/cron issue 157)
        (
            "2018-10-17T05:00:00-0400",
            "TZ=America/Sao_Paulo 0 9 10 * ?",
            "2018-11-10T06:00:00-0500",
        ),
        (
            "2018-02-14T05:00:00-0500",
            "TZ=America/Sao_Paulo 0 9 22 * ?",
            "2018-02-22T07:00:00-0500",
        ),
    ];
    for (start, spec, expected) in runs {
        check(start, spec, expected, "spec_test.go TestNext");
    }
}

/// spec_test.go `TestActivation` (ParseStandard): `expected` says whether the time is a tick.
#[test]
fn robfig_test_activation() {
    let tests = [
        ("Mon Jul 9 15:00 2012", "0/15 * * * *", true),
        ("Mon Jul 9 15:45 2012", "0/15 * * * *", true),
        ("Mon Jul 9 15:40 2012", "0/15 * * * *", false),
        ("Mon Jul 9 15:05 2012", "5/15 * * * *", true),
        ("Mon Jul 9 15:20 2012", "5/15 * * * *", true),
        ("Mon Jul 9 15:50 2012", "5/15 * * * *", true),
        ("Sun Jul 15 15:00 2012", "0/15 * * Jul *", true),
        ("Sun Jul 15 15:00 2012", "0/15 * * Jun *", false),
        ("Sun Jul 15 08:30 2012", "30 08 ? Jul Sun", true),
        ("Sun Jul 15 08:30 2012", "30 08 15 Jul ?", true),
        ("Mon Jul 16 08:30 2012", "30 08 ? Jul Sun", false),
        ("Mon Jul 16 08:30 2012", "30 08 15 Jul ?", false),
        ("Mon Jul 9 15:00 2012", "@hourly", true),
        ("Mon Jul 9 15:04 2012", "@hourly", false),
        ("Mon Jul 9 15:00 2012", "@daily", false),
        ("Mon Jul 9 00:00 2012", "@daily", true),
        ("Mon Jul 9 00:00 2012", "@weekly", false),
        ("Sun Jul 8 00:00 2012", "@weekly", true),
        ("Sun Jul 8 01:00 2012", "@weekly", false),
        ("Sun Jul 8 00:00 2012", "@monthly", false),
        ("Sun Jul 1 00:00 2012", "@monthly", true),
        // If both DOM and DOW are restricted, only one needs to match.
        ("Sun Jul 15 00:00 2012", "* * 1,15 * Sun", true),
        ("Fri Jun 15 00:00 2012", "* * 1,15 * Sun", true),
        ("Wed Aug 1 00:00 2012", "* * 1,15 * Sun", true),
        ("Sun Jul 15 00:00 2012", "* * */10 * Sun", true),
        // However, if one has a star, then both need to match.
        ("Sun Jul 15 00:00 2012", "* * * * Mon", false),
        ("Mon Jul 9 00:00 2012", "* * 1,15 * *", false),
        ("Sun Jul 15 00:00 2012", "* * 1,15 * *", true),
        ("Sun Jul 15 00:00 2012", "* * */2 * Sun", true),
    ];
    let utc = TimeZone::UTC;
    for (time, spec, expected) in tests {
        let (t, _) = go_time(time, &utc);
        let schedule = CronSchedule::parse(spec).expect(spec);
        let got = schedule.next_after(t - SignedDuration::from_secs(1));
        assert_eq!(
            got == Some(t),
            expected,
            "spec_test.go TestActivation: {spec} on {time}"
        );
    }
}

/// spec_test.go `TestNextWithTz`: no TZ= prefix, so the time's own (fixed) zone applies.
#[test]
fn robfig_test_next_with_tz() {
    let runs = [
        (
            "2016-01-03T13:09:03+0530",
            "14 14 * * *",
            "2016-01-03T14:14:00+0530",
        ),
        (
            "2016-01-03T04:09:03+0530",
            "14 14 * * ?",
            "2016-01-03T14:14:00+0530",
        ),
        (
            "2016-01-03T14:09:03+0530",
            "14 14 * * *",
            "2016-01-03T14:14:00+0530",
        ),
        (
            "2016-01-03T14:00:00+0530",
            "14 14 * * ?",
            "2016-01-03T14:14:00+0530",
        ),
    ];
    for (start, spec, expected) in runs {
        check(start, spec, expected, "spec_test.go TestNextWithTz");
    }
}

/// constantdelay_test.go `TestConstantDelayNext`, with each delay written as the Go
/// duration `@every` takes.
#[test]
fn robfig_test_constant_delay_next() {
    let tests = [
        ("Mon Jul 9 14:45 2012", "15m50ns", "Mon Jul 9 15:00 2012"),
        ("Mon Jul 9 14:59 2012", "15m", "Mon Jul 9 15:14 2012"),
        ("Mon Jul 9 14:59:59 2012", "15m", "Mon Jul 9 15:14:59 2012"),
        ("Mon Jul 9 15:45 2012", "35m", "Mon Jul 9 16:20 2012"),
        ("Mon Jul 9 23:46 2012", "14m", "Tue Jul 10 00:00 2012"),
        ("Mon Jul 9 23:45 2012", "35m", "Tue Jul 10 00:20 2012"),
        (
            "Mon Jul 9 23:35:51 2012",
            "44m24s",
            "Tue Jul 10 00:20:15 2012",
        ),
        (
            "Mon Jul 9 23:35:51 2012",
            "25h44m24s",
            "Thu Jul 11 01:20:15 2012",
        ),
        ("Mon Jul 9 23:35 2012", "2184h25m", "Thu Oct 9 00:00 2012"),
        ("Mon Dec 31 23:59:45 2012", "15s", "Tue Jan 1 00:00:00 2013"),
        ("Mon Jul 9 14:45:00 2012", "15ms", "Mon Jul 9 14:45:01 2012"),
        ("Mon Jul 9 14:45:00.005 2012", "15m", "Mon Jul 9 15:00 2012"),
        (
            "Mon Jul 9 14:45:00.005 2012",
            "15m50ns",
            "Mon Jul 9 15:00 2012",
        ),
    ];
    for (start, delay, expected) in tests {
        check(
            start,
            &format!("@every {delay}"),
            expected,
            "constantdelay_test.go TestConstantDelayNext",
        );
    }
}

/// spec_test.go `TestErrors`, parser_test.go `TestRange` (errors, in a field with the same
/// bounds role), `TestStandardSpecSchedule` and `TestParseScheduleErrors` (the ones
/// ParseStandard shares), and `TestSlash0NoHang`.
#[test]
fn robfig_parse_errors() {
    let cases = [
        ("xyz", "expected exactly 5 fields"),
        ("60 0 * * *", "above maximum"),
        ("0 60 * * *", "above maximum"),
        ("0 0 * * XYZ", "failed to parse int from"),
        ("5--5 * * * *", "too many hyphens"),
        ("* * * jan-x *", "failed to parse int from"),
        ("2-x * * * *", "failed to parse int from"),
        ("*/-12 * * * *", "negative number"),
        ("*//2 * * * *", "too many slashes"),
        ("* * 0 * *", "below minimum"),
        ("* * * * 7", "above maximum"),
        ("5-3 * * * *", "beyond end of range"),
        ("*/0 * * * *", "should be a positive number"),
        ("5 j * * *", "failed to parse int from"),
        ("* * * *", "expected exactly 5 fields"),
        ("0 * * * * *", "expected exactly 5 fields"),
        ("@every Xm", "failed to parse duration"),
        ("@unrecognized", "unrecognized descriptor"),
        ("", "empty spec string"),
        (
            "TZ=America/New_York 15/0 * * * *",
            "should be a positive number",
        ),
        ("TZ=Nowhere/Atlantis 0 3 * * *", "provided bad location"),
    ];
    for (spec, want) in cases {
        let e = CronSchedule::parse(spec).expect_err(spec).to_string();
        assert!(e.contains(want), "{spec:?}: {e:?} lacks {want:?}");
    }
    // parser_test.go TestRange, valid ones (bits checked through their ticks).
    for ok in [
        "5-7/2 * * * *",
        "5-7/1 * * * *",
        "* * * * 0",
        "? * * * *",
        "0 0 * * SUN-sat",
    ] {
        CronSchedule::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
}

/// Ticks across DST changes in Europe/Berlin (CRON_TZ, as Velero users write it), worked
/// out from spec.go's algorithm: a 02:30 job skips the spring-forward day; a 02:30 job
/// runs twice on the fall-back day (02:30 CEST and 02:30 CET), like robfig's 1 am New
/// York cases above; an hourly job skips the missing hour.
#[test]
fn berlin_dst() {
    let runs = [
        (
            "2026-03-28T12:00:00+0100",
            "CRON_TZ=Europe/Berlin 30 2 * * *",
            "2026-03-30T02:30:00+0200",
        ),
        (
            "2026-03-29T01:00:00+0100",
            "CRON_TZ=Europe/Berlin 0 * * * *",
            "2026-03-29T03:00:00+0200",
        ),
        (
            "2026-10-25T00:00:00+0200",
            "CRON_TZ=Europe/Berlin 30 2 * * *",
            "2026-10-25T02:30:00+0200",
        ),
        (
            "2026-10-25T02:30:00+0200",
            "CRON_TZ=Europe/Berlin 30 2 * * *",
            "2026-10-25T02:30:00+0100",
        ),
        (
            "2026-10-25T02:30:00+0100",
            "CRON_TZ=Europe/Berlin 30 2 * * *",
            "2026-10-26T02:30:00+0100",
        ),
        (
            "2026-11-28T09:00:00+0000",
            "@daily",
            "2026-11-29T00:00:00+0000",
        ),
        (
            "2026-11-28T09:00:00+0000",
            "CRON_TZ=Europe/Berlin @daily",
            "2026-11-28T23:00:00+0000",
        ),
        (
            "2026-11-28T09:00:00+0000",
            "0 3 * * 1-5",
            "2026-11-30T03:00:00+0000",
        ),
    ];
    for (start, spec, expected) in runs {
        check(start, spec, expected, "Europe/Berlin DST");
    }
}

/// Every row of tests/fixtures/robfig-cron-v3.0.1-next.tsv: robfig v3.0.1's own answers,
/// computed by robfig here (scripts/robfig-truth), for its test tables, edge cases, zones
/// that change clocks at midnight (where robfig's answers are odd, and Velero's are
/// robfig's) and 2,000 random expressions started near DST changes.
#[test]
fn matches_robfig_run_here() {
    let text = testkit::fixtures::read("robfig-cron-v3.0.1-next.tsv");
    let mut checked = 0;
    let mut wrong = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let cols: Vec<&str> = line.split('\t').collect();
        let [id, spec, start, zone, expected] = cols[..] else {
            panic!("bad row {line:?}");
        };
        let start_ts: Timestamp = start.parse().unwrap_or_else(|e| panic!("{id}: {e}"));
        let location = match zone {
            "-" => {
                // Go's time.Parse: "Z" is UTC, "+hh:mm" a fixed zone of that offset.
                match start.strip_suffix('Z') {
                    Some(_) => TimeZone::UTC,
                    None => {
                        let (_, hhmm) = start.split_at(start.len() - 6);
                        let sign = if hhmm.starts_with('-') { -1 } else { 1 };
                        let h: i32 = hhmm[1..3].parse().expect("hh");
                        let m: i32 = hhmm[4..6].parse().expect("mm");
                        TimeZone::fixed(
                            Offset::from_seconds(sign * (h * 3600 + m * 60)).expect("offset"),
                        )
                    }
                }
            }
            name => TimeZone::get(name).unwrap_or_else(|e| panic!("{id}: {e}")),
        };
        let got = match CronSchedule::parse_in(spec, &location) {
            Err(_) => "ERR".to_owned(),
            Ok(s) => match s.next_after(start_ts) {
                None => "ZERO".to_owned(),
                Some(t) => t.to_string(),
            },
        };
        let want = match expected {
            "ERR" | "ZERO" => expected.to_owned(),
            t => t
                .parse::<Timestamp>()
                .unwrap_or_else(|e| panic!("{id}: {e}"))
                .to_string(),
        };
        if got != want {
            wrong.push(format!(
                "{id} {spec:?} from {start}: robfig {want}, ours {got}"
            ));
        }
        checked += 1;
    }
    assert!(checked > 2000, "{checked} rows");
    assert!(
        wrong.is_empty(),
        "{} of {checked} differ:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
