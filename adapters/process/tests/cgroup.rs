//! A session's processes as one unit: a cgroup v2 per session, and the process-group
//! fallback, against real processes (the workspace's `avatar-fixture`).
//!
//! The cgroup tests are skipped, with a message, where cgroup v2 cannot be written to.
//! Every test kills what it started, through pidfds (never a bare pid), when it ends, pass
//! or fail.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use session_lifecycle::{EndReason, Resource, SessionId, Timestamp};
use session_lifecycle_process::{
    CgroupMode, PROCESS_KIND, ProcessBackend, ProcessConfig, session_of_pid,
};
use session_lifecycle_runtime::{AcquireRequest, EventSink, ResourceBackend, ResourceEvent};
use tokio::sync::mpsc::Receiver;

const FIXTURE: &str = env!("CARGO_BIN_EXE_avatar-fixture");

fn backend(mode: &[&str], grace: Duration, cgroups: CgroupMode) -> ProcessBackend {
    let mut command = vec![FIXTURE];
    command.extend_from_slice(mode);
    let mut config = ProcessConfig::new(command);
    config.grace = grace;
    config.cgroups = cgroups;
    ProcessBackend::new(config).unwrap()
}

/// Whether `b` runs sessions in cgroups; says so when it does not (the test is skipped).
fn cgroups_or_skip(b: &ProcessBackend) -> bool {
    if !b.uses_cgroups() {
        eprintln!("skipped: cgroup v2 is not writable here");
    }
    b.uses_cgroups()
}

/// A session id of its own for every test and every run of this binary.
fn session(n: u128) -> SessionId {
    let run = u128::from(std::process::id()) << 32;
    SessionId::from_ulid_parts(Timestamp::from_millis(1_705_314_600_000), run | n)
}

/// What a test started, killed when it ends however it ends.
#[derive(Default)]
struct Leftovers {
    /// Processes, pinned by pidfd so that a recycled pid is never killed.
    processes: Vec<OwnedFd>,
    /// Our own children (reaped too).
    children: Vec<std::process::Child>,
    /// Cgroups: emptied with `cgroup.kill`, then removed, innermost first.
    cgroups: Vec<PathBuf>,
    /// Temporary directories.
    dirs: Vec<PathBuf>,
}

impl Leftovers {
    fn process(&mut self, pid: u32) {
        let pid = Pid::from_raw(i32::try_from(pid).unwrap()).unwrap();
        if let Ok(fd) = pidfd_open(pid, PidfdFlags::empty()) {
            self.processes.push(fd);
        }
    }

    /// `sleep 30`, ours, with no session in its environment.
    fn sleeper(&mut self) -> u32 {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .env_remove(session_lifecycle_runtime::SESSION_ID_ENV)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn temp_dir(&mut self) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("avatar-cgroup-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        self.dirs.push(dir.clone());
        dir
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for fd in &self.processes {
            let _ = pidfd_send_signal(fd, Signal::KILL);
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.cgroups
            .sort_by_key(|dir| std::cmp::Reverse(dir.components().count()));
        for dir in &self.cgroups {
            if !dir.exists() {
                continue;
            }
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while populated(dir) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = std::fs::remove_dir(dir);
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn populated(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.events"))
        .is_ok_and(|e| e.lines().any(|l| l == "populated 1"))
}

/// The state and process group of `pid`, if it has a /proc entry.
fn stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether `pid` runs: it has a /proc entry and is not a zombie.
fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

/// Whether /proc has any entry for `pid`, zombie included.
fn in_proc(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The pid a fixture wrote to `path` (once its child is ready).
async fn read_pid(path: &Path) -> u32 {
    wait_until("the PID file", || path.exists()).await;
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Starts `id`'s avatar server; it (and its cgroup) is left over for the guard.
async fn start(
    b: &ProcessBackend,
    id: SessionId,
    left: &mut Leftovers,
) -> (Resource, u32, Receiver<ResourceEvent>) {
    let env = vec![(
        session_lifecycle_runtime::SESSION_ID_ENV.to_owned(),
        id.to_string(),
    )];
    let (sink, rx) = EventSink::channel();
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
    let pid = u32::try_from(acquired.resource.handle).unwrap();
    left.process(pid);
    if let Some(dir) = b.cgroup_dir(id) {
        left.cgroups.push(dir);
    }
    (acquired.resource, pid, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_mode_kills_a_setsid_grandchild_that_ignores_sigterm() {
    let mut left = Leftovers::default();
    let pid_file = left.temp_dir().join("grandchild.pid");
    let grace = Duration::from_millis(500);
    let b = backend(
        &["setsid-child", pid_file.to_str().unwrap()],
        grace,
        CgroupMode::Auto,
    );
    if !cgroups_or_skip(&b) {
        return;
    }
    let id = session(1);
    let (resource, avatar, mut rx) = start(&b, id, &mut left).await;
    let grandchild = read_pid(&pid_file).await;
    left.process(grandchild);
    let cgroup = b.cgroup_dir(id).unwrap();
    assert!(cgroup.is_dir(), "{} exists", cgroup.display());
    assert_ne!(
        stat(grandchild).map(|(_, pgrp)| pgrp),
        Some(avatar),
        "the grandchild left the avatar server's process group"
    );
    let members = b.session_pids(id).unwrap();
    assert!(
        members.contains(&avatar) && members.contains(&grandchild),
        "both are in the session's cgroup: {members:?}"
    );

    let started = Instant::now();
    let note = b.release(id, resource).await.unwrap();
    assert_eq!(
        note, "sigkill: cgroup.kill after 500 ms grace (1 process left)",
        "the avatar server exited on SIGTERM, its grandchild did not"
    );
    assert!(started.elapsed() >= grace, "killed only after the grace");
    assert!(!in_proc(avatar), "the avatar server is reaped");
    assert!(!alive(grandchild), "the setsid grandchild is gone too");
    assert!(!cgroup.exists(), "the session's cgroup is removed");
    assert!(
        rx.try_recv().is_err(),
        "a stop we made is not reported as avatar_exited"
    );
    // Releasing again is safe and does nothing.
    assert_eq!(b.release(id, resource).await.unwrap(), "gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_mode_stops_a_well_behaved_server_with_sigterm_and_removes_its_cgroup() {
    let mut left = Leftovers::default();
    let b = backend(&["behave"], Duration::from_secs(10), CgroupMode::Auto);
    if !cgroups_or_skip(&b) {
        return;
    }
    let id = session(2);
    let (resource, avatar, _rx) = start(&b, id, &mut left).await;
    let cgroup = b.cgroup_dir(id).unwrap();
    assert_eq!(b.session_pids(id), Some(vec![avatar]));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    assert_eq!(b.release(id, resource).await.unwrap(), "sigterm");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!in_proc(avatar), "reaped");
    assert!(!cgroup.exists(), "the session's cgroup is removed");
    assert_eq!(b.session_pids(id), Some(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_mode_waits_for_a_server_that_takes_time_to_exit() {
    let mut left = Leftovers::default();
    let b = backend(
        &["slow-exit", "300"],
        Duration::from_secs(5),
        CgroupMode::Auto,
    );
    if !cgroups_or_skip(&b) {
        return;
    }
    let id = session(3);
    let (resource, avatar, _rx) = start(&b, id, &mut left).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(b.release(id, resource).await.unwrap(), "sigterm");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "done when it exited, within the grace: {took:?}"
    );
    assert!(!in_proc(avatar));
    assert!(!b.cgroup_dir(id).unwrap().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgroup_mode_a_server_that_exited_on_its_own_is_noted_exited() {
    let mut left = Leftovers::default();
    let b = backend(&["exit-now"], Duration::from_secs(10), CgroupMode::Auto);
    if !cgroups_or_skip(&b) {
        return;
    }
    let id = session(4);
    let (resource, avatar, mut rx) = start(&b, id, &mut left).await;
    let event = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("exit reported")
        .expect("sink open");
    assert_eq!(
        event.kind,
        session_lifecycle_runtime::ResourceEventKind::Ends(EndReason::AvatarExited)
    );
    assert_eq!(b.release(id, resource).await.unwrap(), "exited");
    assert!(!in_proc(avatar));
    assert!(!b.cgroup_dir(id).unwrap().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_groups_kill_a_child_that_ignores_sigterm_after_the_grace() {
    let mut left = Leftovers::default();
    let pid_file = left.temp_dir().join("child.pid");
    let grace = Duration::from_millis(500);
    let b = backend(
        &["child-ignores-term", pid_file.to_str().unwrap()],
        grace,
        CgroupMode::Off,
    );
    assert!(!b.uses_cgroups());
    assert_eq!(b.cgroup_dir(session(5)), None);
    let id = session(5);
    let (resource, avatar, mut rx) = start(&b, id, &mut left).await;
    let child = read_pid(&pid_file).await;
    left.process(child);
    assert_eq!(
        stat(child).map(|(_, pgrp)| pgrp),
        Some(avatar),
        "in the group"
    );

    let started = Instant::now();
    assert_eq!(b.release(id, resource).await.unwrap(), "sigkill");
    assert!(started.elapsed() >= grace, "killed only after the grace");
    assert!(!in_proc(avatar), "the avatar server is reaped");
    assert!(!alive(child), "its child is gone too, not only the leader");
    assert!(rx.try_recv().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_groups_let_a_setsid_grandchild_escape() {
    // The documented limit of the fallback: a descendant that calls setsid leaves the
    // process group, and a stop of the group does not reach it (cgroups do).
    let mut left = Leftovers::default();
    let pid_file = left.temp_dir().join("grandchild.pid");
    let b = backend(
        &["setsid-child", pid_file.to_str().unwrap()],
        Duration::from_millis(500),
        CgroupMode::Off,
    );
    let id = session(6);
    let (resource, avatar, _rx) = start(&b, id, &mut left).await;
    let grandchild = read_pid(&pid_file).await;
    left.process(grandchild);
    assert_eq!(
        session_of_pid(grandchild),
        Some(id),
        "found by the session id it inherited"
    );

    assert_eq!(b.release(id, resource).await.unwrap(), "sigterm");
    assert!(!in_proc(avatar), "the avatar server is stopped and reaped");
    assert!(alive(grandchild), "the setsid grandchild escaped the stop");
    // Not left behind: the guard would do it too, this says it is on purpose.
    let fd = pidfd_open(
        Pid::from_raw(i32::try_from(grandchild).unwrap()).unwrap(),
        PidfdFlags::empty(),
    )
    .unwrap();
    pidfd_send_signal(&fd, Signal::KILL).unwrap();
    wait_until("the grandchild to die", || !alive(grandchild)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_pid_that_is_another_process_now_is_never_signalled() {
    let mut left = Leftovers::default();
    for (n, mode) in [(7, CgroupMode::Auto), (8, CgroupMode::Off)] {
        let sleeper = left.sleeper();
        let b = backend(&["behave"], Duration::from_millis(200), mode);
        let id = session(n);
        let recorded = Resource {
            kind: PROCESS_KIND,
            handle: u64::from(sleeper),
        };
        assert_eq!(b.release(id, recorded).await.unwrap(), "gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(alive(sleeper), "an unrelated process is left alone");
        assert_eq!(b.find_held(&[id]).await.unwrap(), vec![]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_a_session_is_found_and_stopped_by_its_cgroup_only() {
    let mut left = Leftovers::default();
    let first = backend(&["behave"], Duration::from_secs(10), CgroupMode::Auto);
    if !cgroups_or_skip(&first) {
        return;
    }
    let id = session(9);
    let (resource, avatar, _rx) = start(&first, id, &mut left).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A restarted service: it finds the session by its cgroup...
    let restarted = backend(&["behave"], Duration::from_secs(10), CgroupMode::Auto);
    assert_eq!(
        restarted.find_held(&[id, session(10)]).await.unwrap(),
        vec![(id, resource)]
    );
    // ...and stops it by its cgroup, even when the pid it has on record is (now) another
    // process: that one is never signalled.
    let sleeper = left.sleeper();
    let recorded = Resource {
        kind: PROCESS_KIND,
        handle: u64::from(sleeper),
    };
    assert_eq!(restarted.release(id, recorded).await.unwrap(), "sigterm");
    wait_until("the avatar server to be reaped", || !in_proc(avatar)).await;
    assert!(alive(sleeper), "the recorded pid was not signalled");
    assert!(!restarted.cgroup_dir(id).unwrap().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_without_cgroups_the_whole_group_is_stopped_by_pid() {
    let mut left = Leftovers::default();
    let pid_file = left.temp_dir().join("child.pid");
    let mode = ["child-ignores-term", pid_file.to_str().unwrap()];
    let grace = Duration::from_millis(500);
    let first = backend(&mode, grace, CgroupMode::Off);
    let id = session(14);
    let (resource, avatar, _rx) = start(&first, id, &mut left).await;
    let child = read_pid(&pid_file).await;
    left.process(child);

    // A restarted service finds the group leader by the session id in its environment
    // (not its child, which has the id too but does not lead the group)...
    let restarted = backend(&mode, grace, CgroupMode::Off);
    assert_eq!(
        restarted.find_held(&[id, session(15)]).await.unwrap(),
        vec![(id, resource)]
    );
    // ...and its stop is done only when the whole group is gone.
    assert_eq!(restarted.release(id, resource).await.unwrap(), "sigkill");
    assert!(!alive(avatar) && !alive(child));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_of_pid_finds_a_grandchild_by_its_cgroup() {
    let mut left = Leftovers::default();
    let pid_file = left.temp_dir().join("grandchild.pid");
    let b = backend(
        &["setsid-child", pid_file.to_str().unwrap()],
        Duration::from_millis(300),
        CgroupMode::Auto,
    );
    if !cgroups_or_skip(&b) {
        return;
    }
    let id = session(11);
    let (resource, avatar, _rx) = start(&b, id, &mut left).await;
    let grandchild = read_pid(&pid_file).await;
    left.process(grandchild);
    assert_eq!(session_of_pid(avatar), Some(id));
    assert_eq!(session_of_pid(grandchild), Some(id));
    // A process with no session in its environment, moved into the session's cgroup: found
    // by the cgroup alone.
    let stranger = left.sleeper();
    let cgroup = b.cgroup_dir(id).unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), stranger.to_string()).unwrap();
    assert_eq!(session_of_pid(stranger), Some(id));
    assert_eq!(session_of_pid(std::process::id()), None);

    // The release stops whatever is in the cgroup, the stranger included.
    let note = b.release(id, resource).await.unwrap();
    assert!(note.to_string().contains("cgroup.kill"), "{note}");
    assert!(!alive(stranger) && !alive(grandchild));
    assert!(!cgroup.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_cgroup_root_is_used() {
    let mut left = Leftovers::default();
    let auto = backend(&["behave"], Duration::from_secs(10), CgroupMode::Auto);
    if !cgroups_or_skip(&auto) {
        return;
    }
    let id = session(12);
    // A subtree of our own cgroup, as a delegation would hand over.
    let own = auto.cgroup_dir(id).unwrap();
    let own = own.parent().unwrap().parent().unwrap();
    let root = own.join(format!("explicit-{}", std::process::id()));
    std::fs::create_dir(&root).unwrap();
    left.cgroups.push(root.clone());
    left.cgroups.push(root.join("session-lifecycle"));
    let b = backend(
        &["behave"],
        Duration::from_secs(10),
        CgroupMode::Root(root.clone()),
    );
    assert!(b.uses_cgroups());
    let cgroup = root.join("session-lifecycle").join(id.to_string());
    assert_eq!(b.cgroup_dir(id).as_deref(), Some(cgroup.as_path()));
    let (resource, avatar, _rx) = start(&b, id, &mut left).await;
    assert_eq!(b.session_pids(id), Some(vec![avatar]));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.release(id, resource).await.unwrap(), "sigterm");
    assert!(!cgroup.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_cgroup_root_falls_back_to_process_groups() {
    let mut left = Leftovers::default();
    let not_a_cgroup = left.temp_dir();
    let b = backend(
        &["behave"],
        Duration::from_secs(10),
        CgroupMode::Root(not_a_cgroup.clone()),
    );
    assert!(!b.uses_cgroups());
    assert_eq!(b.session_pids(session(13)), None);
    assert!(
        std::fs::read_dir(&not_a_cgroup).unwrap().next().is_none(),
        "nothing was created there"
    );
    let id = session(13);
    let (resource, avatar, _rx) = start(&b, id, &mut left).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.release(id, resource).await.unwrap(), "sigterm");
    assert!(!in_proc(avatar));
}
