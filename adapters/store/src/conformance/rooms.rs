//! Room presence from provider webhooks.

use std::time::Duration;

use session_lifecycle::EndReason;

use super::support::{at, create, fresh_tenant, get, new_session, random};
use crate::store::Store;

/// Room events: applied once, unordered delivery tolerated, presence counts as liveness,
/// since when a room is empty, scoped to the tenant and to started sessions; the session's
/// own timeouts are kept.
pub async fn room_events_track_presence(store: &dyn Store) {
    use crate::record::{RoomBinding, RoomEvent, RoomEventKind, RoomProvider, SessionTimeouts};
    let tenant = fresh_tenant();
    let room = format!("room-{:x}", random() as u64);
    let mut new = new_session(&tenant, at(0), Duration::from_secs(3600));
    new.room = Some(RoomBinding {
        provider: RoomProvider::Livekit,
        name: room.clone(),
    });
    new.timeouts = SessionTimeouts {
        participant_left: Some(Duration::from_millis(3000)),
        participant_absent: Some(Duration::from_millis(2000)),
        websocket_grace: Some(Duration::ZERO),
    };
    create(store, &new).await;
    assert_eq!(
        get(store, new.id).await.timeouts,
        new.timeouts,
        "timeouts kept"
    );
    let fresh = store
        .room_state(new.id)
        .await
        .expect("room")
        .expect("known");
    assert_eq!(
        (fresh.present, fresh.ever_joined, fresh.emptied_at),
        (0, false, None),
        "nobody joined yet: not emptied"
    );
    assert_eq!(fresh.participant_left, Some(Duration::from_millis(3000)));
    let event = |id: &str, secs: u64, kind: RoomEventKind| RoomEvent {
        tenant: Some(tenant.clone()),
        provider: RoomProvider::Livekit,
        room: room.clone(),
        event_id: format!("{room}-{id}"),
        at: at(secs),
        kind,
    };
    let joined = |p: &str| RoomEventKind::Joined {
        participant: p.to_owned(),
    };
    let left = |p: &str| RoomEventKind::Left {
        participant: p.to_owned(),
    };

    let u = store
        .room_event(event("1", 10, joined("ada")), at(10))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(u.len(), 1);
    assert_eq!(
        (u[0].session, u[0].present, u[0].ever_joined, u[0].finished),
        (new.id, 1, true, false)
    );
    assert_eq!(
        get(store, new.id).await.session.last_seen_at(),
        at(10),
        "a join is liveness"
    );
    // The same event again: applied once.
    assert!(
        store
            .room_event(event("1", 10, joined("ada")), at(11))
            .await
            .expect("event")
            .is_none()
    );
    // Bob's leave (t=30) arrives before his join (t=20): he ends up absent.
    let u = store
        .room_event(event("3", 30, left("bob")), at(12))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(u[0].present, 1);
    let u = store
        .room_event(event("2", 20, joined("bob")), at(13))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(u[0].present, 1, "an older join does not undo a newer leave");
    assert_eq!(
        store
            .room_state(new.id)
            .await
            .expect("room")
            .expect("known")
            .present,
        1
    );

    // Presence keeps the session alive.
    let touched = store.touch_present(at(500)).await.expect("touch");
    assert!(touched.contains(&new.id));
    assert_eq!(get(store, new.id).await.session.last_seen_at(), at(500));

    // Another tenant's events for the same room name do not reach it.
    let mut foreign = event("4", 40, left("ada"));
    foreign.tenant = Some(fresh_tenant());
    let u = store
        .room_event(foreign, at(14))
        .await
        .expect("event")
        .expect("fresh");
    assert!(u.is_empty());

    let u = store
        .room_event(event("5", 50, left("ada")), at(15))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!((u[0].present, u[0].ever_joined), (0, true));
    assert_eq!(
        u[0].emptied_at,
        Some(at(15)),
        "emptied when the last one left"
    );
    let u = store
        .room_event(event("5b", 51, left("bob")), at(16))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(
        u[0].emptied_at,
        Some(at(15)),
        "empty already: the earlier time stays"
    );
    let u = store
        .room_event(event("5c", 52, joined("dan")), at(17))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!((u[0].present, u[0].emptied_at), (1, None), "someone joined");
    let u = store
        .room_event(event("5d", 53, left("dan")), at(18))
        .await
        .expect("event")
        .expect("fresh");
    assert_eq!(u[0].emptied_at, Some(at(18)), "emptied again: from then");
    let u = store
        .room_event(event("6", 60, RoomEventKind::Finished), at(19))
        .await
        .expect("event")
        .expect("fresh");
    assert!(u[0].finished);

    // Ended sessions are not concerned; neither are unknown rooms.
    store
        .end(new.id, None, at(70), EndReason::RoomEmpty, None)
        .await
        .expect("end");
    let u = store
        .room_event(event("7", 70, joined("cy")), at(20))
        .await
        .expect("event")
        .expect("fresh");
    assert!(u.is_empty());
    assert!(
        !store
            .touch_present(at(600))
            .await
            .expect("touch")
            .contains(&new.id)
    );
    let mut unknown = event("8", 80, joined("cy"));
    unknown.room = "no-such-room".to_owned();
    assert!(
        store
            .room_event(unknown, at(21))
            .await
            .expect("event")
            .expect("fresh")
            .is_empty()
    );
}
