//! Readiness through the systemd notify protocol: each avatar server gets a datagram
//! socket of its own, named by `NOTIFY_SOCKET` in its environment, and reports `READY=1`
//! there when it can serve (as servers run by systemd with `Type=notify` already do). The
//! backend reports the session ready, or, past its ready timeout, ends it `start_failed`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use session_lifecycle::{EndReason, Resource, SessionId};
use session_lifecycle_runtime::{EventSink, ResourceEvent, ResourceEventKind};
use tokio::net::UnixDatagram;
use tokio::sync::watch;

/// The variable naming the socket.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

/// The longest socket path `sockaddr_un` takes (108 bytes with its terminating zero).
const MAX_PATH: usize = 107;

/// One avatar server's notify socket; its file goes when it is dropped.
pub struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A new directory for notify sockets, private to this user: made here (never one that
/// existed, which someone else could have made), with a name no one can guess ahead.
pub fn private_dir() -> io::Result<PathBuf> {
    use std::hash::{BuildHasher, Hasher};
    use std::os::unix::fs::DirBuilderExt;
    for _ in 0..16 {
        // A random name: std's hasher keys are random per process.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        let dir = std::env::temp_dir().join(format!(
            "sessiond-notify-{}-{:016x}",
            std::process::id(),
            hasher.finish()
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no fresh directory for notify sockets",
    ))
}

impl NotifySocket {
    /// A socket for `session` in `dir` (made by [`private_dir`]).
    pub fn bind(dir: &Path, session: SessionId) -> io::Result<NotifySocket> {
        let path = dir.join(format!("{session}.sock"));
        if path.as_os_str().len() > MAX_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is too long for a socket path", path.display()),
            ));
        }
        // A stale file of an earlier run with this id.
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        Ok(NotifySocket { socket, path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for `READY=1` (reported as the session being ready), the ready timeout (the
    /// session ends `start_failed`), or the server's exit (nothing to report: its exit is).
    pub async fn watch(
        self,
        session: SessionId,
        resource: Resource,
        ready_timeout: Option<Duration>,
        mut exited: watch::Receiver<bool>,
        events: EventSink,
    ) {
        let deadline = async {
            match ready_timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let kind = tokio::select! {
            biased;
            _ = exited.wait_for(|gone| *gone) => return,
            ready = self.ready() => match ready {
                Ok(()) => ResourceEventKind::Ready,
                Err(e) => {
                    tracing::warn!(session = %session, error = %e, "reading the notify socket failed");
                    return;
                }
            },
            () = deadline => {
                tracing::warn!(session = %session, ?ready_timeout, "avatar server not ready in time");
                ResourceEventKind::Ends(EndReason::StartFailed)
            }
        };
        events
            .report(ResourceEvent {
                session,
                resource,
                kind,
            })
            .await;
    }

    /// Until a datagram has a `READY=1` line (others, `STATUS=...`, are ignored).
    async fn ready(&self) -> io::Result<()> {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = self.socket.recv(&mut buf).await?;
            let text = String::from_utf8_lossy(&buf[..n]);
            if text.lines().any(|line| line.trim() == "READY=1") {
                return Ok(());
            }
        }
    }
}
