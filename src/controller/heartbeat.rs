//! What the controller's loop and watches report, for its probes (`/readyz`,
//! `/healthz`); the judgement is `policy::liveness`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::policy::liveness::{self, Deadlines, LoopFacts};

pub struct Heartbeat {
    deadlines: Deadlines,
    state: Mutex<State>,
    /// Whether `state.failing` has any entry: a watch event takes the lock only then.
    any_failing: AtomicBool,
}

#[derive(Default)]
struct State {
    leading_since: Option<Instant>,
    listed: bool,
    last_pass: Option<Instant>,
    /// Watch → (first failure, last failure) since its last success.
    failing: HashMap<&'static str, (Instant, Instant)>,
}

impl Heartbeat {
    /// `pass`: the longest a leader's pass may take to finish before it is not live
    /// (`--pass-deadline`); a watch failing without a break is given as long.
    pub fn new(pass: Duration) -> Self {
        Self::with_deadlines(Deadlines {
            pass,
            watch: pass,
            // kube-runtime's default back-off retries within ~30 s.
            retrying: Duration::from_secs(120),
        })
    }

    pub fn with_deadlines(deadlines: Deadlines) -> Self {
        Self {
            deadlines,
            state: Mutex::default(),
            any_failing: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leading from now (a new term: watches list again), or no longer leading.
    pub fn leading(&self, leading: bool) {
        let mut state = self.state();
        *state = State {
            leading_since: leading.then(Instant::now),
            ..State::default()
        };
        self.any_failing.store(false, Ordering::Release);
    }

    /// Every watch has listed.
    pub fn listed(&self) {
        self.state().listed = true;
    }

    /// A reconcile pass finished.
    pub fn passed(&self) {
        self.state().last_pass = Some(Instant::now());
    }

    pub fn watch_failed(&self, watch: &'static str) {
        let now = Instant::now();
        let mut state = self.state();
        let episode = state.failing.entry(watch).or_insert((now, now));
        // A watch that recovered by watching again says so with no event of its own (a
        // quiet resource): a failure long after the last one starts a new episode.
        if now.duration_since(episode.1) > self.deadlines.retrying {
            episode.0 = now;
        }
        episode.1 = now;
        self.any_failing.store(true, Ordering::Release);
    }

    pub fn watch_ok(&self, watch: &'static str) {
        if !self.any_failing.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.state();
        state.failing.remove(watch);
        self.any_failing
            .store(!state.failing.is_empty(), Ordering::Release);
    }

    fn facts(&self) -> LoopFacts {
        let state = self.state();
        let now = Instant::now();
        LoopFacts {
            leading_for: state.leading_since.map(|t| now - t),
            listed: state.listed,
            last_pass: state.last_pass.map(|t| now - t),
            failing: state
                .failing
                .iter()
                .map(|(w, (first, last))| (*w, now - *first, now - *last))
                .collect(),
        }
    }

    /// Why `/readyz` should fail, if it should.
    pub fn not_ready(&self) -> Option<String> {
        liveness::not_ready(&self.facts())
    }

    /// Why `/healthz` should fail (restart me), if it should.
    pub fn not_live(&self) -> Option<String> {
        liveness::not_live(&self.facts(), &self.deadlines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::webhook::{Health, ops_router};
    use axum::body::Body;
    use http_body_util::BodyExt;
    use std::sync::Arc;
    use tower::ServiceExt;

    /// `(status, body)` of `GET path` on the controller's operations router.
    async fn probe(heartbeat: &Arc<Heartbeat>, path: &str) -> (u16, String) {
        let mut health = Health::new(None, Vec::new());
        health.heartbeat = Some(heartbeat.clone());
        let router = ops_router(health, Arc::new(Metrics::for_controller()));
        let request = axum::http::Request::get(path)
            .body(Body::empty())
            .expect("request");
        let response = router.oneshot(request).await.expect("infallible");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("body");
        (
            status,
            String::from_utf8_lossy(&body.to_bytes()).into_owned(),
        )
    }

    const SHORT: Duration = Duration::from_millis(300);

    fn short() -> Arc<Heartbeat> {
        Arc::new(Heartbeat::with_deadlines(Deadlines {
            pass: SHORT,
            watch: SHORT,
            retrying: Duration::from_secs(60),
        }))
    }

    #[tokio::test]
    async fn a_wedged_loop_fails_the_liveness_probe() {
        let heartbeat = short();
        // A standby replica: nothing to list, nothing to do.
        assert_eq!(probe(&heartbeat, "/readyz").await.0, 200);
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200);
        tokio::time::sleep(SHORT * 2).await;
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200, "standby");
        // Leading: not ready until the watches list.
        heartbeat.leading(true);
        let (status, body) = probe(&heartbeat, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("watches have not listed"), "{body}");
        heartbeat.listed();
        heartbeat.passed();
        assert_eq!(probe(&heartbeat, "/readyz").await.0, 200);
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200);
        // Passes keep coming: live.
        for _ in 0..3 {
            tokio::time::sleep(SHORT / 2).await;
            heartbeat.passed();
            assert_eq!(probe(&heartbeat, "/healthz").await.0, 200);
        }
        // The loop wedges: no pass within the deadline.
        tokio::time::sleep(SHORT * 2).await;
        let (status, body) = probe(&heartbeat, "/healthz").await;
        assert_eq!(status, 503);
        assert!(body.contains("no reconcile pass finished"), "{body}");
        // Not ready either, for the same reason (as the webhook's failed tasks).
        let (status, body) = probe(&heartbeat, "/readyz").await;
        assert_eq!(status, 503);
        assert!(body.contains("no reconcile pass finished"), "{body}");
        // Another term starts the clock again; losing the Lease makes it a standby.
        heartbeat.leading(true);
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200);
        heartbeat.leading(false);
        tokio::time::sleep(SHORT * 2).await;
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200);
    }

    #[tokio::test]
    async fn a_watch_broken_past_the_deadline_fails_the_liveness_probe() {
        let heartbeat = short();
        heartbeat.leading(true);
        heartbeat.listed();
        heartbeat.watch_failed("pods");
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200, "just failed");
        // Failing again and again, passes still finishing (on the store's last state).
        for _ in 0..4 {
            tokio::time::sleep(SHORT / 2).await;
            heartbeat.passed();
            heartbeat.watch_failed("pods");
        }
        let (status, body) = probe(&heartbeat, "/healthz").await;
        assert_eq!(status, 503);
        assert!(body.contains("the pods watch has been failing"), "{body}");
        // One event through: the watch works again.
        heartbeat.watch_ok("pods");
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200);
        // Another watch's success does not clear one that still fails.
        heartbeat.watch_failed("claims");
        tokio::time::sleep(SHORT * 2).await;
        heartbeat.passed();
        heartbeat.watch_failed("claims");
        heartbeat.watch_ok("pods");
        let (status, body) = probe(&heartbeat, "/healthz").await;
        assert_eq!(status, 503);
        assert!(body.contains("the claims watch"), "{body}");
    }

    /// A watch that failed once and recovered without an event (it watched again, and its
    /// resource is quiet) must not count as failing since then when it fails once more.
    #[tokio::test]
    async fn a_new_failure_long_after_the_last_is_a_new_episode() {
        let heartbeat = Arc::new(Heartbeat::with_deadlines(Deadlines {
            pass: Duration::from_secs(900),
            watch: SHORT,
            retrying: SHORT,
        }));
        heartbeat.leading(true);
        heartbeat.listed();
        heartbeat.passed();
        heartbeat.watch_failed("restores");
        tokio::time::sleep(SHORT * 3).await;
        heartbeat.passed();
        heartbeat.watch_failed("restores");
        assert_eq!(probe(&heartbeat, "/healthz").await.0, 200, "a new episode");
    }
}
