//! Room rows are bounded: 20,000 webhook events over 2,000 sessions, then the sweep leaves
//! no room event and no participant row of sessions ended longer than the retention ago,
//! and keeps those of sessions that ended more recently.

use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use session_lifecycle::Timestamp;
use session_lifecycle_runtime::{
    Engine, EngineConfig, ManualClock, Plan, RoomBinding, RoomEvent, RoomEventKind, RoomProvider,
    StartRequest,
};
use session_lifecycle_sqlite::SqliteStore;

fn request(room: String) -> StartRequest {
    StartRequest {
        callback_url: None,
        tenant: "t".into(),
        plan: Plan::new(None, Duration::from_secs(3 * 24 * 3600)),
        duration: None,
        metadata: None,
        room: Some(RoomBinding {
            provider: RoomProvider::Livekit,
            name: room,
        }),
        timeouts: Default::default(),
        resources: Default::default(),
    }
}

/// Ten events in `room`: five participants join, then all leave (the room empties, so its
/// session ends `room_empty`).
async fn busy_room(engine: &Engine, room: &str, at: Timestamp) {
    for (n, joined) in (0..10).map(|n| (n, n < 5)) {
        let participant = format!("p{}", n % 5);
        let kind = if joined {
            RoomEventKind::Joined { participant }
        } else {
            RoomEventKind::Left { participant }
        };
        engine
            .room_event(RoomEvent {
                tenant: Some("t".into()),
                provider: RoomProvider::Livekit,
                room: room.to_owned(),
                event_id: format!("{room}-{n}"),
                at: at.saturating_add(Duration::from_millis(n)),
                kind,
            })
            .await
            .unwrap();
    }
}

fn count(db: &Connection, table: &str) -> i64 {
    db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_rows_of_long_ended_sessions_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rooms.db");
    let t0 = Timestamp::parse_rfc3339("2024-01-15T10:30:00Z").unwrap();
    let clock = ManualClock::new(t0);
    let retention = Duration::from_secs(3600);
    let engine = Engine::open(
        Arc::new(SqliteStore::open(&path).unwrap()),
        Vec::new(),
        Arc::new(clock.clone()),
        EngineConfig {
            room_retention: retention,
            ..EngineConfig::default()
        },
    )
    .await
    .unwrap();

    // 2,000 sessions, 10 events each, 64 rooms at a time (their writes share commits).
    let rooms: Vec<String> = (0..2000).map(|i| format!("room-{i}")).collect();
    for chunk in rooms.chunks(64) {
        let mut tasks = Vec::new();
        for room in chunk {
            let (engine, room) = (engine.clone(), room.clone());
            tasks.push(tokio::spawn(async move {
                engine.start(request(room.clone())).await.unwrap();
                busy_room(&engine, &room, t0).await;
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let db = Connection::open(&path).unwrap();
    assert_eq!(count(&db, "room_events"), 20_000);
    assert_eq!(
        db.query_row(
            "SELECT COUNT(*) FROM sessions WHERE end_reason = 'room_empty'",
            [],
            |r| r.get::<_, i64>(0)
        )
        .unwrap(),
        2000,
        "every room emptied"
    );

    // Later, a few more rooms whose sessions end within the retention.
    clock.advance(retention);
    let recent: Vec<String> = (0..10).map(|i| format!("recent-{i}")).collect();
    for room in &recent {
        engine.start(request(room.clone())).await.unwrap();
        busy_room(&engine, room, clock_now(&clock)).await;
    }
    clock.advance(Duration::from_secs(60));
    // The sweep prunes a batch at a time.
    for _ in 0..3 {
        engine.run_due().await.unwrap();
    }
    assert_eq!(
        db.query_row(
            "SELECT COUNT(*) FROM room_participants p JOIN sessions s ON s.id = p.session_id
             WHERE s.ended_at <= ?1",
            [ms(clock_now(&clock).saturating_sub(retention))],
            |r| r.get::<_, i64>(0)
        )
        .unwrap(),
        0,
        "no participant row of a session ended longer than the retention ago"
    );
    assert_eq!(count(&db, "room_participants"), 10 * 5, "recent ones kept");
    assert_eq!(count(&db, "room_events"), 10 * 10, "recent events kept");
}

fn clock_now(clock: &ManualClock) -> Timestamp {
    use session_lifecycle::Clock;
    clock.now()
}

fn ms(t: Timestamp) -> i64 {
    t.as_millis() as i64
}
