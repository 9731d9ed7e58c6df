//! Uses the core on a bare-metal target: start, attach, end, timeout, and the sans-IO
//! release path (poll, handle_release).
#![no_std]

use core::time::Duration;
use session_lifecycle::{
    Effects, EndReason, Policy, ReleaseOutcome, Resource, ResourceKind, SessionId, SessionTable,
    Timestamp, Work,
};

struct Count(u32);

impl Effects for Count {
    fn release(&mut self, _: &SessionId, _: Resource) -> ReleaseOutcome {
        self.0 += 1;
        ReleaseOutcome::Released
    }
}

/// Runs one session through its lifecycle; returns the releases made.
#[unsafe(no_mangle)]
pub extern "C" fn probe(now_ms: u64, random: u64) -> u32 {
    let mut effects = Count(0);
    let Ok(mut table) = SessionTable::<8>::new(Policy::DEFAULT) else {
        return 0;
    };
    let now = Timestamp::from_millis(now_ms);
    let Ok(session) = table.start(now, u128::from(random), Duration::from_secs(60)) else {
        return 0;
    };
    let id = *session.id();
    let _ = table.attach(
        &id,
        Resource {
            kind: ResourceKind(1),
            handle: 1,
        },
    );
    let _ = table.end_and_release(now, &id, EndReason::Requested, &mut effects);
    let _ = table.handle_timeout(now.saturating_add(Duration::from_secs(3600)), &mut effects);
    // The sans-IO way: a second session's release handed out, run, reported back.
    if let Ok(session) = table.start(now, u128::from(random) + 1, Duration::from_secs(60)) {
        let id = *session.id();
        let gpu = Resource {
            kind: ResourceKind(2),
            handle: 2,
        };
        let _ = table.attach(&id, gpu);
        let _ = table.end(now, &id, EndReason::Requested);
        while let Some(Work::Release { session, resource }) = table.poll(now) {
            effects.0 += 1;
            let _ = table.handle_release(now, &session, resource, ReleaseOutcome::Released);
        }
    }
    effects.0
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
