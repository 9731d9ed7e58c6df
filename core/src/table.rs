//! A fixed-capacity table of sessions that drives their deadlines.

use core::fmt;
use core::time::Duration;

use crate::id::SessionId;
use crate::policy::{Policy, PolicyError};
use crate::session::{AttachRefusal, EndReason, ReleaseState, Resource, Session, Transition};
use crate::time::Timestamp;

/// What a resource release callback reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The resource is given back. It is never offered again.
    Released,
    /// Releasing failed; the resource stays pending and is offered again after a backoff.
    Failed,
}

/// The callbacks a [`SessionTable`] makes into its driver.
///
/// Both are called only after the state change they report is committed in the table, so a
/// callback can never observe (or cause) a half-ended session.
pub trait Effects {
    /// Release one resource of `session`. Called once per held resource when the session
    /// ends, in reverse acquisition order, and again after a backoff for each release that
    /// reported [`ReleaseOutcome::Failed`]. A resource that was released is never offered
    /// again. Must be safe to repeat after a failure.
    fn release(&mut self, session: &SessionId, resource: Resource) -> ReleaseOutcome;

    /// `session` has just ended (by any trigger), before its releases run. The default does
    /// nothing.
    fn ended(&mut self, session: &Session) {
        let _ = session;
    }
}

/// What one [`SessionTable::handle_timeout`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Sessions ended with `expired`.
    pub expired: u32,
    /// Sessions ended with `orphaned`.
    pub orphaned: u32,
    /// Release attempts made (first attempts of the sessions ended here, and retries).
    pub release_attempts: u32,
    /// Of those, the ones that failed and stay pending.
    pub release_failures: u32,
    /// Ended, fully released sessions dropped after their retention.
    pub evicted: u32,
}

/// Why a session could not be started or restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// The table holds as many sessions as it can.
    TableFull,
    /// A session with this id is already in the table.
    DuplicateId,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StartError::TableFull => "the session table is full",
            StartError::DuplicateId => "a session with this id already exists",
        })
    }
}

/// No session with the given id is in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotFound;

impl fmt::Display for NotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no such session")
    }
}

/// Why a liveness signal was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchError {
    /// No session with that id is in the table.
    NotFound,
    /// The session has ended; liveness no longer matters to it.
    SessionEnded,
}

impl fmt::Display for TouchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TouchError::NotFound => "no such session",
            TouchError::SessionEnded => "the session has ended",
        })
    }
}

/// A resource that could not be attached, handed back with the reason. The caller owns it
/// again and must release it at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachError {
    /// Why it was refused.
    pub refusal: AttachRefusal,
    /// The resource, to be released by the caller.
    pub resource: Resource,
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "resource not attached: {}", self.refusal)
    }
}

/// The result of ending a session: the session as it now stands, and whether this call
/// ended it.
#[derive(Debug, Clone, Copy)]
pub struct EndOutcome<'a> {
    /// The session, ended. A repeated end sees the same `ended_at` and `end_reason`.
    pub session: &'a Session,
    /// [`Transition::Committed`] for the call that ended it, [`Transition::AlreadyEnded`]
    /// for every later one.
    pub transition: Transition,
}

const NONE: u32 = u32::MAX;

/// One entry of the deadline heap: when the table next has to look at a slot's session
/// (see `Session::deadline`).
#[derive(Clone, Copy)]
struct HeapEntry {
    deadline: Timestamp,
    slot: u32,
}

impl HeapEntry {
    const EMPTY: HeapEntry = HeapEntry {
        deadline: Timestamp::EPOCH,
        slot: NONE,
    };
}

struct Slot {
    session: Option<Session>,
    /// The id's hash, to skip most key comparisons while probing a bucket.
    hash: u32,
    /// Next slot in the same bucket while occupied; next free slot while free.
    link: u32,
    /// Where this slot sits in the deadline heap.
    heap_pos: u32,
}

impl Slot {
    const EMPTY: Slot = Slot {
        session: None,
        hash: 0,
        link: NONE,
        heap_pos: NONE,
    };
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

    /// The earliest moment at which [`handle_timeout`](Self::handle_timeout) has work to do,
    /// or `None` when the table is empty. A deadline in the past means "now"; once handled it
    /// moves on, so a driver that sleeps until it never spins.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        if self.len == 0 {
            None
        } else {
            Some(self.heap[0].deadline)
        }
    }

    /// Starts a session at `now` that expires after `lifetime` (the caller's
    /// `min(requested duration, plan limit)`). Its id is the ULID of `now` and `random`,
    /// which the caller draws from its own randomness.
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
    /// (ended sessions with pending releases are retried on the next timeout).
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

    /// Ends the session `id` at `now` for `reason`, then releases what it holds through
    /// `effects` (in reverse acquisition order). Idempotent: ending an ended session changes
    /// nothing, runs nothing, and returns it as it was first ended.
    pub fn end<E: Effects>(
        &mut self,
        now: Timestamp,
        id: &SessionId,
        reason: EndReason,
        effects: &mut E,
    ) -> Result<EndOutcome<'_>, NotFound> {
        let slot = self.find(id).ok_or(NotFound)?;
        let transition = self.end_slot(slot, now, reason, effects).ok_or(NotFound)?;
        if transition == Transition::Committed {
            self.reschedule(slot);
        }
        let session = self.slots[slot].session.as_ref().ok_or(NotFound)?;
        Ok(EndOutcome {
            session,
            transition,
        })
    }

    /// Does everything due at or before `now`: ends expired sessions (`expired`) and those
    /// without liveness for the orphan timeout (`orphaned`), retries pending releases, and
    /// evicts ended sessions past their retention. Costs O(1) when nothing is due.
    pub fn handle_timeout<E: Effects>(&mut self, now: Timestamp, effects: &mut E) -> Sweep {
        let mut sweep = Sweep::default();
        while self.len > 0 {
            let HeapEntry { deadline, slot } = self.heap[0];
            if deadline > now {
                break;
            }
            let slot = slot as usize;
            self.handle_due(slot, now, effects, &mut sweep);
        }
        sweep
    }

    fn handle_due<E: Effects>(
        &mut self,
        slot: usize,
        now: Timestamp,
        effects: &mut E,
        sweep: &mut Sweep,
    ) {
        let policy = self.policy;
        let Some(session) = self.slots[slot].session.as_mut() else {
            // An empty slot is never in the heap; drop it rather than loop on it.
            self.heap_remove(slot);
            return;
        };
        let (attempts, failures) = if session.ending().is_none() {
            let orphan_at = session.last_seen_at().saturating_add(policy.orphan_timeout);
            // The earlier deadline names the reason; a tie is an expiry.
            let reason = if session.expires_at() <= orphan_at {
                sweep.expired += 1;
                EndReason::Expired
            } else {
                sweep.orphaned += 1;
                EndReason::Orphaned
            };
            let (_, attempts, failures) = commit_end(&policy, now, session, reason, effects);
            (attempts, failures)
        } else if session.is_fully_released() {
            self.evict(slot);
            sweep.evicted += 1;
            return;
        } else {
            run_releases(&policy, now, session, effects)
        };
        sweep.release_attempts += attempts;
        sweep.release_failures += failures;
        self.reschedule(slot);
    }

    /// Ends the session in `slot` through [`commit_end`]; `None` if the slot is empty.
    fn end_slot<E: Effects>(
        &mut self,
        slot: usize,
        now: Timestamp,
        reason: EndReason,
        effects: &mut E,
    ) -> Option<Transition> {
        let policy = self.policy;
        let session = self.slots[slot].session.as_mut()?;
        let (transition, _, _) = commit_end(&policy, now, session, reason, effects);
        Some(transition)
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
        self.slots[slot] = Slot {
            session: Some(session),
            hash: hash as u32,
            link: self.buckets[bucket],
            heap_pos: NONE,
        };
        self.buckets[bucket] = slot as u32;
        self.heap_push(HeapEntry {
            deadline,
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

    /// Recomputes the slot's deadline after its session changed and restores heap order.
    fn reschedule(&mut self, slot: usize) {
        let Some(session) = self.slots[slot].session.as_ref() else {
            return;
        };
        let deadline = session.deadline(&self.policy);
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
            if self.heap[parent].deadline <= entry.deadline {
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
            let child = if right < len && self.heap[right].deadline < self.heap[left].deadline {
                right
            } else {
                left
            };
            if entry.deadline <= self.heap[child].deadline {
                break;
            }
            self.heap_set(pos, self.heap[child]);
            pos = child;
        }
        self.heap_set(pos, entry);
        pos
    }

    /// Checks the table's internal structure; for tests and fuzzing.
    #[doc(hidden)]
    pub fn check_structure(&self) -> Result<(), &'static str> {
        let len = self.len as usize;
        if self.iter().count() != len {
            return Err("len disagrees with occupied slots");
        }
        for pos in 0..len {
            let HeapEntry { deadline, slot } = self.heap[pos];
            let slot = slot as usize;
            if self.slots[slot].heap_pos as usize != pos {
                return Err("heap position out of sync");
            }
            if pos > 0 && self.heap[(pos - 1) / 2].deadline > deadline {
                return Err("heap order violated");
            }
            let Some(session) = self.slots[slot].session.as_ref() else {
                return Err("empty slot in heap");
            };
            if deadline != session.deadline(&self.policy) {
                return Err("stale deadline");
            }
            if self.find(session.id()) != Some(slot) {
                return Err("session not reachable through the index");
            }
        }
        Ok(())
    }
}

/// Ends `session` unless it already ended: commits the state change first, then tells
/// `effects`, then runs the first release attempts. Returns the transition and the
/// (attempts, failures) of those releases.
fn commit_end<E: Effects>(
    policy: &Policy,
    now: Timestamp,
    session: &mut Session,
    reason: EndReason,
    effects: &mut E,
) -> (Transition, u32, u32) {
    let transition = session.end(now, reason);
    if transition == Transition::AlreadyEnded {
        return (transition, 0, 0);
    }
    effects.ended(session);
    let (attempts, failures) = run_releases(policy, now, session, effects);
    (transition, attempts, failures)
}

/// Runs the releases of `session` that are due at `now`: every held resource (first
/// attempts, after an end) and every pending one whose retry time came, in reverse
/// acquisition order. Returns (attempts, failures).
fn run_releases<E: Effects>(
    policy: &Policy,
    now: Timestamp,
    session: &mut Session,
    effects: &mut E,
) -> (u32, u32) {
    let id = *session.id();
    let (mut attempts_made, mut failures) = (0, 0);
    for held in session.resources_mut().iter_mut().rev() {
        let failed_before = match held.release {
            ReleaseState::Held => 0,
            ReleaseState::Pending { attempts, retry_at } if retry_at <= now => attempts,
            ReleaseState::Pending { .. } | ReleaseState::Released { .. } => continue,
        };
        attempts_made += 1;
        held.release = match effects.release(&id, held.resource) {
            ReleaseOutcome::Released => ReleaseState::Released { at: now },
            ReleaseOutcome::Failed => {
                failures += 1;
                let attempts = failed_before.saturating_add(1);
                ReleaseState::Pending {
                    attempts,
                    retry_at: now.saturating_add(policy.release_backoff(attempts)),
                }
            }
        };
    }
    (attempts_made, failures)
}

fn id_hash(id: &SessionId) -> u64 {
    id.hash64()
}

/// Maps a hash onto `0..n` without a division (Lemire's multiply-shift).
fn bucket_of(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{ResourceKind, Status};
    use std::vec::Vec;

    const T0: u64 = 1_705_314_600_000;

    fn at(secs: u64) -> Timestamp {
        Timestamp::from_millis(T0 + secs * 1000)
    }

    fn res(handle: u64) -> Resource {
        Resource {
            kind: ResourceKind(1),
            handle,
        }
    }

    /// Records calls in order; fails releases of the handles in `failing`.
    #[derive(Default)]
    struct Log {
        calls: Vec<(&'static str, u64)>,
        failing: Vec<u64>,
    }

    impl Effects for Log {
        fn release(&mut self, _: &SessionId, r: Resource) -> ReleaseOutcome {
            self.calls.push(("release", r.handle));
            if self.failing.contains(&r.handle) {
                ReleaseOutcome::Failed
            } else {
                ReleaseOutcome::Released
            }
        }
        fn ended(&mut self, s: &Session) {
            assert_eq!(s.status(), Status::Ended);
            self.calls.push(("ended", 0));
        }
    }

    fn table() -> SessionTable<16> {
        SessionTable::new(Policy::DEFAULT).unwrap()
    }

    #[test]
    fn end_releases_in_reverse_order_after_commit() {
        let mut t = table();
        let mut log = Log::default();
        let id = *t.start(at(0), 1, Duration::from_secs(3600)).unwrap().id();
        for h in [1, 2, 3] {
            t.attach(&id, res(h)).unwrap();
        }
        let out = t.end(at(5), &id, EndReason::Requested, &mut log).unwrap();
        assert_eq!(out.transition, Transition::Committed);
        assert_eq!(
            log.calls,
            [("ended", 0), ("release", 3), ("release", 2), ("release", 1)]
        );
        assert!(out.session.is_fully_released());
        // A repeated end runs nothing.
        let again = t.end(at(9), &id, EndReason::Shutdown, &mut log).unwrap();
        assert_eq!(again.transition, Transition::AlreadyEnded);
        assert_eq!(again.session.ended_at(), Some(at(5)));
        assert_eq!(log.calls.len(), 4);
    }

    #[test]
    fn late_resource_is_handed_back() {
        let mut t = table();
        let id = *t.start(at(0), 1, Duration::from_secs(60)).unwrap().id();
        t.end(at(1), &id, EndReason::Requested, &mut Log::default())
            .unwrap();
        let err = t.attach(&id, res(9)).unwrap_err();
        assert_eq!(err.refusal, AttachRefusal::SessionEnded);
        assert_eq!(err.resource, res(9));
        assert!(t.get(&id).unwrap().resources().is_empty());
    }

    #[test]
    fn failed_release_is_retried_with_backoff_until_it_succeeds() {
        let mut t = table();
        let mut log = Log {
            failing: std::vec![7],
            ..Log::default()
        };
        let id = *t.start(at(0), 1, Duration::from_secs(3600)).unwrap().id();
        t.attach(&id, res(7)).unwrap();
        t.end(at(10), &id, EndReason::Requested, &mut log).unwrap();
        // First retry after the initial backoff (250 ms), then 500 ms later.
        let first_retry = Timestamp::from_millis(at(10).as_millis() + 250);
        assert_eq!(t.next_deadline(), Some(first_retry));
        t.handle_timeout(first_retry, &mut log);
        let second_retry = Timestamp::from_millis(first_retry.as_millis() + 500);
        assert_eq!(t.next_deadline(), Some(second_retry));
        log.failing.clear();
        let sweep = t.handle_timeout(second_retry, &mut log);
        assert_eq!((sweep.release_attempts, sweep.release_failures), (1, 0));
        assert!(t.get(&id).unwrap().is_fully_released());
        assert_eq!(log.calls.iter().filter(|c| c.0 == "release").count(), 3);
        // Released once, never offered again; evicted after retention.
        let evict_at = second_retry.saturating_add(Policy::DEFAULT.retention);
        assert_eq!(t.next_deadline(), Some(evict_at));
        assert_eq!(t.handle_timeout(evict_at, &mut log).evicted, 1);
        assert_eq!(log.calls.iter().filter(|c| c.0 == "release").count(), 3);
        assert!(t.get(&id).is_none());
    }

    #[test]
    fn expiry_and_orphan_deadlines() {
        let mut t = table();
        let mut log = Log::default();
        let short = *t.start(at(0), 1, Duration::from_secs(30)).unwrap().id();
        let long = *t.start(at(0), 2, Duration::from_secs(3600)).unwrap().id();
        assert_eq!(t.next_deadline(), Some(at(30)));
        assert_eq!(t.handle_timeout(at(29), &mut log), Sweep::default());
        t.touch(at(29), &long).unwrap();
        let sweep = t.handle_timeout(at(30), &mut log);
        assert_eq!(sweep.expired, 1);
        assert_eq!(
            t.get(&short).unwrap().end_reason(),
            Some(EndReason::Expired)
        );
        // `long` was last seen at 29 s: orphaned at 89 s.
        assert_eq!(t.handle_timeout(at(88), &mut log).orphaned, 0);
        assert_eq!(t.handle_timeout(at(89), &mut log).orphaned, 1);
        let ended = t.get(&long).unwrap();
        assert_eq!(ended.end_reason(), Some(EndReason::Orphaned));
        assert_eq!(ended.ended_at(), Some(at(89)));
        assert_eq!(t.touch(at(90), &long), Err(TouchError::SessionEnded));
    }

    #[test]
    fn clock_stepping_back_never_ends_before_start() {
        let mut t = table();
        let id = *t.start(at(100), 1, Duration::from_secs(60)).unwrap().id();
        let out = t
            .end(at(40), &id, EndReason::Requested, &mut Log::default())
            .unwrap();
        assert_eq!(out.session.ended_at(), Some(at(100)));
    }

    #[test]
    fn full_table_is_an_error() {
        let mut t = SessionTable::<2>::new(Policy::DEFAULT).unwrap();
        t.start(at(0), 1, Duration::from_secs(60)).unwrap();
        assert_eq!(
            t.start(at(0), 1, Duration::from_secs(60)).err(),
            Some(StartError::DuplicateId)
        );
        t.start(at(0), 2, Duration::from_secs(60)).unwrap();
        assert_eq!(
            t.start(at(0), 3, Duration::from_secs(60)).err(),
            Some(StartError::TableFull)
        );
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn evicted_slots_are_reused() {
        let mut t = SessionTable::<4>::new(Policy::DEFAULT).unwrap();
        let mut log = Log::default();
        let mut now = at(0);
        for round in 0..20u128 {
            let id = *t.start(now, round, Duration::from_secs(60)).unwrap().id();
            t.end(now, &id, EndReason::Requested, &mut log).unwrap();
            now = now.saturating_add(Duration::from_secs(601));
            t.handle_timeout(now, &mut log);
            t.check_structure().unwrap();
            assert!(t.is_empty());
        }
    }

    #[test]
    fn restored_records_finish_their_releases() {
        let json = r#"{"session_id":"sess_01","status":"ended","started_at":"2024-01-15T10:30:00Z","ended_at":"2024-01-15T10:35:00Z","end_reason":"orphaned","expires_at":"2024-01-15T11:30:00Z","last_seen_at":"2024-01-15T10:30:00Z","resources":[{"kind":1,"handle":5,"release":"held"},{"kind":1,"handle":6,"release":"pending","release_attempts":2,"retry_at":"2024-01-15T10:35:10Z"},{"kind":1,"handle":7,"release":"released","released_at":"2024-01-15T10:35:00Z"}]}"#;
        let session: Session = serde_json::from_str(json).unwrap();
        let id = *session.id();
        let mut t = table();
        t.restore(session).unwrap();
        let mut log = Log::default();
        let now = Timestamp::parse_rfc3339("2024-01-15T10:40:00Z").unwrap();
        let sweep = t.handle_timeout(now, &mut log);
        assert_eq!(sweep.release_attempts, 2);
        assert_eq!(log.calls, [("release", 6), ("release", 5)]);
        assert!(t.get(&id).unwrap().is_fully_released());
    }
}
