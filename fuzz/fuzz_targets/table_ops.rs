//! Applies an arbitrary sequence of operations to a real table and checks the contract's
//! invariants after each: status only moves started -> ended, the first ending stands, no
//! resource is released twice, nothing due is left after a timeout, and the table's
//! internal structure holds.
#![no_main]

use std::collections::HashMap;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use session_lifecycle::*;

#[derive(Arbitrary, Debug)]
enum Operation {
    Start {
        random: u8,
        lifetime_secs: u8,
    },
    End {
        target: u8,
        reason: u8,
        fail_mask: u8,
    },
    Attach {
        target: u8,
        handle: u8,
    },
    Touch {
        target: u8,
    },
    Advance {
        millis: u16,
        fail_mask: u8,
    },
    StepBack {
        millis: u16,
    },
    Restore {
        json: Vec<u8>,
    },
}

#[derive(Default)]
struct Ledger {
    fail_mask: u8,
    released: HashMap<(SessionId, Resource), u32>,
}

impl Effects for Ledger {
    fn release(&mut self, session: &SessionId, resource: Resource) -> ReleaseOutcome {
        if self.fail_mask & (1 << (resource.handle % 8)) != 0 {
            return ReleaseOutcome::Failed;
        }
        let n = self.released.entry((*session, resource)).or_default();
        *n += 1;
        assert_eq!(*n, 1, "{resource:?} of {session} released twice");
        ReleaseOutcome::Released
    }
}

const BASE_MS: u64 = 1_705_314_600_000;

fuzz_target!(|ops: Vec<Operation>| {
    let policy = Policy {
        orphan_timeout: Duration::from_secs(10),
        sweep_interval: Duration::from_secs(5),
        retention: Duration::from_secs(20),
        release_backoff_initial: Duration::from_millis(500),
        release_backoff_max: Duration::from_secs(4),
    };
    let mut table = Box::new(SessionTable::<8>::new(policy).unwrap());
    let mut ledger = Ledger::default();
    let mut now = BASE_MS;
    let mut ids: Vec<SessionId> = Vec::new();
    let mut first_end: HashMap<SessionId, Ending> = HashMap::new();
    let pick = |ids: &[SessionId], t: u8| ids.get(usize::from(t) % ids.len().max(1)).copied();

    for op in ops.into_iter().take(256) {
        let ts = Timestamp::from_millis(now);
        match op {
            Operation::Start {
                random,
                lifetime_secs,
            } => {
                let r = table.start(
                    ts,
                    u128::from(random),
                    Duration::from_secs(lifetime_secs.into()),
                );
                if let Ok(s) = r {
                    ids.push(*s.id());
                }
            }
            Operation::End {
                target,
                reason,
                fail_mask,
            } => {
                if let Some(id) = pick(&ids, target) {
                    ledger.fail_mask = fail_mask;
                    let reason = EndReason::ALL[usize::from(reason) % EndReason::ALL.len()];
                    if let Ok(out) = table.end(ts, &id, reason, &mut ledger) {
                        let ending = out.session.ending().unwrap();
                        assert_eq!(*first_end.entry(id).or_insert(ending), ending);
                    }
                }
            }
            Operation::Attach { target, handle } => {
                if let Some(id) = pick(&ids, target) {
                    let resource = Resource {
                        kind: ResourceKind(1),
                        handle: handle.into(),
                    };
                    let ended = table.get(&id).is_some_and(|s| s.ended_at().is_some());
                    match table.attach(&id, resource) {
                        Ok(()) => assert!(!ended),
                        Err(e) => assert_eq!(e.resource, resource),
                    }
                }
            }
            Operation::Touch { target } => {
                if let Some(id) = pick(&ids, target) {
                    let _ = table.touch(ts, &id);
                }
            }
            Operation::Advance { millis, fail_mask } => {
                now += u64::from(millis) * 8;
                ledger.fail_mask = fail_mask;
                table.handle_timeout(Timestamp::from_millis(now), &mut ledger);
                assert!(table.next_deadline().is_none_or(|d| d.as_millis() > now));
            }
            Operation::StepBack { millis } => now = now.saturating_sub(millis.into()),
            Operation::Restore { json } => {
                if let Ok(session) = serde_json::from_slice::<Session>(&json) {
                    let id = *session.id();
                    if table.restore(session).is_ok() {
                        // The caller vouches for a restored record (it comes from durable
                        // storage); it replaces whatever this id was before eviction.
                        first_end.remove(&id);
                        ids.push(id);
                    }
                }
            }
        }
        table.check_structure().unwrap();
        for s in table.iter() {
            assert!(s.ended_at().is_none_or(|at| at >= s.started_at()));
            match (s.ending(), first_end.get(s.id())) {
                (Some(e), Some(first)) => assert_eq!(e, *first, "an ending changed"),
                (Some(e), None) => {
                    first_end.insert(*s.id(), e);
                }
                (None, Some(_)) => panic!("{} restarted", s.id()),
                (None, None) => {}
            }
        }
    }
});
