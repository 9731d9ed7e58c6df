//! One cgroup v2 per session: everything a session's avatar server starts, including what
//! leaves its process group with `setsid`, is stopped as one unit.
//!
//! The sessions' cgroups live in `<root>/session-lifecycle/<session id>`. The root is this
//! service's own cgroup ([`CgroupMode::Auto`]: the cgroup2 mount point from
//! `/proc/self/mountinfo` joined with the `0::` path of `/proc/self/cgroup`) or a subtree
//! handed over explicitly ([`CgroupMode::Root`]: systemd's `Delegate=`, a container's own
//! cgroup). No controller is enabled anywhere: only the core files `cgroup.procs`,
//! `cgroup.events` and `cgroup.kill` are used, so creating children of the cgroup this
//! service itself lives in is allowed (the "no internal processes" rule concerns
//! controllers only).
//!
//! A stop signals the members of the cgroup through pidfds, each checked to still be in the
//! session's cgroup after its pidfd is open, so that a recycled pid is never signalled;
//! waits for `cgroup.events` to say `populated 0`; and, after the grace period, writes
//! `cgroup.kill`, which the kernel applies to every member atomically, forks in flight
//! included.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
use session_lifecycle::SessionId;
use session_lifecycle_runtime::{ReleaseError, ReleaseNote};

use session_lifecycle_runtime::SESSION_ID_ENV;

use crate::procs::KILL_WAIT;

/// Where avatar servers' cgroups go.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CgroupMode {
    /// Under this service's own cgroup v2 when that can be written to (a child directory
    /// can be made there); process groups otherwise, with one warning saying why.
    #[default]
    Auto,
    /// Never: process groups only. An avatar server's descendant that calls `setsid`
    /// escapes its stop.
    Off,
    /// Under this cgroup v2 directory, handed over explicitly (systemd's `Delegate=`, a
    /// container's cgroup). Process groups, with a warning, if it is not usable.
    Root(PathBuf),
}

/// The directory, under the root, that holds one cgroup per session.
pub(crate) const DIR_NAME: &str = "session-lifecycle";

/// How often a stop looks at `cgroup.events`.
const POLL: Duration = Duration::from_millis(10);

/// The sessions' cgroups of one backend: `<root>/session-lifecycle/<session id>`.
#[derive(Debug, Clone)]
pub(crate) struct Cgroups {
    /// `<root>/session-lifecycle`.
    base: PathBuf,
}

impl Cgroups {
    /// The cgroups `mode` asks for: `Ok(None)` for [`CgroupMode::Off`], `Err(why)` when
    /// cgroup v2 is not usable.
    pub(crate) fn open(mode: &CgroupMode) -> Result<Option<Cgroups>, String> {
        let root = match mode {
            CgroupMode::Off => return Ok(None),
            CgroupMode::Root(root) => root.clone(),
            CgroupMode::Auto => own_cgroup_dir()?,
        };
        // `cgroup.controllers` exists in every cgroup v2 directory and in no v1 one.
        if !root.join("cgroup.controllers").exists() {
            return Err(format!("{} is not a cgroup v2 directory", root.display()));
        }
        let base = root.join(DIR_NAME);
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", base.display())),
        }
        if !base.join("cgroup.kill").exists() {
            return Err(format!(
                "{} has no cgroup.kill (Linux older than 5.14)",
                base.display()
            ));
        }
        Ok(Some(Cgroups { base }))
    }

    /// `<root>/session-lifecycle`.
    pub(crate) fn base(&self) -> &Path {
        &self.base
    }

    /// The cgroup of `session`, whether it exists or not.
    pub(crate) fn dir(&self, session: SessionId) -> PathBuf {
        self.base.join(&*session.as_str())
    }

    /// Creates the cgroup of `session` (an existing one is reused) and returns it with the
    /// path of its `cgroup.procs`, ready for the child to join before it execs.
    pub(crate) fn create(&self, session: SessionId) -> io::Result<(PathBuf, CString)> {
        let dir = self.dir(session);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok((dir, procs))
    }
}

/// The cgroup directory this process lives in (its `0::` entry under the cgroup2 mount
/// that shows it).
fn own_cgroup_dir() -> Result<PathBuf, String> {
    let read =
        |path: &str| std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"));
    let mountinfo = read("/proc/self/mountinfo")?;
    let cgroup = read("/proc/self/cgroup")?;
    let own = unified_path(&cgroup)
        .ok_or("no cgroup v2 entry (0::) in /proc/self/cgroup: cgroup v1 only")?;
    let mounts = cgroup2_mounts(&mountinfo);
    if mounts.is_empty() {
        return Err("no cgroup2 file system in /proc/self/mountinfo".to_owned());
    }
    mounts
        .iter()
        .find_map(|(root, point)| {
            let rest = Path::new(own).strip_prefix(root).ok()?;
            Some(if rest.as_os_str().is_empty() {
                point.clone()
            } else {
                point.join(rest)
            })
        })
        .ok_or_else(|| format!("own cgroup {own} is not under any cgroup2 mount"))
}

/// The `(root, mount point)` of every cgroup2 mount in a `mountinfo` text.
fn cgroup2_mounts(mountinfo: &str) -> Vec<(PathBuf, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - fstype ...
            let (fields, after) = line.split_once(" - ")?;
            if after.split(' ').next()? != "cgroup2" {
                return None;
            }
            let mut fields = fields.split(' ').skip(3);
            let root = unescape(fields.next()?);
            let point = unescape(fields.next()?);
            Some((root, point))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// The cgroup v2 path of a `/proc/<pid>/cgroup` text (its `0::` line).
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// The session whose cgroup a cgroup path is, or is inside of: the last
/// `session-lifecycle/<session id>` pair of its components.
fn session_in_path(path: &str) -> Option<SessionId> {
    let components: Vec<&str> = path.split('/').collect();
    components
        .windows(2)
        .rev()
        .find(|w| w[0] == DIR_NAME)
        .and_then(|w| SessionId::parse(w[1]).ok())
}

/// The session whose cgroup process `pid` is in, if any.
fn cgroup_session(pid: u32) -> Option<SessionId> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    session_in_path(unified_path(&text)?)
}

/// The session process `pid` belongs to: the session whose cgroup
/// (`.../session-lifecycle/<session id>`) holds it, or else the one named by
/// `SESSION_LIFECYCLE_SESSION_ID` in its environment (avatar servers started with process
/// groups only, and their descendants, which inherit it). For attributing GPU memory to
/// sessions.
pub fn session_of_pid(pid: u32) -> Option<SessionId> {
    cgroup_session(pid).or_else(|| env_session(pid))
}

/// The session named in the environment of process `pid`.
pub(crate) fn env_session(pid: u32) -> Option<SessionId> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{SESSION_ID_ENV}=");
    environ.split(|b| *b == 0).find_map(|var| {
        let id = var.strip_prefix(prefix.as_bytes())?;
        SessionId::parse(std::str::from_utf8(id).ok()?).ok()
    })
}

/// The processes in cgroup `dir` and its descendants; none if it does not exist.
pub(crate) fn members(dir: &Path) -> io::Result<Vec<u32>> {
    let mut pids = Vec::new();
    collect_members(dir, &mut pids)?;
    Ok(pids)
}

fn collect_members(dir: &Path, pids: &mut Vec<u32>) -> io::Result<()> {
    let procs = match std::fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    for child in sub_cgroups(dir)? {
        collect_members(&child, pids)?;
    }
    Ok(())
}

/// The child cgroups of `dir`.
fn sub_cgroups(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect())
}

/// Whether cgroup `dir` or a descendant has a live process (`populated 1` in
/// `cgroup.events`; zombies do not count). A cgroup that does not exist is empty.
pub(crate) fn populated(dir: &Path) -> io::Result<bool> {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => Ok(events.lines().any(|l| l.trim() == "populated 1")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes cgroup `dir` and its descendants (all empty); one already gone is fine.
pub(crate) async fn remove(dir: &Path) -> io::Result<()> {
    for child in sub_cgroups(dir)? {
        Box::pin(remove(&child)).await?;
    }
    // Right after the last member exited the kernel may still call the cgroup busy for
    // a moment.
    let mut tries = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                tries += 1;
                if tries >= 100 {
                    return Err(e);
                }
                tokio::time::sleep(POLL).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Sends `signal` to every member of `session`'s cgroup `dir`, never to a recycled pid:
/// each is pinned by a pidfd first, then checked to still be in the session's cgroup.
fn signal_members(dir: &Path, session: SessionId, signal: Signal) -> io::Result<usize> {
    let mut signalled = 0;
    for pid in members(dir)? {
        let Some(raw) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
            continue;
        };
        let pidfd = match pidfd_open(raw, PidfdFlags::empty()) {
            Ok(fd) => fd,
            // Exited since the cgroup was read.
            Err(rustix::io::Errno::SRCH) => continue,
            Err(e) => return Err(e.into()),
        };
        // The pidfd is this very process: if the pid is in the session's cgroup now, the
        // signal reaches that process, or nothing if it has exited meanwhile.
        if cgroup_session(pid) != Some(session) {
            continue;
        }
        match pidfd_send_signal(&pidfd, signal) {
            Ok(()) => signalled += 1,
            Err(rustix::io::Errno::SRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(signalled)
}

/// Waits up to `within` for cgroup `dir` to be empty; whether it became so.
async fn wait_empty(dir: &Path, within: Duration) -> io::Result<bool> {
    let deadline = tokio::time::Instant::now() + within;
    // A cooperative server is gone within milliseconds: look often at first, then every
    // POLL.
    let mut pause = Duration::from_millis(1);
    loop {
        if !populated(dir)? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(POLL);
    }
}

/// Stops every process of `session`'s cgroup `dir`: SIGTERM to each, up to `grace` for
/// them to exit, then `cgroup.kill`; removes the cgroup once it is empty. The note is
/// `exited` (empty already), `sigterm`, or `sigkill: cgroup.kill after ...`.
pub(crate) async fn stop(
    dir: &Path,
    session: SessionId,
    grace: Duration,
) -> Result<ReleaseNote, ReleaseError> {
    let failed = |what: &str, e: io::Error| {
        ReleaseError::transient(format!("{what} of cgroup {}", dir.display())).caused_by(e)
    };
    let note = if !populated(dir).map_err(|e| failed("reading cgroup.events", e))? {
        ReleaseNote::Exited
    } else {
        signal_members(dir, session, Signal::TERM)
            .map_err(|e| failed("SIGTERM to the members", e))?;
        if wait_empty(dir, grace)
            .await
            .map_err(|e| failed("reading cgroup.events", e))?
        {
            ReleaseNote::Sigterm
        } else {
            let left = members(dir)
                .map_err(|e| failed("reading cgroup.procs", e))?
                .len();
            std::fs::write(dir.join("cgroup.kill"), "1")
                .map_err(|e| failed("writing cgroup.kill", e))?;
            if !wait_empty(dir, KILL_WAIT)
                .await
                .map_err(|e| failed("reading cgroup.events", e))?
            {
                return Err(ReleaseError::transient(format!(
                    "cgroup {} still populated {} ms after cgroup.kill",
                    dir.display(),
                    KILL_WAIT.as_millis()
                )));
            }
            ReleaseNote::CgroupKilled { grace, left }
        }
    };
    remove(dir)
        .await
        .map_err(|e| failed("removing the directory", e))?;
    Ok(note)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 25 0:38 /ctr /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw
";

    #[test]
    fn cgroup2_mounts_are_read_from_mountinfo() {
        assert_eq!(
            cgroup2_mounts(MOUNTINFO),
            vec![
                (PathBuf::from("/"), PathBuf::from("/sys/fs/cgroup/unified")),
                (PathBuf::from("/ctr"), PathBuf::from("/mnt/my cgroup")),
            ]
        );
    }

    #[test]
    fn the_unified_entry_is_the_zero_line() {
        let text = "4:memory:/process_api/x\n1:cpu:/\n0::/system.slice/sessiond.service\n";
        assert_eq!(unified_path(text), Some("/system.slice/sessiond.service"));
        assert_eq!(unified_path("4:memory:/x\n"), None);
    }

    #[test]
    fn a_session_is_read_from_the_last_pair_of_components() {
        let id = "sess_01H3Z8G9YR3K2N5M6P7Q8W4T";
        let want = SessionId::parse(id).ok();
        assert_eq!(session_in_path(&format!("/session-lifecycle/{id}")), want);
        assert_eq!(
            session_in_path(&format!("/a.service/session-lifecycle/{id}/inner")),
            want
        );
        assert_eq!(session_in_path("/session-lifecycle"), None);
        assert_eq!(session_in_path("/session-lifecycle/not-a-session"), None);
        assert_eq!(session_in_path(&format!("/other/{id}")), None);
    }
}
