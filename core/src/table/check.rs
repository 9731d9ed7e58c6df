//! The table's own structure checked from outside its operations (tests and fuzzing).

use super::SessionTable;
use super::slots::Timer;

impl<const N: usize> SessionTable<N> {
    /// Checks the table's internal structure; for tests and fuzzing.
    #[doc(hidden)]
    pub fn check_structure(&self) -> Result<(), &'static str> {
        let len = self.len as usize;
        if self.iter().count() != len {
            return Err("len disagrees with occupied slots");
        }
        for pos in 0..len {
            let entry = self.heap[pos];
            let slot = entry.slot as usize;
            if self.slots[slot].heap_pos as usize != pos {
                return Err("heap position out of sync");
            }
            if pos > 0 && entry.before(&self.heap[(pos - 1) / 2]) {
                return Err("heap order violated");
            }
            if entry.seq != self.slots[slot].seq {
                return Err("heap entry's insertion order out of sync");
            }
            let Some(session) = self.slots[slot].session.as_ref() else {
                return Err("empty slot in heap");
            };
            if Some(entry.deadline) != self.slot_deadline(slot) {
                return Err("stale deadline");
            }
            if session.ended_at().is_some() && self.slots[slot].timer != Timer::Armed {
                return Err("an ended session's timer is not reset");
            }
            if self.find(session.id()) != Some(slot) {
                return Err("session not reachable through the index");
            }
        }
        Ok(())
    }
}
