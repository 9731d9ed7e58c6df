//! The dashboard and alert rules under `deploy/` use only metrics a live `sessiond`
//! exposes (promtool checks and tests the rules themselves, in `.ci/run`).
#![cfg(feature = "sessiond")]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Cluster, api, client, create};

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
    create(&client(), &node).await;
    let exposed = api(&client(), &node).metrics().await.unwrap();
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

/// A node stopped on purpose is not missed; one that died is: `sessiond_node_alive` lists
/// the dead one at 0 (its alert fires) and leaves the stopped one out, and the overview
/// tells them apart.
#[tokio::test]
async fn a_node_that_stopped_on_purpose_is_not_missed_and_a_dead_one_is() {
    let cluster = Cluster::sqlite(&["--node-heartbeat-ms", "200", "--node-timeout-secs", "1"]);
    // Stopped as soon as it says it listens: a signal that early stops it gracefully too.
    let mut stopped = cluster.start_bare("stopped");
    stopped.terminate();
    assert!(stopped.exited(Duration::from_secs(30)).await.success());
    let died = cluster.start_bare("died");
    // Its first report is written with its first heartbeats.
    tokio::time::sleep(Duration::from_millis(600)).await;
    died.kill_9();
    let node = cluster.start_bare("live");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics = api(&client(), &node).metrics().await.unwrap();
    assert!(
        metrics.contains("sessiond_node_alive{node=\"live\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sessiond_node_alive{node=\"died\"} 0"),
        "{metrics}"
    );
    assert!(!metrics.contains("node=\"stopped\""), "{metrics}");
    // The development key is the operator's too.
    let nodes = api(&client(), &node)
        .overview()
        .await
        .unwrap()
        .nodes
        .expect("the operator sees nodes");
    let state = |id: &str| {
        let n = nodes.iter().find(|n| n.node == id).expect(id);
        (n.alive, n.stopped)
    };
    assert_eq!(state("live"), (true, false));
    assert_eq!(state("died"), (false, false));
    assert_eq!(state("stopped"), (false, true));
    cluster.finish().await;
}

/// `sessiond --help` names the reason a dead node's sessions end with as the API answers it
/// (`node_lost`), where it once said `orphaned`.
#[test]
fn help_names_the_end_reason_of_a_dead_node_s_sessions() {
    let out = std::process::Command::new(common::SESSIOND)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let flag = help
        .split("--node-timeout-secs")
        .nth(1)
        .expect("the flag is documented");
    let text = flag.split("\n      --").next().unwrap();
    let reason = session_lifecycle::EndReason::NodeLost.as_str();
    assert!(text.contains(reason), "--node-timeout-secs: {text}");
    assert!(!text.contains("orphaned"), "--node-timeout-secs: {text}");
}
