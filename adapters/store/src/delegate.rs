//! Writing a store wrapper once: [`delegate_store!`](crate::delegate_store) implements every
//! store trait of a wrapper type by passing each call to its `inner` store through the
//! wrapper's own macro, so a wrapper states only what it does around a call.

/// Implements every store trait ([`Store`](crate::Store)) for `$ty`, a type with a field
/// `inner: Arc<dyn Store>`, each method running `$wrap!(self, "method_name", inner_call)`,
/// where `$wrap` is a macro in scope at the call site that turns the inner call's future
/// into the wrapper's `BoxFuture` (the watches of the event stream and of releases go
/// straight through).
#[macro_export]
macro_rules! delegate_store {
    ($ty:ty, $wrap:ident) => {
        impl $crate::SessionStore for $ty {
            fn create(
                &self,
                new: $crate::NewSession,
            ) -> $crate::BoxFuture<'_, Result<$crate::CreateOutcome, $crate::StoreError>> {
                $wrap!(self, "create", self.inner.create(new))
            }
            fn attach(
                &self,
                id: $crate::__core::SessionId,
                resource: $crate::__core::Resource,
            ) -> $crate::BoxFuture<'_, Result<$crate::AttachOutcome, $crate::StoreError>> {
                $wrap!(self, "attach", self.inner.attach(id, resource))
            }
            fn end<'a>(
                &'a self,
                id: $crate::__core::SessionId,
                tenant: $crate::TenantScope<'a>,
                now: $crate::__core::Timestamp,
                reason: $crate::__core::EndReason,
                claim: Option<$crate::ReleaseClaim>,
            ) -> $crate::BoxFuture<
                'a,
                Result<
                    Option<($crate::SessionRecord, $crate::__core::Transition)>,
                    $crate::StoreError,
                >,
            > {
                $wrap!(self, "end", self.inner.end(id, tenant, now, reason, claim))
            }
            fn get(
                &self,
                id: $crate::__core::SessionId,
            ) -> $crate::BoxFuture<'_, Result<Option<$crate::SessionRecord>, $crate::StoreError>>
            {
                $wrap!(self, "get", self.inner.get(id))
            }
            fn list(
                &self,
                query: $crate::ListQuery,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::SessionRecord>, $crate::StoreError>> {
                $wrap!(self, "list", self.inner.list(query))
            }
            fn ended_since(
                &self,
                tenant: Option<String>,
                since: $crate::__core::Timestamp,
                limit: u32,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::SessionRecord>, $crate::StoreError>> {
                $wrap!(
                    self,
                    "ended_since",
                    self.inner.ended_since(tenant, since, limit)
                )
            }
            fn count_ends(
                &self,
                tenant: Option<String>,
                since: $crate::__core::Timestamp,
                until: $crate::__core::Timestamp,
                bucket: std::time::Duration,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::EndCount>, $crate::StoreError>> {
                $wrap!(
                    self,
                    "count_ends",
                    self.inner.count_ends(tenant, since, until, bucket)
                )
            }
            fn touch<'a>(
                &'a self,
                id: $crate::__core::SessionId,
                tenant: $crate::TenantScope<'a>,
                now: $crate::__core::Timestamp,
            ) -> $crate::BoxFuture<'a, Result<$crate::TouchOutcome, $crate::StoreError>> {
                $wrap!(self, "touch", self.inner.touch(id, tenant, now))
            }
            fn due(
                &self,
                now: $crate::__core::Timestamp,
                orphan_timeout: std::time::Duration,
                limit: u32,
            ) -> $crate::BoxFuture<
                '_,
                Result<
                    Vec<($crate::__core::SessionId, $crate::__core::EndReason)>,
                    $crate::StoreError,
                >,
            > {
                $wrap!(self, "due", self.inner.due(now, orphan_timeout, limit))
            }
        }

        impl $crate::ReleaseQueue for $ty {
            fn claim_releases(
                &self,
                node: &str,
                now: $crate::__core::Timestamp,
                lease: std::time::Duration,
                limit: u32,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::SessionRecord>, $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(
                    self,
                    "claim_releases",
                    self.inner.claim_releases(&node, now, lease, limit)
                )
            }
            fn record_release(
                &self,
                node: &str,
                progress: $crate::ReleaseProgress,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(
                    self,
                    "record_release",
                    self.inner.record_release(&node, progress)
                )
            }
            fn drop_claims(
                &self,
                node: &str,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(self, "drop_claims", self.inner.drop_claims(&node))
            }
            fn watch_releases<'a>(
                &'a self,
                node: &'a str,
                wake: &'a (dyn Fn() + Send + Sync),
            ) -> $crate::BoxFuture<'a, ()> {
                self.inner.watch_releases(node, wake)
            }
        }

        impl $crate::NodeMembership for $ty {
            fn node_alive(
                &self,
                node: &str,
                now: $crate::__core::Timestamp,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(self, "node_alive", self.inner.node_alive(&node, now))
            }
            fn live_nodes(
                &self,
                now: $crate::__core::Timestamp,
                node_timeout: std::time::Duration,
            ) -> $crate::BoxFuture<'_, Result<u32, $crate::StoreError>> {
                $wrap!(self, "live_nodes", self.inner.live_nodes(now, node_timeout))
            }
            fn report_node<'a>(
                &'a self,
                node: &'a str,
                report: &'a str,
            ) -> $crate::BoxFuture<'a, Result<(), $crate::StoreError>> {
                $wrap!(self, "report_node", self.inner.report_node(node, report))
            }
            fn nodes(
                &self,
                now: $crate::__core::Timestamp,
                node_timeout: std::time::Duration,
                window: std::time::Duration,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::NodeRow>, $crate::StoreError>> {
                $wrap!(self, "nodes", self.inner.nodes(now, node_timeout, window))
            }
            fn end_dead_nodes(
                &self,
                except: &str,
                now: $crate::__core::Timestamp,
                node_timeout: std::time::Duration,
                limit: u32,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::__core::SessionId>, $crate::StoreError>>
            {
                let except = except.to_owned();
                $wrap!(
                    self,
                    "end_dead_nodes",
                    self.inner.end_dead_nodes(&except, now, node_timeout, limit)
                )
            }
        }

        impl $crate::RoomStore for $ty {
            fn room_event(
                &self,
                event: $crate::RoomEvent,
                now: $crate::__core::Timestamp,
            ) -> $crate::BoxFuture<'_, Result<Option<Vec<$crate::RoomState>>, $crate::StoreError>>
            {
                $wrap!(self, "room_event", self.inner.room_event(event, now))
            }
            fn room_state(
                &self,
                id: $crate::__core::SessionId,
            ) -> $crate::BoxFuture<'_, Result<Option<$crate::RoomState>, $crate::StoreError>> {
                $wrap!(self, "room_state", self.inner.room_state(id))
            }
            fn touch_present(
                &self,
                now: $crate::__core::Timestamp,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::__core::SessionId>, $crate::StoreError>>
            {
                $wrap!(self, "touch_present", self.inner.touch_present(now))
            }
            fn prune_rooms(
                &self,
                ended_before: $crate::__core::Timestamp,
                limit: u32,
            ) -> $crate::BoxFuture<'_, Result<u32, $crate::StoreError>> {
                $wrap!(
                    self,
                    "prune_rooms",
                    self.inner.prune_rooms(ended_before, limit)
                )
            }
        }

        impl $crate::PresenceStore for $ty {
            fn set_presence(
                &self,
                session: $crate::__core::SessionId,
                node: &str,
                holds: bool,
                now: $crate::__core::Timestamp,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(
                    self,
                    "set_presence",
                    self.inner.set_presence(session, &node, holds, now)
                )
            }
            fn clear_presence(
                &self,
                node: &str,
                now: $crate::__core::Timestamp,
            ) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                let node = node.to_owned();
                $wrap!(
                    self,
                    "clear_presence",
                    self.inner.clear_presence(&node, now)
                )
            }
            fn presence(
                &self,
                session: $crate::__core::SessionId,
                now: $crate::__core::Timestamp,
                node_timeout: std::time::Duration,
            ) -> $crate::BoxFuture<'_, Result<Vec<String>, $crate::StoreError>> {
                $wrap!(
                    self,
                    "presence",
                    self.inner.presence(session, now, node_timeout)
                )
            }
            fn watch_ends<'a>(
                &'a self,
                ended: &'a (dyn Fn($crate::__core::SessionId) + Send + Sync),
            ) -> $crate::BoxFuture<'a, ()> {
                self.inner.watch_ends(ended)
            }
        }

        impl $crate::FleetPlacement for $ty {
            fn places(&self) -> bool {
                self.inner.places()
            }
            fn create_placed<'a>(
                &'a self,
                new: $crate::NewSession,
                ask: &'a $crate::PlacementAsk,
                request: &'a str,
            ) -> $crate::BoxFuture<'a, Result<$crate::PlaceOutcome, $crate::StoreError>> {
                $wrap!(
                    self,
                    "create_placed",
                    self.inner.create_placed(new, ask, request)
                )
            }
            fn place_again<'a>(
                &'a self,
                id: $crate::__core::SessionId,
                from: &'a str,
                ask: &'a $crate::PlacementAsk,
            ) -> $crate::BoxFuture<'a, Result<Option<$crate::PlaceOutcome>, $crate::StoreError>>
            {
                $wrap!(self, "place_again", self.inner.place_again(id, from, ask))
            }
            fn claim_starts<'a>(
                &'a self,
                node: &'a str,
                limit: u32,
            ) -> $crate::BoxFuture<'a, Result<Vec<$crate::ClaimedStart>, $crate::StoreError>> {
                $wrap!(self, "claim_starts", self.inner.claim_starts(node, limit))
            }
            fn finish_start<'a>(
                &'a self,
                id: $crate::__core::SessionId,
                node: &'a str,
                refused: Option<&'a str>,
            ) -> $crate::BoxFuture<'a, Result<bool, $crate::StoreError>> {
                $wrap!(
                    self,
                    "finish_start",
                    self.inner.finish_start(id, node, refused)
                )
            }
            fn placed_state(
                &self,
                id: $crate::__core::SessionId,
            ) -> $crate::BoxFuture<'_, Result<Option<$crate::PlacedState>, $crate::StoreError>>
            {
                $wrap!(self, "placed_state", self.inner.placed_state(id))
            }
            fn interrupted_starts<'a>(
                &'a self,
                node: &'a str,
            ) -> $crate::BoxFuture<'a, Result<Vec<$crate::__core::SessionId>, $crate::StoreError>>
            {
                $wrap!(
                    self,
                    "interrupted_starts",
                    self.inner.interrupted_starts(node)
                )
            }
            fn watch_starts<'a>(
                &'a self,
                node: &'a str,
                wake: &'a (dyn Fn() + Send + Sync),
            ) -> $crate::BoxFuture<'a, ()> {
                self.inner.watch_starts(node, wake)
            }
            fn watch_placed<'a>(
                &'a self,
                heard: &'a (dyn Fn($crate::__core::SessionId) + Send + Sync),
            ) -> $crate::BoxFuture<'a, ()> {
                self.inner.watch_placed(heard)
            }
        }

        impl $crate::StoreHealth for $ty {
            fn ping(&self) -> $crate::BoxFuture<'_, Result<(), $crate::StoreError>> {
                $wrap!(self, "ping", self.inner.ping())
            }
        }

        impl $crate::usage::UsageLedger for $ty {
            fn close_usage<'a>(
                &'a self,
                node: &'a str,
                now: $crate::__core::Timestamp,
                period: ::std::time::Duration,
                limit: u32,
            ) -> $crate::BoxFuture<'a, Result<u32, $crate::StoreError>> {
                $wrap!(
                    self,
                    "close_usage",
                    self.inner.close_usage(node, now, period, limit)
                )
            }
            fn usage_totals(
                &self,
                tenant: Option<String>,
                from: $crate::__core::Timestamp,
                to: $crate::__core::Timestamp,
                grouping: Option<$crate::usage::UsageGrouping>,
                page: $crate::usage::SessionPage,
            ) -> $crate::BoxFuture<'_, Result<$crate::usage::UsageTotals, $crate::StoreError>> {
                $wrap!(
                    self,
                    "usage_totals",
                    self.inner.usage_totals(tenant, from, to, grouping, page)
                )
            }
            fn session_usage(
                &self,
                session: $crate::__core::SessionId,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::usage::UsageRecord>, $crate::StoreError>>
            {
                $wrap!(self, "session_usage", self.inner.session_usage(session))
            }
            fn usage_record(
                &self,
                session: $crate::__core::SessionId,
                seq: u32,
            ) -> $crate::BoxFuture<'_, Result<Option<$crate::usage::UsageRecord>, $crate::StoreError>>
            {
                $wrap!(self, "usage_record", self.inner.usage_record(session, seq))
            }
            fn usage_states(
                &self,
                from: $crate::__core::Timestamp,
                to: $crate::__core::Timestamp,
                after: Option<$crate::__core::SessionId>,
                limit: u32,
            ) -> $crate::BoxFuture<'_, Result<Vec<$crate::usage::SessionUsage>, $crate::StoreError>>
            {
                $wrap!(
                    self,
                    "usage_states",
                    self.inner.usage_states(from, to, after, limit)
                )
            }
        }

        $crate::delegate_outbox!($ty, $wrap);
        $crate::delegate_idempotency!($ty, $wrap);
    };
}
