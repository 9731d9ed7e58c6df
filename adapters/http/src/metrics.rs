//! Prometheus metrics: request latency by route and status, and the engine's figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use session_lifecycle_runtime::{DeviceReport, MetricsSnapshot, RELEASE_LATENCY_BUCKETS};

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
    pub fn render(
        &self,
        engine: &MetricsSnapshot,
        active: usize,
        failing: usize,
        devices: &[DeviceReport],
    ) -> String {
        let mut out = String::new();
        let o = &mut out;
        one(
            o,
            "sessiond_sessions_started_total",
            "counter",
            "Sessions started.",
            engine.started,
        );
        family(
            o,
            "sessiond_sessions_ended_total",
            "counter",
            "Sessions ended, by reason.",
        );
        for (reason, n) in &engine.ended {
            let _ = writeln!(
                o,
                "sessiond_sessions_ended_total{{reason=\"{reason}\"}} {n}"
            );
        }
        one(
            o,
            "sessiond_sessions_active",
            "gauge",
            "Started sessions this instance tracks.",
            active,
        );
        one(
            o,
            "sessiond_orphans_found_total",
            "counter",
            "Orphaned sessions the sweeper or timers ended.",
            engine.orphans_found,
        );
        one(
            o,
            "sessiond_presence_writes_total",
            "counter",
            "Store writes of client socket presence this instance made (one when it first holds a session's sockets, one when it lets go; none per ping).",
            engine.presence_writes,
        );
        one(
            o,
            "sessiond_release_failures_total",
            "counter",
            "Release attempts that failed (and are retried).",
            engine.release_failures,
        );
        one(
            o,
            "sessiond_releases_failing",
            "gauge",
            "Resources whose last release attempt on this instance failed and that are still held (retried with backoff; never handed to another session).",
            failing,
        );
        family(
            o,
            "sessiond_store_errors_total",
            "counter",
            "Store calls of this instance that failed, by kind (unavailable: the store could not be reached; other: any other failure).",
        );
        for (kind, n) in [
            ("unavailable", engine.store_unavailable),
            ("other", engine.store_failures),
        ] {
            let _ = writeln!(o, "sessiond_store_errors_total{{kind=\"{kind}\"}} {n}");
        }
        family(
            o,
            "sessiond_gpu_memory_bytes",
            "gauge",
            "GPU memory of this node, by device and state: total, free, used_by_sessions (held by started sessions' processes), promised (to started sessions), not_returned (held by processes of sessions that hold no share any more).",
        );
        for d in devices {
            for (state, n) in [
                ("total", d.total),
                ("free", d.free),
                ("used_by_sessions", d.used_by_sessions),
                ("promised", d.promised),
                ("not_returned", d.not_returned),
            ] {
                let _ = writeln!(
                    o,
                    "sessiond_gpu_memory_bytes{{gpu=\"{}\",state=\"{state}\"}} {n}",
                    d.index
                );
            }
        }
        family(
            o,
            "sessiond_release_duration_seconds",
            "histogram",
            "Time a successful release took.",
        );
        histogram(
            o,
            "sessiond_release_duration_seconds",
            "",
            RELEASE_LATENCY_BUCKETS
                .iter()
                .zip(&engine.release_latency_buckets),
            engine.releases,
            engine.release_latency_sum,
        );
        family(
            o,
            "sessiond_http_request_duration_seconds",
            "histogram",
            "Request latency by route and status.",
        );
        let map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for (route, status, h) in map
            .iter()
            .flat_map(|(route, m)| m.iter().map(move |(status, h)| (route, status, h)))
        {
            histogram(
                o,
                "sessiond_http_request_duration_seconds",
                &format!("route=\"{route}\",status=\"{status}\""),
                REQUEST_BUCKETS.iter().zip(&h.buckets),
                h.count,
                h.sum,
            );
        }
        out
    }
}

/// `text` as a label value of the text format: backslash, double quote and line feed
/// escaped (a node id comes from the store, written by any instance).
fn label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The `HELP` and `TYPE` lines of metric `name`.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A metric of one unlabelled sample.
fn one(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    family(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// The samples of one histogram series with `labels` (`k="v",...`, or empty): cumulative
/// buckets by upper bound, then `+Inf`, sum and count.
fn histogram<'a>(
    out: &mut String,
    name: &str,
    labels: &str,
    buckets: impl Iterator<Item = (&'a f64, &'a u64)>,
    count: u64,
    sum: f64,
) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (bound, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let braced = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braced} {sum}");
    let _ = writeln!(out, "{name}_count{braced} {count}");
}

/// Whether each node the cluster heard from lately is alive (its heartbeat within the node
/// timeout), from the store: every instance reports the same. A node that stopped on
/// purpose with no session left is not listed: its heartbeat is not missed.
pub fn render_nodes(out: &mut String, nodes: &[session_lifecycle_runtime::NodeRow]) {
    family(
        out,
        "sessiond_node_alive",
        "gauge",
        "Nodes heard from in the last hour, cluster-wide: 1 if its heartbeat is within the node timeout, 0 if it is missing (nodes stopped on purpose with no session left are not listed).",
    );
    for n in nodes {
        let report = n.last_report();
        if !n.alive && report.is_some_and(|r| r.stopped && r.sessions == 0) {
            continue;
        }
        let node = label_value(&n.node);
        let _ = writeln!(
            out,
            "sessiond_node_alive{{node=\"{node}\"}} {}",
            u8::from(n.alive)
        );
    }
}

/// What the outbound webhooks add to the metrics: the cluster's deliveries by status (from
/// the store, so every instance reports the same), the age of the oldest pending one, and
/// this instance's attempts.
#[derive(Debug, Clone, Copy, Default)]
pub struct WebhookFigures {
    /// Deliveries by status, cluster-wide.
    pub counts: session_lifecycle_runtime::DeliveryCounts,
    /// Seconds since the oldest pending delivery was fanned out (0: none pending).
    pub oldest_pending_secs: f64,
    /// This instance's attempts answered 2xx.
    pub delivered_attempts: u64,
    /// This instance's failed attempts.
    pub failed_attempts: u64,
    /// Deliveries this instance gave up.
    pub given_up: u64,
}

/// The Prometheus text of the outbound webhooks' figures.
pub fn render_webhooks(out: &mut String, w: &WebhookFigures) {
    family(
        out,
        "sessiond_webhook_deliveries",
        "gauge",
        "Webhook deliveries by status, cluster-wide (retrying: pending after a failed attempt).",
    );
    for (status, n) in [
        ("pending", w.counts.pending),
        ("retrying", w.counts.retrying),
        ("delivered", w.counts.delivered),
        ("failed", w.counts.failed),
    ] {
        let _ = writeln!(
            out,
            "sessiond_webhook_deliveries{{status=\"{status}\"}} {n}"
        );
    }
    one(
        out,
        "sessiond_webhook_oldest_pending_seconds",
        "gauge",
        "Age of the oldest pending webhook delivery (0 when none is pending).",
        w.oldest_pending_secs,
    );
    family(
        out,
        "sessiond_webhook_attempts_total",
        "counter",
        "Webhook delivery attempts made by this instance, by result.",
    );
    let _ = writeln!(
        out,
        "sessiond_webhook_attempts_total{{result=\"delivered\"}} {}",
        w.delivered_attempts
    );
    let _ = writeln!(
        out,
        "sessiond_webhook_attempts_total{{result=\"failed\"}} {}",
        w.failed_attempts
    );
    one(
        out,
        "sessiond_webhook_given_up_total",
        "counter",
        "Webhook deliveries this instance marked failed after the retry period.",
        w.given_up,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_escape_what_the_text_format_requires() {
        assert_eq!(label_value("plain:8080"), "plain:8080");
        assert_eq!(label_value("a\nb\"c\\"), "a\\nb\\\"c\\\\");
    }
}
