//! Avatar servers as child processes, one per session.
//!
//! Acquiring starts the configured command line with the session id and the resources
//! acquired before it (`CUDA_VISIBLE_DEVICES`, ...) in its environment. A supervisor task
//! waits on it (so it is always reaped) and, if it exits on its own, reports it so the
//! engine ends the session with `avatar_exited`.
//!
//! # One unit per session: a cgroup
//!
//! Where cgroup v2 can be written to (see [`CgroupMode`] for where the root is), each
//! session gets its own cgroup, `<root>/session-lifecycle/<session id>`, which the avatar
//! server joins between fork and exec: nothing it ever starts can be outside, whatever it
//! does with sessions and process groups. Releasing stops the whole cgroup: SIGTERM to every member, a grace period (10 s
//! by default) for `cgroup.events` to say `populated 0`, then `cgroup.kill`; then the
//! cgroup is removed. The release note is `sigterm`, `sigkill: cgroup.kill after 10 s grace
//! (2 processes left)`, or `exited` when the cgroup was empty already.
//!
//! # Fallback: a process group
//!
//! Without cgroup v2 (or with [`CgroupMode::Off`], or for a session whose cgroup could
//! not be made), the avatar server leads its own process group. Releasing sends SIGTERM to
//! the group, and the stop is done when no live process of the group is left (members are
//! found by their `pgrp` in `/proc/*/stat`); after the grace period the group gets
//! SIGKILL. The notes are `sigterm`, `sigkill` and `exited`. A descendant that calls
//! `setsid` (a daemonising helper) leaves the group and escapes the stop: the GPU
//! backend's own escalation on release remains the backstop for the GPU memory it holds,
//! and cgroups are the fix.
//!
//! # After a restart
//!
//! After a crash of the service its avatar servers outlive it as orphans. The restarted
//! service stops a session by its cgroup when that exists (no pid is signalled directly);
//! otherwise by pid, after checking `/proc/<pid>/environ` for the session's id, so that a
//! recycled pid is never signalled. Linux only.
//!
//! # Example
//!
//! An engine whose sessions each run `sleep 600` as their avatar server; ending the
//! session stops it (SIGTERM, within the grace) and records how:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! use session_lifecycle::EndReason;
//! use session_lifecycle_process::{CgroupMode, ProcessBackend, ProcessConfig};
//! use session_lifecycle_runtime::{
//!     Engine, EngineConfig, MemoryStore, Plan, ResourceBackend, StartRequest, SystemClock,
//! };
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let config = ProcessConfig { cgroups: CgroupMode::Off, ..ProcessConfig::new(["sleep", "600"]) };
//! let avatar: Arc<dyn ResourceBackend> = Arc::new(ProcessBackend::new(config).unwrap());
//! let store = Arc::new(MemoryStore::new());
//! let engine = Engine::open(store, vec![avatar], Arc::new(SystemClock), EngineConfig::default())
//!     .await
//!     .unwrap();
//! let plan = Plan::new(None, Duration::from_secs(3600));
//! let started = engine.start(StartRequest::new("acme", plan)).await.unwrap();
//! let id = *started.session.id();
//! engine.end(None, id, EndReason::Requested).await.unwrap();
//! let mut record = engine.get(None, id).await.unwrap();
//! while !record.session.is_fully_released() {
//!     tokio::time::sleep(Duration::from_millis(20)).await;
//!     record = engine.get(None, id).await.unwrap();
//! }
//! assert_eq!(record.release_notes[0].1, "sigterm");
//! engine.shutdown(Duration::from_secs(5)).await.unwrap();
//! # });
//! ```

#![deny(unsafe_code)]

mod cgroup;
mod notify;
mod procs;

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::Signal;
use session_lifecycle::{EndReason, Resource, ResourceKind, SessionId};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, EventSink, ReleaseError, ReleaseNote,
    ResourceBackend, ResourceEvent, ResourceEventKind, SESSION_ID_ENV, lock,
};
use tokio::sync::watch;

pub use cgroup::{CgroupMode, session_of_pid};

use cgroup::Cgroups;
use procs::{
    KILL_WAIT, group_members, is_dead, join_cgroup_before_exec, leads_group, signal_group,
    state_and_group, wait_group_gone, wait_reaped,
};

/// The resource kind of avatar server processes (the handle is the process id).
pub const PROCESS_KIND: ResourceKind = ResourceKind(1);

/// Set once the fallback to process groups has been logged (once per process).
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// How to run avatar servers.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Program and arguments.
    pub command: Vec<OsString>,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Extra environment for every avatar server.
    pub env: Vec<(OsString, OsString)>,
    /// Whether, and where, to put each session's processes in a cgroup of its own.
    pub cgroups: CgroupMode,
    /// How long an avatar server may take to report `READY=1` on its `NOTIFY_SOCKET`
    /// before its session ends `start_failed` (a session's own request wins); `None`: no
    /// limit (a server that never reports is simply never `ready`).
    pub ready_timeout: Option<Duration>,
}

impl ProcessConfig {
    /// Runs `command` with the default 10 s grace period, in cgroups where possible
    /// ([`CgroupMode::Auto`]).
    pub fn new<I, S>(command: I) -> ProcessConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        ProcessConfig {
            command: command.into_iter().map(Into::into).collect(),
            grace: Duration::from_secs(10),
            env: Vec::new(),
            cgroups: CgroupMode::Auto,
            ready_timeout: None,
        }
    }

    /// Splits a command line on whitespace (no shell quoting): the form of
    /// `--avatar-command`.
    pub fn from_command_line(line: &str) -> Option<ProcessConfig> {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.is_empty() {
            None
        } else {
            Some(ProcessConfig::new(words))
        }
    }
}

/// A child this backend started and still supervises.
struct Child {
    session: SessionId,
    /// Its session's cgroup; `None` when it runs in a process group only.
    cgroup: Option<PathBuf>,
    /// `true` once the supervisor reaped it.
    exited: watch::Receiver<bool>,
    /// Set before a release signals it, so its exit is not reported as `avatar_exited`.
    stopping: Arc<AtomicBool>,
}

/// Starts, supervises and stops avatar server processes.
///
/// The children it supervises are per instance (kept in memory): after a restart, or from
/// another instance, a session's processes are found again through its cgroup or the
/// session id in their environment, never through this table.
pub struct ProcessBackend {
    config: ProcessConfig,
    /// `None`: process groups only.
    cgroups: Option<Cgroups>,
    children: Mutex<HashMap<u32, Child>>,
    /// Avatar servers an earlier run of the service started and this one took back
    /// ([`ResourceBackend::resume`]), watched for an exit of their own: their pid and the
    /// flag a release sets before it stops them.
    resumed: Mutex<HashMap<u32, Arc<AtomicBool>>>,
    /// Where each avatar server's notify socket is made (see [`notify`]): made by this
    /// backend, private to its user, removed with it.
    notify_dir: PathBuf,
    /// Notify directories of earlier runs made again to take back the readiness of their
    /// servers (see [`ResourceBackend::resume`]); removed with this backend too.
    adopted_dirs: Mutex<Vec<PathBuf>>,
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.notify_dir);
        for dir in lock(&self.adopted_dirs).drain(..) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// How often a taken-back avatar server (not our child: no exit status to wait for) is
/// looked at.
const RESUMED_POLL: Duration = Duration::from_millis(200);

impl ProcessBackend {
    /// A backend running `config`. Fails if the command line is empty. Falls back to
    /// process groups, with one warning per process saying why, when the cgroups `config`
    /// asks for are not usable.
    pub fn new(config: ProcessConfig) -> io::Result<ProcessBackend> {
        if config.command.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty avatar command",
            ));
        }
        let cgroups = match Cgroups::open(&config.cgroups) {
            Ok(Some(cgroups)) => {
                tracing::info!(
                    root = %cgroups.base().display(),
                    "avatar servers run in one cgroup per session"
                );
                Some(cgroups)
            }
            Ok(None) => None,
            Err(why) => {
                if !FALLBACK_LOGGED.swap(true, Ordering::SeqCst) {
                    tracing::warn!(
                        %why,
                        "cgroup v2 not usable: avatar servers are stopped by process group, \
                         and a descendant that calls setsid escapes the stop"
                    );
                }
                None
            }
        };
        let notify_dir = notify::private_dir()?;
        Ok(ProcessBackend {
            config,
            cgroups,
            notify_dir,
            adopted_dirs: Mutex::new(Vec::new()),
            children: Mutex::new(HashMap::new()),
            resumed: Mutex::new(HashMap::new()),
        })
    }

    /// Whether sessions get a cgroup each (`false`: process groups only).
    pub fn uses_cgroups(&self) -> bool {
        self.cgroups.is_some()
    }

    /// Where `session`'s cgroup is (or would be), when this backend uses cgroups.
    pub fn cgroup_dir(&self, session: SessionId) -> Option<PathBuf> {
        self.cgroups.as_ref().map(|c| c.dir(session))
    }

    /// The processes in `session`'s cgroup (none if it has no cgroup); `None` when this
    /// backend does not use cgroups.
    pub fn session_pids(&self, session: SessionId) -> Option<Vec<u32>> {
        let cgroups = self.cgroups.as_ref()?;
        Some(cgroup::members(&cgroups.dir(session)).unwrap_or_default())
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Child>> {
        lock(&self.children)
    }

    async fn spawn(
        &self,
        request: AcquireRequest<'_>,
        events: EventSink,
    ) -> Result<Acquired, AcquireError> {
        let session = request.session;
        let mut cmd = tokio::process::Command::new(&self.config.command[0]);
        cmd.args(&self.config.command[1..])
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .env(SESSION_ID_ENV, session.to_string())
            .stdin(std::process::Stdio::null())
            // Its own group: the fallback's stop, and harmless with a cgroup.
            .process_group(0)
            .kill_on_drop(false);
        let cgroup = match self.cgroups.as_ref().map(|c| c.create(session)) {
            None => None,
            Some(Ok((dir, procs))) => {
                join_cgroup_before_exec(&mut cmd, procs);
                Some(dir)
            }
            Some(Err(e)) => {
                tracing::warn!(
                    session = %session,
                    error = %e,
                    "cannot create the session's cgroup: its avatar server runs in a process group only"
                );
                None
            }
        };
        // Readiness (the systemd notify protocol): a socket of its own, named in its
        // environment. Without one (a path too long), it is never reported ready.
        let notify = match notify::NotifySocket::bind(&self.notify_dir, session) {
            Ok(socket) => {
                cmd.env(notify::NOTIFY_SOCKET_ENV, socket.path());
                Some(socket)
            }
            Err(e) => {
                tracing::warn!(session = %session, error = %e, "no notify socket: readiness is not reported");
                None
            }
        };
        let spawned = match cmd.spawn() {
            Ok(child) => child
                .id()
                .map(|pid| (child, pid))
                .ok_or_else(|| AcquireError::Failed("avatar server exited at once".to_owned())),
            Err(e) => Err(AcquireError::Failed(format!(
                "cannot start avatar server {:?}{}: {e}",
                self.config.command[0],
                cgroup
                    .as_ref()
                    .map_or(String::new(), |d| format!(" in cgroup {}", d.display()))
            ))),
        };
        let (mut child, pid) = match spawned {
            Ok(spawned) => spawned,
            Err(e) => {
                if let Some(dir) = &cgroup {
                    // Nothing ran in it (or what did has exited): leave nothing behind.
                    let _ = cgroup::remove(dir).await;
                }
                return Err(e);
            }
        };
        let (exited_tx, exited_rx) = watch::channel(false);
        if let Some(socket) = notify {
            let ready_timeout = request
                .resources
                .ready_timeout
                .or(self.config.ready_timeout);
            let exited = exited_rx.clone();
            let events = events.clone();
            let resource = Resource {
                kind: PROCESS_KIND,
                handle: u64::from(pid),
            };
            tokio::spawn(async move {
                socket
                    .watch(session, resource, ready_timeout, exited, events)
                    .await
            });
        }
        let stopping = Arc::new(AtomicBool::new(false));
        self.children().insert(
            pid,
            Child {
                session,
                cgroup: cgroup.clone(),
                exited: exited_rx,
                stopping: Arc::clone(&stopping),
            },
        );
        let resource = Resource {
            kind: PROCESS_KIND,
            handle: u64::from(pid),
        };
        tokio::spawn(async move {
            // Waiting reaps it: no zombie is left, whoever stops it.
            let status = child.wait().await;
            let _ = exited_tx.send(true);
            if !stopping.load(Ordering::SeqCst) {
                tracing::warn!(session = %session, pid, ?status, "avatar server exited on its own");
                events
                    .report(ResourceEvent {
                        session,
                        resource,
                        kind: ResourceEventKind::Ends(EndReason::AvatarExited),
                    })
                    .await;
            }
        });
        tracing::info!(
            session = %session,
            pid,
            cgroup = cgroup.as_ref().map(|d| d.display().to_string()),
            "avatar server started"
        );
        Ok(Acquired {
            resource,
            env: Vec::new(),
        })
    }

    async fn stop(&self, session: SessionId, pid: u32) -> Result<ReleaseNote, ReleaseError> {
        let supervised = self.children().get(&pid).map(|c| {
            if c.session == session {
                c.stopping.store(true, Ordering::SeqCst);
            }
            (c.session, c.cgroup.clone(), c.exited.clone())
        });
        let result = match supervised {
            Some((owner, Some(dir), exited)) if owner == session => {
                let note = cgroup::stop(&dir, session, self.config.grace).await?;
                // Its cgroup is empty, so it has exited: the supervisor reaps it now.
                wait_reaped(exited).await;
                Ok(note)
            }
            Some((owner, None, exited)) if owner == session => {
                self.stop_group(pid, Some(exited)).await
            }
            // Another session's process: never ours to stop.
            Some(_) => Ok(ReleaseNote::Gone),
            None => self.stop_orphan(session, pid).await,
        };
        if result.is_ok() {
            self.children().remove(&pid);
        }
        result
    }

    /// Stops the process group `pgid` leads: SIGTERM, the grace period for every live
    /// member to exit, SIGKILL. `exited` is the supervisor's word on the leader, when it is
    /// our child.
    async fn stop_group(
        &self,
        pgid: u32,
        exited: Option<watch::Receiver<bool>>,
    ) -> Result<ReleaseNote, ReleaseError> {
        let leader_reaped = exited.as_ref().is_some_and(|e| *e.borrow());
        if leader_reaped && group_members(pgid).is_empty() {
            return Ok(ReleaseNote::Exited);
        }
        signal_group(pgid, Signal::TERM)?;
        let give_up = tokio::time::Instant::now() + self.config.grace;
        if let Some(exited) = &exited {
            // The leader's exit comes first and costs nothing to wait for; the rest of the
            // group is looked for after it (a /proc scan each time).
            let mut exited = exited.clone();
            let _ = tokio::time::timeout_at(give_up, exited.wait_for(|e| *e)).await;
        }
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        let note = if wait_group_gone(pgid, left).await {
            ReleaseNote::Sigterm
        } else {
            signal_group(pgid, Signal::KILL)?;
            if !wait_group_gone(pgid, KILL_WAIT).await {
                return Err(ReleaseError::transient(format!(
                    "process group {pgid} survived SIGKILL"
                )));
            }
            ReleaseNote::Sigkill
        };
        if let Some(exited) = exited {
            wait_reaped(exited).await;
        }
        Ok(note)
    }

    /// Stops a session a previous run of the service started (not our child): by its
    /// cgroup when it has one, else by `pid` if that still runs the session.
    async fn stop_orphan(&self, session: SessionId, pid: u32) -> Result<ReleaseNote, ReleaseError> {
        let resumed = lock(&self.resumed).get(&pid).cloned();
        if let Some(stopping) = resumed {
            stopping.store(true, Ordering::SeqCst);
        }
        let result = self.stop_unsupervised(session, pid).await;
        if result.is_ok() {
            lock(&self.resumed).remove(&pid);
        }
        result
    }

    async fn stop_unsupervised(
        &self,
        session: SessionId,
        pid: u32,
    ) -> Result<ReleaseNote, ReleaseError> {
        if let Some(cgroups) = &self.cgroups {
            let dir = cgroups.dir(session);
            if dir.exists() {
                return cgroup::stop(&dir, session, self.config.grace).await;
            }
        }
        if !runs_session(pid, session) {
            return Ok(ReleaseNote::Gone);
        }
        self.stop_group(pid, None).await
    }
}

/// Whether `pid` is alive (not a zombie) and runs `session`'s avatar server.
fn runs_session(pid: u32, session: SessionId) -> bool {
    let alive = state_and_group(pid).is_some_and(|(state, _)| !is_dead(state));
    alive && cgroup::env_session(pid) == Some(session)
}

impl ResourceBackend for ProcessBackend {
    fn kind(&self) -> ResourceKind {
        PROCESS_KIND
    }

    fn name(&self) -> &'static str {
        "process"
    }

    fn kind_name(&self) -> &'static str {
        "avatar_process"
    }

    /// The grace, then SIGKILL and its wait, the reap and the cgroup's removal, and a
    /// margin.
    fn release_deadline(&self) -> Duration {
        self.config.grace + KILL_WAIT * 2 + Duration::from_secs(10)
    }

    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        Box::pin(self.spawn(request, events))
    }

    fn find_held<'a>(
        &'a self,
        sessions: &'a [SessionId],
    ) -> BoxFuture<'a, Result<Vec<(SessionId, Resource)>, ReleaseError>> {
        Box::pin(async move {
            let resource = |pid: u32| Resource {
                kind: PROCESS_KIND,
                handle: u64::from(pid),
            };
            let mut found = Vec::new();
            let mut by_env = Vec::new();
            for &session in sessions {
                // A session with a non-empty cgroup: its avatar server is the member that
                // leads a process group (else any member; the release goes by cgroup).
                let members = match &self.cgroups {
                    Some(cgroups) => cgroup::members(&cgroups.dir(session)).map_err(|e| {
                        ReleaseError::transient(format!("reading the cgroup of {session}: {e}"))
                    })?,
                    None => Vec::new(),
                };
                match members
                    .iter()
                    .find(|p| leads_group(**p))
                    .or(members.first())
                {
                    Some(&pid) => found.push((session, resource(pid))),
                    None => by_env.push(session),
                }
            }
            if by_env.is_empty() {
                return Ok(found);
            }
            // Process group leaders whose environment names one of the other sessions.
            let entries = std::fs::read_dir("/proc")
                .map_err(|e| ReleaseError::transient(format!("reading /proc: {e}")))?;
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                if !leads_group(pid) {
                    continue;
                }
                if let Some(session) = by_env.iter().find(|s| runs_session(pid, **s)) {
                    found.push((*session, resource(pid)));
                }
            }
            Ok(found)
        })
    }

    /// Watches an avatar server an earlier run started (after a crash or a handover): when
    /// it exits on its own, its session ends `avatar_exited`, as for a child of this run.
    fn resume<'a>(
        &'a self,
        session: SessionId,
        resource: Resource,
        events: EventSink,
    ) -> BoxFuture<'a, Result<(), ReleaseError>> {
        Box::pin(async move {
            let pid = u32::try_from(resource.handle)
                .map_err(|_| ReleaseError::permanent(format!("invalid pid {}", resource.handle)))?;
            if self.children().contains_key(&pid) {
                return Ok(());
            }
            let stopping = Arc::new(AtomicBool::new(false));
            lock(&self.resumed).insert(pid, Arc::clone(&stopping));
            // Not ready yet when its earlier run stopped, it reports readiness here now.
            let (gone_tx, gone_rx) = watch::channel(false);
            if let Some(socket) = notify::adopt(pid, &mut lock(&self.adopted_dirs)) {
                let events = events.clone();
                tokio::spawn(async move {
                    socket.watch(session, resource, None, gone_rx, events).await
                });
            }
            tokio::spawn(async move {
                // Alive and still the session's: its cgroup, or its environment.
                let alive = |pid| {
                    state_and_group(pid).is_some_and(|(state, _)| !is_dead(state))
                        && session_of_pid(pid) == Some(session)
                };
                while alive(pid) {
                    tokio::time::sleep(RESUMED_POLL).await;
                }
                let _ = gone_tx.send(true);
                if !stopping.load(Ordering::SeqCst) {
                    tracing::warn!(session = %session, pid, "avatar server exited on its own");
                    events
                        .report(ResourceEvent {
                            session,
                            resource,
                            kind: ResourceEventKind::Ends(EndReason::AvatarExited),
                        })
                        .await;
                }
            });
            tracing::info!(session = %session, pid, "took back a running avatar server");
            Ok(())
        })
    }

    fn release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        Box::pin(async move {
            let pid = u32::try_from(resource.handle)
                .map_err(|_| ReleaseError::permanent(format!("invalid pid {}", resource.handle)))?;
            self.stop(session, pid).await
        })
    }
}
