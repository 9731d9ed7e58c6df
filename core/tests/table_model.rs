//! Model-based property test: a plain reference model and the real `SessionTable` run the
//! same random operation sequences, and must agree after every step.
//!
//! Both ways of driving releases are covered: the synchronous loops over `Effects`
//! (`end_and_release`, `handle_timeout`) and the sans-IO one, where `poll` hands out work
//! and the driver reports back later (`handle_release`, `end`, `defer_end`), with several
//! pieces of work out at once. Beyond agreeing with the model, the table must never have
//! two releases of one session in flight, must release in reverse acquisition order, never
//! retry before the backoff, and never offer a released resource again.
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
const NEVER: u64 = Timestamp::MAX.as_millis();

fn policy() -> Policy {
    Policy {
        orphan_timeout: Duration::from_secs(10),
        sweep_interval: Duration::from_secs(5),
        retention: Duration::from_secs(30),
        release_backoff_initial: Duration::from_secs(1),
        release_backoff_max: Duration::from_secs(4),
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
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
    /// `end`: the state change only.
    End {
        target: Option<Index>,
        reason: EndReason,
    },
    /// `end_and_release`: the state change, then due releases through `Effects`.
    EndAndRelease {
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
    /// `handle_timeout`: everything due, through `Effects`.
    Advance {
        ms: u64,
        fail_mask: u8,
    },
    StepBack {
        ms: u64,
    },
    /// `poll`: hand out one piece of work, kept by the driver.
    Poll,
    /// Report the outcome of one outstanding release (or, with none out, a bogus report).
    Complete {
        pick: Index,
        fail: bool,
    },
    /// Answer one outstanding `Work::End`: commit it or defer it.
    AnswerEnd {
        pick: Index,
        commit: bool,
        defer_ms: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum ModelRelease {
    Pending { attempts: u32, retry_at: u64 },
    Held,
    Released { at: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum ModelTimer {
    Armed,
    HandedOut,
    Deferred(u64),
}

#[derive(Clone, Debug)]
struct ModelSession {
    id: SessionId,
    seq: u32,
    started_at: u64,
    expires_at: u64,
    last_seen: u64,
    ended: Option<(u64, EndReason)>,
    resources: Vec<(Resource, ModelRelease)>,
    /// Index of the resource whose release is in flight.
    releasing: Option<usize>,
    timer: ModelTimer,
    evicted: bool,
}

#[derive(Clone, Debug)]
struct Model {
    now: u64,
    inserted: u32,
    sessions: Vec<ModelSession>,
    /// Work handed out by `poll` and not answered yet, oldest first.
    outstanding: Vec<Work>,
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
    Swept {
        expired: u32,
        orphaned: u32,
    },
    Polled(Option<Work>),
    Handled {
        session: SessionId,
        resource: Resource,
        outcome: ReleaseOutcome,
        result: Result<(), ReleaseRefused>,
    },
    Deferred(SessionId, u64),
    /// A handed-out end committed with its reason.
    EndCommitted(
        SessionId,
        EndReason,
        Result<(Transition, u64, EndReason), NotFound>,
    ),
}

impl ModelSession {
    /// When the table looks at this session next (its heap deadline).
    fn deadline(&self, p: &Policy) -> u64 {
        match self.ended {
            None => {
                let natural = self.expires_at.min(self.last_seen + ms(p.orphan_timeout));
                match self.timer {
                    ModelTimer::Armed => natural,
                    ModelTimer::HandedOut => NEVER,
                    ModelTimer::Deferred(t) => natural.max(t),
                }
            }
            Some((ended_at, _)) => {
                if self.releasing.is_some() {
                    return NEVER;
                }
                match self.next_release(ended_at) {
                    Some((_, due)) => due,
                    None => {
                        let done = self
                            .resources
                            .iter()
                            .filter_map(|(_, r)| match r {
                                ModelRelease::Released { at } => Some(*at),
                                _ => None,
                            })
                            .fold(ended_at, u64::max);
                        done + ms(p.retention)
                    }
                }
            }
        }
    }

    /// The last unreleased resource and when its release is due.
    fn next_release(&self, ended_at: u64) -> Option<(usize, u64)> {
        let i = self
            .resources
            .iter()
            .rposition(|(_, r)| !matches!(r, ModelRelease::Released { .. }))?;
        let due = match self.resources[i].1 {
            ModelRelease::Pending { retry_at, .. } => retry_at,
            ModelRelease::Held => ended_at,
            ModelRelease::Released { .. } => unreachable!(),
        };
        Some((i, due))
    }

    /// Hands out the next release if due.
    fn poll_release(&mut self, now: u64) -> Option<Resource> {
        let (ended_at, _) = self.ended?;
        if self.releasing.is_some() {
            return None;
        }
        let (i, due) = self.next_release(ended_at)?;
        if due > now {
            return None;
        }
        self.releasing = Some(i);
        Some(self.resources[i].0)
    }

    fn handle_release(&mut self, now: u64, outcome: ReleaseOutcome, p: &Policy) {
        let i = self.releasing.take().expect("a release in flight");
        let before = match self.resources[i].1 {
            ModelRelease::Pending { attempts, .. } => attempts,
            _ => 0,
        };
        self.resources[i].1 = match outcome {
            ReleaseOutcome::Released => ModelRelease::Released { at: now },
            ReleaseOutcome::Failed => ModelRelease::Pending {
                attempts: before + 1,
                retry_at: now + ms(p.release_backoff(before + 1)),
            },
        };
    }

    fn end(&mut self, now: u64, reason: EndReason) -> Transition {
        if self.ended.is_some() {
            return Transition::AlreadyEnded;
        }
        let at = now.max(self.started_at);
        self.ended = Some((at, reason));
        for (_, r) in self.resources.iter_mut() {
            if *r == ModelRelease::Held {
                *r = ModelRelease::Pending {
                    attempts: 0,
                    retry_at: at,
                };
            }
        }
        self.timer = ModelTimer::Armed;
        Transition::Committed
    }

    /// The synchronous release loop: due releases one after another until one fails.
    fn release_due(&mut self, now: u64, fail_mask: u8, p: &Policy) {
        while let Some(resource) = self.poll_release(now) {
            let outcome = if fails(resource, fail_mask) {
                ReleaseOutcome::Failed
            } else {
                ReleaseOutcome::Released
            };
            self.handle_release(now, outcome, p);
            if outcome == ReleaseOutcome::Failed {
                break;
            }
        }
    }

    fn timeout_reason(&self, p: &Policy) -> EndReason {
        if self.expires_at <= self.last_seen + ms(p.orphan_timeout) {
            EndReason::Expired
        } else {
            EndReason::Orphaned
        }
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

    fn index_of(&self, id: &SessionId) -> usize {
        self.sessions
            .iter()
            .position(|s| s.id == *id && !s.evicted)
            .expect("work names a live session")
    }

    /// What `SessionTable::poll` hands out: the due session with the earliest (deadline,
    /// insertion), evicting released sessions past their retention on the way.
    fn poll(&mut self, p: &Policy) -> Option<Work> {
        let now = self.now;
        loop {
            let i = self
                .sessions
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.evicted)
                .map(|(i, s)| (s.deadline(p), s.seq, i))
                .filter(|(d, _, _)| *d <= now)
                .min()?
                .2;
            let s = &mut self.sessions[i];
            if s.ended.is_none() {
                s.timer = ModelTimer::HandedOut;
                return Some(Work::End {
                    session: s.id,
                    reason: s.timeout_reason(p),
                });
            }
            if let Some(resource) = s.poll_release(now) {
                return Some(Work::Release {
                    session: s.id,
                    resource,
                });
            }
            s.evicted = true;
        }
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
            inserted: 0,
            sessions: Vec::new(),
            outstanding: Vec::new(),
            expect: Expect::Nothing,
        })
        .boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Op> {
        let target = proptest::option::weighted(0.95, any::<Index>());
        let reason = proptest::sample::select(EndReason::ALL.to_vec());
        prop_oneof![
            3 => (0u128..4, 0u64..60_000).prop_map(|(random, lifetime_ms)| Op::Start { random, lifetime_ms }),
            2 => (target.clone(), reason.clone())
                .prop_map(|(target, reason)| Op::End { target, reason }),
            2 => (target.clone(), reason, any::<u8>())
                .prop_map(|(target, reason, fail_mask)| Op::EndAndRelease { target, reason, fail_mask }),
            3 => (target.clone(), 0u64..12).prop_map(|(target, handle)| Op::Attach { target, handle }),
            2 => target.prop_map(|target| Op::Touch { target }),
            3 => (0u64..20_000, any::<u8>()).prop_map(|(ms, fail_mask)| Op::Advance { ms, fail_mask }),
            1 => (0u64..15_000).prop_map(|ms| Op::StepBack { ms }),
            4 => Just(Op::Poll),
            4 => (any::<Index>(), proptest::bool::weighted(0.3))
                .prop_map(|(pick, fail)| Op::Complete { pick, fail }),
            2 => (any::<Index>(), any::<bool>(), 0u64..20_000)
                .prop_map(|(pick, commit, defer_ms)| Op::AnswerEnd { pick, commit, defer_ms }),
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
                        seq: m.inserted,
                        started_at: m.now,
                        expires_at: m.now + lifetime_ms,
                        last_seen: m.now,
                        ended: None,
                        resources: Vec::new(),
                        releasing: None,
                        timer: ModelTimer::Armed,
                        evicted: false,
                    });
                    m.inserted += 1;
                    Expect::Started(Ok(id))
                }
            }
            Op::End { target, reason } => match m.live_target(target) {
                None => Expect::Ended(Err(NotFound)),
                Some(i) => {
                    let now = m.now;
                    let s = &mut m.sessions[i];
                    let t = s.end(now, *reason);
                    let (at, why) = s.ended.unwrap();
                    Expect::Ended(Ok((t, at, why)))
                }
            },
            Op::EndAndRelease {
                target,
                reason,
                fail_mask,
            } => match m.live_target(target) {
                None => Expect::Ended(Err(NotFound)),
                Some(i) => {
                    let now = m.now;
                    let s = &mut m.sessions[i];
                    let t = s.end(now, *reason);
                    if t == Transition::Committed {
                        s.release_due(now, *fail_mask, &p);
                    }
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
                while let Some(work) = m.poll(&p) {
                    match work {
                        Work::End { session, reason } => {
                            match reason {
                                EndReason::Expired => expired += 1,
                                _ => orphaned += 1,
                            }
                            let i = m.index_of(&session);
                            m.sessions[i].end(now, reason);
                        }
                        Work::Release { session, resource } => {
                            let outcome = if fails(resource, *fail_mask) {
                                ReleaseOutcome::Failed
                            } else {
                                ReleaseOutcome::Released
                            };
                            let i = m.index_of(&session);
                            m.sessions[i].handle_release(now, outcome, &p);
                        }
                    }
                }
                Expect::Swept { expired, orphaned }
            }
            Op::StepBack { ms } => {
                m.now = m.now.saturating_sub(*ms).max(BASE_MS - 60_000);
                Expect::Nothing
            }
            Op::Poll => {
                let work = m.poll(&p);
                if let Some(w) = work {
                    m.outstanding.push(w);
                }
                Expect::Polled(work)
            }
            Op::Complete { pick, fail } => {
                let releases: Vec<usize> = m
                    .outstanding
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| matches!(w, Work::Release { .. }))
                    .map(|(i, _)| i)
                    .collect();
                let outcome = if *fail {
                    ReleaseOutcome::Failed
                } else {
                    ReleaseOutcome::Released
                };
                if releases.is_empty() {
                    // A bogus report: the first resource of some session, none in flight.
                    match m.sessions.first() {
                        None => Expect::Nothing,
                        Some(s) => {
                            let resource = s.resources.first().map_or(
                                Resource {
                                    kind: ResourceKind(1),
                                    handle: 99,
                                },
                                |r| r.0,
                            );
                            let result = if s.evicted {
                                Err(ReleaseRefused::NotFound)
                            } else {
                                Err(ReleaseRefused::NotInFlight(NotInFlight { resource }))
                            };
                            Expect::Handled {
                                session: s.id,
                                resource,
                                outcome,
                                result,
                            }
                        }
                    }
                } else {
                    let k = releases[pick.index(releases.len())];
                    let Work::Release { session, resource } = m.outstanding.remove(k) else {
                        unreachable!()
                    };
                    let now = m.now;
                    let i = m.index_of(&session);
                    m.sessions[i].handle_release(now, outcome, &p);
                    Expect::Handled {
                        session,
                        resource,
                        outcome,
                        result: Ok(()),
                    }
                }
            }
            Op::AnswerEnd {
                pick,
                commit,
                defer_ms,
            } => {
                let ends: Vec<usize> = m
                    .outstanding
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| matches!(w, Work::End { .. }))
                    .map(|(i, _)| i)
                    .collect();
                if ends.is_empty() {
                    Expect::Nothing
                } else {
                    let k = ends[pick.index(ends.len())];
                    let Work::End { session, reason } = m.outstanding.remove(k) else {
                        unreachable!()
                    };
                    let now = m.now;
                    let i = m.index_of(&session);
                    let s = &mut m.sessions[i];
                    if *commit {
                        let t = s.end(now, reason);
                        let (at, why) = s.ended.unwrap();
                        Expect::EndCommitted(session, reason, Ok((t, at, why)))
                    } else {
                        if s.ended.is_none() && s.timer == ModelTimer::HandedOut {
                            s.timer = ModelTimer::Deferred(now + defer_ms);
                        }
                        Expect::Deferred(session, now + defer_ms)
                    }
                }
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
    /// Per session, the resources released, in the order they were.
    order: HashMap<SessionId, Vec<Resource>>,
    ended_calls: HashMap<SessionId, u32>,
}

impl Ledger {
    fn record(&mut self, session: SessionId, resource: Resource, outcome: ReleaseOutcome) {
        if outcome == ReleaseOutcome::Released {
            *self.released.entry((session, resource)).or_default() += 1;
            self.order.entry(session).or_default().push(resource);
        }
    }
}

impl Effects for Ledger {
    fn release(&mut self, session: &SessionId, resource: Resource) -> ReleaseOutcome {
        let outcome = if fails(resource, self.fail_mask) {
            ReleaseOutcome::Failed
        } else {
            ReleaseOutcome::Released
        };
        self.record(*session, resource, outcome);
        outcome
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

/// What handing out `resource` of `session` must respect: it is not released, every
/// resource acquired after it is, and its retry time (after a failure) has come.
fn check_handout(session: &Session, resource: Resource, now: Timestamp) {
    let resources = session.resources();
    let i = resources
        .iter()
        .position(|r| r.resource == resource)
        .expect("a handed-out resource belongs to its session");
    match resources[i].release {
        ReleaseState::Released { .. } => panic!("{resource:?} handed out after its release"),
        ReleaseState::Pending { retry_at, .. } => {
            assert!(retry_at <= now, "{resource:?} retried before its backoff")
        }
        ReleaseState::Held => {}
    }
    assert!(
        resources[i + 1..]
            .iter()
            .all(|r| matches!(r.release, ReleaseState::Released { .. })),
        "{resource:?} handed out before the resources acquired after it were released"
    );
    assert_eq!(session.release_in_flight(), Some(resource));
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
        let check_end =
            |sut: &mut Sut,
             id: SessionId,
             got: Result<(Transition, u64, EndReason), NotFound>,
             want: &Result<(Transition, u64, EndReason), NotFound>| {
                assert_eq!(&got, want);
                if let Ok((_, at, why)) = got {
                    // A repeated end is identical to the first.
                    let first = *sut
                        .first_end
                        .entry(id)
                        .or_insert((Timestamp::from_millis(at), why));
                    assert_eq!(first, (Timestamp::from_millis(at), why));
                }
            };
        let summary = |o: EndOutcome<'_>| {
            (
                o.transition,
                o.session.ended_at().unwrap().as_millis(),
                o.session.end_reason().unwrap(),
            )
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
            (Op::End { target, reason }, Expect::Ended(want)) => {
                let id = id_of(target);
                let got = sut.table.end(now, &id, *reason).map(summary);
                check_end(&mut sut, id, got, want);
            }
            (
                Op::EndAndRelease {
                    target,
                    reason,
                    fail_mask,
                },
                Expect::Ended(want),
            ) => {
                sut.ledger.fail_mask = *fail_mask;
                let id = id_of(target);
                let got = sut
                    .table
                    .end_and_release(now, &id, *reason, &mut sut.ledger)
                    .map(summary);
                check_end(&mut sut, id, got, want);
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
            (Op::Poll, Expect::Polled(want)) => {
                let got = sut.table.poll(now);
                assert_eq!(&got, want);
                if let Some(Work::Release { session, resource }) = got {
                    let s = sut.table.get(&session).expect("handed out from the table");
                    check_handout(s, resource, now);
                }
            }
            (Op::Complete { .. }, Expect::Nothing) => {}
            (
                Op::Complete { .. },
                Expect::Handled {
                    session,
                    resource,
                    outcome,
                    result,
                },
            ) => {
                let got = sut.table.handle_release(now, session, *resource, *outcome);
                assert_eq!(&got, result);
                if got.is_ok() {
                    sut.ledger.record(*session, *resource, *outcome);
                }
            }
            (Op::AnswerEnd { .. }, Expect::Nothing) => {}
            (Op::AnswerEnd { .. }, Expect::EndCommitted(id, reason, want)) => {
                let got = sut.table.end(now, id, *reason).map(summary);
                // The session may have ended for another reason meanwhile: the model
                // says which.
                check_end(&mut sut, *id, got, want);
            }
            (Op::AnswerEnd { .. }, Expect::Deferred(id, not_before)) => {
                sut.table
                    .defer_end(id, Timestamp::from_millis(*not_before))
                    .unwrap();
            }
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
        // Never two releases of one session out at once.
        let mut out: HashMap<SessionId, u32> = HashMap::new();
        for w in &m.outstanding {
            if let Work::Release { session, .. } = w {
                *out.entry(*session).or_default() += 1;
            }
        }
        assert!(
            out.values().all(|n| *n == 1),
            "two releases of one session in flight"
        );
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
            assert_eq!(
                s.release_in_flight(),
                ms.releasing.map(|i| ms.resources[i].0)
            );
            // A started session holds everything.
            if ms.ended.is_none() {
                assert!(
                    s.resources()
                        .iter()
                        .all(|r| r.release == ReleaseState::Held)
                );
            }
            // An expired or orphaned session does not outlive its deadline past a timeout.
            if s.status() == Status::Started && ms.timer == ModelTimer::Armed {
                assert!(ms.deadline(&p) > m.now || !matches!(m.expect, Expect::Swept { .. }));
            }
            // Released in reverse acquisition order.
            if let Some(order) = sut.ledger.order.get(&ms.id) {
                let index = |r: &Resource| ms.resources.iter().position(|(x, _)| x == r).unwrap();
                assert!(
                    order.windows(2).all(|w| index(&w[0]) > index(&w[1])),
                    "{} released out of order: {order:?}",
                    ms.id
                );
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
        let model_next = m
            .live()
            .map(|s| s.deadline(&p))
            .min()
            .filter(|d| *d != NEVER);
        assert_eq!(sut.table.next_deadline().map(|t| t.as_millis()), model_next);
    }
}

prop_state_machine! {
    #[test]
    fn table_agrees_with_model(sequential 1..80 => TableTest);
}

/// Found by the `table_ops` fuzz target: the driver holds an end the table handed out,
/// the session ends another way, and the retention evicts it. Answering that end late
/// finds nothing and changes nothing (the driver drops it).
#[test]
fn a_late_answer_to_an_evicted_sessions_end_finds_nothing() {
    let mut table = SessionTable::<CAPACITY>::new(policy()).unwrap();
    let t0 = Timestamp::from_millis(BASE_MS);
    let id = *table.start(t0, 0, Duration::ZERO).unwrap().id();
    let Some(Work::End { session, reason }) = table.poll(t0) else {
        panic!("an expired session's end is handed out");
    };
    assert_eq!(session, id);
    table
        .end_and_release(t0, &id, EndReason::Requested, &mut Ledger::default())
        .unwrap();
    let later = t0.saturating_add(policy().retention + Duration::from_secs(1));
    table.handle_timeout(later, &mut Ledger::default());
    assert!(table.get(&id).is_none(), "evicted after the retention");
    assert!(table.end(later, &id, reason).is_err());
    assert!(table.defer_end(&id, later).is_err());
    assert!(table.get(&id).is_none());
    assert!(table.poll(later).is_none());
}
