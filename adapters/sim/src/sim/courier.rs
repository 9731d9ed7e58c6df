//! The event outbox, modelled: a courier fans the stored events out to one endpoint and
//! delivers them to a receiver that refuses some, takes others and loses the answer, and
//! sees some twice when the courier dies after a delivery and before recording it. The
//! receiver dedupes by event (a session and its kind, as a Standard Webhooks receiver
//! does by `webhook-id`). After every step nothing may have reached it that the store
//! does not hold; once the faults stop and the outbox is drained, every stored event has
//! reached it, exactly once after dedup, in its session's order, with one delivery
//! recorded delivered.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use session_lifecycle::{EventKind, SessionId, Timestamp};
use session_lifecycle_runtime::{
    DeliveryAttempt, DeliveryNext, DeliveryQuery, DeliveryStatus, Dispatch, Fanout, lock,
};

use super::Sim;
use crate::rng::Rng;

/// The courier's name when it claims deliveries.
const COURIER: &str = "courier";
/// How long a claimed delivery is the courier's: past it, one it never recorded is due
/// again.
const LEASE: Duration = Duration::from_secs(30);
/// A refused or unanswered delivery is tried again this much later.
const RETRY: Duration = Duration::from_secs(2);
/// Longest listing read back at the end (far above any run's events).
const ALL: u32 = 1_000_000;

/// What the receiver was sent, and the courier's own randomness.
pub(super) struct Receiver {
    /// Draws when the courier runs and the fate of each delivery (a stream of its own: the
    /// workload's draws stay as they were).
    rng: Rng,
    /// Whether this seed's receiver and courier misbehave.
    troubled: bool,
    /// Every delivery that reached it, in arrival order.
    arrivals: Vec<(SessionId, EventKind)>,
}

impl Receiver {
    pub(super) fn new(mut rng: Rng) -> Receiver {
        let troubled = rng.chance(600);
        Receiver {
            rng,
            troubled,
            arrivals: Vec::new(),
        }
    }
}

/// What becomes of one attempt.
#[derive(Clone, Copy)]
enum Fate {
    /// Taken, and the courier hears so.
    Taken,
    /// Refused (a 500): it did not arrive.
    Refused,
    /// Taken, but the answer is lost: the courier tries again.
    AnswerLost,
    /// Taken, and the courier dies before it records anything: the claim runs out.
    CourierDies,
}

impl Sim {
    /// After a step: the courier runs one round, one step in three.
    pub(super) async fn maybe_courier(&mut self) {
        if self.receiver.rng.below(3) == 0 {
            let troubled = self.receiver.troubled;
            self.courier(troubled).await;
        }
    }

    /// One round of the courier: fans out what is not yet, claims what is due and
    /// delivers it. `troubled`: the receiver and the courier misbehave at random.
    pub(super) async fn courier(&mut self, troubled: bool) {
        let store = std::sync::Arc::clone(&self.raw);
        let now = self.clock_now();
        if let Ok(events) = store.undispatched_events(64).await
            && !events.is_empty()
        {
            let dispatches = events
                .iter()
                .map(|e| Dispatch {
                    session: e.session,
                    kind: e.kind,
                    to: vec![Fanout {
                        endpoint: "hook".to_owned(),
                        url: "http://receiver.sim/hook".to_owned(),
                        origin: "http://receiver.sim".to_owned(),
                    }],
                })
                .collect();
            let _ = store.dispatch_events(dispatches, now).await;
        }
        let Ok(claimed) = store
            .claim_deliveries(COURIER, now, LEASE, 32, 32, Vec::new())
            .await
        else {
            return;
        };
        let mut attempts = Vec::new();
        let mut dies = false;
        for delivery in claimed {
            let fate = if troubled {
                match self.receiver.rng.below(20) {
                    0..=1 => Fate::Refused,
                    2..=3 => Fate::AnswerLost,
                    4 => Fate::CourierDies,
                    _ => Fate::Taken,
                }
            } else {
                Fate::Taken
            };
            let key = (delivery.session, delivery.kind);
            let (name, next) = match fate {
                Fate::Taken => ("webhook_delivered", Some(DeliveryNext::Delivered)),
                Fate::Refused => ("webhook_refused", Some(retry(now))),
                Fate::AnswerLost => ("webhook_answer_lost", Some(retry(now))),
                Fate::CourierDies => ("webhook_courier_died", None),
            };
            self.count(name);
            if !matches!(fate, Fate::Refused) {
                self.receiver.arrivals.push(key);
            }
            match next {
                Some(next) => attempts.push(DeliveryAttempt {
                    id: delivery.id,
                    at: now,
                    status_code: matches!(fate, Fate::Taken | Fate::Refused).then_some(
                        if matches!(fate, Fate::Taken) {
                            204
                        } else {
                            500
                        },
                    ),
                    error: (!matches!(fate, Fate::Taken)).then(|| name.to_owned()),
                    next,
                }),
                None => {
                    dies = true;
                    break;
                }
            }
        }
        // A courier that died records nothing of this round.
        if !dies && !attempts.is_empty() {
            let _ = store.record_deliveries(COURIER, attempts).await;
        }
        self.check_arrivals().await;
    }

    /// Nothing reached the receiver that the store does not hold as an event.
    async fn check_arrivals(&mut self) {
        let Ok(stored) = self.raw.events_after(None, None, 0, ALL).await else {
            return;
        };
        let stored: BTreeSet<(SessionId, EventKind)> =
            stored.iter().map(|e| (e.session, e.kind)).collect();
        let made_up: Vec<String> = {
            let shared = lock(&self.shared);
            self.receiver
                .arrivals
                .iter()
                .filter(|k| !stored.contains(k))
                .map(|(id, kind)| format!("{} {kind:?}", shared.label(id)))
                .collect()
        };
        if !made_up.is_empty() {
            lock(&self.shared).obs.violations.push(format!(
                "webhooks received for events the store does not hold: {}",
                made_up.join(", ")
            ));
        }
    }

    /// Once the faults stop: the courier runs untroubled until the outbox is empty (claims
    /// of a courier that died run out meanwhile), then every stored event must have
    /// reached the receiver once after dedup, in order, delivered once.
    pub(super) async fn settle_outbox(&mut self) {
        for _ in 0..100 {
            self.courier(false).await;
            let undispatched = self
                .raw
                .undispatched_events(1)
                .await
                .map_or(true, |e| !e.is_empty());
            let pending = self
                .raw
                .delivery_counts()
                .await
                .map_or(true, |c| c.pending > 0);
            if !undispatched && !pending {
                break;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let (Ok(stored), Ok(deliveries)) = (
            self.raw.events_after(None, None, 0, ALL).await,
            self.raw
                .deliveries(DeliveryQuery {
                    tenant: None,
                    session: None,
                    status: None,
                    limit: ALL,
                })
                .await,
        ) else {
            lock(&self.shared)
                .obs
                .violations
                .push("the outbox could not be read back".to_owned());
            return;
        };
        let mut delivered: BTreeMap<(SessionId, EventKind), u32> = BTreeMap::new();
        let mut left: Vec<String> = Vec::new();
        for d in &deliveries {
            match d.status {
                DeliveryStatus::Delivered => {
                    *delivered.entry((d.session, d.kind)).or_default() += 1
                }
                other => left.push(format!("{} {:?} {other:?}", d.session, d.kind)),
            }
        }
        let received: BTreeSet<(SessionId, EventKind)> =
            self.receiver.arrivals.iter().copied().collect();
        let mut shared = lock(&self.shared);
        let mut broken = Vec::new();
        if !left.is_empty() {
            broken.push(format!(
                "deliveries not delivered at the end: {}",
                left.join(", ")
            ));
        }
        // Each session's events in their order, against the order of first arrival: its
        // lifecycle events in sequence, and its usage records as written (the two
        // interleave: a running session's usage goes before its end exists).
        let mut by_session: BTreeMap<SessionId, Vec<EventKind>> = BTreeMap::new();
        for e in &stored {
            let key = (e.session, e.kind);
            if !received.contains(&key) {
                broken.push(format!(
                    "{} {:?}: stored, never received",
                    shared.label(&e.session),
                    e.kind
                ));
            }
            if delivered.get(&key) != Some(&1) {
                broken.push(format!(
                    "{} {:?}: {} deliveries recorded delivered, not 1",
                    shared.label(&e.session),
                    e.kind,
                    delivered.get(&key).copied().unwrap_or(0)
                ));
            }
            by_session.entry(e.session).or_default().push(e.kind);
        }
        let usage = |k: &EventKind| matches!(k, EventKind::UsageRecorded(_));
        let split = |kinds: &[EventKind]| -> (Vec<EventKind>, Vec<EventKind>) {
            kinds.iter().copied().partition(|k| !usage(k))
        };
        let mut first_seen: BTreeMap<SessionId, Vec<EventKind>> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for key in &self.receiver.arrivals {
            if seen.insert(*key) {
                first_seen.entry(key.0).or_default().push(key.1);
            }
        }
        for (id, order) in &by_session {
            let seen_order = first_seen.get(id).map(|kinds| split(kinds));
            if seen_order != Some(split(order)) {
                broken.push(format!(
                    "{}: events stored as {order:?}, first received as {:?}",
                    shared.label(id),
                    first_seen.get(id)
                ));
            }
        }
        let duplicates = self.receiver.arrivals.len() - seen.len();
        shared.log(format!(
            "outbox settled: {} events, {} arrivals ({duplicates} repeated, deduped)",
            stored.len(),
            self.receiver.arrivals.len()
        ));
        if duplicates > 0 {
            *shared.counts.entry("webhook_duplicate").or_default() += duplicates as u32;
        }
        shared.obs.violations.extend(broken);
    }
}

fn retry(now: Timestamp) -> DeliveryNext {
    DeliveryNext::RetryAt(now.saturating_add(RETRY))
}
