//! The conformance suite every [`Store`] implementation runs unchanged, as object_store's
//! `integration.rs` does for its backends: a new store is correct when this suite passes.
//!
//! Each function panics with a message on the first violation. They use fresh random ids,
//! so they can share one store and run in any order; [`run_all`] runs them all.

use crate::store::Store;
use std::sync::Arc;

mod idempotency;
mod nodes;
mod outbox;
mod presence;
mod releases;
mod rooms;
mod sessions;
mod support;
mod usage;

pub use idempotency::idempotency_keys_bind_one_request;
pub use nodes::{
    node_reports_and_recent_ends_are_listed, nodes_own_releases_and_dead_nodes_are_taken_over,
};
pub use outbox::{
    claims_are_bounded_per_origin, outbox_follows_the_session_and_delivers_in_order,
    pruning_forgets_only_what_is_done, readiness_is_recorded_once,
};
pub use presence::{presence_counts_live_nodes_only, watch_ends_hears_every_end};
pub use releases::{
    an_end_claims_releases_for_its_own_node,
    another_node_s_release_record_counts_for_its_resource_only,
    claims_are_most_overdue_first_then_in_id_order, end_records_release_intents,
    release_claims_follow_the_core,
};
pub use rooms::room_events_track_presence;
pub use sessions::{
    attach_is_refused_after_end, concurrent_ends_commit_once, create_and_get,
    due_finds_expired_and_orphaned, due_is_most_overdue_first_within_its_limit,
    duplicate_ids_are_refused, end_is_conditional_and_idempotent, end_is_scoped_to_its_tenant,
    list_is_newest_first_tenant_scoped_and_paged, plan_limit_is_enforced, touch_moves_forward_only,
    watch_releases_wakes_a_waiting_node,
};
pub use usage::{
    unreadable_usage_never_blocks_an_end_or_other_sessions,
    usage_is_recorded_with_its_causes_and_read_back_exactly,
};

/// Runs every check of the suite against `store`.
pub async fn run_all(store: Arc<dyn Store>) {
    create_and_get(&*store).await;
    duplicate_ids_are_refused(&*store).await;
    list_is_newest_first_tenant_scoped_and_paged(&*store).await;
    end_is_conditional_and_idempotent(&*store).await;
    end_records_release_intents(&*store).await;
    release_claims_follow_the_core(&*store).await;
    claims_are_most_overdue_first_then_in_id_order(&*store).await;
    an_end_claims_releases_for_its_own_node(&*store).await;
    another_node_s_release_record_counts_for_its_resource_only(&*store).await;
    attach_is_refused_after_end(&*store).await;
    touch_moves_forward_only(&*store).await;
    end_is_scoped_to_its_tenant(&*store).await;
    due_finds_expired_and_orphaned(&*store).await;
    due_is_most_overdue_first_within_its_limit(&*store).await;
    watch_releases_wakes_a_waiting_node(&*store).await;
    plan_limit_is_enforced(&*store).await;
    concurrent_ends_commit_once(Arc::clone(&store)).await;
    nodes_own_releases_and_dead_nodes_are_taken_over(&*store).await;
    node_reports_and_recent_ends_are_listed(&*store).await;
    room_events_track_presence(&*store).await;
    presence_counts_live_nodes_only(&*store).await;
    watch_ends_hears_every_end(&*store).await;
    outbox_follows_the_session_and_delivers_in_order(&*store).await;
    claims_are_bounded_per_origin(&*store).await;
    readiness_is_recorded_once(&*store).await;
    idempotency_keys_bind_one_request(&*store).await;
    pruning_forgets_only_what_is_done(&*store).await;
    usage_is_recorded_with_its_causes_and_read_back_exactly(&*store).await;
    store.ping().await.expect("ping");
}
