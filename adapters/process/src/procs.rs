//! Process groups and what `/proc` says of a process: the system calls the backend makes
//! about processes it did not spawn in this run (after a restart) as well as its own.

use std::ffi::CString;
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process_group};
use session_lifecycle_runtime::ReleaseError;
use tokio::sync::watch;

/// How long to wait for a process to disappear after SIGKILL (or a cgroup to empty after
/// `cgroup.kill`) before calling the release failed (it is retried).
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// How often a process-group stop looks for the group's members.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// Makes the child spawned by `cmd` join the cgroup whose `cgroup.procs` is `procs`
/// between fork and exec, so that nothing it ever starts is outside that cgroup. If it
/// cannot, the spawn fails.
#[allow(unsafe_code)]
pub(crate) fn join_cgroup_before_exec(cmd: &mut tokio::process::Command, procs: CString) {
    use rustix::fs::{Mode, OFlags};
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe operations are allowed. It makes three system calls through
    // rustix (open, write, and close when the fd drops) on a path prepared before the
    // fork, allocates nothing (a rustix `Errno` becomes an `io::Error` without
    // allocating), takes no lock, and touches no state shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            let fd = rustix::fs::open(
                procs.as_c_str(),
                OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            rustix::io::write(&fd, b"0")?;
            Ok(())
        });
    }
}

/// Waits (up to [`KILL_WAIT`]) for the supervisor to reap a child that has exited.
pub(crate) async fn wait_reaped(mut exited: watch::Receiver<bool>) {
    let _ = tokio::time::timeout(KILL_WAIT, exited.wait_for(|e| *e)).await;
}

pub(crate) fn signal_group(pgid: u32, signal: Signal) -> Result<(), ReleaseError> {
    let Some(pid) = i32::try_from(pgid).ok().and_then(Pid::from_raw) else {
        return Err(ReleaseError::permanent(format!("invalid pid {pgid}")));
    };
    match kill_process_group(pid, signal) {
        // Already gone: nothing left to stop.
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(ReleaseError::transient(format!(
            "signal {signal:?} to process group {pgid}: {e}"
        ))),
    }
}

/// The state and process group of `pid`, from `/proc/<pid>/stat`.
pub(crate) fn state_and_group(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name: state, ppid, pgrp, ...
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Whether a process state is a dead one (`Z` zombie, `X` dead).
pub(crate) fn is_dead(state: char) -> bool {
    matches!(state, 'Z' | 'X')
}

/// The live (not zombie) processes of process group `pgid`.
pub(crate) fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            state_and_group(*pid).is_some_and(|(state, pgrp)| pgrp == pgid && !is_dead(state))
        })
        .collect()
}

/// Waits up to `within` for process group `pgid` to have no live member.
pub(crate) async fn wait_group_gone(pgid: u32, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if group_members(pgid).is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(GROUP_POLL).await;
    }
}

/// Whether `pid` leads its process group (as every avatar server this backend starts
/// does; its own children inherit its environment but not the leadership).
pub(crate) fn leads_group(pid: u32) -> bool {
    state_and_group(pid).is_some_and(|(_, pgrp)| pgrp == pid)
}
