//! Crash recovery: the engine runs in a child process that is killed with SIGKILL at
//! random points while it starts and ends sessions, then restarted on the same file.
//!
//! Checks: every end acknowledged before a kill is still ended with the same `ended_at`;
//! every resource ends up released exactly once (the file ledger of `common`, kept
//! outside the engine); `PRAGMA integrity_check` is `ok`. And after every kill, usage: the
//! `usage.recorded` events in the outbox, taken as a billing receiver takes them
//! (deduplicated by identifier, a correction replacing what it names), add up for every
//! session to exactly its billable time by its record (an ended one's interval, a running
//! one's closed periods): 0 ms lost, 0 ms counted twice. Usage periods are 1 s long here,
//! and some sessions run for a few of them.
//!
//! Cycles: `CRASH_CYCLES` (default 25; CI runs 200). The long run:
//! `CRASH_CYCLES=2000 cargo test --release -p session-lifecycle-sqlite --test crash`

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::FileBackend;
use session_lifecycle::{EndReason, SessionId, Status};
use session_lifecycle_runtime::{Engine, EngineConfig, ListQuery, Plan, StartRequest, SystemClock};
use session_lifecycle_sqlite::SqliteStore;

const CHILD_ENV: &str = "CRASH_CHILD_DIR";

fn request() -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: "crash".into(),
        plan: Plan::new(None, Duration::from_secs(3600)),
        duration: None,
        metadata: None,
        room: None,
        timeouts: Default::default(),
        resources: Default::default(),
    }
}

async fn open(dir: &std::path::Path) -> (Engine, Arc<FileBackend>, SqliteStore) {
    let files = FileBackend::new(dir);
    let store = SqliteStore::open(dir.join("engine.db")).unwrap();
    let engine = Engine::open(
        Arc::new(store.clone()),
        vec![files.clone()],
        Arc::new(SystemClock),
        EngineConfig {
            usage_period: Duration::from_secs(1),
            node_heartbeat: Duration::from_millis(100),
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap();
    (engine, files, store)
}

/// The child: runs the engine with its background tasks and ends sessions as fast as it
/// can, several at once, printing `ACK <id> <ended_at ms>` after each acknowledged end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of crash_recovery; it runs only when that test starts it"]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (engine, _files, _store) = open(std::path::Path::new(&dir)).await;
    let _background = engine.spawn_background();
    println!("READY");
    let mut workers = Vec::new();
    // Sessions that run across usage periods (1 s here) before they end.
    for lingering in 0..2u64 {
        let engine = engine.clone();
        workers.push(tokio::spawn(async move {
            let mut n = lingering;
            loop {
                let Ok(record) = engine.start(request()).await else {
                    continue;
                };
                n += 1;
                tokio::time::sleep(Duration::from_millis(300 + (n * 677) % 2500)).await;
                let id = *record.session.id();
                if let Ok(ended) = engine.end(Some("crash"), id, EndReason::Requested).await {
                    let at = ended.session.ended_at().unwrap().as_millis();
                    println!("ACK {id} {at}");
                }
            }
        }));
    }
    for _ in 0..4 {
        let engine = engine.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let Ok(record) = engine.start(request()).await else {
                    continue;
                };
                let id = *record.session.id();
                if let Ok(ended) = engine.end(Some("crash"), id, EndReason::Requested).await {
                    let at = ended.session.ended_at().unwrap().as_millis();
                    println!("ACK {id} {at}");
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_recovery() {
    let cycles: u32 = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: HashMap<SessionId, u64> = HashMap::new();
    let mut receiver = UsageReceiver::default();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(std::process::id());
    for cycle in 0..cycles {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Wait for it to be up, then let it work for a random 5 to 100 ms.
        let up = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                // The test harness may print its own words before ours on a line.
                Ok(line) if line.ends_with("READY") => break,
                Ok(_) => {}
                Err(e) => panic!("cycle {cycle}: child never got ready: {e}"),
            }
            assert!(up.elapsed() < Duration::from_secs(30));
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(5 + seed % 96));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        for line in rx.try_iter() {
            if let Some((_, rest)) = line.split_once("ACK ") {
                let (id, at) = rest.split_once(' ').unwrap();
                acked.insert(SessionId::parse(id).unwrap(), at.parse().unwrap());
            }
        }
        receiver.check_after_crash(dir.path(), cycle).await;
    }
    assert!(
        receiver.across_periods() > 0,
        "no session's usage was recorded across periods"
    );

    // Restart once more, in this process, and let it settle.
    let (engine, files, store) = open(dir.path()).await;
    let mut started = Vec::new();
    let mut before = None;
    loop {
        let page = engine
            .list(ListQuery {
                tenant: None,
                status: Some(Status::Started),
                limit: 1000,
                before,
                node: None,
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        before = Some(*last.session.id());
        started.extend(page);
    }
    for r in &started {
        engine
            .end(None, *r.session.id(), EndReason::Shutdown)
            .await
            .unwrap();
    }
    engine.run_due().await.unwrap();

    assert!(!acked.is_empty(), "the children acknowledged no end at all");
    for (id, at) in &acked {
        let r = engine.get(None, *id).await.unwrap();
        assert_eq!(r.session.status(), Status::Ended, "{id} lost its end");
        assert_eq!(
            r.session.ended_at().unwrap().as_millis(),
            *at,
            "{id} ended_at changed"
        );
    }
    // Every session, page by page.
    let mut all = Vec::new();
    let mut before = None;
    loop {
        let page = engine
            .list(ListQuery {
                tenant: None,
                status: None,
                limit: 1000,
                before,
                node: None,
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        before = Some(*last.session.id());
        all.extend(page);
    }
    for r in &all {
        assert!(
            r.session.is_fully_released(),
            "{} not fully released",
            r.session.id()
        );
    }
    if !files.still_held().is_empty() {
        for h in files.still_held() {
            let owner =
                std::fs::read_to_string(dir.path().join("held").join(h.to_string())).unwrap();
            let r = engine
                .get(None, SessionId::parse(&owner).unwrap())
                .await
                .unwrap();
            eprintln!("leaked {h}: {r:?}");
        }
    }
    common::assert_released_once_after_crashes(&files);
    assert_eq!(store.integrity_check().await.unwrap(), "ok");
    println!(
        "{cycles} kill -9 cycles: {} sessions, {} acknowledged ends kept, {} resources released once, \
         {} usage events taken ({} sessions across several periods), 0 ms lost or counted twice",
        all.len(),
        acked.len(),
        files.released().len(),
        receiver.received.len(),
        receiver.across_periods()
    );
}

/// A billing system's view of the exported usage: every `usage.recorded` event of the
/// outbox taken once by its record's identifier, a correction replacing what it names.
#[derive(Default)]
struct UsageReceiver {
    /// Identifier -> (session, billable ms, identifier it corrects).
    received: HashMap<String, (SessionId, u64, Option<String>)>,
    /// The events taken so far, by session and sequence.
    seen: std::collections::HashSet<(SessionId, u32)>,
    /// Per session, how many spans (periods) its usage was recorded in.
    spans_of: HashMap<SessionId, u32>,
}

impl UsageReceiver {
    fn across_periods(&self) -> usize {
        self.spans_of.values().filter(|n| **n > 1).count()
    }

    async fn check_after_crash(&mut self, dir: &std::path::Path, cycle: u32) {
        use session_lifecycle::EventKind;
        use session_lifecycle::usage::Interval;
        use session_lifecycle_runtime::EventOutbox;
        use session_lifecycle_runtime::usage::UsageLedger;

        let store = SqliteStore::open(dir.join("engine.db")).unwrap();
        // Nothing delivers in this run: every event ever written is still in the outbox.
        let events = store.undispatched_events(u32::MAX).await.unwrap();
        let mut records_of = HashMap::new();
        for event in &events {
            let EventKind::UsageRecorded(seq) = event.kind else {
                continue;
            };
            if !self.seen.insert((event.session, seq)) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = records_of.entry(event.session) {
                e.insert(store.session_usage(event.session).await.unwrap());
            }
            let record = records_of[&event.session]
                .iter()
                .find(|r| r.seq == seq)
                .unwrap_or_else(|| panic!("cycle {cycle}: an event without its record"));
            let first = self
                .received
                .insert(
                    record.id.clone(),
                    (event.session, record.millis(), record.corrects.clone()),
                )
                .is_none();
            assert!(first, "cycle {cycle}: two events of one record");
            if record.revision == 1 {
                *self.spans_of.entry(event.session).or_default() += 1;
            }
        }
        let states = store
            .usage_states(
                session_lifecycle::Timestamp::from_millis(0),
                session_lifecycle::Timestamp::from_millis(u64::MAX / 2),
                None,
                u32::MAX,
            )
            .await
            .unwrap();
        let corrected: std::collections::HashSet<&String> = self
            .received
            .values()
            .filter_map(|(_, _, c)| c.as_ref())
            .collect();
        let mut counted: HashMap<SessionId, u64> = HashMap::new();
        for (id, (session, ms, _)) in &self.received {
            if !corrected.contains(id) {
                *counted.entry(*session).or_default() += ms;
            }
        }
        for state in states.iter().map(|usage| usage.state.as_ref().unwrap()) {
            // What its record says it owes: an ended session's billable interval, a
            // running one's billable part up to its last closed period.
            let owed = state
                .target(state.closed_to)
                .map_or(0, |i: Interval| i.millis());
            let got = counted.get(&state.session).copied().unwrap_or(0);
            assert_eq!(
                got, owed,
                "cycle {cycle}: session {} exported {got} ms for {owed} ms billable",
                state.session
            );
        }
    }
}
