//! The table's storage: slots holding sessions, chained by bucket, and the entries of the
//! deadline heap. Plain data; the table keeps their invariants.

use crate::id::SessionId;
use crate::session::Session;
use crate::time::Timestamp;

pub(super) const NONE: u32 = u32::MAX;

/// One entry of the deadline heap: when the table next has to look at a slot's session
/// (see `Session::deadline`). Equal deadlines go in insertion order (`seq`), so the order in
/// which `SessionTable::poll` hands out work is fully determined by the inputs.
#[derive(Clone, Copy)]
pub(super) struct HeapEntry {
    pub(super) deadline: Timestamp,
    pub(super) seq: u32,
    pub(super) slot: u32,
}

impl HeapEntry {
    pub(super) const EMPTY: HeapEntry = HeapEntry {
        deadline: Timestamp::EPOCH,
        seq: 0,
        slot: NONE,
    };

    /// Whether `self` comes before `other`: earlier deadline, then earlier insertion.
    pub(super) fn before(&self, other: &HeapEntry) -> bool {
        (self.deadline, self.seq) < (other.deadline, other.seq)
    }
}

/// Where a started session's own timer stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Timer {
    /// It fires at the session's expiry or orphan deadline.
    Armed,
    /// It fired and `Work::End` went to the driver, which has not answered yet.
    HandedOut,
    /// The driver could not end it: it fires again at this time at the earliest.
    Deferred(Timestamp),
}

pub(super) struct Slot {
    pub(super) session: Option<Session>,
    /// The id's hash, to skip most key comparisons while probing a bucket.
    pub(super) hash: u32,
    /// Next slot in the same bucket while occupied; next free slot while free.
    pub(super) link: u32,
    /// Where this slot sits in the deadline heap.
    pub(super) heap_pos: u32,
    /// When the session was inserted, among all insertions (ties in the heap).
    pub(super) seq: u32,
    /// The started session's timer; `Armed` once it ended.
    pub(super) timer: Timer,
}

impl Slot {
    pub(super) const EMPTY: Slot = Slot {
        session: None,
        hash: 0,
        link: NONE,
        heap_pos: NONE,
        seq: 0,
        timer: Timer::Armed,
    };
}

pub(super) fn id_hash(id: &SessionId) -> u64 {
    id.hash64()
}

/// Maps a hash onto `0..n` without a division (Lemire's multiply-shift).
pub(super) fn bucket_of(hash: u64, n: usize) -> usize {
    ((u128::from(hash) * n as u128) >> 64) as usize
}
