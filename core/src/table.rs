//! A fixed-capacity table of sessions that drives their deadlines.

use core::time::Duration;

use crate::id::SessionId;
use crate::policy::{Policy, PolicyError};
use crate::resource::{AttachRefusal, Resource};
use crate::session::{EndReason, ReleaseOutcome, Session, Transition};
use crate::time::Timestamp;

mod check;
mod errors;
mod outputs;
mod slots;

pub use errors::{AttachError, NotFound, ReleaseRefused, StartError, TouchError};
pub use outputs::{EndOutcome, Sweep, Work};
use slots::{HeapEntry, NONE, Slot, Timer, bucket_of, id_hash};

/// The callbacks of the synchronous loops ([`SessionTable::handle_timeout`],
/// [`SessionTable::end_and_release`]), for drivers whose releases finish at once. Drivers
/// whose releases take time (a SIGTERM grace, an NVML wait) use [`SessionTable::poll`] and
/// [`SessionTable::handle_release`] instead; both ways run the same rules.
///
/// Both callbacks are called only after the state change they report is committed in the
/// table, so a callback can never observe (or cause) a half-ended session.
pub trait Effects {
    /// Release one resource of `session`. Called for one resource of a session at a time,
    /// in reverse acquisition order: a resource only once every resource acquired after it
    /// is released. A failed release is offered again after the policy's backoff, and holds
    /// back the resources acquired before it. A resource that was released is never offered
    /// again. Must be safe to repeat after a failure.
    fn release(&mut self, session: &SessionId, resource: Resource) -> ReleaseOutcome;

    /// `session` has just ended (by any trigger), before its releases run. The default does
    /// nothing.
    fn ended(&mut self, session: &Session) {
        let _ = session;
    }
}

/// A table of at most `N` sessions, held by id, that drives their deadlines. No allocation:
/// all storage is inline and sized by `N`.
///
/// Methods, in the order a driver uses them:
/// - getters: [`get`](Self::get), [`len`](Self::len), [`iter`](Self::iter),
///   [`policy`](Self::policy);
/// - inputs: [`start`](Self::start), [`restore`](Self::restore), [`attach`](Self::attach),
///   [`touch`](Self::touch), [`end`](Self::end), and
///   [`handle_timeout`](Self::handle_timeout) when the deadline passes;
/// - output: [`next_deadline`](Self::next_deadline), the moment to call `handle_timeout`
///   next. Call it after every input: any of them may move it.
///
/// Every operation that may release resources takes the driver's [`Effects`]. Ended,
/// fully released sessions stay for [`Policy::retention`] so that a repeated end gets the
/// first answer, then are evicted.
///
/// Costs: lookups are O(1) expected (chained hashing with `N` buckets); a deadline change is
/// O(log n) in a binary heap; [`handle_timeout`](Self::handle_timeout) costs
/// O(1 + k log n) for k sessions due, however many are held.
///
/// A table for 65,536 sessions takes about 20 MB, so put big ones in a `static`, on a
/// thread with a big enough stack, or build them in place.
pub struct SessionTable<const N: usize> {
    policy: Policy,
    slots: [Slot; N],
    /// Bucket heads of the id index.
    buckets: [u32; N],
    /// Deadlines with their slots, a binary min-heap; `heap[..len]` is live. The deadline
    /// sits in the entry, not the slot, so that sifting touches only this array.
    heap: [HeapEntry; N],
    len: u32,
    /// Head of the list of slots freed by eviction.
    free_head: u32,
    /// Slots `fresh..N` have never been used.
    fresh: u32,
    /// Insertions so far (wrapping), the `seq` of the next one.
    inserted: u32,
}

impl<const N: usize> SessionTable<N> {
    /// Bytes of table storage per session slot (the slot, its bucket head and heap entry).
    pub const BYTES_PER_SLOT: usize = core::mem::size_of::<Slot>()
        + core::mem::size_of::<u32>()
        + core::mem::size_of::<HeapEntry>();

    /// An empty table with `policy`, which must pass [`Policy::validate`].
    pub const fn new(policy: Policy) -> Result<Self, PolicyError> {
        const {
            assert!(N > 0, "a table needs room for at least one session");
            assert!(
                N < NONE as usize,
                "a table holds fewer than 2^32 - 1 sessions"
            );
        }
        if let Err(e) = policy.validate() {
            return Err(e);
        }
        Ok(SessionTable {
            policy,
            slots: [const { Slot::EMPTY }; N],
            buckets: [NONE; N],
            heap: [HeapEntry::EMPTY; N],
            len: 0,
            free_head: NONE,
            fresh: 0,
            inserted: 0,
        })
    }

    /// The policy the table runs.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The most sessions the table can hold.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Sessions held, started and retained ended ones alike.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the table holds no session.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The session with `id`, if held.
    pub fn get(&self, id: &SessionId) -> Option<&Session> {
        self.find(id).and_then(|i| self.slots[i].session.as_ref())
    }

    /// Every held session, in no particular order. Visits all `N` slots.
    pub fn iter(&self) -> impl Iterator<Item = &Session> {
        self.slots.iter().filter_map(|s| s.session.as_ref())
    }

    /// The earliest moment at which [`poll`](Self::poll) (or
    /// [`handle_timeout`](Self::handle_timeout)) has work to do; `None` when nothing will
    /// come due without another input (the table is empty, or all its work is out with the
    /// driver). A deadline in the past means "now"; once handled it moves on, so a driver
    /// that sleeps until it never spins.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        if self.len == 0 || self.heap[0].deadline == Timestamp::MAX {
            None
        } else {
            Some(self.heap[0].deadline)
        }
    }

    /// Starts a session at `now` that expires after `lifetime` (the caller's
    /// `min(requested duration, plan limit)`). Its id is the ULID of `now` and `random`,
    /// which the caller draws from its own randomness (80 bits of it make ids unique). An
    /// id held now is refused; one evicted after its retention is not remembered, so
    /// uniqueness beyond the table rests on that randomness and the durable store's key.
    pub fn start(
        &mut self,
        now: Timestamp,
        random: u128,
        lifetime: Duration,
    ) -> Result<&Session, StartError> {
        let id = SessionId::from_ulid_parts(now, random);
        self.insert(Session::new(id, now, now.saturating_add(lifetime)))
    }

    /// Puts back a session read from durable storage, in whatever state it was recorded
    /// (an ended session's pending releases are handed out again as they come due).
    pub fn restore(&mut self, session: Session) -> Result<&Session, StartError> {
        self.insert(session)
    }

    /// Records a liveness signal at `now`, which pushes back the orphan deadline.
    pub fn touch(&mut self, now: Timestamp, id: &SessionId) -> Result<(), TouchError> {
        let slot = self.find(id).ok_or(TouchError::NotFound)?;
        let session = self.slots[slot]
            .session
            .as_mut()
            .ok_or(TouchError::NotFound)?;
        if session.ended_at().is_some() {
            return Err(TouchError::SessionEnded);
        }
        session.touch(now);
        self.reschedule(slot);
        Ok(())
    }

    /// Attaches a resource just acquired for the session `id`. Refused (and handed back for
    /// the caller to release at once) when the session is unknown, ended or full.
    pub fn attach(&mut self, id: &SessionId, resource: Resource) -> Result<(), AttachError> {
        let refuse = |refusal| AttachError { refusal, resource };
        let slot = self.find(id).ok_or(refuse(AttachRefusal::NotFound))?;
        let session = self.slots[slot]
            .session
            .as_mut()
            .ok_or(refuse(AttachRefusal::NotFound))?;
        session.attach(resource).map_err(refuse)
    }

    /// Ends the session `id` at `now` for `reason`, and nothing more: its releases become
    /// due, for [`poll`](Self::poll) to hand out. Idempotent: ending an ended session
    /// changes nothing and returns it as it was first ended.
    pub fn end(
        &mut self,
        now: Timestamp,
        id: &SessionId,
        reason: EndReason,
    ) -> Result<EndOutcome<'_>, NotFound> {
        let slot = self.find(id).ok_or(NotFound)?;
        let transition = self.end_slot(slot, now, reason)?;
        let session = self.slots[slot].session.as_ref().ok_or(NotFound)?;
        Ok(EndOutcome {
            session,
            transition,
        })
    }

    /// [`end`](Self::end), then tells `effects` and runs the session's releases that are due
    /// through it, one after another in reverse acquisition order, stopping at the first
    /// failure (retried after its backoff by [`handle_timeout`](Self::handle_timeout)).
    /// For drivers whose releases finish at once; a repeated end runs nothing.
    pub fn end_and_release<E: Effects>(
        &mut self,
        now: Timestamp,
        id: &SessionId,
        reason: EndReason,
        effects: &mut E,
    ) -> Result<EndOutcome<'_>, NotFound> {
        let slot = self.find(id).ok_or(NotFound)?;
        let transition = self.end_slot(slot, now, reason)?;
        if transition == Transition::Committed {
            if let Some(session) = self.slots[slot].session.as_ref() {
                effects.ended(session);
            }
            self.release_due(slot, now, effects);
        }
        let session = self.slots[slot].session.as_ref().ok_or(NotFound)?;
        Ok(EndOutcome {
            session,
            transition,
        })
    }

    /// Puts back the timer of a session whose [`Work::End`] the driver could not carry out
    /// (its store was unreachable, or the session proved alive elsewhere): it fires again at
    /// `not_before` at the earliest, or later if the session is touched meanwhile. A session
    /// that ended or whose timer was not handed out is left as it is.
    pub fn defer_end(&mut self, id: &SessionId, not_before: Timestamp) -> Result<(), NotFound> {
        let slot = self.find(id).ok_or(NotFound)?;
        let started = self.slots[slot]
            .session
            .as_ref()
            .is_some_and(|s| s.ended_at().is_none());
        if started && self.slots[slot].timer == Timer::HandedOut {
            self.slots[slot].timer = Timer::Deferred(not_before);
            self.reschedule(slot);
        }
        Ok(())
    }

    /// Hands out the most overdue work at `now`, if any: a started session to end
    /// ([`Work::End`]) or a release to run ([`Work::Release`]). Each piece of work is handed
    /// out once and comes back through [`end`](Self::end) or [`defer_end`](Self::defer_end),
    /// or [`handle_release`](Self::handle_release). Ended sessions whose releases are done
    /// are evicted here once their retention passed. Costs O(log n) per piece of work, O(1)
    /// when nothing is due.
    pub fn poll(&mut self, now: Timestamp) -> Option<Work> {
        while self.len > 0 {
            let HeapEntry { deadline, slot, .. } = self.heap[0];
            if deadline > now {
                return None;
            }
            let slot = slot as usize;
            let policy = self.policy;
            let Some(session) = self.slots[slot].session.as_mut() else {
                // An empty slot is never in the heap; drop it rather than loop on it.
                self.heap_remove(slot);
                continue;
            };
            let id = *session.id();
            if session.ended_at().is_none() {
                let (_, reason) = session.timeout(&policy);
                self.slots[slot].timer = Timer::HandedOut;
                self.reschedule(slot);
                return Some(Work::End {
                    session: id,
                    reason,
                });
            }
            if let Some(resource) = session.poll_release(now) {
                self.reschedule(slot);
                return Some(Work::Release {
                    session: id,
                    resource,
                });
            }
            // Ended, nothing in flight and nothing due, with a deadline that passed: only a
            // released session past its retention has such a deadline.
            self.evict(slot);
        }
        None
    }

    /// Takes back the outcome of a release handed out by [`poll`](Self::poll): released for
    /// good, or failed and retried after the policy's backoff. Refused, changing nothing,
    /// unless that release of that session is in flight.
    pub fn handle_release(
        &mut self,
        now: Timestamp,
        id: &SessionId,
        resource: Resource,
        outcome: ReleaseOutcome,
    ) -> Result<(), ReleaseRefused> {
        let slot = self.find(id).ok_or(ReleaseRefused::NotFound)?;
        let policy = self.policy;
        let session = self.slots[slot]
            .session
            .as_mut()
            .ok_or(ReleaseRefused::NotFound)?;
        session.handle_release(now, resource, outcome, &policy)?;
        self.reschedule(slot);
        Ok(())
    }

    /// Does everything due at or before `now` through `effects`: ends expired sessions
    /// (`expired`) and those without liveness for the orphan timeout (`orphaned`), runs due
    /// releases and retries, and evicts ended sessions past their retention. A loop over
    /// [`poll`](Self::poll) for drivers whose releases finish at once. Costs O(1) when
    /// nothing is due.
    pub fn handle_timeout<E: Effects>(&mut self, now: Timestamp, effects: &mut E) -> Sweep {
        let mut sweep = Sweep::default();
        let len_before = self.len;
        while let Some(work) = self.poll(now) {
            match work {
                Work::End { session, reason } => {
                    match reason {
                        EndReason::Expired => sweep.expired += 1,
                        _ => sweep.orphaned += 1,
                    }
                    if let Ok(out) = self.end(now, &session, reason) {
                        effects.ended(out.session);
                    }
                }
                Work::Release { session, resource } => {
                    let outcome = effects.release(&session, resource);
                    sweep.release_attempts += 1;
                    if outcome == ReleaseOutcome::Failed {
                        sweep.release_failures += 1;
                    }
                    // The release was just handed out, so its outcome is taken.
                    let _ = self.handle_release(now, &session, resource, outcome);
                }
            }
        }
        // Nothing is inserted meanwhile: what is gone was evicted.
        sweep.evicted = len_before.saturating_sub(self.len);
        sweep
    }

    /// Ends the session in `slot` (the state change only) and reschedules it.
    fn end_slot(
        &mut self,
        slot: usize,
        now: Timestamp,
        reason: EndReason,
    ) -> Result<Transition, NotFound> {
        let session = self.slots[slot].session.as_mut().ok_or(NotFound)?;
        let transition = session.end(now, reason);
        if transition == Transition::Committed {
            self.slots[slot].timer = Timer::Armed;
            self.reschedule(slot);
        }
        Ok(transition)
    }

    /// Runs the releases of the session in `slot` that are due at `now` through `effects`,
    /// one at a time, until one fails or none is due.
    fn release_due<E: Effects>(&mut self, slot: usize, now: Timestamp, effects: &mut E) {
        let policy = self.policy;
        let Some(session) = self.slots[slot].session.as_mut() else {
            return;
        };
        let id = *session.id();
        while let Some(resource) = session.poll_release(now) {
            let outcome = effects.release(&id, resource);
            // Just handed out, so the outcome is taken.
            let _ = session.handle_release(now, resource, outcome, &policy);
            if outcome == ReleaseOutcome::Failed {
                break;
            }
        }
        self.reschedule(slot);
    }

    fn insert(&mut self, session: Session) -> Result<&Session, StartError> {
        if self.find(session.id()).is_some() {
            return Err(StartError::DuplicateId);
        }
        let slot = if self.free_head != NONE {
            let slot = self.free_head as usize;
            self.free_head = self.slots[slot].link;
            slot
        } else if (self.fresh as usize) < N {
            self.fresh += 1;
            self.fresh as usize - 1
        } else {
            return Err(StartError::TableFull);
        };
        let hash = id_hash(session.id());
        let bucket = bucket_of(hash, N);
        let deadline = session.deadline(&self.policy);
        let seq = self.inserted;
        self.inserted = self.inserted.wrapping_add(1);
        self.slots[slot] = Slot {
            session: Some(session),
            hash: hash as u32,
            link: self.buckets[bucket],
            heap_pos: NONE,
            seq,
            timer: Timer::Armed,
        };
        self.buckets[bucket] = slot as u32;
        self.heap_push(HeapEntry {
            deadline,
            seq,
            slot: slot as u32,
        });
        self.slots[slot]
            .session
            .as_ref()
            .ok_or(StartError::TableFull)
    }

    fn evict(&mut self, slot: usize) {
        let Some(session) = self.slots[slot].session.take() else {
            return;
        };
        self.heap_remove(slot);
        // Unlink from its bucket chain.
        let bucket = bucket_of(id_hash(session.id()), N);
        let next = self.slots[slot].link;
        if self.buckets[bucket] == slot as u32 {
            self.buckets[bucket] = next;
        } else {
            let mut at = self.buckets[bucket];
            while at != NONE {
                let link = self.slots[at as usize].link;
                if link == slot as u32 {
                    self.slots[at as usize].link = next;
                    break;
                }
                at = link;
            }
        }
        self.slots[slot].link = self.free_head;
        self.free_head = slot as u32;
    }

    fn find(&self, id: &SessionId) -> Option<usize> {
        let hash = id_hash(id);
        let mut at = self.buckets[bucket_of(hash, N)];
        while at != NONE {
            let slot = &self.slots[at as usize];
            if slot.hash == hash as u32 && slot.session.as_ref().is_some_and(|s| s.id() == id) {
                return Some(at as usize);
            }
            at = slot.link;
        }
        None
    }

    /// When the table next looks at the session in `slot`: the session's own deadline,
    /// unless its timer is out with the driver or deferred.
    fn slot_deadline(&self, slot: usize) -> Option<Timestamp> {
        let s = &self.slots[slot];
        let session = s.session.as_ref()?;
        let own = session.deadline(&self.policy);
        Some(match (session.ended_at(), s.timer) {
            (None, Timer::HandedOut) => Timestamp::MAX,
            (None, Timer::Deferred(not_before)) => own.max(not_before),
            _ => own,
        })
    }

    /// Recomputes the slot's deadline after its session changed and restores heap order.
    fn reschedule(&mut self, slot: usize) {
        let Some(deadline) = self.slot_deadline(slot) else {
            return;
        };
        let pos = self.slots[slot].heap_pos as usize;
        self.heap[pos].deadline = deadline;
        let pos = self.sift_up(pos);
        self.sift_down(pos);
    }

    fn heap_set(&mut self, pos: usize, entry: HeapEntry) {
        self.heap[pos] = entry;
        self.slots[entry.slot as usize].heap_pos = pos as u32;
    }

    fn heap_push(&mut self, entry: HeapEntry) {
        let pos = self.len as usize;
        self.len += 1;
        self.heap_set(pos, entry);
        self.sift_up(pos);
    }

    fn heap_remove(&mut self, slot: usize) {
        let pos = self.slots[slot].heap_pos as usize;
        if pos >= self.len as usize {
            return;
        }
        self.len -= 1;
        let last = self.len as usize;
        self.slots[slot].heap_pos = NONE;
        if pos != last {
            let moved = self.heap[last];
            self.heap_set(pos, moved);
            let pos = self.sift_up(pos);
            self.sift_down(pos);
        }
        self.heap[last] = HeapEntry::EMPTY;
    }

    fn sift_up(&mut self, mut pos: usize) -> usize {
        let entry = self.heap[pos];
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if !entry.before(&self.heap[parent]) {
                break;
            }
            self.heap_set(pos, self.heap[parent]);
            pos = parent;
        }
        self.heap_set(pos, entry);
        pos
    }

    fn sift_down(&mut self, mut pos: usize) -> usize {
        let len = self.len as usize;
        let entry = self.heap[pos];
        loop {
            let left = 2 * pos + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && self.heap[right].before(&self.heap[left]) {
                right
            } else {
                left
            };
            if !self.heap[child].before(&entry) {
                break;
            }
            self.heap_set(pos, self.heap[child]);
            pos = child;
        }
        self.heap_set(pos, entry);
        pos
    }
}

#[cfg(test)]
mod tests;
