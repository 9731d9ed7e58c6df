//! Usage a bill can trust, tried from outside: 1,000 sessions with random start, ready and
//! end times (some never ready, some ended by each reason, some lost with their node after
//! periods were closed, some running across several periods) are recorded by a real store
//! (SQLite, and PostgreSQL with `SESSION_LIFECYCLE_PG_URL`), and `GET /v1/usage` is asked
//! for random ranges and groupings by each tenant and by an operator. Every answer must
//! equal, to the millisecond, a reference computation written here from the contract's
//! billing rules (not from the library's), and a tenant never sees another's sessions.
//! `USAGE_SEED` picks the random run (default 7).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;
use session_lifecycle::{EndReason, SessionId, Timestamp};
use session_lifecycle_http::tenants::{Tenants, hash_key};
use session_lifecycle_http::tokens::TokenSigner;
use session_lifecycle_http::{AppState, HttpConfig, router};
use session_lifecycle_postgres::testing::{TestDb, pg_url};
use session_lifecycle_runtime::usage::reconcile_session;
use session_lifecycle_runtime::{Engine, EngineConfig, ManualClock, NewSession, Store};

const SESSIONS: usize = 1000;
const RANGES: usize = 40;
const PERIOD_MS: u64 = 300_000;
const TICK_MS: u64 = 60_000;
const HORIZON_MS: u64 = 4 * 3_600_000;
const LOST_NODES: usize = 12;
const MINUTE: u64 = 60_000;
/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;

/// xorshift64*: a small deterministic generator, so that a failing seed can be rerun.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Debug, Clone)]
struct Planned {
    id: SessionId,
    tenant: &'static str,
    node: String,
    start: u64,
    ready: Option<u64>,
    /// When and why it ends (within the horizon), if it does.
    end: Option<(u64, EndReason)>,
}

/// A lost node: its last heartbeat and when it is declared dead (its sessions end then).
#[derive(Debug, Clone, Copy)]
struct LostNode {
    last_heartbeat: u64,
    dies: u64,
}

/// The two tenants' rules, as the tenants file below gives them.
fn rule_of(tenant: &str) -> (bool, bool) {
    // (meter from ready, round up to the minute)
    match tenant {
        "alpha" => (true, false),
        _ => (false, true),
    }
}

fn plan(rng: &mut Rng, count: usize) -> (Vec<Planned>, Vec<LostNode>) {
    let lost: Vec<LostNode> = (0..LOST_NODES)
        .map(|_| {
            let last_heartbeat = 1_800_000 + rng.below(HORIZON_MS - 2_400_000);
            // Dies between one and eleven minutes after its last sign of life: periods
            // closed meanwhile went past the moment it was last seen.
            LostNode {
                last_heartbeat,
                dies: last_heartbeat + MINUTE + rng.below(10 * MINUTE),
            }
        })
        .collect();
    let reasons: Vec<EndReason> = EndReason::ALL
        .into_iter()
        .filter(|r| *r != EndReason::NodeLost)
        .collect();
    let mut sessions = Vec::new();
    for i in 0..count {
        let tenant = if rng.chance(50) { "alpha" } else { "beta" };
        let on_lost = rng.chance(8);
        let (node, start, end) = if on_lost {
            let k = rng.below(LOST_NODES as u64) as usize;
            let n = lost[k];
            let start = rng.below(n.dies);
            (
                format!("lost-{k}"),
                start,
                Some((n.dies, EndReason::NodeLost)),
            )
        } else {
            let start = rng.below(HORIZON_MS - 30 * MINUTE);
            let end = if rng.chance(80) {
                let at = start + rng.below(90 * MINUTE);
                let reason = reasons[rng.below(reasons.len() as u64) as usize];
                (at < HORIZON_MS).then_some((at, reason))
            } else {
                None
            };
            ("local".to_owned(), start, end)
        };
        let ready = match rng.below(10) {
            0..=5 => Some(start + rng.below(60_000)),
            // Late: after periods were closed from its start.
            6 | 7 => Some(start + rng.below(25 * MINUTE)),
            _ => None,
        };
        sessions.push(Planned {
            id: SessionId::from_ulid_parts(Timestamp::from_millis(T0 + start), i as u128 + 1),
            tenant,
            node,
            start,
            ready,
            end,
        });
    }
    (sessions, lost)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Create(usize),
    Ready(usize),
    End(usize),
    NodeDies(usize),
    Tick,
}

/// The billable interval the contract gives a session once the run is over, in ms since
/// T0, written from the rules themselves: the meter starts at its readiness report under
/// `ready` (at its start without one, or under `started`); it stops at its end, except
/// that a failed start is never billed and a session lost with its node is billed up to
/// the node's last heartbeat; minute rounding applies to ended sessions, except the ends
/// that are our failures (`node_lost`, `shutdown`); a running session counts up to its
/// last closed period.
fn reference(
    s: &Planned,
    lost: &[LostNode],
    last_seen: &HashMap<SessionId, u64>,
    closed_to: u64,
) -> Option<(u64, u64)> {
    let (from_ready, minute) = rule_of(s.tenant);
    let ready = s
        .ready
        .filter(|r| s.end.is_none_or(|(at, _)| *r <= at.max(s.start)));
    let from = match (from_ready, ready) {
        (true, Some(r)) => r,
        _ => s.start,
    };
    let to = match s.end {
        None => closed_to,
        Some((_, EndReason::StartFailed)) => return None,
        Some((at, EndReason::NodeLost)) => {
            let k: usize = s.node.trim_start_matches("lost-").parse().unwrap();
            at.min(
                last_seen
                    .get(&s.id)
                    .copied()
                    .unwrap_or(lost[k].last_heartbeat),
            )
        }
        Some((at, _)) => at,
    };
    if to <= from {
        return None;
    }
    let rounds = minute
        && s.end
            .is_some_and(|(_, r)| !matches!(r, EndReason::NodeLost | EndReason::Shutdown));
    let to = if rounds {
        from + (to - from).div_ceil(MINUTE) * MINUTE
    } else {
        to
    };
    Some((from, to))
}

fn within((from, to): (u64, u64), a: u64, b: u64) -> u64 {
    to.min(b).saturating_sub(from.max(a))
}

struct Service {
    base: String,
    store: Arc<dyn Store>,
}

async fn serve(store: Arc<dyn Store>) -> Service {
    let text = format!(
        "operator_keys_sha256 = [\"{}\"]\n\
         [[tenants]]\nname = \"alpha\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 5000\nmax_session_secs = 86400\n\
         billing = {{ meter = \"ready\", rounding = \"second\" }}\n\
         [[tenants]]\nname = \"beta\"\napi_key_sha256 = \"{}\"\nmax_concurrent_sessions = 5000\nmax_session_secs = 86400\n\
         billing = {{ meter = \"started\", rounding = \"minute\" }}\n",
        hash_key("key-operator"),
        hash_key("key-alpha"),
        hash_key("key-beta"),
    );
    let tenants = Tenants::from_toml(&text).unwrap();
    let engine = Engine::open(
        store.clone(),
        vec![],
        Arc::new(ManualClock::new(Timestamp::from_millis(T0))),
        EngineConfig::default(),
    )
    .await
    .unwrap();
    let state = AppState::new(
        engine,
        tenants,
        TokenSigner::new([3; 32]),
        HttpConfig::default(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router(state)).await.unwrap() });
    Service { base, store }
}

fn rfc3339(ms: u64) -> String {
    let t = Timestamp::from_millis(T0 + ms);
    let mut buf = [0u8; 20];
    let secs = t.format_rfc3339(&mut buf).trim_end_matches('Z').to_owned();
    format!("{secs}.{:03}Z", (T0 + ms) % 1000)
}

async fn usage(base: &str, key: &str, query: &str) -> (StatusCode, Value) {
    let response = reqwest::Client::new()
        .get(format!("{base}/v1/usage?{query}"))
        .header("x-api-key", key)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap())
}

/// Records the planned sessions through the store, step by step in time order, closing
/// usage periods every minute as each live node's engine would.
async fn record(store: &Arc<dyn Store>, sessions: &[Planned], lost: &[LostNode]) -> u64 {
    let mut steps: Vec<(u64, Step)> = Vec::new();
    for (i, s) in sessions.iter().enumerate() {
        steps.push((s.start, Step::Create(i)));
        if let Some(r) = s.ready {
            steps.push((r, Step::Ready(i)));
        }
        if let Some((at, reason)) = s.end
            && reason != EndReason::NodeLost
        {
            steps.push((at, Step::End(i)));
        }
    }
    for (k, n) in lost.iter().enumerate() {
        steps.push((n.dies, Step::NodeDies(k)));
    }
    let mut t = TICK_MS;
    while t <= HORIZON_MS {
        steps.push((t, Step::Tick));
        t += TICK_MS;
    }
    steps.sort();
    let at = |ms: u64| Timestamp::from_millis(T0 + ms);
    let period = Duration::from_millis(PERIOD_MS);
    let mut last_tick = 0;
    for (t, step) in steps {
        match step {
            Step::Create(i) => {
                let s = &sessions[i];
                let (from_ready, minute) = rule_of(s.tenant);
                let billing = session_lifecycle::usage::BillingRule {
                    meter: if from_ready {
                        session_lifecycle::usage::MeterStart::Ready
                    } else {
                        session_lifecycle::usage::MeterStart::Started
                    },
                    rounding: if minute {
                        session_lifecycle::usage::Rounding::Minute
                    } else {
                        session_lifecycle::usage::Rounding::Second
                    },
                };
                store
                    .create(NewSession {
                        id: s.id,
                        tenant: s.tenant.to_owned(),
                        started_at: at(t),
                        expires_at: at(t + 86_400_000),
                        metadata: None,
                        room: None,
                        max_concurrent: None,
                        node: s.node.clone(),
                        timeouts: Default::default(),
                        callback_url: None,
                        billing,
                    })
                    .await
                    .unwrap();
            }
            Step::Ready(i) => {
                store.record_ready(sessions[i].id, at(t)).await.unwrap();
            }
            Step::End(i) => {
                let (_, reason) = sessions[i].end.unwrap();
                store
                    .end(sessions[i].id, None, at(t), reason, None)
                    .await
                    .unwrap();
            }
            Step::NodeDies(k) => {
                let node = format!("lost-{k}");
                // Its last heartbeat (a shared store writes its own clock's time).
                store
                    .node_alive(&node, at(lost[k].last_heartbeat))
                    .await
                    .unwrap();
                store
                    .end_dead_nodes("local", at(t), Duration::ZERO, 10_000)
                    .await
                    .unwrap();
            }
            Step::Tick => {
                last_tick = t;
                store
                    .close_usage("local", at(t), period, 10_000)
                    .await
                    .unwrap();
                for (k, n) in lost.iter().enumerate() {
                    if t < n.dies {
                        store
                            .close_usage(&format!("lost-{k}"), at(t), period, 10_000)
                            .await
                            .unwrap();
                    }
                }
            }
        }
    }
    last_tick / PERIOD_MS * PERIOD_MS
}

/// `heartbeats_on_db_clock`: the store writes heartbeats on its own clock (PostgreSQL), so
/// a lost node's last heartbeat is known only as the store saw it: its age when the node
/// was declared dead, taken back from that moment. The reference then takes each lost
/// session's last-seen time from the store, after checking it lies within the real time
/// the run took before that end.
async fn usage_totals_equal_the_reference(store: Arc<dyn Store>, heartbeats_on_db_clock: bool) {
    let seed: u64 = std::env::var("USAGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (sessions, lost) = plan(&mut rng, SESSIONS);
    let service = serve(store).await;
    let started = std::time::Instant::now();
    let closed_to = record(&service.store, &sessions, &lost).await;
    let run_ms = started.elapsed().as_millis() as u64 + 1;

    let mut last_seen: HashMap<SessionId, u64> = HashMap::new();
    if heartbeats_on_db_clock {
        let states = service
            .store
            .usage_states(
                Timestamp::from_millis(0),
                Timestamp::from_millis(u64::MAX / 2),
                None,
                u32::MAX,
            )
            .await
            .unwrap();
        for usage in &states {
            let m = &usage.state.as_ref().unwrap().metered;
            if let (Some((ended, EndReason::NodeLost)), Some(seen)) = (m.ended, m.node_last_seen) {
                let (ended, seen) = (ended.as_millis() - T0, seen.as_millis() - T0);
                assert!(
                    seen <= ended && ended - seen <= run_ms,
                    "{}: last seen {seen} for an end at {ended}, the run took {run_ms} ms",
                    usage.session
                );
                last_seen.insert(usage.session, seen);
            }
        }
        assert!(!last_seen.is_empty(), "no session was lost with its node");
    }
    let intervals: Vec<Option<(u64, u64)>> = sessions
        .iter()
        .map(|s| reference(s, &lost, &last_seen, closed_to))
        .collect();
    // Every kind of session is in the run.
    for reason in EndReason::ALL {
        assert!(
            sessions
                .iter()
                .any(|s| s.end.is_some_and(|(_, r)| r == reason)),
            "{reason:?}"
        );
    }
    assert!(sessions.iter().any(|s| s.end.is_none()));
    let corrections = {
        let mut n = 0;
        for s in &sessions {
            n += service
                .store
                .session_usage(s.id)
                .await
                .unwrap()
                .iter()
                .filter(|r| r.corrects.is_some())
                .count();
        }
        n
    };
    assert!(corrections > 0, "the run moved no recorded boundary");

    let keys = [
        ("key-alpha", Some("alpha")),
        ("key-beta", Some("beta")),
        ("key-operator", None),
    ];
    let mut checked = 0;
    for r in 0..RANGES {
        let a = rng.below(HORIZON_MS + 3_600_000);
        let b = if r == 0 {
            // One range over everything.
            HORIZON_MS + 86_400_000
        } else {
            a + rng.below(HORIZON_MS + 3_600_000 - a + 1)
        };
        let a = if r == 0 { 0 } else { a };
        let group_by = ["", "day", "hour", "session"][r % 4];
        for (key, tenant) in keys {
            let mine: Vec<usize> = (0..sessions.len())
                .filter(|i| tenant.is_none_or(|t| sessions[*i].tenant == t))
                .collect();
            let expected: u64 = mine
                .iter()
                .filter_map(|i| intervals[*i])
                .map(|iv| within(iv, a, b))
                .sum();
            let query = if group_by.is_empty() {
                format!("from={}&to={}", rfc3339(a), rfc3339(b))
            } else {
                format!("from={}&to={}&group_by={group_by}", rfc3339(a), rfc3339(b))
            };
            // By session, a page at a time (a small limit, so that most ranges take
            // several): each answer has the whole total, the pages every group once.
            let limit = 1 + rng.below(300);
            let mut groups: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let query = match (group_by, &cursor) {
                    ("session", None) => format!("{query}&limit={limit}"),
                    ("session", Some(c)) => format!("{query}&limit={limit}&cursor={c}"),
                    _ => query.clone(),
                };
                let (status, v) = usage(&service.base, key, &query).await;
                assert_eq!(status, StatusCode::OK, "{v}");
                assert_eq!(
                    v["billable_ms"].as_u64().unwrap(),
                    expected,
                    "{key} range [{a}, {b}) {group_by}"
                );
                let page = v["groups"].as_array().unwrap();
                groups.extend(page.iter().cloned());
                match v["next_cursor"].as_str() {
                    Some(next) => {
                        assert_eq!(group_by, "session", "{v}");
                        assert_eq!(page.len() as u64, limit, "only a full page has a next");
                        cursor = Some(next.to_owned());
                    }
                    None => break,
                }
            }
            let sum: u64 = groups
                .iter()
                .map(|g| g["billable_ms"].as_u64().unwrap())
                .sum();
            if !group_by.is_empty() {
                assert_eq!(sum, expected, "{key}: groups add up to the total");
            }
            match group_by {
                "session" => {
                    let want: BTreeMap<String, u64> = mine
                        .iter()
                        .filter_map(|i| {
                            let ms = within(intervals[*i]?, a, b);
                            (ms > 0).then(|| (sessions[*i].id.to_string(), ms))
                        })
                        .collect();
                    let got: BTreeMap<String, u64> = groups
                        .iter()
                        .map(|g| {
                            (
                                g["session_id"].as_str().unwrap().to_owned(),
                                g["billable_ms"].as_u64().unwrap(),
                            )
                        })
                        .collect();
                    assert_eq!(got, want, "{key}: by session");
                    if let Some(t) = tenant {
                        assert!(groups.iter().all(|g| g["tenant"] == t));
                    }
                }
                "day" | "hour" => {
                    let bucket = if group_by == "day" {
                        86_400_000
                    } else {
                        3_600_000
                    };
                    let mut want: BTreeMap<u64, u64> = BTreeMap::new();
                    for i in &mine {
                        let Some((f, t)) = intervals[*i] else {
                            continue;
                        };
                        let (f, t) = (T0 + f.max(a), T0 + t.min(b));
                        let mut x = f;
                        while x < t {
                            let start = x / bucket * bucket;
                            let end = (start + bucket).min(t);
                            *want.entry(start).or_default() += end - x;
                            x = end;
                        }
                    }
                    let got: BTreeMap<u64, u64> = groups
                        .iter()
                        .map(|g| {
                            let start =
                                Timestamp::parse_rfc3339(g["start"].as_str().unwrap()).unwrap();
                            (start.as_millis(), g["billable_ms"].as_u64().unwrap())
                        })
                        .collect();
                    assert_eq!(got, want, "{key}: by {group_by}");
                }
                _ => assert!(groups.is_empty()),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, RANGES * keys.len());

    // The records reconcile with the session records: nothing lost, nothing counted twice.
    let (from, to) = (
        Timestamp::from_millis(T0),
        Timestamp::from_millis(T0 + HORIZON_MS + 86_400_000),
    );
    let mut states = BTreeSet::new();
    let mut after = None;
    loop {
        let page = service
            .store
            .usage_states(from, to, after, 300)
            .await
            .unwrap();
        for usage in &page {
            let state = usage.state.as_ref().unwrap();
            let records = usage.records.as_ref().unwrap();
            assert_eq!(
                reconcile_session(state, records, from, to),
                None,
                "{}",
                state.session
            );
            states.insert(state.session);
        }
        match page.last() {
            Some(last) if page.len() == 300 => after = Some(last.session),
            _ => break,
        }
    }
    assert_eq!(states.len(), SESSIONS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_equal_the_reference_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = session_lifecycle_sqlite::SqliteStore::open(dir.path().join("u.db")).unwrap();
    usage_totals_equal_the_reference(Arc::new(store), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_equal_the_reference_on_postgres() {
    let Some(url) = pg_url() else { return };
    let db = TestDb::create(&url).await;
    let store = session_lifecycle_postgres::PostgresStore::connect(&db.url)
        .await
        .unwrap();
    usage_totals_equal_the_reference(Arc::new(store), true).await;
    db.drop_db().await;
}

/// Bad ranges are refused with a clear code, and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_refuses_bad_ranges_with_a_clear_code() {
    let dir = tempfile::tempdir().unwrap();
    let store = session_lifecycle_sqlite::SqliteStore::open(dir.path().join("u.db")).unwrap();
    let service = serve(Arc::new(store)).await;
    let day = 86_400_000;
    for (query, status, code) in [
        (
            format!("from={}&to={}", rfc3339(day), rfc3339(0)),
            400,
            "invalid_range",
        ),
        (
            format!("from={}&to={}", rfc3339(0), rfc3339(367 * day)),
            400,
            "invalid_range",
        ),
        (
            format!("from={}&to={}&group_by=week", rfc3339(0), rfc3339(day)),
            400,
            "invalid_request",
        ),
        (format!("to={}", rfc3339(day)), 400, "invalid_request"),
        (
            format!("from=yesterday&to={}", rfc3339(day)),
            400,
            "invalid_request",
        ),
        (
            format!("from={}&to={}", rfc3339(0), rfc3339(366 * day)),
            200,
            "",
        ),
        (format!("from={}&to={}", rfc3339(0), rfc3339(0)), 200, ""),
        (
            format!(
                "from={}&to={}&group_by=day&limit=5",
                rfc3339(0),
                rfc3339(day)
            ),
            400,
            "invalid_request",
        ),
        (
            format!("from={}&to={}&cursor=sess_01", rfc3339(0), rfc3339(day)),
            400,
            "invalid_request",
        ),
        (
            format!(
                "from={}&to={}&group_by=session&limit=0",
                rfc3339(0),
                rfc3339(day)
            ),
            400,
            "invalid_request",
        ),
        (
            format!(
                "from={}&to={}&group_by=session&limit=10001",
                rfc3339(0),
                rfc3339(day)
            ),
            400,
            "invalid_request",
        ),
        (
            format!(
                "from={}&to={}&group_by=session&cursor=bogus",
                rfc3339(0),
                rfc3339(day)
            ),
            400,
            "invalid_request",
        ),
        (
            format!(
                "from={}&to={}&group_by=session&limit=10000",
                rfc3339(0),
                rfc3339(day)
            ),
            200,
            "",
        ),
    ] {
        let (got, v) = usage(&service.base, "key-alpha", &query).await;
        assert_eq!(got.as_u16(), status, "{query}: {v}");
        if status == 400 {
            assert_eq!(v["error"]["code"], code, "{query}");
        } else {
            assert_eq!(v["billable_ms"], 0);
        }
    }
    let (got, _) = usage(&service.base, "wrong-key", "from=x&to=y").await;
    assert_eq!(got, StatusCode::UNAUTHORIZED);
}

/// `sessiond usage reconcile` finds nothing on a healthy store, and names every session
/// whose records were changed behind the store's back (exit status 1); bad input is exit
/// status 2 with the reason.
#[cfg(feature = "sessiond")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reconcile_reports_nothing_on_a_healthy_store_and_every_difference() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u.db");
    {
        let store: Arc<dyn Store> =
            Arc::new(session_lifecycle_sqlite::SqliteStore::open(&file).unwrap());
        let mut rng = Rng(99);
        let (sessions, lost) = plan(&mut rng, 200);
        record(&store, &sessions, &lost).await;
    }
    let reconcile = |from: &str, to: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sessiond"))
            .args(["--database", file.to_str().unwrap(), "usage", "reconcile"])
            .args(["--from", from, "--to", to])
            .output()
            .unwrap()
    };
    let (from, to) = (rfc3339(0), rfc3339(HORIZON_MS + 86_400_000));
    let healthy = reconcile(&from, &to);
    let out = String::from_utf8_lossy(&healthy.stdout).into_owned();
    assert_eq!(healthy.status.code(), Some(0), "{out}");
    assert!(
        out.contains("checked 200 sessions") && out.ends_with("0 differences\n"),
        "{out}"
    );

    // Behind the store's back: one record made longer, another session's records gone.
    let db = rusqlite::Connection::open(&file).unwrap();
    let (longer, lengthened): (String, i64) = db
        .query_row(
            "SELECT session_id, seq FROM usage_records
             WHERE NOT superseded AND millis > 0 ORDER BY session_id, seq LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    db.execute(
        "UPDATE usage_records SET to_ms = to_ms + 1000, millis = millis + 1000
         WHERE session_id = ?1 AND seq = ?2",
        rusqlite::params![&longer, lengthened],
    )
    .unwrap();
    let gone: String = db
        .query_row(
            "SELECT session_id FROM usage_records
             WHERE NOT superseded AND millis > 0 AND session_id <> ?1
             ORDER BY session_id DESC LIMIT 1",
            [&longer],
            |r| r.get(0),
        )
        .unwrap();
    db.execute("DELETE FROM usage_records WHERE session_id = ?1", [&gone])
        .unwrap();
    // And a third's record unreadable: reported, and the others still checked.
    let corrupt: String = db
        .query_row(
            "SELECT session_id FROM usage_records
             WHERE session_id NOT IN (?1, ?2) ORDER BY session_id LIMIT 1",
            [&longer, &gone],
            |r| r.get(0),
        )
        .unwrap();
    db.execute(
        "UPDATE usage_records SET revision = 0 WHERE session_id = ?1",
        [&corrupt],
    )
    .unwrap();
    drop(db);
    let broken = reconcile(&from, &to);
    let out = String::from_utf8_lossy(&broken.stdout).into_owned();
    assert_eq!(broken.status.code(), Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines.iter().any(|l| l.starts_with(&longer)), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&corrupt) && l.contains("unreadable")),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&gone) && l.contains("recorded_ms=0")),
        "{out}"
    );
    assert!(
        out.contains("checked 200 sessions") && out.ends_with("3 differences\n"),
        "{out}"
    );

    let bad = reconcile(&to, &from);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--to must not be before --from"));
    let bad = reconcile("yesterday", &to);
    assert_eq!(bad.status.code(), Some(2));
}
