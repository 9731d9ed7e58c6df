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

/// Where the avatar server `pid` of an earlier run reports readiness, taken back: its
/// `NOTIFY_SOCKET` (read from its environment) bound again, so that a server adopted before
/// it was ready still reports it. Only a path an earlier run of this backend would have
/// made (a `sessiond-notify-*` directory right in the temporary directory): its directory,
/// gone with that run, is made again private to this user; one that exists must be ours
/// and private. `None` when the server has no such socket, with a warning when it has one
/// that cannot be taken back. The directory made is added to `made`, for removal.
pub fn adopt(pid: u32, made: &mut Vec<PathBuf>) -> Option<NotifySocket> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{NOTIFY_SOCKET_ENV}=");
    let path = environ.split(|b| *b == 0).find_map(|var| {
        let value = var.strip_prefix(prefix.as_bytes())?;
        Some(PathBuf::from(std::ffi::OsStr::from_bytes(value)))
    })?;
    let dir = path.parent()?.to_owned();
    let ours = dir.parent() == Some(std::env::temp_dir().as_path())
        && dir
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"sessiond-notify-"))
        && path.extension().is_some_and(|e| e == "sock");
    if !ours {
        tracing::warn!(pid, path = %path.display(), "not taking back a notify socket this backend did not make");
        return None;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => made.push(dir.clone()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let private = std::fs::symlink_metadata(&dir).is_ok_and(|m| {
                m.is_dir()
                    && m.uid() == rustix::process::geteuid().as_raw()
                    && m.permissions().mode() & 0o077 == 0
            });
            if !private {
                tracing::warn!(pid, dir = %dir.display(), "a notify directory that is not private to this user: readiness is not taken back");
                return None;
            }
        }
        Err(e) => {
            tracing::warn!(pid, dir = %dir.display(), error = %e, "cannot make the notify directory again");
            return None;
        }
    }
    // A stale file of the earlier run.
    let _ = std::fs::remove_file(&path);
    match UnixDatagram::bind(&path) {
        Ok(socket) => Some(NotifySocket { socket, path }),
        Err(e) => {
            tracing::warn!(pid, path = %path.display(), error = %e, "cannot bind the notify socket again");
            None
        }
    }
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
