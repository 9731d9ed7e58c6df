use super::statements::*;
use super::*;

const ALL: &[&str] = &[
    COUNT_STARTED,
    INSERT_SESSION,
    COUNT_ATTACHED,
    RECORD_ATTEMPT,
    RECORD_SESSION,
    DROP_CLAIMS,
    MARK_LOST,
    INSERT_ROOM_EVENT,
    UPSERT_PARTICIPANT,
    SEEN,
    ROOM_FINISHED,
    ROOM_STATE,
    ROOM_EMPTIED,
    TOUCH_PRESENT,
    PRUNE_PARTICIPANTS,
    PRUNE_ROOM_EVENTS,
    HOLD,
    LET_GO,
    CLEAR_PRESENCE,
    PRUNE_PRESENCE,
    DUE,
    SEEN_HELD_BY,
    INSERT_EVENT,
    RECORD_READY,
    EVENT_READY,
    EVENT_ENDED,
    EVENT_RELEASED,
    UNDISPATCHED,
    LAST_POSITION,
    NEXT_POSITION,
    PLACE_EVENT,
    INSERT_DELIVERY,
    EVENTS_AFTER,
    RECORD_DELIVERY,
    UNCLAIM_DELIVERY,
    RETRY_DELIVERY,
    COUNT_DELIVERIES,
    LIST_DELIVERIES,
    GET_DELIVERY,
    KEY_OF,
    TAKE_KEY,
    TAKE_OVER_KEY,
    FINISH_KEY,
    ABANDON_KEY,
    PRUNE_KEYS,
    PRUNE_DELIVERIES,
    PRUNE_EVENTS,
    sql_holders!("n.last_heartbeat_at > ?2 - ?3"),
];

#[test]
fn postgres_form_numbers_the_same_parameters() {
    for sql in ALL {
        let pg = postgres(sql);
        assert!(!pg.contains('?'), "{pg}");
        let count = |text: &str, mark: char| {
            (1..=12)
                .filter(|n| text.contains(&format!("{mark}{n}")))
                .count()
        };
        assert_eq!(count(sql, '?'), count(pg, '$'), "{sql}");
        assert!(std::ptr::eq(pg, postgres(sql)), "made once");
    }
}

#[test]
fn rules_read_as_written() {
    assert_eq!(
        sql_ended_at!("?2"),
        "CASE WHEN ?2 > started_at THEN ?2 ELSE started_at END"
    );
    assert_eq!(
        sql_release_due_at!(sql_ended_at!("$2")),
        "CASE WHEN resource_count > 0 THEN CASE WHEN $2 > started_at THEN $2 ELSE started_at END END"
    );
}
