//! The `no_std` core on its own, driven the way firmware or a test harness drives it: a
//! hand-written loop and a fake clock. The loop sleeps (here: jumps the clock) to the
//! table's next deadline, takes the work the table hands out, does it, and reports back.
//! The core allocates nothing; this example itself uses `std` (it prints, and it runs on
//! a host). CI builds the core alone for a bare-metal target (`.ci/no-std-probe`).
//!
//! `cargo run --example no_std_core`

use core::time::Duration;

use session_lifecycle::{
    EndReason, Policy, ReleaseOutcome, Resource, ResourceKind, SessionTable, Timestamp, Work,
};

const GPU: ResourceKind = ResourceKind(1);
const PROCESS: ResourceKind = ResourceKind(2);

/// A clock that moves only when told: the core never reads one itself.
struct FakeClock(Timestamp);

impl FakeClock {
    fn now(&self) -> Timestamp {
        self.0
    }
    fn jump_to(&mut self, to: Timestamp) {
        self.0 = self.0.max(to);
    }
}

fn at(clock: &FakeClock, t0: Timestamp) -> String {
    format!(
        "t+{:>5} ms",
        clock.now().saturating_duration_since(t0).as_millis()
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Timestamp::parse_rfc3339("2024-01-15T10:30:00Z")?;
    let mut clock = FakeClock(t0);
    let mut table = SessionTable::<16>::new(Policy::DEFAULT)?;

    // A short session that expires after 30 s, and a long one kept alive by liveness
    // signals until they stop (orphaned 60 s after the last one).
    let short = *table.start(clock.now(), 1, Duration::from_secs(30))?.id();
    let long = *table.start(clock.now(), 2, Duration::from_secs(3600))?.id();
    for (n, id) in [short, long].iter().enumerate() {
        table.attach(
            id,
            Resource {
                kind: GPU,
                handle: n as u64,
            },
        )?;
        table.attach(
            id,
            Resource {
                kind: PROCESS,
                handle: 1000 + n as u64,
            },
        )?;
    }
    println!(
        "{}: started {short} (30 s) and {long} (1 h)",
        at(&clock, t0)
    );

    // The long session's client sends a signal every 20 s for a minute.
    let mut signals = [20, 40, 60].map(|s| t0.saturating_add(Duration::from_secs(s)));
    let mut failed_once = false;
    let mut endings = Vec::new();
    let mut steps = 0;
    while !table.is_empty() {
        steps += 1;
        if steps > 1000 {
            return Err("the loop did not settle".into());
        }
        // Sleep until whichever comes first: the table's deadline or the next signal.
        let signal = signals.iter().copied().find(|s| *s > clock.now());
        let wake = match (table.next_deadline(), signal) {
            (Some(d), Some(s)) => d.min(s),
            (d, s) => d.or(s).ok_or("nothing to wait for")?,
        };
        clock.jump_to(wake);
        if signal == Some(clock.now()) {
            table.touch(clock.now(), &long)?;
            signals
                .iter_mut()
                .filter(|s| **s == clock.now())
                .for_each(|s| *s = t0);
            println!("{}: liveness signal for {long}", at(&clock, t0));
        }
        while let Some(work) = table.poll(clock.now()) {
            match work {
                Work::End { session, reason } => {
                    // A durable driver commits the end to its database here first.
                    table.end(clock.now(), &session, reason)?;
                    endings.push((session, reason, clock.now()));
                    println!("{}: ended {session}: {reason}", at(&clock, t0));
                }
                Work::Release { session, resource } => {
                    // The first attempt to stop a process fails: the core retries it after
                    // its backoff, and the GPU under it waits (last acquired, first released).
                    let outcome = if resource.kind == PROCESS && !failed_once {
                        failed_once = true;
                        ReleaseOutcome::Failed
                    } else {
                        ReleaseOutcome::Released
                    };
                    let what = if resource.kind == GPU {
                        "gpu"
                    } else {
                        "process"
                    };
                    println!(
                        "{}: release {what} {} of {session}: {outcome:?}",
                        at(&clock, t0),
                        resource.handle
                    );
                    table.handle_release(clock.now(), &session, resource, outcome)?;
                }
            }
        }
    }
    println!(
        "{}: every session ended, released and evicted",
        at(&clock, t0)
    );
    // The short one expired at 30 s; the long one was orphaned 60 s after its last signal.
    let expected = [
        (
            short,
            EndReason::Expired,
            t0.saturating_add(Duration::from_secs(30)),
        ),
        (
            long,
            EndReason::Orphaned,
            t0.saturating_add(Duration::from_secs(120)),
        ),
    ];
    if endings != expected {
        return Err(format!("ended {endings:?}, expected {expected:?}").into());
    }
    Ok(())
}
