//! Prometheus metrics: request latency by route and status, and the engine's figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use session_lifecycle_runtime::{MetricsSnapshot, RELEASE_LATENCY_BUCKETS};

/// Upper bounds (seconds) of the request latency histogram's buckets.
const REQUEST_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; REQUEST_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Request latency histograms by route and status.
#[derive(Default)]
pub struct HttpMetrics {
    requests: Mutex<BTreeMap<String, BTreeMap<u16, Histogram>>>,
}

impl HttpMetrics {
    /// Records one request to `route` answered `status` after `took`.
    pub fn observe(&self, route: &str, status: u16, took: Duration) {
        let secs = took.as_secs_f64();
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        // No allocation once a route has been seen.
        let by_status = match map.get_mut(route) {
            Some(m) => m,
            None => map.entry(route.to_owned()).or_default(),
        };
        let h = by_status.entry(status).or_default();
        h.count += 1;
        h.sum += secs;
        for (i, bound) in REQUEST_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.buckets[i] += 1;
            }
        }
    }

    /// The Prometheus text exposition of the engine's and the requests' metrics.
    pub fn render(&self, engine: &MetricsSnapshot, active: usize, failing: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP sessiond_sessions_started_total Sessions started."
        );
        let _ = writeln!(out, "# TYPE sessiond_sessions_started_total counter");
        let _ = writeln!(out, "sessiond_sessions_started_total {}", engine.started);
        let _ = writeln!(
            out,
            "# HELP sessiond_sessions_ended_total Sessions ended, by reason."
        );
        let _ = writeln!(out, "# TYPE sessiond_sessions_ended_total counter");
        for (reason, n) in &engine.ended {
            let _ = writeln!(
                out,
                "sessiond_sessions_ended_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP sessiond_sessions_active Started sessions this instance tracks."
        );
        let _ = writeln!(out, "# TYPE sessiond_sessions_active gauge");
        let _ = writeln!(out, "sessiond_sessions_active {active}");
        let _ = writeln!(
            out,
            "# HELP sessiond_orphans_found_total Orphaned sessions the sweeper or timers ended."
        );
        let _ = writeln!(out, "# TYPE sessiond_orphans_found_total counter");
        let _ = writeln!(out, "sessiond_orphans_found_total {}", engine.orphans_found);
        let _ = writeln!(
            out,
            "# HELP sessiond_presence_writes_total Store writes of client socket presence this instance made (one when it first holds a session's sockets, one when it lets go; none per ping)."
        );
        let _ = writeln!(out, "# TYPE sessiond_presence_writes_total counter");
        let _ = writeln!(
            out,
            "sessiond_presence_writes_total {}",
            engine.presence_writes
        );
        let _ = writeln!(
            out,
            "# HELP sessiond_release_failures_total Release attempts that failed (and are retried)."
        );
        let _ = writeln!(out, "# TYPE sessiond_release_failures_total counter");
        let _ = writeln!(
            out,
            "sessiond_release_failures_total {}",
            engine.release_failures
        );
        let _ = writeln!(
            out,
            "# HELP sessiond_releases_failing Resources whose last release attempt on this instance failed and that are still held (retried with backoff; never handed to another session)."
        );
        let _ = writeln!(out, "# TYPE sessiond_releases_failing gauge");
        let _ = writeln!(out, "sessiond_releases_failing {failing}");
        let _ = writeln!(
            out,
            "# HELP sessiond_release_duration_seconds Time a successful release took."
        );
        let _ = writeln!(out, "# TYPE sessiond_release_duration_seconds histogram");
        for (i, bound) in RELEASE_LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "sessiond_release_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                engine.release_latency_buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "sessiond_release_duration_seconds_bucket{{le=\"+Inf\"}} {}",
            engine.releases
        );
        let _ = writeln!(
            out,
            "sessiond_release_duration_seconds_sum {}",
            engine.release_latency_sum
        );
        let _ = writeln!(
            out,
            "sessiond_release_duration_seconds_count {}",
            engine.releases
        );
        let _ = writeln!(
            out,
            "# HELP sessiond_http_request_duration_seconds Request latency by route and status."
        );
        let _ = writeln!(
            out,
            "# TYPE sessiond_http_request_duration_seconds histogram"
        );
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for (route, status, h) in map
            .iter()
            .flat_map(|(route, m)| m.iter().map(move |(status, h)| (route, status, h)))
        {
            let labels = format!("route=\"{route}\",status=\"{status}\"");
            for (i, bound) in REQUEST_BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "sessiond_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "sessiond_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "sessiond_http_request_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "sessiond_http_request_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
        out
    }
}
