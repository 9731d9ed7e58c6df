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
//! It prints `ready` once its signal handling is in place.

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
