use super::*;
use crate::resource::ResourceKind;
use crate::session::{NotInFlight, Status};
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
    let out = t
        .end_and_release(at(5), &id, EndReason::Requested, &mut log)
        .unwrap();
    assert_eq!(out.transition, Transition::Committed);
    assert_eq!(
        log.calls,
        [("ended", 0), ("release", 3), ("release", 2), ("release", 1)]
    );
    assert!(out.session.is_fully_released());
    // A repeated end runs nothing.
    let again = t
        .end_and_release(at(9), &id, EndReason::Shutdown, &mut log)
        .unwrap();
    assert_eq!(again.transition, Transition::AlreadyEnded);
    assert_eq!(again.session.ended_at(), Some(at(5)));
    assert_eq!(log.calls.len(), 4);
}

#[test]
fn late_resource_is_handed_back() {
    let mut t = table();
    let id = *t.start(at(0), 1, Duration::from_secs(60)).unwrap().id();
    t.end(at(1), &id, EndReason::Requested).unwrap();
    let err = t.attach(&id, res(9)).unwrap_err();
    assert_eq!(err.refusal, AttachRefusal::SessionEnded);
    assert_eq!(err.resource, res(9));
    assert!(t.get(&id).unwrap().resources().is_empty());
}

#[test]
fn a_failed_release_holds_back_the_ones_acquired_before_it() {
    let mut t = table();
    let mut log = Log {
        failing: std::vec![7],
        ..Log::default()
    };
    let id = *t.start(at(0), 1, Duration::from_secs(3600)).unwrap().id();
    t.attach(&id, res(6)).unwrap();
    t.attach(&id, res(7)).unwrap();
    t.end_and_release(at(10), &id, EndReason::Requested, &mut log)
        .unwrap();
    // 7 failed, so 6 (acquired before it) waits.
    assert_eq!(log.calls, [("ended", 0), ("release", 7)]);
    // First retry after the initial backoff (250 ms), then 500 ms later.
    let first_retry = Timestamp::from_millis(at(10).as_millis() + 250);
    assert_eq!(t.next_deadline(), Some(first_retry));
    t.handle_timeout(first_retry, &mut log);
    let second_retry = Timestamp::from_millis(first_retry.as_millis() + 500);
    assert_eq!(t.next_deadline(), Some(second_retry));
    log.failing.clear();
    let sweep = t.handle_timeout(second_retry, &mut log);
    assert_eq!((sweep.release_attempts, sweep.release_failures), (2, 0));
    assert!(t.get(&id).unwrap().is_fully_released());
    assert_eq!(
        log.calls[1..],
        [
            ("release", 7),
            ("release", 7),
            ("release", 7),
            ("release", 6)
        ]
    );
    // Released once, never offered again; evicted after retention.
    let evict_at = second_retry.saturating_add(Policy::DEFAULT.retention);
    assert_eq!(t.next_deadline(), Some(evict_at));
    assert_eq!(t.handle_timeout(evict_at, &mut log).evicted, 1);
    assert_eq!(log.calls.len(), 5);
    assert!(t.get(&id).is_none());
}

#[test]
fn poll_hands_out_one_release_of_a_session_at_a_time() {
    let mut t = table();
    let a = *t.start(at(0), 1, Duration::from_secs(3600)).unwrap().id();
    let b = *t.start(at(0), 2, Duration::from_secs(3600)).unwrap().id();
    for h in [1, 2] {
        t.attach(&a, res(h)).unwrap();
        t.attach(&b, res(10 + h)).unwrap();
    }
    t.end(at(5), &a, EndReason::Requested).unwrap();
    t.end(at(5), &b, EndReason::Requested).unwrap();
    // One release of each session, the last acquired first; then nothing until they
    // come back.
    let first = t.poll(at(5));
    let second = t.poll(at(5));
    assert_eq!(
        first,
        Some(Work::Release {
            session: a,
            resource: res(2)
        })
    );
    assert_eq!(
        second,
        Some(Work::Release {
            session: b,
            resource: res(12)
        })
    );
    assert_eq!(t.poll(at(60)), None);
    assert_eq!(t.next_deadline(), None, "everything is out with the driver");
    // Reporting the wrong resource is refused and changes nothing.
    assert_eq!(
        t.handle_release(at(6), &a, res(1), ReleaseOutcome::Released),
        Err(ReleaseRefused::NotInFlight(NotInFlight {
            resource: res(1)
        }))
    );
    t.handle_release(at(6), &a, res(2), ReleaseOutcome::Released)
        .unwrap();
    assert_eq!(
        t.poll(at(6)),
        Some(Work::Release {
            session: a,
            resource: res(1)
        })
    );
    // A failure: retried after the backoff, not before.
    t.handle_release(at(7), &b, res(12), ReleaseOutcome::Failed)
        .unwrap();
    let retry = Timestamp::from_millis(at(7).as_millis() + 250);
    assert_eq!(t.next_deadline(), Some(retry));
    assert_eq!(t.poll(Timestamp::from_millis(retry.as_millis() - 1)), None);
    assert_eq!(
        t.poll(retry),
        Some(Work::Release {
            session: b,
            resource: res(12)
        })
    );
}

#[test]
fn a_timer_is_handed_out_once_and_can_be_deferred() {
    let mut t = table();
    let id = *t.start(at(0), 1, Duration::from_secs(3600)).unwrap().id();
    // Orphaned at 60 s; the table does not end it, the driver does.
    assert_eq!(t.poll(at(59)), None);
    assert_eq!(
        t.poll(at(60)),
        Some(Work::End {
            session: id,
            reason: EndReason::Orphaned
        })
    );
    assert_eq!(t.poll(at(61)), None, "handed out once");
    assert_eq!(t.get(&id).unwrap().status(), Status::Started);
    // The driver's store was down: look again at 70 s.
    t.defer_end(&id, at(70)).unwrap();
    assert_eq!(t.next_deadline(), Some(at(70)));
    assert_eq!(
        t.poll(at(70)),
        Some(Work::End {
            session: id,
            reason: EndReason::Orphaned
        })
    );
    // It turned out alive elsewhere: a touch and a deferral re-arm the timer.
    t.touch(at(70), &id).unwrap();
    t.defer_end(&id, at(70)).unwrap();
    assert_eq!(t.next_deadline(), Some(at(130)));
    assert_eq!(t.poll(at(130)).map(|_| ()), Some(()));
    let out = t.end(at(130), &id, EndReason::Orphaned).unwrap();
    assert_eq!(out.transition, Transition::Committed);
    t.check_structure().unwrap();
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
    let out = t.end(at(40), &id, EndReason::Requested).unwrap();
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
        t.end_and_release(now, &id, EndReason::Requested, &mut log)
            .unwrap();
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
