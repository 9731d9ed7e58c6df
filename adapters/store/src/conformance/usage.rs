//! Usage records: written with their causes, closed per period once, read back one by
//! one, with their state, and in totals cut at a range's edges.

use std::time::Duration;

use session_lifecycle::{EndReason, EventKind, SessionId};

use super::support::{at, create, fresh_tenant, new_session, random};
use crate::store::Store;
use crate::usage::{SessionPage, UsageGroup, UsageGrouping, record_id};

/// A session metered from its readiness report (the default rule), on its own node:
/// closing its periods writes one record per closed period, once; its end writes the rest;
/// each record has its `usage.recorded` event; a record reads back alone, with the
/// session's state, and in totals to the millisecond.
pub async fn usage_is_recorded_with_its_causes_and_read_back_exactly(store: &dyn Store) {
    let period = Duration::from_secs(300);
    let tenant = fresh_tenant();
    let node = format!("usage-{:x}", random() as u64);
    let mut new = new_session(&tenant, at(0), Duration::from_secs(3600));
    new.node = node.clone();
    let id = new.id;
    create(store, &new).await;
    assert!(store.record_ready(id, at(10)).await.expect("ready"));

    // 12 minutes in: two periods closed, once.
    assert_eq!(
        store
            .close_usage(&node, at(720), period, 100)
            .await
            .expect("close"),
        1
    );
    assert_eq!(
        store
            .close_usage(&node, at(720), period, 100)
            .await
            .expect("close again"),
        0,
        "closing again writes nothing"
    );
    let records = store.session_usage(id).await.expect("records");
    let spans: Vec<_> = records
        .iter()
        .map(|r| (r.seq, r.span, r.billable.map(|b| (b.from(), b.to()))))
        .collect();
    assert_eq!(
        spans,
        [
            (1, (at(0), at(300)), Some((at(10), at(300)))),
            (2, (at(300), at(600)), Some((at(300), at(600)))),
        ]
    );
    assert_eq!(records[0].id, record_id(id, at(0), 1));
    assert!(
        records
            .iter()
            .all(|r| r.tenant == tenant && r.revision == 1)
    );
    assert_eq!(
        store.usage_record(id, 2).await.expect("record"),
        Some(records[1].clone())
    );
    assert_eq!(store.usage_record(id, 9).await.expect("record"), None);
    let stranger = SessionId::from_ulid_parts(at(0), random());
    assert_eq!(store.usage_record(stranger, 1).await.expect("record"), None);

    // Its end records the rest of its last period.
    store
        .end(id, None, at(690), EndReason::Requested, None)
        .await
        .expect("end")
        .expect("it was running");
    let records = store.session_usage(id).await.expect("records");
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(records[2].span, (at(600), at(690)));
    assert_eq!(records[2].millis(), 90_000);
    let events: Vec<u32> = store
        .undispatched_events(100_000)
        .await
        .expect("undispatched")
        .into_iter()
        .filter(|e| e.session == id)
        .filter_map(|e| match e.kind {
            EventKind::UsageRecorded(seq) => Some(seq),
            _ => None,
        })
        .collect();
    assert_eq!(events, [1, 2, 3], "one usage.recorded event per record");

    let total = |tenant: Option<String>, from, to, grouping| async move {
        store
            .usage_totals(tenant, from, to, grouping, SessionPage::ALL)
            .await
            .expect("totals")
    };
    let all = total(Some(tenant.clone()), at(0), at(3600), None).await;
    assert_eq!(all.total_ms, 680_000);
    let cut = total(Some(tenant.clone()), at(100), at(650), None).await;
    assert_eq!(cut.total_ms, 550_000, "records cut at the range's edges");
    let by_session = total(
        Some(tenant.clone()),
        at(0),
        at(3600),
        Some(UsageGrouping::Session),
    )
    .await;
    assert_eq!(
        by_session.groups,
        [(UsageGroup::Session(id, tenant.clone()), 680_000)]
    );
    let other = total(Some(fresh_tenant()), at(0), at(3600), None).await;
    assert_eq!(other.total_ms, 0, "another tenant's usage never appears");

    // Session groups come a page at a time, by id; the total is always the range's.
    let mut second = new_session(&tenant, at(0), Duration::from_secs(3600));
    second.node = node.clone();
    second.billing.meter = session_lifecycle::usage::MeterStart::Started;
    create(store, &second).await;
    store
        .end(second.id, None, at(30), EndReason::Requested, None)
        .await
        .expect("end")
        .expect("it was running");
    let mut ids = [id, second.id];
    ids.sort();
    let page = |after, limit| {
        let tenant = tenant.clone();
        async move {
            store
                .usage_totals(
                    Some(tenant),
                    at(0),
                    at(3600),
                    Some(UsageGrouping::Session),
                    SessionPage { after, limit },
                )
                .await
                .expect("a page of totals")
        }
    };
    let first = page(None, 1).await;
    assert_eq!(first.total_ms, 710_000, "the total is the whole range's");
    let sessions = |t: &crate::usage::UsageTotals| -> Vec<SessionId> {
        t.groups
            .iter()
            .filter_map(|(g, _)| match g {
                UsageGroup::Session(id, _) => Some(*id),
                UsageGroup::Time(_) => None,
            })
            .collect()
    };
    assert_eq!(sessions(&first), [ids[0]]);
    let rest = page(Some(ids[0]), 1).await;
    assert_eq!((rest.total_ms, sessions(&rest)), (710_000, vec![ids[1]]));
    let past = page(Some(ids[1]), 10).await;
    assert_eq!((past.total_ms, past.groups.len()), (710_000, 0));

    let states = store
        .usage_states(at(0), at(3600), None, u32::MAX)
        .await
        .expect("states");
    let mine = states.iter().find(|u| u.session == id).expect("its state");
    assert_eq!(mine.tenant, tenant);
    let state = mine.state.as_ref().expect("readable");
    assert_eq!(state.tenant, tenant);
    assert_eq!(state.metered.ended, Some((at(690), EndReason::Requested)));
    assert_eq!(mine.records.as_ref().expect("readable"), &records);
}

/// A session whose usage state holds a value this release does not know (corrupt, or a
/// newer release's rule; `make_unreadable` writes one behind the store's back) is left
/// unsettled, with a warning: its end still commits, closing usage periods goes past it
/// to the sessions behind it, and a look at the ledger reports it and reads the others.
/// Not in `run_all`: only a store with a raw handle can break a row.
pub async fn unreadable_usage_never_blocks_an_end_or_other_sessions<F, Fut>(
    store: &dyn Store,
    make_unreadable: F,
) where
    F: Fn(SessionId) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let tenant = fresh_tenant();
    let node = format!("usage-{:x}", random() as u64);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut new = new_session(&tenant, at(0), Duration::from_secs(3600));
        new.node = node.clone();
        new.billing.meter = session_lifecycle::usage::MeterStart::Started;
        create(store, &new).await;
        ids.push(new.id);
    }
    ids.sort();
    // The first two, by id, carry a rule this release does not know.
    for id in &ids[..2] {
        make_unreadable(*id).await;
    }
    let period = Duration::from_secs(300);
    // A batch of one: the two unreadable ones do not fill it, nor stop the third.
    let closed = store.close_usage(&node, at(301), period, 1).await;
    assert_eq!(closed.expect("close"), 1);
    let again = store.close_usage(&node, at(301), period, 1).await;
    assert_eq!(again.expect("close again"), 0);
    assert!(
        store
            .session_usage(ids[0])
            .await
            .expect("records")
            .is_empty()
    );
    let third = store.session_usage(ids[2]).await.expect("records");
    assert_eq!(
        third.iter().map(|r| r.millis()).collect::<Vec<_>>(),
        [300_000]
    );
    // Their ends commit; the readable one records its rest.
    for id in &ids {
        let ended = store
            .end(*id, None, at(400), EndReason::Requested, None)
            .await;
        assert!(ended.expect("end").is_some(), "{id} ended");
    }
    assert!(
        store
            .session_usage(ids[1])
            .await
            .expect("records")
            .is_empty()
    );
    let third = store.session_usage(ids[2]).await.expect("records");
    assert_eq!(third.iter().map(|r| r.millis()).sum::<u64>(), 400_000);
    // A look at the ledger reports the two and still reads the third.
    let states = store
        .usage_states(at(0), at(3600), None, u32::MAX)
        .await
        .expect("states");
    let mine: Vec<_> = states.iter().filter(|u| ids.contains(&u.session)).collect();
    assert_eq!(mine.len(), 3);
    assert!(mine[..2].iter().all(|u| u.state.is_err()));
    assert!(mine[2].state.is_ok() && mine[2].records.is_ok());
}
