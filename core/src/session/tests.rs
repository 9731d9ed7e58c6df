use super::*;
use crate::resource::ResourceKind;

fn ts(s: &str) -> Timestamp {
    Timestamp::parse_rfc3339(s).unwrap()
}

#[test]
fn reference_json_shape_round_trips() {
    // The reference's response object, with the fields the contract adds.
    let json = r#"{"session_id":"sess_01H3Z8G9YR3K2N5M6P7Q8W4T","status":"ended","started_at":"2024-01-15T10:30:00Z","ended_at":"2024-01-15T10:35:00Z","end_reason":"requested","expires_at":"2024-01-15T11:30:00Z","last_seen_at":"2024-01-15T10:34:10Z","resources":[{"kind":1,"handle":4242,"release":"released","release_attempts":0,"retry_at":null,"released_at":"2024-01-15T10:35:01Z"}]}"#;
    let session: Session = serde_json::from_str(json).unwrap();
    assert_eq!(session.id().as_str(), "sess_01H3Z8G9YR3K2N5M6P7Q8W4T");
    assert_eq!(session.status(), Status::Ended);
    assert_eq!(session.started_at(), ts("2024-01-15T10:30:00Z"));
    assert_eq!(session.ended_at(), Some(ts("2024-01-15T10:35:00Z")));
    assert!(session.is_fully_released());
    assert_eq!(serde_json::to_string(&session).unwrap(), json);
}

#[test]
fn started_session_serializes_nulls() {
    let s = Session::new(
        SessionId::parse("sess_01H3Z8G9YR3K2N5M6P7Q8W4T").unwrap(),
        ts("2024-01-15T10:30:00Z"),
        ts("2024-01-15T11:30:00Z"),
    );
    let v: serde_json::Value = serde_json::to_value(&s).unwrap();
    assert_eq!(v["status"], "started");
    assert_eq!(v["ended_at"], serde_json::Value::Null);
    assert_eq!(v["end_reason"], serde_json::Value::Null);
    assert_eq!(v["started_at"], "2024-01-15T10:30:00Z");
    assert_eq!(serde_json::from_value::<Session>(v).unwrap(), s);
}

#[test]
fn inconsistent_records_are_refused() {
    let base = r#""session_id":"sess_01","started_at":"2024-01-15T10:30:00Z","expires_at":"2024-01-15T11:30:00Z","last_seen_at":"2024-01-15T10:30:00Z""#;
    for (rest, why) in [
        (
            r#""status":"ended","ended_at":null,"end_reason":null,"resources":[]"#,
            "ended without ended_at",
        ),
        (
            r#""status":"started","ended_at":"2024-01-15T10:35:00Z","end_reason":"requested","resources":[]"#,
            "started with ended_at",
        ),
        (
            r#""status":"ended","ended_at":"2024-01-15T10:29:59Z","end_reason":"requested","resources":[]"#,
            "ended before start",
        ),
        (
            r#""status":"started","ended_at":null,"end_reason":null,"resources":[{"kind":1,"handle":1,"release":"released","released_at":"2024-01-15T10:35:00Z"}]"#,
            "released while started",
        ),
        (
            r#""status":"ended","ended_at":"2024-01-15T10:35:00Z","end_reason":"requested","resources":[{"kind":1,"handle":1,"release":"pending"}]"#,
            "pending without retry time",
        ),
        (
            r#""status":"ended","ended_at":"2024-01-15T10:35:00Z","end_reason":"nope","resources":[]"#,
            "unknown reason",
        ),
        (
            r#""status":"ended","ended_at":"2024-01-15T10:35:00Z","end_reason":"requested","resources":[{"kind":1,"handle":1,"release":"held"},{"kind":1,"handle":1,"release":"held"}]"#,
            "duplicate",
        ),
        (
            r#""status":"started","ended_at":null,"end_reason":null,"resources":[{"kind":1,"handle":1,"release":"held"},{"kind":1,"handle":2,"release":"held"},{"kind":1,"handle":3,"release":"held"},{"kind":1,"handle":4,"release":"held"},{"kind":1,"handle":5,"release":"held"}]"#,
            "too many resources",
        ),
    ] {
        let json = alloc_free_concat(base, rest);
        assert!(serde_json::from_str::<Session>(&json).is_err(), "{why}");
    }
}

fn alloc_free_concat(a: &str, b: &str) -> heapless::String<1024> {
    let mut s = heapless::String::new();
    s.push('{').unwrap();
    s.push_str(a).unwrap();
    s.push(',').unwrap();
    s.push_str(b).unwrap();
    s.push('}').unwrap();
    s
}

#[test]
fn end_is_idempotent_and_never_before_start() {
    let start = ts("2024-01-15T10:30:00Z");
    let mut s = Session::new(SessionId::parse("sess_1").unwrap(), start, start);
    // The clock stepped back a minute.
    assert_eq!(
        s.end(ts("2024-01-15T10:29:00Z"), EndReason::Orphaned),
        Transition::Committed
    );
    assert_eq!(s.ended_at(), Some(start));
    assert_eq!(
        s.end(ts("2024-01-15T10:40:00Z"), EndReason::Requested),
        Transition::AlreadyEnded
    );
    assert_eq!(s.ended_at(), Some(start));
    assert_eq!(s.end_reason(), Some(EndReason::Orphaned));
}

#[test]
fn a_lone_session_releases_one_resource_at_a_time_in_reverse() {
    let p = Policy::DEFAULT;
    let t0 = ts("2024-01-15T10:30:00Z");
    let mut s = Session::new(SessionId::parse("sess_1").unwrap(), t0, t0);
    let res = |h| Resource {
        kind: ResourceKind(1),
        handle: h,
    };
    for h in [1, 2, 3] {
        s.attach(res(h)).unwrap();
    }
    assert_eq!(s.release_step(t0), ReleaseStep::NotEnded);
    assert_eq!(s.poll_release(t0), None);
    s.end(t0, EndReason::Requested);
    assert_eq!(s.next_release_at(), Some(t0));
    assert_eq!(s.poll_release(t0), Some(res(3)));
    assert_eq!(s.release_step(t0), ReleaseStep::InFlight(res(3)));
    assert_eq!(s.poll_release(t0), None, "one at a time");
    assert_eq!(s.next_release_at(), None);
    assert_eq!(
        s.handle_release(t0, res(2), ReleaseOutcome::Released, &p),
        Err(NotInFlight { resource: res(2) })
    );
    s.handle_release(t0, res(3), ReleaseOutcome::Failed, &p)
        .unwrap();
    let retry = t0.saturating_add(p.release_backoff(1));
    assert_eq!(s.release_step(t0), ReleaseStep::WaitUntil(retry));
    assert_eq!(s.next_release_at(), Some(retry));
    assert_eq!(s.poll_release(t0), None, "not before its backoff");
    assert_eq!(s.poll_release(retry), Some(res(3)));
    s.handle_release(retry, res(3), ReleaseOutcome::Released, &p)
        .unwrap();
    assert_eq!(s.poll_release(retry), Some(res(2)));
    s.handle_release(retry, res(2), ReleaseOutcome::Released, &p)
        .unwrap();
    assert_eq!(s.poll_release(retry), Some(res(1)));
    s.handle_release(retry, res(1), ReleaseOutcome::Released, &p)
        .unwrap();
    assert_eq!(s.release_step(retry), ReleaseStep::Done);
    assert!(s.is_fully_released());
    assert_eq!(s.poll_release(retry), None, "nothing after released");
}

#[test]
fn reason_names() {
    for r in EndReason::ALL {
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json.trim_matches('"'), r.as_str());
        assert_eq!(EndReason::from_name(r.as_str()), Some(r));
    }
    assert_eq!(EndReason::from_name("bored"), None);
}
