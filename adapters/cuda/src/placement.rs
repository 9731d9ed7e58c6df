//! Placement arithmetic: which GPU a session's memory goes to. Pure, so it is tested and
//! measured without a GPU; the inputs come from NVML.

use std::collections::HashMap;

use session_lifecycle::SessionId;
use session_lifecycle_runtime::DeviceReport;

use crate::gpu::DeviceMemory;

/// One GPU as placement sees it at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRoom {
    /// The device's index (its NVML index, which is what `CUDA_VISIBLE_DEVICES` names).
    pub index: u32,
    /// Free device memory now, in bytes (NVML).
    pub free: u64,
    /// Memory promised to sessions and not yet taken by them, in bytes.
    pub outstanding: u64,
}

impl DeviceRoom {
    /// Memory neither in use nor promised: what a new session can be given.
    pub fn room(&self) -> u64 {
        self.free.saturating_sub(self.outstanding)
    }
}

/// A share promised to a session on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promise {
    /// The session.
    pub session: SessionId,
    /// The device.
    pub device: u32,
    /// Bytes promised.
    pub bytes: u64,
}

/// Memory promised on `device` and not yet taken: for each promise there, what its session's
/// processes do not use yet (`used`, from NVML). A session using more than its promise
/// takes nothing from the others' promises.
pub fn outstanding<'a>(
    device: u32,
    promises: impl IntoIterator<Item = &'a Promise>,
    used: &HashMap<SessionId, u64>,
) -> u64 {
    promises
        .into_iter()
        .filter(|p| p.device == device)
        .map(|p| {
            p.bytes
                .saturating_sub(used.get(&p.session).copied().unwrap_or(0))
        })
        .fold(0u64, u64::saturating_add)
}

/// What `device` reports of its memory (see [`DeviceReport`]): memory held by the processes
/// of sessions with a share on it, memory promised to them, and memory still held by
/// processes of sessions without one (ended and released, yet holding).
pub fn device_report<'a>(
    device: &DeviceMemory,
    promises: impl IntoIterator<Item = &'a Promise>,
    used: &HashMap<SessionId, u64>,
) -> DeviceReport {
    let mut report = DeviceReport {
        index: device.index,
        name: device.name.clone(),
        total: device.total,
        free: device.free,
        ..Default::default()
    };
    let mut sharing: Vec<SessionId> = Vec::new();
    for p in promises.into_iter().filter(|p| p.device == device.index) {
        report.promised = report.promised.saturating_add(p.bytes);
        sharing.push(p.session);
    }
    for (session, bytes) in used {
        let sum = if sharing.contains(session) {
            &mut report.used_by_sessions
        } else {
            &mut report.not_returned
        };
        *sum = sum.saturating_add(*bytes);
    }
    report
}

/// Why no device was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// No device (or not the one asked for) has `wanted` bytes of room.
    #[error("no GPU has {wanted} bytes free and unpromised (most room: {best} bytes)")]
    CapacityExhausted {
        /// Bytes asked for.
        wanted: u64,
        /// The largest room of any eligible device.
        best: u64,
    },
    /// The session asked for a device that does not exist.
    #[error("there is no GPU {0}")]
    UnknownDevice(u32),
}

impl From<PlacementError> for session_lifecycle_runtime::AcquireError {
    /// No room is capacity (the API's `capacity_exhausted`); a device that does not exist
    /// is a failed start.
    fn from(e: PlacementError) -> Self {
        use session_lifecycle_runtime::AcquireError;
        match e {
            PlacementError::CapacityExhausted { .. } => {
                AcquireError::CapacityExhausted(e.to_string())
            }
            PlacementError::UnknownDevice(_) => AcquireError::Failed(e.to_string()),
        }
    }
}

/// Chooses a device for `bytes`: the one asked for if it has room, else the one with the
/// most room (ties go to the lowest index).
pub fn choose(
    devices: &[DeviceRoom],
    bytes: u64,
    wanted: Option<u32>,
) -> Result<u32, PlacementError> {
    let eligible = |d: &&DeviceRoom| wanted.is_none_or(|w| d.index == w);
    if let Some(w) = wanted
        && !devices.iter().any(|d| d.index == w)
    {
        return Err(PlacementError::UnknownDevice(w));
    }
    let best = devices
        .iter()
        .filter(eligible)
        .max_by(|a, b| a.room().cmp(&b.room()).then(b.index.cmp(&a.index)));
    match best {
        Some(d) if d.room() >= bytes => Ok(d.index),
        other => Err(PlacementError::CapacityExhausted {
            wanted: bytes,
            best: other.map_or(0, DeviceRoom::room),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_report_tells_shares_from_memory_that_did_not_come_back() {
        let (a, b, gone) = (
            SessionId::from_ulid_parts(session_lifecycle::Timestamp::from_millis(1), 1),
            SessionId::from_ulid_parts(session_lifecycle::Timestamp::from_millis(1), 2),
            SessionId::from_ulid_parts(session_lifecycle::Timestamp::from_millis(1), 3),
        );
        let device = DeviceMemory {
            index: 0,
            uuid: "GPU-0".into(),
            name: "H200".into(),
            total: 100,
            free: 40,
        };
        let promises = [
            Promise {
                session: a,
                device: 0,
                bytes: 20,
            },
            Promise {
                session: b,
                device: 0,
                bytes: 10,
            },
            Promise {
                session: gone,
                device: 1,
                bytes: 10,
            },
        ];
        let used = HashMap::from([(a, 25), (gone, 7)]);
        let report = device_report(&device, &promises, &used);
        assert_eq!(
            (
                report.promised,
                report.used_by_sessions,
                report.not_returned
            ),
            (30, 25, 7)
        );
        assert_eq!(
            (report.total, report.free, report.name.as_str()),
            (100, 40, "H200")
        );
    }
    use session_lifecycle::Timestamp;

    const GIB: u64 = 1 << 30;

    fn dev(index: u32, free: u64, outstanding: u64) -> DeviceRoom {
        DeviceRoom {
            index,
            free,
            outstanding,
        }
    }

    fn id(n: u128) -> SessionId {
        SessionId::from_ulid_parts(Timestamp::from_millis(1_700_000_000_000), n)
    }

    #[test]
    fn the_device_with_most_room_wins() {
        let devices = [
            dev(0, 40 * GIB, 30 * GIB),
            dev(1, 20 * GIB, 0),
            dev(2, 35 * GIB, 0),
        ];
        assert_eq!(choose(&devices, 2 * GIB, None), Ok(2));
        // Free memory alone would pick 0; what is promised there is not free to give.
        assert_eq!(devices[0].room(), 10 * GIB);
    }

    #[test]
    fn ties_go_to_the_lowest_index() {
        let devices = [dev(3, 8 * GIB, 0), dev(1, 8 * GIB, 0)];
        assert_eq!(choose(&devices, GIB, None), Ok(1));
    }

    #[test]
    fn a_device_asked_for_is_used_only_if_it_has_room() {
        let devices = [dev(0, 80 * GIB, 0), dev(1, 4 * GIB, 0)];
        assert_eq!(choose(&devices, 2 * GIB, Some(1)), Ok(1));
        assert_eq!(
            choose(&devices, 8 * GIB, Some(1)),
            Err(PlacementError::CapacityExhausted {
                wanted: 8 * GIB,
                best: 4 * GIB
            })
        );
        assert_eq!(
            choose(&devices, GIB, Some(7)),
            Err(PlacementError::UnknownDevice(7))
        );
    }

    #[test]
    fn no_room_anywhere_is_capacity_exhausted() {
        let devices = [dev(0, 3 * GIB, 2 * GIB), dev(1, GIB, 0)];
        assert_eq!(
            choose(&devices, 2 * GIB, None),
            Err(PlacementError::CapacityExhausted {
                wanted: 2 * GIB,
                best: GIB
            })
        );
        assert_eq!(
            choose(&[], GIB, None),
            Err(PlacementError::CapacityExhausted {
                wanted: GIB,
                best: 0
            })
        );
    }

    #[test]
    fn outstanding_counts_only_what_sessions_have_not_taken_yet() {
        let promises = [
            Promise {
                session: id(1),
                device: 0,
                bytes: 4 * GIB,
            },
            Promise {
                session: id(2),
                device: 0,
                bytes: 4 * GIB,
            },
            Promise {
                session: id(3),
                device: 1,
                bytes: 4 * GIB,
            },
        ];
        let mut used = HashMap::new();
        assert_eq!(outstanding(0, &promises, &used), 8 * GIB);
        used.insert(id(1), GIB);
        assert_eq!(outstanding(0, &promises, &used), 7 * GIB);
        // Using more than promised does not eat another session's promise.
        used.insert(id(1), 6 * GIB);
        assert_eq!(outstanding(0, &promises, &used), 4 * GIB);
        assert_eq!(outstanding(1, &promises, &used), 4 * GIB);
        assert_eq!(outstanding(2, &promises, &used), 0);
    }

    #[test]
    fn huge_numbers_saturate_instead_of_overflowing() {
        let promises = [
            Promise {
                session: id(1),
                device: 0,
                bytes: u64::MAX,
            },
            Promise {
                session: id(2),
                device: 0,
                bytes: u64::MAX,
            },
        ];
        assert_eq!(outstanding(0, &promises, &HashMap::new()), u64::MAX);
        assert_eq!(dev(0, GIB, u64::MAX).room(), 0);
    }
}
