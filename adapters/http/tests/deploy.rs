//! The dashboard and alert rules under `deploy/` use only metrics a live `sessiond`
//! exposes (promtool checks and tests the rules themselves, in `.ci/run`).

mod common;

use std::collections::BTreeSet;

use common::{Cluster, KEY, client};

/// Every `sessiond_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("sessiond_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_use_metrics_sessiond_exposes() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");
    let mut used = BTreeSet::new();
    for file in ["grafana/sessiond.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).expect("deploy file");
        used.extend(metric_names(&text));
    }
    assert!(used.len() >= 10, "{used:?}");
    let cluster = Cluster::sqlite(&[]);
    let node = cluster.start_bare("a");
    // One request and one session, so that labelled series have samples.
    let resp = client()
        .post(node.url("/v1/sessions"))
        .header("x-api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let exposed = client()
        .get(node.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // A histogram's samples carry suffixes; its family is declared by name.
    let families: BTreeSet<String> = exposed
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            !families.contains(family) && !families.contains(name.as_str())
        })
        .collect();
    assert!(missing.is_empty(), "not exposed: {missing:?}\n{exposed}");
    cluster.finish().await;
}
