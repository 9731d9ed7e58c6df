//! The release queue: ends make releases due; claims are per session and follow the core.

use std::time::Duration;

use session_lifecycle::{EndReason, ReleaseState, Resource, SessionId, Timestamp};

use super::support::{at, create, fresh_tenant, get, new_session, random, res};
use crate::record::{AttachOutcome, SessionRecord};
use crate::store::Store;

/// Ending turns every held resource into a pending release due at the end, in the same
/// write, as the core's end does.
pub async fn end_records_release_intents(store: &dyn Store) {
    let new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    create(store, &new).await;
    for h in [1, 2] {
        assert_eq!(
            store.attach(new.id, res(h)).await.expect("attach"),
            AttachOutcome::Attached
        );
    }
    let held = get(store, new.id).await;
    let states: Vec<_> = held
        .session
        .resources()
        .iter()
        .map(|r| (r.resource, r.release))
        .collect();
    assert_eq!(
        states,
        [(res(1), ReleaseState::Held), (res(2), ReleaseState::Held)]
    );

    let (r, _) = store
        .end(new.id, None, at(30), EndReason::Requested, None)
        .await
        .expect("end")
        .expect("found");
    for held in r.session.resources() {
        assert_eq!(
            held.release,
            ReleaseState::Pending {
                attempts: 0,
                retry_at: at(30)
            },
            "every held resource is due for release at the end"
        );
    }
    assert_eq!(r.session.resources().len(), 2);
    let mut core = held.session.clone();
    core.end(at(30), EndReason::Requested);
    assert_eq!(r.session, core, "the store's end is the core's end");
}

/// A unique node name, so that a check's claims see only its own sessions.
pub(super) fn fresh_node() -> String {
    format!("node-{:x}", random() as u64)
}

/// Claims for `node` at `now`, keeping only the sessions in `ids`.
pub(super) async fn claim(
    store: &dyn Store,
    node: &str,
    now: Timestamp,
    lease: Duration,
    ids: &[SessionId],
) -> Vec<SessionRecord> {
    store
        .claim_releases(node, now, lease, 10_000)
        .await
        .expect("claim")
        .into_iter()
        .filter(|r| ids.contains(r.session.id()))
        .collect()
}

/// Runs one release of a claimed session the way an engine does: asks the core for the
/// next resource, applies `outcome` at `now`, and records what the core decided (keeping
/// the claim when the next release is due at once). Returns the released resource and the
/// session as the core now sees it.
pub(super) async fn release_one(
    store: &dyn Store,
    node: &str,
    session: &mut session_lifecycle::Session,
    now: Timestamp,
    outcome: session_lifecycle::ReleaseOutcome,
    note: &str,
    lease: Duration,
) -> Resource {
    use session_lifecycle::ReleaseStep;
    let policy = session_lifecycle::Policy::DEFAULT;
    let resource = session.poll_release(now).expect("a release is due");
    session
        .handle_release(now, resource, outcome, &policy)
        .expect("in flight");
    let release = session
        .resources()
        .iter()
        .find(|r| r.resource == resource)
        .expect("held")
        .release;
    let go_on = matches!(session.release_step(now), ReleaseStep::Due(_));
    store
        .record_release(
            node,
            crate::record::ReleaseProgress {
                session: *session.id(),
                attempt: Some(crate::record::ReleaseAttempt {
                    resource,
                    release,
                    note: note.to_owned(),
                }),
                next_release_at: session.next_release_at(),
                keep_claim_until: go_on.then(|| now.saturating_add(lease)),
            },
        )
        .await
        .expect("record");
    resource
}

/// Claims are per session and leased; a claimed session is not handed out again until
/// its claim is given up or lapses; a session is due when the core says its next release
/// is (in the core's order), not when any of its resources is; what the core decided is
/// what the store keeps.
pub async fn release_claims_follow_the_core(store: &dyn Store) {
    use session_lifecycle::ReleaseOutcome::{Failed, Released};
    let node = fresh_node();
    let mut new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    new.node = node.clone();
    create(store, &new).await;
    store.attach(new.id, res(10)).await.expect("attach");
    store.attach(new.id, res(11)).await.expect("attach");
    store
        .end(new.id, None, at(1), EndReason::Requested, None)
        .await
        .expect("end");
    let lease = Duration::from_secs(60);
    let ids = [new.id];

    let claimed = claim(store, &node, at(1), lease, &ids).await;
    assert_eq!(claimed.len(), 1, "the ended session is due at its end");
    assert!(
        claim(store, &node, at(2), lease, &ids).await.is_empty(),
        "a claimed session is not handed out again"
    );
    assert!(
        claim(store, "another-node", at(2), lease, &ids)
            .await
            .is_empty(),
        "another node never claims a release it cannot run"
    );

    // The core picks the last acquired resource first; it fails.
    let mut session = claimed[0].session.clone();
    let first = release_one(store, &node, &mut session, at(3), Failed, "busy", lease).await;
    assert_eq!(first, res(11), "the last acquired goes first");
    let retry = at(3).saturating_add(session_lifecycle::Policy::DEFAULT.release_backoff(1));
    let r = get(store, new.id).await;
    let state = |r: &SessionRecord, h| {
        r.session
            .resources()
            .iter()
            .find(|x| x.resource == res(h))
            .map(|x| x.release)
    };
    assert_eq!(
        state(&r, 11),
        Some(ReleaseState::Pending {
            attempts: 1,
            retry_at: retry
        })
    );
    assert_eq!(
        state(&r, 10),
        Some(ReleaseState::Pending {
            attempts: 0,
            retry_at: at(1)
        })
    );
    assert_eq!(r.release_errors, [(res(11), "busy".to_owned())]);

    // Resource 10 has been due since the end, but the core's next release is 11's retry:
    // the session is not handed out before it.
    assert!(
        claim(
            store,
            &node,
            Timestamp::from_millis(retry.as_millis() - 1),
            lease,
            &ids
        )
        .await
        .is_empty(),
        "not before the core's next release"
    );
    let claimed = claim(store, &node, retry, lease, &ids).await;
    assert_eq!(claimed.len(), 1);
    let mut session = claimed[0].session.clone();
    assert_eq!(
        session, r.session,
        "a claim hands out the session as recorded"
    );
    let second = release_one(
        store,
        &node,
        &mut session,
        retry,
        Released,
        "sigterm",
        lease,
    )
    .await;
    assert_eq!(second, res(11));
    // The worker goes on with 10 and keeps its claim meanwhile.
    assert!(
        claim(store, &node, retry, lease, &ids).await.is_empty(),
        "a kept claim holds"
    );
    let third = release_one(store, &node, &mut session, retry, Released, "freed", lease).await;
    assert_eq!(third, res(10));
    assert!(session.is_fully_released());

    let r = get(store, new.id).await;
    assert_eq!(r.session, session, "the store keeps what the core decided");
    assert_eq!(
        r.release_notes,
        [
            (res(10), "freed".to_owned()),
            (res(11), "sigterm".to_owned())
        ]
    );
    assert!(r.release_errors.is_empty());
    assert!(
        claim(store, &node, at(1000), lease, &ids).await.is_empty(),
        "released is final"
    );

    // A worker that dies mid-release: its claim lapses and the session is claimed again,
    // at the same resource.
    let mut other = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    other.node = node.clone();
    create(store, &other).await;
    store.attach(other.id, res(20)).await.expect("attach");
    store.attach(other.id, res(21)).await.expect("attach");
    store
        .end(other.id, None, at(5), EndReason::Orphaned, None)
        .await
        .expect("end");
    let ids = [other.id];
    assert_eq!(claim(store, &node, at(5), lease, &ids).await.len(), 1);
    assert!(claim(store, &node, at(64), lease, &ids).await.is_empty());
    let again = claim(store, &node, at(65), lease, &ids).await;
    assert_eq!(again.len(), 1, "a lapsed claim is taken over");
    let mut session = again[0].session.clone();
    assert_eq!(session.poll_release(at(65)), Some(res(21)));
    // Or the node restarts and drops its claims at once.
    store.drop_claims(&node).await.expect("drop");
    assert_eq!(claim(store, &node, at(66), lease, &ids).await.len(), 1);
}

/// An end can claim the session's releases for the node ending it, in the same write, when
/// the session runs there and has something to release; for any other node it claims
/// nothing.
pub async fn an_end_claims_releases_for_its_own_node(store: &dyn Store) {
    let node = fresh_node();
    let lease = Duration::from_secs(60);
    let session_on = |node: &str| {
        let mut new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
        new.node = node.to_owned();
        new
    };
    let claim_for = |node: &str| {
        Some(crate::record::ReleaseClaim {
            node: node.to_owned(),
            until: at(70),
        })
    };

    // Ended by its own node: claimed with the end.
    let own = session_on(&node);
    create(store, &own).await;
    store.attach(own.id, res(1)).await.expect("attach");
    let (record, _) = store
        .end(own.id, None, at(10), EndReason::Requested, claim_for(&node))
        .await
        .expect("end")
        .expect("found");
    assert_eq!(record.node, node);
    assert_eq!(record.session.next_release_at(), Some(at(10)));
    assert!(
        claim(store, &node, at(10), lease, &[own.id])
            .await
            .is_empty(),
        "claimed with the end"
    );
    assert_eq!(
        claim(store, &node, at(70), lease, &[own.id]).await.len(),
        1,
        "until the claim lapses"
    );

    // Ended by another node: its owner claims it.
    let other = session_on(&node);
    create(store, &other).await;
    store.attach(other.id, res(2)).await.expect("attach");
    store
        .end(
            other.id,
            None,
            at(10),
            EndReason::Requested,
            claim_for("elsewhere"),
        )
        .await
        .expect("end");
    assert_eq!(
        claim(store, &node, at(10), lease, &[other.id]).await.len(),
        1
    );

    // Nothing to release: nothing claimed, nothing due.
    let bare = session_on(&node);
    create(store, &bare).await;
    let (record, _) = store
        .end(
            bare.id,
            None,
            at(10),
            EndReason::Requested,
            claim_for(&node),
        )
        .await
        .expect("end")
        .expect("found");
    assert_eq!(record.session.next_release_at(), None);
    assert!(
        claim(store, &node, at(1000), lease, &[bare.id])
            .await
            .is_empty()
    );
}

/// A release record from a node that does not run the session (one back from the dead,
/// reporting a release it did make) counts for the resource it names, and for nothing of
/// the session's schedule: the session's node keeps its claim and its next release.
pub async fn another_node_s_release_record_counts_for_its_resource_only(store: &dyn Store) {
    let node = fresh_node();
    let elsewhere = fresh_node();
    let lease = Duration::from_secs(60);
    let mut new = new_session(&fresh_tenant(), at(0), Duration::from_secs(600));
    new.node = node.clone();
    create(store, &new).await;
    store.attach(new.id, res(1)).await.expect("attach");
    store.attach(new.id, res(2)).await.expect("attach");
    let claim_until = crate::record::ReleaseClaim {
        node: node.clone(),
        until: at(70),
    };
    let (record, _) = store
        .end(
            new.id,
            None,
            at(10),
            EndReason::Requested,
            Some(claim_until),
        )
        .await
        .expect("end")
        .expect("found");

    // The other node releases the last acquired resource and would keep a claim to at(71).
    let mut session = record.session.clone();
    let released = release_one(
        store,
        &elsewhere,
        &mut session,
        at(11),
        session_lifecycle::ReleaseOutcome::Released,
        "stopped by a node back from the dead",
        lease,
    )
    .await;
    assert_eq!(released, res(2));
    let after = get(store, new.id).await;
    let state = |r: Resource| {
        after
            .session
            .resources()
            .iter()
            .find(|h| h.resource == r)
            .map(|h| h.release)
    };
    assert!(
        matches!(state(res(2)), Some(session_lifecycle::ReleaseState::Released { at: t }) if t == at(11)),
        "the resource's release is recorded: {:?}",
        state(res(2))
    );
    assert!(
        !matches!(
            state(res(1)),
            Some(session_lifecycle::ReleaseState::Released { .. })
        ),
        "the other resource is untouched"
    );
    assert_eq!(after.node, node, "the session still runs on its node");

    // Its claim stays the end's (to at(70)), not the other node's: the session's node
    // claims it again at at(70), with only the other resource left.
    assert!(
        claim(store, &node, at(69), lease, &[new.id])
            .await
            .is_empty()
    );
    let claimed = claim(store, &node, at(70), lease, &[new.id]).await;
    assert_eq!(claimed.len(), 1, "the owner's claim lapsed at its own time");
    assert!(
        claim(store, &elsewhere, at(70), lease, &[new.id])
            .await
            .is_empty(),
        "the other node never claims it"
    );
    let mut session = claimed[0].session.clone();
    assert_eq!(session.poll_release(at(70)), Some(res(1)));
}

/// Claims go most overdue first, and sessions due at the same time in id order: every
/// store hands out the same sessions in the same order (a limit takes the same ones).
pub async fn claims_are_most_overdue_first_then_in_id_order(store: &dyn Store) {
    let node = fresh_node();
    let tenant = fresh_tenant();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut new = new_session(&tenant, at(0), Duration::from_secs(600));
        new.node = node.clone();
        create(store, &new).await;
        store.attach(new.id, res(1)).await.expect("attach");
        ids.push(new.id);
    }
    // The newest ends first; the other two end together, later.
    let end = |id, t| async move {
        store
            .end(id, None, at(t), EndReason::Requested, None)
            .await
            .expect("end");
    };
    end(ids[2], 1).await;
    end(ids[1], 2).await;
    end(ids[0], 2).await;
    let lease = Duration::from_secs(60);
    let first = store
        .claim_releases(&node, at(3), lease, 2)
        .await
        .expect("claim");
    let order: Vec<SessionId> = first.iter().map(|r| *r.session.id()).collect();
    let (mut tied, overdue) = (vec![ids[0], ids[1]], ids[2]);
    tied.sort();
    assert_eq!(
        order,
        vec![overdue, tied[0]],
        "most overdue first, then the smaller id of the two due together"
    );
    let rest = claim(store, &node, at(3), lease, &ids).await;
    assert_eq!(rest.len(), 1);
    assert_eq!(*rest[0].session.id(), tied[1]);
}
