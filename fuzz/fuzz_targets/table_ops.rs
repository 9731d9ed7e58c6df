//! Applies an arbitrary sequence of operations to a real table, driven both ways (the
//! synchronous `Effects` loops and the sans-IO `poll`/`handle_release`/`defer_end`), and
//! checks the contract's invariants after each: status only moves started -> ended, the
//! first ending stands, no resource is released twice, releases go one at a time per
//! session in reverse acquisition order and never before their backoff, nothing due is
//! left after a timeout, and the table's internal structure holds.
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
    /// `end` without releasing: releases are then polled.
    EndOnly {
        target: u8,
        reason: u8,
    },
    Poll,
    Complete {
        pick: u8,
        fail: bool,
    },
    AnswerEnd {
        pick: u8,
        commit: bool,
        defer_millis: u16,
    },
}

/// Checks what a table hands out for release: not released, every later resource
/// released, its retry time come, and marked in flight.
fn check_handout(session: &Session, resource: Resource, now: Timestamp) {
    let rs = session.resources();
    let i = rs.iter().position(|r| r.resource == resource).unwrap();
    match rs[i].release {
        ReleaseState::Released { .. } => panic!("released resource handed out"),
        ReleaseState::Pending { retry_at, .. } => assert!(retry_at <= now, "retry before backoff"),
        ReleaseState::Held => {}
    }
    assert!(
        rs[i + 1..]
            .iter()
            .all(|r| matches!(r.release, ReleaseState::Released { .. })),
        "released out of order"
    );
    assert_eq!(session.release_in_flight(), Some(resource));
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
    let mut outstanding: Vec<Work> = Vec::new();

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
                    // This harness's 8 bits of randomness can repeat an id the table has
                    // evicted and no longer knows (the clock stepped back): a new session,
                    // as with a restore. Real ids carry 80 random bits, and the store's key.
                    let id = *s.id();
                    first_end.remove(&id);
                    outstanding.retain(|w| match w {
                        Work::End { session, .. } | Work::Release { session, .. } => *session != id,
                    });
                    ids.push(id);
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
                    if let Ok(out) = table.end_and_release(ts, &id, reason, &mut ledger) {
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
                // A restore may replace a session whose work was out; the rest stays out.
            }
            Operation::StepBack { millis } => now = now.saturating_sub(millis.into()),
            Operation::EndOnly { target, reason } => {
                if let Some(id) = pick(&ids, target) {
                    let reason = EndReason::ALL[usize::from(reason) % EndReason::ALL.len()];
                    if let Ok(out) = table.end(ts, &id, reason) {
                        let ending = out.session.ending().unwrap();
                        assert_eq!(*first_end.entry(id).or_insert(ending), ending);
                    }
                }
            }
            Operation::Poll => {
                if let Some(work) = table.poll(ts) {
                    if let Work::Release { session, resource } = work {
                        assert!(
                            !outstanding.iter().any(
                                |w| matches!(w, Work::Release { session: s, .. } if *s == session)
                            ),
                            "two releases of one session in flight"
                        );
                        check_handout(table.get(&session).unwrap(), resource, ts);
                    }
                    outstanding.push(work);
                }
            }
            Operation::Complete { pick, fail } => {
                let releases: Vec<usize> = (0..outstanding.len())
                    .filter(|i| matches!(outstanding[*i], Work::Release { .. }))
                    .collect();
                if !releases.is_empty() {
                    let k = releases[usize::from(pick) % releases.len()];
                    let Work::Release { session, resource } = outstanding.remove(k) else {
                        unreachable!()
                    };
                    let outcome = if fail {
                        ReleaseOutcome::Failed
                    } else {
                        let n = ledger.released.entry((session, resource)).or_default();
                        *n += 1;
                        assert_eq!(*n, 1, "{resource:?} of {session} released twice");
                        ReleaseOutcome::Released
                    };
                    table
                        .handle_release(ts, &session, resource, outcome)
                        .unwrap();
                    // Reporting it again is refused.
                    assert!(
                        table
                            .handle_release(ts, &session, resource, outcome)
                            .is_err()
                    );
                }
            }
            Operation::AnswerEnd {
                pick,
                commit,
                defer_millis,
            } => {
                let ends: Vec<usize> = (0..outstanding.len())
                    .filter(|i| matches!(outstanding[*i], Work::End { .. }))
                    .collect();
                if !ends.is_empty() {
                    let k = ends[usize::from(pick) % ends.len()];
                    let Work::End { session, reason } = outstanding.remove(k) else {
                        unreachable!()
                    };
                    if table.get(&session).is_none() {
                        // Ended another way meanwhile and evicted after the retention: the
                        // answer finds nothing, and changes nothing.
                        assert!(table.end(ts, &session, reason).is_err());
                        assert!(table.defer_end(&session, ts).is_err());
                        assert!(table.get(&session).is_none());
                    } else if commit {
                        let out = table.end(ts, &session, reason).unwrap();
                        let ending = out.session.ending().unwrap();
                        assert_eq!(*first_end.entry(session).or_insert(ending), ending);
                    } else {
                        let later = Timestamp::from_millis(now + u64::from(defer_millis));
                        table.defer_end(&session, later).unwrap();
                    }
                }
            }
            Operation::Restore { json } => {
                if let Ok(session) = serde_json::from_slice::<Session>(&json) {
                    let id = *session.id();
                    if table.restore(session).is_ok() {
                        outstanding.retain(|w| match w {
                            Work::End { session, .. } | Work::Release { session, .. } => {
                                *session != id
                            }
                        });
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
