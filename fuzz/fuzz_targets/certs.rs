//! The certificate keeper's decision from what its Secrets' annotations and certificates
//! say, taken from arbitrary bytes: times as the annotations hold them (RFC 3339 text,
//! which may not parse, or lie far in the past or the future) and validities. The
//! decision must never panic and never wait for a time that has passed; the retry
//! back-off stays within its bounds.
#![no_main]

use jiff::{SignedDuration, Timestamp};
use libfuzzer_sys::fuzz_target;
use velero_jupyterhub::policy::certs::{self, CertOptions, CertState, CertStep, Serving, Validity};

struct Input<'a> {
    bytes: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.bytes.split_first() else {
            return 0;
        };
        self.bytes = rest;
        b
    }
    fn offset(&mut self) -> SignedDuration {
        let raw = i32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()]);
        SignedDuration::from_secs(i64::from(raw) * 64)
    }
    /// An annotation's value as text, read as `Cas::read` reads it (a time, or nothing).
    fn annotation(&mut self) -> Option<Timestamp> {
        let end = self.bytes.iter().position(|&b| b == b'\n').unwrap_or(self.bytes.len());
        let (line, rest) = self.bytes.split_at(end);
        self.bytes = rest.get(1..).unwrap_or_default();
        std::str::from_utf8(line).ok()?.parse().ok()
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input { bytes: data };
    let Ok(now) = "2026-12-07T10:00:00Z".parse::<Timestamp>() else {
        return;
    };
    let at = |input: &mut Input<'_>| now.checked_add(input.offset()).unwrap_or(now);
    let validity = |input: &mut Input<'_>| {
        let a = at(input);
        let b = at(input);
        Validity { not_before: a.min(b), not_after: a.max(b) }
    };
    let current = (input.byte() % 4 != 0).then(|| validity(&mut input));
    let next_validity = (input.byte() % 2 == 0).then(|| validity(&mut input));
    let introduced = input.annotation().unwrap_or(Timestamp::UNIX_EPOCH);
    let promoted = input.annotation();
    let serving = (input.byte() % 4 != 0).then(|| Serving {
        validity: validity(&mut input),
        signed_by_current: input.byte() % 3 != 0,
        names_match: input.byte() % 3 != 0,
    });
    let state = CertState {
        current,
        next: next_validity.map(|v| (v, introduced)),
        previous: promoted,
        serving,
        bundle_in_place_since: (input.byte() % 3 != 0).then(|| at(&mut input)),
        orphan_trusted: input.byte() % 2 == 0,
    };
    let opts = CertOptions::default();
    if let CertStep::Wait { until } = certs::next_step(&state, now, &opts) {
        assert!(until > now, "waits for a time that has passed: {until} ({state:?})");
    }
    let n = u32::from_le_bytes([input.byte(), input.byte(), input.byte(), input.byte()]);
    let wait = certs::retry_after(n);
    assert!((5..=300).contains(&wait.as_secs()), "{n}: {wait:?}");
});
