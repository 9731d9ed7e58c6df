//! The process backend against real child processes (the workspace's `avatar-fixture`).

use std::path::Path;
use std::time::{Duration, Instant};

use session_lifecycle::{EndReason, SessionId, Timestamp};
use session_lifecycle_process::{PROCESS_KIND, ProcessBackend, ProcessConfig};
use session_lifecycle_runtime::{AcquireError, AcquireRequest, EventSink, ResourceBackend};

const FIXTURE: &str = env!("CARGO_BIN_EXE_avatar-fixture");

fn backend(mode: &[&str], grace: Duration) -> ProcessBackend {
    let mut command = vec![FIXTURE];
    command.extend_from_slice(mode);
    let mut config = ProcessConfig::new(command);
    config.grace = grace;
    ProcessBackend::new(config).unwrap()
}

/// A session id of its own for every test and every run of this binary (in cgroup mode
/// the id names the session's cgroup, which concurrent runs must not share).
fn session(n: u128) -> SessionId {
    let run = u128::from(std::process::id()) << 32;
    SessionId::from_ulid_parts(Timestamp::from_millis(1_705_314_600_000), run | n)
}

fn env_for(id: SessionId) -> Vec<(String, String)> {
    vec![
        (
            session_lifecycle_runtime::SESSION_ID_ENV.into(),
            id.to_string(),
        ),
        ("CUDA_VISIBLE_DEVICES".into(), "3".into()),
    ]
}

/// Whether /proc has any entry for `pid`, zombie included.
fn in_proc(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_behaving_server_stops_on_sigterm_and_is_reaped() {
    let dir = tempfile_dir();
    let env_file = dir.join("env.txt");
    let b = backend(
        &["write-env", env_file.to_str().unwrap()],
        Duration::from_secs(10),
    );
    let id = session(1);
    let env = env_for(id);
    let (sink, _rx) = EventSink::channel();
    let acquired = b
        .acquire(
            AcquireRequest {
                resources: Default::default(),
                session: id,
                tenant: "t",
                env: &env,
            },
            sink,
        )
        .await
        .unwrap();
    assert_eq!(acquired.resource.kind, PROCESS_KIND);
    let pid = acquired.resource.handle;
    wait_until("the env file", || env_file.exists()).await;
    let written = std::fs::read_to_string(&env_file).unwrap();
    assert_eq!(
        written,
        format!("{id}\n3\n"),
        "session id and GPU placement reach the server"
    );

    let started = Instant::now();
    let note = b.release(id, acquired.resource).await.unwrap();
    assert_eq!(note, "sigterm");
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_until("the process to be reaped", || !in_proc(pid)).await;
    // Releasing again is safe and does nothing.
    assert_eq!(b.release(id, acquired.resource).await.unwrap(), "gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_ignoring_sigterm_is_killed_after_the_grace_period() {
    let grace = Duration::from_millis(400);
    let b = backend(&["ignore-term"], grace);
    let id = session(2);
    let (sink, mut rx) = EventSink::channel();
    let acquired = b
        .acquire(
            AcquireRequest {
                resources: Default::default(),
                session: id,
                tenant: "t",
                env: &env_for(id),
            },
            sink,
        )
        .await
        .unwrap();
    let pid = acquired.resource.handle;
    // Give it time to install its handler, so SIGTERM is really ignored.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let note = b.release(id, acquired.resource).await.unwrap();
    // `sigkill`, or `sigkill: cgroup.kill after ...` in cgroup mode.
    assert!(note.to_string().starts_with("sigkill"), "{note}");
    assert!(
        started.elapsed() >= grace,
        "killed only after the grace period"
    );
    wait_until("the process to be reaped", || !in_proc(pid)).await;
    assert!(
        rx.try_recv().is_err(),
        "a stop we made is not reported as avatar_exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_exits_on_its_own_is_reported() {
    let b = backend(&["exit-now"], Duration::from_secs(10));
    let id = session(3);
    let (sink, mut rx) = EventSink::channel();
    let acquired = b
        .acquire(
            AcquireRequest {
                resources: Default::default(),
                session: id,
                tenant: "t",
                env: &env_for(id),
            },
            sink,
        )
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("exit reported")
        .expect("sink open");
    assert_eq!(event.session, id);
    assert_eq!(event.resource, acquired.resource);
    assert_eq!(
        event.kind,
        session_lifecycle_runtime::ResourceEventKind::Ends(EndReason::AvatarExited)
    );
    wait_until("the process to be reaped", || {
        !in_proc(acquired.resource.handle)
    })
    .await;
    assert_eq!(b.release(id, acquired.resource).await.unwrap(), "exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_be_spawned_fails_the_acquire() {
    let b = ProcessBackend::new(ProcessConfig::new(["/nonexistent/avatar-server"])).unwrap();
    let id = session(4);
    let (sink, _rx) = EventSink::channel();
    let err = b
        .acquire(
            AcquireRequest {
                resources: Default::default(),
                session: id,
                tenant: "t",
                env: &env_for(id),
            },
            sink,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, AcquireError::Failed(m) if m.contains("cannot start")));
    assert!(ProcessBackend::new(ProcessConfig::new(Vec::<String>::new())).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_servers_are_stopped_by_pid_only_if_they_run_the_session() {
    // The first backend starts it; a fresh backend (a restarted service) releases it.
    let first = backend(&["behave"], Duration::from_secs(10));
    let id = session(5);
    let (sink, _rx) = EventSink::channel();
    let acquired = first
        .acquire(
            AcquireRequest {
                resources: Default::default(),
                session: id,
                tenant: "t",
                env: &env_for(id),
            },
            sink,
        )
        .await
        .unwrap();
    let pid = acquired.resource.handle;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let restarted = backend(&["behave"], Duration::from_secs(10));
    // A pid that does not run this session (recycled) is never signalled.
    assert_eq!(
        restarted
            .release(session(99), acquired.resource)
            .await
            .unwrap(),
        "gone"
    );
    assert!(in_proc(pid));
    assert_eq!(
        restarted.release(id, acquired.resource).await.unwrap(),
        "sigterm"
    );
    wait_until("the process to be reaped", || !in_proc(pid)).await;
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "avatar-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Acquires for session `n` on `b`, with `ready_timeout`; the event reported, and when.
async fn first_event(
    b: &ProcessBackend,
    n: u128,
    ready_timeout: Option<Duration>,
) -> (session_lifecycle_runtime::ResourceEvent, Duration, u64) {
    let id = session(n);
    let (sink, mut rx) = EventSink::channel();
    let started = Instant::now();
    let acquired = b
        .acquire(
            AcquireRequest {
                resources: session_lifecycle_runtime::ResourceRequest {
                    ready_timeout,
                    ..Default::default()
                },
                session: id,
                tenant: "t",
                env: &env_for(id),
            },
            sink,
        )
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event")
        .expect("sink open");
    assert_eq!((event.session, event.resource), (id, acquired.resource));
    (event, started.elapsed(), acquired.resource.handle)
}

/// A server that sends `READY=1` to its `NOTIFY_SOCKET` after 300 ms is reported ready
/// then; one that never does is reported past the ready timeout, to end `start_failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_comes_through_the_notify_socket_or_the_timeout_ends_it() {
    use session_lifecycle_runtime::ResourceEventKind;
    let notifying = backend(&["notify-after", "300"], Duration::from_secs(5));
    let (event, after, pid) = first_event(&notifying, 11, Some(Duration::from_secs(5))).await;
    assert_eq!(event.kind, ResourceEventKind::Ready);
    assert!(
        after >= Duration::from_millis(300) && after < Duration::from_secs(3),
        "{after:?}"
    );
    let resource = session_lifecycle::Resource {
        kind: PROCESS_KIND,
        handle: pid,
    };
    assert_eq!(
        notifying.release(session(11), resource).await.unwrap(),
        "sigterm"
    );

    let silent = backend(&["behave"], Duration::from_secs(5));
    let (event, after, pid) = first_event(&silent, 12, Some(Duration::from_millis(500))).await;
    assert_eq!(event.kind, ResourceEventKind::Ends(EndReason::StartFailed));
    assert!(after >= Duration::from_millis(500), "{after:?}");
    let resource = session_lifecycle::Resource {
        kind: PROCESS_KIND,
        handle: pid,
    };
    assert_eq!(
        silent.release(session(12), resource).await.unwrap(),
        "sigterm"
    );
}
