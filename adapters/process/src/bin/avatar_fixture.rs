//! A small real avatar server for tests: `avatar-fixture MODE`.
//!
//! - `behave`: runs until SIGTERM, then exits 0.
//! - `ignore-term`: ignores SIGTERM; only SIGKILL stops it.
//! - `exit-now`: exits at once with status 3.
//! - `exit-after MILLIS`: runs that long, then exits 0.
//! - `write-env PATH`: writes its session id and `CUDA_VISIBLE_DEVICES` to PATH, then
//!   behaves.
//!
//! - `ledger PATH`: runs until SIGTERM, then appends `SESSION_ID SENDER_PID` to PATH (one
//!   line, one append) and exits 0: an outside record of who stopped which session.
//!
//! - `notify-after MILLIS`: sends `READY=1` to `$NOTIFY_SOCKET` after MILLIS (the systemd
//!   notify protocol), then behaves.
//! - `slow-exit MILLIS`: on SIGTERM waits MILLIS, then exits 0 (a server that needs time
//!   to shut down).
//! - `setsid-child PATH`: starts a grandchild in a session of its own (`setsid`, so out of
//!   this process group) running this fixture in `ignore-term` mode, writes its pid to
//!   PATH, then behaves.
//! - `child-ignores-term PATH`: the same with a child that stays in this process group.
//!
//! It prints `ready` once its signal handling is in place (and, in the modes with a child,
//! once the child's is: the PID file appears after the child printed `ready`).

#![deny(unsafe_code)]

use std::io::BufRead;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("behave");
    match mode {
        "exit-now" => std::process::exit(3),
        "exit-after" => {
            let ms = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
            println!("ready");
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        "write-env" => {
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            let var = |k| std::env::var(k).unwrap_or_default();
            let text = format!(
                "{}\n{}\n",
                var("SESSION_LIFECYCLE_SESSION_ID"),
                var("CUDA_VISIBLE_DEVICES")
            );
            if let Some(path) = args.get(2) {
                std::fs::write(path, text).expect("write env file");
            }
            println!("ready");
            term.recv().await;
        }
        "ledger" => {
            use signal_hook::iterator::SignalsInfo;
            use signal_hook::iterator::exfiltrator::WithOrigin;
            let mut signals = SignalsInfo::<WithOrigin>::new([signal_hook::consts::SIGTERM])
                .expect("install SIGTERM handler");
            println!("ready");
            let origin = signals.forever().next();
            let sender = origin
                .and_then(|o| o.process)
                .map_or(-1, |p| i64::from(p.pid));
            let line = format!(
                "{} {sender}\n",
                std::env::var("SESSION_LIFECYCLE_SESSION_ID").unwrap_or_default()
            );
            if let Some(path) = args.get(2) {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .expect("open ledger");
                file.write_all(line.as_bytes()).expect("append to ledger");
            }
        }
        "notify-after" => {
            // Reports READY=1 on $NOTIFY_SOCKET after MILLIS (the systemd notify
            // protocol), then runs until SIGTERM.
            let ms = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(300);
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            println!("ready");
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if let Ok(path) = std::env::var("NOTIFY_SOCKET") {
                let socket = std::os::unix::net::UnixDatagram::unbound().expect("socket");
                socket
                    .send_to(b"STATUS=loading done\nREADY=1\n", path)
                    .expect("notify");
            }
            term.recv().await;
        }
        "slow-exit" => {
            let ms = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(500);
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            println!("ready");
            term.recv().await;
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        "setsid-child" | "child-ignores-term" => {
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            let path = args.get(2).expect("usage: avatar-fixture MODE PID_FILE");
            let mut cmd = std::process::Command::new(std::env::current_exe().expect("own path"));
            cmd.arg("ignore-term")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped());
            if mode == "setsid-child" {
                new_session_before_exec(&mut cmd);
            }
            #[expect(
                clippy::zombie_processes,
                reason = "the child outlives this process on purpose, never waited for"
            )]
            let mut child = cmd.spawn().expect("start the child");
            // Its SIGTERM handler is in place once it says so.
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().expect("piped stdout"))
                .read_line(&mut line)
                .expect("read the child's ready line");
            assert_eq!(line.trim(), "ready", "the child is ready");
            // Written whole, then renamed: a reader never sees half a pid.
            let partial = format!("{path}.partial");
            std::fs::write(&partial, child.id().to_string()).expect("write the PID file");
            std::fs::rename(&partial, path).expect("rename the PID file");
            println!("ready");
            term.recv().await;
            // The child is left running: that is the point.
        }
        "ignore-term" => {
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            println!("ready");
            loop {
                term.recv().await;
            }
        }
        _ => {
            let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
            println!("ready");
            term.recv().await;
        }
    }
}

/// Makes the child spawned by `cmd` start a session of its own (and so leave this process
/// group) before it execs, as a daemonising helper would.
#[allow(unsafe_code)]
fn new_session_before_exec(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes a single system call
    // (setsid), which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
}
