//! What the run saw, and the invariants checked against it after every step and once the
//! faults have stopped.

use std::collections::BTreeMap;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId, Status, Timestamp};
use session_lifecycle_runtime::SessionRecord;

/// What the run knows of one session.
#[derive(Debug, Clone)]
pub struct SessionObs {
    /// A short name for traces (`s12`).
    pub label: String,
    /// The node it runs on.
    pub owner: usize,
    /// Virtual time it was first seen (its start was answered, or the store showed it).
    pub seen: Duration,
    /// Its tenant.
    pub tenant: String,
    /// The first end the store was seen to record.
    pub first_end: Option<(Timestamp, EndReason)>,
    /// An end the API acknowledged.
    pub acked_end: Option<(Timestamp, EndReason)>,
    /// An answer said it had ended (a touch or socket refused with "ended").
    pub said_ended: bool,
    /// Liveness sent: (virtual time, node, acknowledged by the store).
    pub touches: Vec<(Duration, usize, bool)>,
    /// Client sockets held: (node, opened, closed).
    pub sockets: Vec<(usize, Duration, Option<Duration>)>,
    /// The run keeps its liveness coming (touches at a steady pace).
    pub kept_alive: bool,
    /// When the run stopped sending it liveness (its clients went away).
    pub kept_alive_until: Option<Duration>,
    /// When the run last sent it liveness (for the steady pace).
    pub last_touch: Duration,
}

impl SessionObs {
    /// A session first seen at virtual time `seen`, with nothing observed of it yet.
    pub fn new(label: String, owner: usize, tenant: String, seen: Duration) -> SessionObs {
        SessionObs {
            label,
            owner,
            seen,
            tenant,
            first_end: None,
            acked_end: None,
            said_ended: false,
            touches: Vec::new(),
            sockets: Vec::new(),
            kept_alive: false,
            kept_alive_until: None,
            last_touch: seen,
        }
    }
}

/// Everything observed in the run.
#[derive(Debug, Default)]
pub struct Obs {
    /// Sessions by id.
    pub sessions: BTreeMap<SessionId, SessionObs>,
    /// Per node, the virtual times it was down: from, until (`None`: still down), why.
    pub down: Vec<Vec<(Duration, Option<Duration>, Down)>>,
    /// Invariants broken.
    pub violations: Vec<String>,
    /// When the last check ran.
    pub last_check: Duration,
}

/// Why a node was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Down {
    /// Crashed: its memory lost, until it restarted.
    Crashed,
    /// Cut off from the store, until it reached it again.
    CutOff,
}

/// The timing the invariants judge by.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The engines' orphan timeout.
    pub orphan_timeout: Duration,
    /// The engines' node timeout.
    pub node_timeout: Duration,
}

impl Obs {
    /// Node `node` went down at `at`, for `why`.
    pub fn went_down(&mut self, node: usize, why: Down, at: Duration) {
        self.down[node].push((at, None, why));
    }

    /// Node `node` is back at `at` from its last time down for `why` (if still down).
    pub fn came_back(&mut self, node: usize, why: Down, at: Duration) {
        if let Some(span) = self.down[node]
            .iter_mut()
            .rev()
            .find(|(_, until, w)| *w == why && until.is_none())
        {
            span.1 = Some(at);
        }
    }

    /// Whether node `node` was down at any time within `from..=to`.
    pub fn down_within(&self, node: usize, from: Duration, to: Duration) -> bool {
        self.down.get(node).is_some_and(|spans| {
            spans
                .iter()
                .any(|(a, b, _)| *a <= to && b.is_none_or(|b| b >= from))
        })
    }

    /// The longest stretch, between the session's start and `at`, in which no liveness of
    /// it arrived: acknowledged touches, touches kept by a node that stayed up (written
    /// once the store was back), and client sockets held on a node that stayed up.
    pub fn longest_silence(&self, s: &SessionObs, at: Duration) -> Duration {
        let mut spans: Vec<(Duration, Duration)> = Vec::new();
        for &(t, node, acked) in &s.touches {
            if t <= at && (acked || !self.down_within(node, t, at)) {
                spans.push((t, t));
            }
        }
        for &(node, open, close) in &s.sockets {
            let close = close.unwrap_or(at).min(at);
            if open <= at && !self.down_within(node, open, close) {
                spans.push((open, close));
            }
        }
        spans.sort();
        let mut covered = s.seen;
        let mut longest = Duration::ZERO;
        for (from, to) in spans {
            if from > covered {
                longest = longest.max(from - covered);
            }
            covered = covered.max(to);
        }
        longest.max(at.saturating_sub(covered))
    }

    /// Checks one store record against what was seen before; `now` is virtual time.
    pub fn check_record(
        &mut self,
        record: &SessionRecord,
        now: Duration,
        wall: Timestamp,
        limits: Limits,
    ) {
        let id = *record.session.id();
        let Some(s) = self.sessions.get(&id).cloned() else {
            return;
        };
        let mut broken = Vec::new();
        let ending = record.session.ended_at().zip(record.session.end_reason());
        match (s.first_end, ending) {
            (Some(first), Some(now_end)) if first != now_end => broken.push(format!(
                "{}: its end changed from {first:?} to {now_end:?}",
                s.label
            )),
            (Some(first), None) => {
                broken.push(format!("{}: ended {first:?}, now started again", s.label))
            }
            (None, Some((ended_at, reason))) => {
                if ended_at < record.session.started_at() {
                    broken.push(format!("{}: ended before it started", s.label));
                }
                // When it ended, in virtual time: the wall clock has not stepped since the
                // last check but for this step's own operation, so the end lies between.
                let ago = wall.saturating_duration_since(ended_at);
                let at = now
                    .saturating_sub(ago)
                    .clamp(self.last_check.max(s.seen).min(now), now);
                self.judge_end(&s, reason, at, now, limits, &mut broken);
            }
            _ => {}
        }
        if let Some(acked) = s.acked_end {
            match ending {
                None => broken.push(format!(
                    "{}: the API acknowledged its end {acked:?}, the store has it started",
                    s.label
                )),
                Some(end) if end != acked => broken.push(format!(
                    "{}: the API acknowledged the end {acked:?}, the store recorded {end:?}",
                    s.label
                )),
                Some(_) => {}
            }
        }
        if s.said_ended && record.session.status() == Status::Started {
            broken.push(format!(
                "{}: an answer said it had ended, the store has it started",
                s.label
            ));
        }
        if let Some(entry) = self.sessions.get_mut(&id)
            && entry.first_end.is_none()
        {
            entry.first_end = ending;
        }
        self.violations.extend(broken);
    }

    /// A session seen ended `reason` since the last check: was it alive?
    fn judge_end(
        &self,
        s: &SessionObs,
        reason: EndReason,
        at: Duration,
        now: Duration,
        limits: Limits,
        broken: &mut Vec<String>,
    ) {
        match reason {
            EndReason::Orphaned => {
                let silence = self.longest_silence(s, at);
                if s.kept_alive_until.is_none_or(|until| at <= until)
                    && silence < limits.orphan_timeout * 3 / 4
                {
                    broken.push(format!(
                        "{}: ended orphaned though its liveness kept arriving (longest silence {} ms)",
                        s.label,
                        silence.as_millis()
                    ));
                }
            }
            EndReason::NodeLost => {
                let window = limits.node_timeout * 3;
                if !self.down_within(s.owner, at.saturating_sub(window), now) {
                    broken.push(format!(
                        "{}: ended node_lost though its node n{} stayed up",
                        s.label, s.owner
                    ));
                }
            }
            _ => {}
        }
    }
}
