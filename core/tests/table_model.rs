//! Model-based property test: a plain reference model and the real `SessionTable` run the
//! same random operation sequences, and must agree after every step.
//!
//! `PROPTEST_CASES` sets the number of sequences (CI runs 10,000).

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use session_lifecycle::*;

const CAPACITY: usize = 8;
const BASE_MS: u64 = 1_705_314_600_000; // 2024-01-15T10:30:00Z

fn policy() -> Policy {
    Policy {
        orphan_timeout: Duration::from_secs(10),
        sweep_interval: Duration::from_secs(5),
        retention: Duration::from_secs(30),
        release_backoff_initial: Duration::from_secs(1),
        release_backoff_max: Duration::from_secs(4),
    }
}

/// Whether releasing `resource` fails during a step with `fail_mask`: decided by the
/// resource alone, so the order in which the table visits sessions cannot matter.
fn fails(resource: Resource, fail_mask: u8) -> bool {
    fail_mask & (1 << (resource.handle % 8)) != 0
}

#[derive(Clone, Debug)]
enum Op {
    Start {
        random: u128,
        lifetime_ms: u64,
    },
    End {
        target: Option<Index>,
        reason: EndReason,
        fail_mask: u8,
    },
    Attach {
        target: Option<Index>,
        handle: u64,
    },
    Touch {
        target: Option<Index>,
    },
    Advance {
        ms: u64,
        fail_mask: u8,
    },
    StepBack {
        ms: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum ModelRelease {
    Held,
    Pending { attempts: u32, retry_at: u64 },
    Released { at: u64 },
}

#[derive(Clone, Debug)]
struct ModelSession {
    id: SessionId,
    started_at: u64,
    expires_at: u64,
    last_seen: u64,
    ended: Option<(u64, EndReason)>,
    resources: Vec<(Resource, ModelRelease)>,
    evicted: bool,
}

#[derive(Clone, Debug)]
struct Model {
    now: u64,
    sessions: Vec<ModelSession>,
    /// What the last operation must have returned, checked by the SUT step.
    expect: Expect,
}

#[derive(Clone, Debug, PartialEq)]
enum Expect {
    Nothing,
    Started(Result<SessionId, StartError>),
    Ended(Result<(Transition, u64, EndReason), NotFound>),
    Attached(Result<(), AttachRefusal>),
    Touched(Result<(), TouchError>),
    Swept { expired: u32, orphaned: u32 },
}

impl ModelSession {
    fn deadline(&self, p: &Policy) -> u64 {
        let ms = |d: Duration| d.as_millis() as u64;
        match self.ended {
            None => self.expires_at.min(self.last_seen + ms(p.orphan_timeout)),
            Some((ended_at, _)) => {
                if self.resources.iter().any(|(_, r)| *r == ModelRelease::Held) {
                    return ended_at;
                }
                let retry = self
                    .resources
                    .iter()
                    .filter_map(|(_, r)| match r {
                        ModelRelease::Pending { retry_at, .. } => Some(*retry_at),
                        _ => None,
                    })
                    .min();
                retry.unwrap_or_else(|| {
                    let done = self
                        .resources
                        .iter()
                        .filter_map(|(_, r)| match r {
                            ModelRelease::Released { at } => Some(*at),
                            _ => None,
                        })
                        .fold(ended_at, u64::max);
                    done + ms(p.retention)
                })
            }
        }
    }

    fn run_releases(&mut self, now: u64, fail_mask: u8, p: &Policy) {
        for (resource, state) in self.resources.iter_mut().rev() {
            let before = match state {
                ModelRelease::Held => 0,
                ModelRelease::Pending { attempts, retry_at } if *retry_at <= now => *attempts,
                _ => continue,
            };
            *state = if fails(*resource, fail_mask) {
                ModelRelease::Pending {
                    attempts: before + 1,
                    retry_at: now + p.release_backoff(before + 1).as_millis() as u64,
                }
            } else {
                ModelRelease::Released { at: now }
            };
        }
    }

    fn end(&mut self, now: u64, reason: EndReason, fail_mask: u8, p: &Policy) -> Transition {
        if self.ended.is_some() {
            return Transition::AlreadyEnded;
        }
        self.ended = Some((now.max(self.started_at), reason));
        self.run_releases(now, fail_mask, p);
        Transition::Committed
    }
}

impl Model {
    fn live(&self) -> impl Iterator<Item = &ModelSession> {
        self.sessions.iter().filter(|s| !s.evicted)
    }

    fn target(&self, target: &Option<Index>) -> Option<usize> {
        match target {
            Some(ix) if !self.sessions.is_empty() => Some(ix.index(self.sessions.len())),
            _ => None,
        }
    }

    fn live_target(&self, target: &Option<Index>) -> Option<usize> {
        self.target(target).filter(|&i| !self.sessions[i].evicted)
    }
}

/// An id no session in the test ever has (its ULID time is before the base).
fn unknown_id() -> SessionId {
    SessionId::parse("sess_01H3Z8G9YR3K2N5M6P7Q8W4T").unwrap()
}

struct TableModel;

impl ReferenceStateMachine for TableModel {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model {
            now: BASE_MS,
            sessions: Vec::new(),
            expect: Expect::Nothing,
        })
        .boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Op> {
        let target = proptest::option::weighted(0.95, any::<Index>());
        let reason = proptest::sample::select(EndReason::ALL.to_vec());
        prop_oneof![
            3 => (0u128..4, 0u64..60_000).prop_map(|(random, lifetime_ms)| Op::Start { random, lifetime_ms }),
            3 => (target.clone(), reason, any::<u8>())
                .prop_map(|(target, reason, fail_mask)| Op::End { target, reason, fail_mask }),
            3 => (target.clone(), 0u64..12).prop_map(|(target, handle)| Op::Attach { target, handle }),
            2 => target.prop_map(|target| Op::Touch { target }),
            4 => (0u64..20_000, any::<u8>()).prop_map(|(ms, fail_mask)| Op::Advance { ms, fail_mask }),
            1 => (0u64..15_000).prop_map(|ms| Op::StepBack { ms }),
        ]
        .boxed()
    }

    fn apply(mut m: Model, op: &Op) -> Model {
        let p = policy();
        m.expect = match op {
            Op::Start {
                random,
                lifetime_ms,
            } => {
                let id = SessionId::from_ulid_parts(Timestamp::from_millis(m.now), *random);
                if m.live().any(|s| s.id == id) {
                    Expect::Started(Err(StartError::DuplicateId))
                } else if m.live().count() == CAPACITY {
                    Expect::Started(Err(StartError::TableFull))
                } else {
                    m.sessions.push(ModelSession {
                        id,
                        started_at: m.now,
                        expires_at: m.now + lifetime_ms,
                        last_seen: m.now,
                        ended: None,
                        resources: Vec::new(),
                        evicted: false,
                    });
                    Expect::Started(Ok(id))
                }
            }
            Op::End {
                target,
                reason,
                fail_mask,
            } => match m.live_target(target) {
                None => Expect::Ended(Err(NotFound)),
                Some(i) => {
                    let now = m.now;
                    let s = &mut m.sessions[i];
                    let t = s.end(now, *reason, *fail_mask, &p);
                    let (at, why) = s.ended.unwrap();
                    Expect::Ended(Ok((t, at, why)))
                }
            },
            Op::Attach { target, handle } => match m.live_target(target) {
                None => Expect::Attached(Err(AttachRefusal::NotFound)),
                Some(i) => {
                    let s = &mut m.sessions[i];
                    let resource = Resource {
                        kind: ResourceKind(1),
                        handle: *handle,
                    };
                    Expect::Attached(if s.ended.is_some() {
                        Err(AttachRefusal::SessionEnded)
                    } else if s.resources.iter().any(|(r, _)| *r == resource) {
                        Err(AttachRefusal::AlreadyHeld)
                    } else if s.resources.len() == MAX_RESOURCES {
                        Err(AttachRefusal::TooManyResources)
                    } else {
                        s.resources.push((resource, ModelRelease::Held));
                        Ok(())
                    })
                }
            },
            Op::Touch { target } => match m.live_target(target) {
                None => Expect::Touched(Err(TouchError::NotFound)),
                Some(i) => {
                    let now = m.now;
                    let s = &mut m.sessions[i];
                    Expect::Touched(if s.ended.is_some() {
                        Err(TouchError::SessionEnded)
                    } else {
                        s.last_seen = s.last_seen.max(now);
                        Ok(())
                    })
                }
            },
            Op::Advance { ms, fail_mask } => {
                m.now += ms;
                let now = m.now;
                let (mut expired, mut orphaned) = (0, 0);
                for s in m.sessions.iter_mut().filter(|s| !s.evicted) {
                    while !s.evicted && s.deadline(&p) <= now {
                        match s.ended {
                            None => {
                                let orphan_at = s.last_seen + p.orphan_timeout.as_millis() as u64;
                                let reason = if s.expires_at <= orphan_at {
                                    expired += 1;
                                    EndReason::Expired
                                } else {
                                    orphaned += 1;
                                    EndReason::Orphaned
                                };
                                s.end(now, reason, *fail_mask, &p);
                            }
                            Some(_)
                                if s.resources
                                    .iter()
                                    .all(|(_, r)| matches!(r, ModelRelease::Released { .. })) =>
                            {
                                s.evicted = true;
                            }
                            Some(_) => s.run_releases(now, *fail_mask, &p),
                        }
                    }
                }
                Expect::Swept { expired, orphaned }
            }
            Op::StepBack { ms } => {
                m.now = m.now.saturating_sub(*ms).max(BASE_MS - 60_000);
                Expect::Nothing
            }
        };
        m
    }
}

/// The driver side: releases go into a ledger kept outside the table.
#[derive(Default)]
struct Ledger {
    fail_mask: u8,
    released: HashMap<(SessionId, Resource), u32>,
    attempts: u32,
    ended_calls: HashMap<SessionId, u32>,
}

impl Effects for Ledger {
    fn release(&mut self, session: &SessionId, resource: Resource) -> ReleaseOutcome {
        self.attempts += 1;
        if fails(resource, self.fail_mask) {
            ReleaseOutcome::Failed
        } else {
            *self.released.entry((*session, resource)).or_default() += 1;
            ReleaseOutcome::Released
        }
    }

    fn ended(&mut self, session: &Session) {
        assert_eq!(
            session.status(),
            Status::Ended,
            "ended() runs after the commit"
        );
        *self.ended_calls.entry(*session.id()).or_default() += 1;
    }
}

struct Sut {
    table: Box<SessionTable<CAPACITY>>,
    ledger: Ledger,
    /// The first answer of every end, to compare later ones against.
    first_end: HashMap<SessionId, (Timestamp, EndReason)>,
}

struct TableTest;

impl StateMachineTest for TableTest {
    type SystemUnderTest = Sut;
    type Reference = TableModel;

    fn init_test(_: &Model) -> Sut {
        Sut {
            table: Box::new(SessionTable::new(policy()).unwrap()),
            ledger: Ledger::default(),
            first_end: HashMap::new(),
        }
    }

    fn apply(mut sut: Sut, m: &Model, op: Op) -> Sut {
        let now = Timestamp::from_millis(m.now);
        let id_of = |target: &Option<Index>| match m.target(target) {
            Some(i) => m.sessions[i].id,
            None => unknown_id(),
        };
        match (&op, &m.expect) {
            (
                Op::Start {
                    random,
                    lifetime_ms,
                },
                Expect::Started(want),
            ) => {
                let got = sut
                    .table
                    .start(now, *random, Duration::from_millis(*lifetime_ms))
                    .map(|s| *s.id());
                assert_eq!(&got, want);
            }
            (
                Op::End {
                    target,
                    reason,
                    fail_mask,
                },
                Expect::Ended(want),
            ) => {
                sut.ledger.fail_mask = *fail_mask;
                let id = id_of(target);
                let got = sut.table.end(now, &id, *reason, &mut sut.ledger).map(|o| {
                    (
                        o.transition,
                        o.session.ended_at().unwrap().as_millis(),
                        o.session.end_reason().unwrap(),
                    )
                });
                assert_eq!(&got, want);
                if let Ok((_, at, why)) = got {
                    // A repeated end is identical to the first.
                    let first = *sut
                        .first_end
                        .entry(id)
                        .or_insert((Timestamp::from_millis(at), why));
                    assert_eq!(first, (Timestamp::from_millis(at), why));
                }
            }
            (Op::Attach { target, handle }, Expect::Attached(want)) => {
                let resource = Resource {
                    kind: ResourceKind(1),
                    handle: *handle,
                };
                let got = sut.table.attach(&id_of(target), resource);
                match (got, want) {
                    (Ok(()), Ok(())) => {}
                    (Err(e), Err(refusal)) => {
                        assert_eq!(e.refusal, *refusal);
                        assert_eq!(e.resource, resource, "a refused resource is handed back");
                    }
                    (got, want) => panic!("attach: got {got:?}, want {want:?}"),
                }
            }
            (Op::Touch { target }, Expect::Touched(want)) => {
                assert_eq!(&sut.table.touch(now, &id_of(target)), want);
            }
            (Op::Advance { fail_mask, .. }, Expect::Swept { expired, orphaned }) => {
                sut.ledger.fail_mask = *fail_mask;
                let sweep = sut.table.handle_timeout(now, &mut sut.ledger);
                assert_eq!((sweep.expired, sweep.orphaned), (*expired, *orphaned));
                // Nothing due is left behind.
                assert!(sut.table.next_deadline().is_none_or(|d| d > now));
            }
            (Op::StepBack { .. }, Expect::Nothing) => {}
            (op, expect) => panic!("model produced {expect:?} for {op:?}"),
        }
        for s in sut.table.iter() {
            if let Some(e) = s.ending() {
                sut.first_end.entry(*s.id()).or_insert((e.at, e.reason));
            }
        }
        sut
    }

    fn check_invariants(sut: &Sut, m: &Model) {
        sut.table.check_structure().unwrap();
        assert_eq!(sut.table.len(), m.live().count());
        let p = policy();
        for ms in &m.sessions {
            let got = sut.table.get(&ms.id);
            if ms.evicted {
                assert!(got.is_none(), "{} should be evicted", ms.id);
                continue;
            }
            let s = got.unwrap_or_else(|| panic!("{} missing", ms.id));
            // Status only moves started -> ended; ended_at is set iff ended, never before start.
            assert_eq!(s.status() == Status::Ended, ms.ended.is_some());
            assert_eq!(s.ended_at().is_some(), s.status() == Status::Ended);
            assert!(s.ended_at().is_none_or(|at| at >= s.started_at()));
            assert_eq!(s.ending().map(|e| (e.at.as_millis(), e.reason)), ms.ended);
            if let Some(first) = sut.first_end.get(&ms.id) {
                assert_eq!(s.ending().map(|e| (e.at, e.reason)), Some(*first));
            }
            assert_eq!(s.last_seen_at().as_millis(), ms.last_seen);
            assert_eq!(s.expires_at().as_millis(), ms.expires_at);
            let states: Vec<_> = s
                .resources()
                .iter()
                .map(|r| {
                    let state = match r.release {
                        ReleaseState::Held => ModelRelease::Held,
                        ReleaseState::Pending { attempts, retry_at } => ModelRelease::Pending {
                            attempts,
                            retry_at: retry_at.as_millis(),
                        },
                        ReleaseState::Released { at } => {
                            ModelRelease::Released { at: at.as_millis() }
                        }
                    };
                    (r.resource, state)
                })
                .collect();
            assert_eq!(states, ms.resources);
            // A started session holds everything; an ended one holds nothing unreleased
            // once its releases succeeded.
            if ms.ended.is_none() {
                assert!(
                    s.resources()
                        .iter()
                        .all(|r| r.release == ReleaseState::Held)
                );
            }
            // An expired or orphaned session does not outlive its deadline past a timeout.
            if s.status() == Status::Started {
                assert!(ms.deadline(&p) > m.now || !matches!(m.expect, Expect::Swept { .. }));
            }
        }
        // No resource is released twice, and the released ones are exactly the ledger's.
        for (key, count) in &sut.ledger.released {
            assert_eq!(*count, 1, "{key:?} released {count} times");
        }
        for (id, count) in &sut.ledger.ended_calls {
            assert_eq!(*count, 1, "{id} reported ended {count} times");
        }
        let released_in_model = m
            .sessions
            .iter()
            .flat_map(|s| s.resources.iter().map(move |r| (s.id, r)))
            .filter(|(_, (_, st))| matches!(st, ModelRelease::Released { .. }))
            .count();
        assert_eq!(sut.ledger.released.len(), released_in_model);
        let model_next = m.live().map(|s| s.deadline(&p)).min();
        assert_eq!(sut.table.next_deadline().map(|t| t.as_millis()), model_next);
    }
}

prop_state_machine! {
    #[test]
    fn table_agrees_with_model(sequential 1..80 => TableTest);
}
