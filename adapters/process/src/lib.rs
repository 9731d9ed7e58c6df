//! Avatar servers as child processes, one per session.
//!
//! Acquiring starts the configured command line in its own process group, with the
//! session id and the resources acquired before it (`CUDA_VISIBLE_DEVICES`, ...) in its
//! environment. A supervisor task waits on it (so it is always reaped) and, if it exits on
//! its own, reports it so the engine ends the session with `avatar_exited`.
//!
//! Releasing is a graceful stop of the whole process group: SIGTERM, a grace period
//! (10 s by default), then SIGKILL; the release note says which one stopped it
//! (`sigterm`, `sigkill`, or `exited` if it was gone already).
//!
//! After a crash of the service, its avatar servers outlive it as orphans. The restarted
//! service still releases them by pid, but first checks `/proc/<pid>/environ` for the
//! session's id, so that a recycled pid is never signalled. Linux only.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use session_lifecycle::{EndReason, Resource, ResourceKind, SessionId};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, EventSink, ReleaseError, ResourceBackend,
    ResourceEvent,
};
use tokio::sync::watch;

/// The resource kind of avatar server processes (the handle is the process id).
pub const PROCESS_KIND: ResourceKind = ResourceKind(1);

/// The variable that carries the session id into the avatar server's environment.
pub const SESSION_ENV: &str = "SESSION_LIFECYCLE_SESSION_ID";

/// How long to wait for a process to disappear after SIGKILL before calling the release
/// failed (it is retried).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How to run avatar servers.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Program and arguments.
    pub command: Vec<OsString>,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// Extra environment for every avatar server.
    pub env: Vec<(OsString, OsString)>,
}

impl ProcessConfig {
    /// Runs `command` with the default 10 s grace period.
    pub fn new<I, S>(command: I) -> ProcessConfig
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        ProcessConfig {
            command: command.into_iter().map(Into::into).collect(),
            grace: Duration::from_secs(10),
            env: Vec::new(),
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
    /// `true` once the supervisor reaped it.
    exited: watch::Receiver<bool>,
    /// Set before a release signals it, so its exit is not reported as `avatar_exited`.
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Starts, supervises and stops avatar server processes.
pub struct ProcessBackend {
    config: ProcessConfig,
    children: Mutex<HashMap<u32, Child>>,
}

impl ProcessBackend {
    /// A backend running `config`. Fails if the command line is empty.
    pub fn new(config: ProcessConfig) -> io::Result<ProcessBackend> {
        if config.command.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty avatar command",
            ));
        }
        Ok(ProcessBackend {
            config,
            children: Mutex::new(HashMap::new()),
        })
    }

    fn children(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Child>> {
        self.children.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn spawn(
        &self,
        request: AcquireRequest<'_>,
        events: EventSink,
    ) -> Result<Acquired, AcquireError> {
        let mut cmd = tokio::process::Command::new(&self.config.command[0]);
        cmd.args(&self.config.command[1..])
            .envs(self.config.env.iter().map(|(k, v)| (k, v)))
            .envs(request.env.iter().map(|(k, v)| (k, v)))
            .env(SESSION_ENV, request.session.to_string())
            .stdin(std::process::Stdio::null())
            // Its own group: a stop reaches whatever the avatar server started.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            AcquireError::Failed(format!(
                "cannot start avatar server {:?}: {e}",
                self.config.command[0]
            ))
        })?;
        let Some(pid) = child.id() else {
            return Err(AcquireError::Failed(
                "avatar server exited at once".to_owned(),
            ));
        };
        let (exited_tx, exited_rx) = watch::channel(false);
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        self.children().insert(
            pid,
            Child {
                session: request.session,
                exited: exited_rx,
                stopping: Arc::clone(&stopping),
            },
        );
        let session = request.session;
        let resource = Resource {
            kind: PROCESS_KIND,
            handle: u64::from(pid),
        };
        tokio::spawn(async move {
            // Waiting reaps it: no zombie is left, whoever stops it.
            let status = child.wait().await;
            let _ = exited_tx.send(true);
            if !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::warn!(session = %session, pid, ?status, "avatar server exited on its own");
                events.report(ResourceEvent {
                    session,
                    resource,
                    reason: EndReason::AvatarExited,
                });
            }
        });
        tracing::info!(session = %session, pid, "avatar server started");
        Ok(Acquired {
            resource,
            env: Vec::new(),
        })
    }

    async fn stop(&self, session: SessionId, pid: u32) -> Result<String, ReleaseError> {
        let supervised = self.children().get(&pid).map(|c| {
            c.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            (c.session, c.exited.clone())
        });
        let result = match supervised {
            Some((owner, exited)) if owner == session => self.stop_child(pid, exited).await,
            // Another session's process: never ours to stop.
            Some(_) => Ok("gone".to_owned()),
            None => self.stop_orphan(session, pid).await,
        };
        if result.is_ok() {
            self.children().remove(&pid);
        }
        result
    }

    async fn stop_child(
        &self,
        pid: u32,
        mut exited: watch::Receiver<bool>,
    ) -> Result<String, ReleaseError> {
        if *exited.borrow() {
            return Ok("exited".to_owned());
        }
        signal_group(pid, Signal::TERM)?;
        if tokio::time::timeout(self.config.grace, exited.wait_for(|e| *e))
            .await
            .is_ok()
        {
            return Ok("sigterm".to_owned());
        }
        signal_group(pid, Signal::KILL)?;
        match tokio::time::timeout(KILL_WAIT, exited.wait_for(|e| *e)).await {
            Ok(_) => Ok("sigkill".to_owned()),
            Err(_) => Err(ReleaseError(format!("process {pid} survived SIGKILL"))),
        }
    }

    /// Stops a process a previous run of the service started (not our child).
    async fn stop_orphan(&self, session: SessionId, pid: u32) -> Result<String, ReleaseError> {
        if !runs_session(pid, session) {
            return Ok("gone".to_owned());
        }
        signal_group(pid, Signal::TERM)?;
        if wait_gone(pid, session, self.config.grace).await {
            return Ok("sigterm".to_owned());
        }
        signal_group(pid, Signal::KILL)?;
        if wait_gone(pid, session, KILL_WAIT).await {
            Ok("sigkill".to_owned())
        } else {
            Err(ReleaseError(format!("process {pid} survived SIGKILL")))
        }
    }
}

fn signal_group(pid: u32, signal: Signal) -> Result<(), ReleaseError> {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return Err(ReleaseError(format!("invalid pid {pid}")));
    };
    match kill_process_group(pid, signal) {
        // Already gone: nothing left to stop.
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(ReleaseError(format!(
            "signal {signal:?} to process group {}: {e}",
            pid.as_raw_nonzero()
        ))),
    }
}

/// Whether `pid` is alive (not a zombie) and runs `session`'s avatar server.
fn runs_session(pid: u32, session: SessionId) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name; `Z` is a zombie, already dead.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X")) {
        return false;
    }
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("{SESSION_ENV}={session}");
    environ.split(|b| *b == 0).any(|var| var == want.as_bytes())
}

/// Whether `pid` leads its process group (as every avatar server this backend starts
/// does; its own children inherit its environment but not the leadership).
fn leads_group(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Fields after the command name: state, ppid, pgrp, ...
    let pgrp = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .and_then(|g| g.parse::<u32>().ok());
    pgrp == Some(pid)
}

async fn wait_gone(pid: u32, session: SessionId, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while runs_session(pid, session) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

impl ResourceBackend for ProcessBackend {
    fn kind(&self) -> ResourceKind {
        PROCESS_KIND
    }

    fn name(&self) -> &'static str {
        "process"
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
            // Process group leaders whose environment names one of the sessions.
            let entries = std::fs::read_dir("/proc")
                .map_err(|e| ReleaseError(format!("reading /proc: {e}")))?;
            let mut found = Vec::new();
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
                if let Some(session) = sessions.iter().find(|s| runs_session(pid, **s)) {
                    let resource = Resource {
                        kind: PROCESS_KIND,
                        handle: u64::from(pid),
                    };
                    found.push((*session, resource));
                }
            }
            Ok(found)
        })
    }

    fn release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<String, ReleaseError>> {
        Box::pin(async move {
            let pid = u32::try_from(resource.handle)
                .map_err(|_| ReleaseError(format!("invalid pid {}", resource.handle)))?;
            self.stop(session, pid).await
        })
    }
}
