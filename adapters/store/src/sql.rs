//! The SQL rulebook the SQL stores share (SQLite in `session-lifecycle-sqlite`, PostgreSQL
//! in `session-lifecycle-postgres`): each rule written once, as an expression macro, and
//! each statement the two dialects agree on written once, here.
//!
//! Statements use SQLite's `?N` parameters; [`postgres`] gives PostgreSQL's `$N` form of
//! one. Where the dialects differ (PostgreSQL's one-statement end and its row locks, its
//! clock for heartbeats), each store writes its own statement beside this one, using the
//! rule macros for the rules. Portable expressions only: `CASE` instead of `MAX`/`GREATEST`
//! of two values, booleans bound as parameters.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// The later of two values (`MAX(a, b)` in SQLite, `GREATEST(a, b)` in PostgreSQL).
#[macro_export]
macro_rules! sql_later {
    ($a:literal, $b:literal) => {
        concat!(
            "CASE WHEN ",
            $a,
            " > ",
            $b,
            " THEN ",
            $a,
            " ELSE ",
            $b,
            " END"
        )
    };
}

/// `ended_at` of an end at `$now`: never before `started_at`, whatever the clock did.
#[macro_export]
macro_rules! sql_ended_at {
    ($now:literal) => {
        $crate::sql_later!($now, "started_at")
    };
}

/// Whether a started session that is due ends `expired` rather than `orphaned` for the
/// orphan timeout `$timeout`: its expiry comes first, or ties (an expiry wins a tie).
#[macro_export]
macro_rules! sql_expired {
    ($timeout:literal) => {
        concat!("expires_at <= last_seen_at + ", $timeout)
    };
}

/// When a started session is due to end for the orphan timeout `$timeout`: the earlier of
/// its expiry and its orphan deadline. The sweep takes the most overdue first by it.
#[macro_export]
macro_rules! sql_deadline {
    ($timeout:literal) => {
        concat!(
            "CASE WHEN expires_at <= last_seen_at + ",
            $timeout,
            " THEN expires_at ELSE last_seen_at + ",
            $timeout,
            " END"
        )
    };
}

/// The next release of a session ended at `$ended_at`: due then if it holds anything
/// (what the core's `Session::next_release_at` says of a session just ended).
#[macro_export]
macro_rules! sql_release_due_at {
    ($ended_at:expr) => {
        concat!("CASE WHEN resource_count > 0 THEN ", $ended_at, " END")
    };
}

/// The columns of a session's usage state, as `usage::sql::UsageStateRow` reads them.
#[macro_export]
macro_rules! sql_usage_state_columns {
    () => {
        "id, tenant, started_at, ready_at, ended_at, end_reason, node_last_seen_at, bill_meter,
         bill_rounding, usage_closed_to"
    };
}

/// The live nodes holding client sockets of session `?1`, by id; `$node_alive` is the
/// dialect's condition that node row `n` is alive.
#[macro_export]
macro_rules! sql_holders {
    ($node_alive:expr) => {
        concat!(
            "SELECT p.node FROM session_presence p JOIN nodes n ON n.id = p.node
             WHERE p.session_id = ?1 AND ",
            $node_alive,
            " ORDER BY p.node"
        )
    };
}

/// The ids of the ended sessions of tenant `$tenant` (each dialect's NULL test of its text
/// parameter) that ended at or after `$since` or still owe releases, at most `$limit`:
/// those owing releases first (a limit never drops them for recent ones), each part by
/// the latest end first.
#[macro_export]
macro_rules! sql_ended_since {
    ($tenant:literal, $since:literal, $limit:literal) => {
        concat!(
            "SELECT id FROM sessions
             WHERE status = 'ended' AND (",
            $tenant,
            ")
               AND id IN (SELECT id FROM sessions WHERE status = 'ended' AND ended_at >= ",
            $since,
            " UNION SELECT id FROM sessions WHERE release_due_at IS NOT NULL)
             ORDER BY (release_due_at IS NULL), ended_at DESC, id DESC LIMIT ",
            $limit
        )
    };
}

/// How many sessions of tenant `$tenant` (each dialect's NULL test of its text parameter)
/// ended from `$since` to `$until`, by span (`$bucket` ms long, counted from `$since`) and
/// reason: rows of (span, reason, count) in that order, as `rows::end_count` reads them.
#[macro_export]
macro_rules! sql_count_ends {
    ($tenant:literal, $since:literal, $until:literal, $bucket:literal) => {
        concat!(
            "SELECT (ended_at - ",
            $since,
            ") / ",
            $bucket,
            " AS span, end_reason, COUNT(*) FROM sessions
             WHERE status = 'ended' AND ended_at >= ",
            $since,
            " AND ended_at <= ",
            $until,
            " AND (",
            $tenant,
            ") GROUP BY span, end_reason ORDER BY span, end_reason"
        )
    };
}

/// The columns of a delivery, in the order `rows::DeliveryRow` reads them.
#[macro_export]
macro_rules! delivery_columns {
    () => {
        "id, session_id, tenant, session_seq, event_at, endpoint, url, status, attempts, \
         created_at, next_attempt_at, last_attempt_at, last_status, last_error"
    };
}

/// The pending deliveries due at `$now` and not claimed, to origins that are not busy
/// (`$not_busy`, the dialect's test of `d.origin`), each the first pending event of its
/// session to its endpoint (a session's events go in order; a failed one does not hold
/// the next back): of the `$scan` most overdue (only those are locked, with the dialect's
/// `$lock`), at most `$per_origin` to one origin and `$limit` in all.
#[macro_export]
macro_rules! sql_due_deliveries {
    ($now:literal, $limit:literal, $per_origin:literal, $scan:literal, $not_busy:literal, $lock:literal) => {
        concat!(
            "SELECT id FROM (
                SELECT id, next_attempt_at,
                       ROW_NUMBER() OVER (PARTITION BY origin ORDER BY next_attempt_at, id) AS nth
                FROM (SELECT d.id, d.origin, d.next_attempt_at FROM deliveries d
                      WHERE d.status = 'pending' AND d.next_attempt_at <= ",
            $now,
            " AND (d.claimed_until IS NULL OR d.claimed_until <= ",
            $now,
            ") AND ",
            $not_busy,
            " AND NOT EXISTS (SELECT 1 FROM deliveries e
                               WHERE e.session_id = d.session_id AND e.endpoint = d.endpoint
                                 AND e.status = 'pending' AND e.session_seq < d.session_seq)
                      ORDER BY d.next_attempt_at, d.id LIMIT ",
            $scan,
            " ",
            $lock,
            ") candidates
             ) ranked WHERE nth <= ",
            $per_origin,
            " ORDER BY next_attempt_at, id LIMIT ",
            $limit
        )
    };
}

/// Statements the two dialects agree on (SQLite parameters; see [`postgres`]).
pub mod statements {
    /// A started session of a tenant at its plan limit: how many it runs (`?1` tenant).
    pub const COUNT_STARTED: &str =
        "SELECT COUNT(*) FROM sessions WHERE tenant = ?1 AND status = 'started'";

    /// A new started session, alive as of its start: `?1` id, `?2` tenant, `?3` started_at,
    /// `?4` expires_at, `?5` metadata, `?6` room provider, `?7` room name, `?8` node, its
    /// own timeouts in ms: `?9` participant left, `?10` participant absent, `?11` WebSocket
    /// grace; `?12` its callback URL; its billing rule: `?13` meter, `?14` rounding.
    pub const INSERT_SESSION: &str =
        "INSERT INTO sessions (id, tenant, status, started_at, expires_at, last_seen_at,
                               metadata, room_provider, room_name, node, participant_left_ms,
                               participant_absent_ms, websocket_grace_ms, callback_url,
                               bill_meter, bill_rounding)
         VALUES (?1, ?2, 'started', ?3, ?4, ?3, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

    /// The event of sequence `?3` (see `EventKind::sequence`) of session `?1` of tenant
    /// `?2`, at `?4`: written with its cause.
    pub const INSERT_EVENT: &str =
        "INSERT INTO events (session_id, tenant, session_seq, at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT DO NOTHING";

    /// Session `?1` ended: its `ended` event (sequence `?2`), at its end, once. SQLite's:
    /// `?3` is the first of the usage records its end wrote, if any (their events are
    /// written with the fan-out of this one: `MATERIALIZE_USAGE_EVENTS`).
    pub const EVENT_ENDED: &str = "INSERT INTO events (session_id, tenant, session_seq, at,
                                            usage_from)
         SELECT id, tenant, CAST(?2 AS BIGINT), ended_at, ?3 FROM sessions
         WHERE id = ?1 AND status = 'ended'
         ON CONFLICT DO NOTHING";

    /// Session `?1` ended and holds nothing unreleased: its `released` event (sequence
    /// `?2`) at `?3` (never before its end), once.
    pub const EVENT_RELEASED: &str = concat!(
        "INSERT INTO events (session_id, tenant, session_seq, at)
         SELECT id, tenant, CAST(?2 AS BIGINT), ",
        sql_later!("?3", "ended_at"),
        " FROM sessions WHERE id = ?1 AND status = 'ended'
           AND NOT EXISTS (SELECT 1 FROM resources WHERE session_id = ?1 AND state <> 'released')
         ON CONFLICT DO NOTHING"
    );

    /// The started session `?1` is ready at `?2` (never before its start), once.
    pub const RECORD_READY: &str = concat!(
        "UPDATE sessions SET ready_at = ",
        sql_later!("?2", "started_at"),
        " WHERE id = ?1 AND status = 'started' AND ready_at IS NULL"
    );

    /// Session `?1` is ready: its `ready` event (sequence `?2`) at its `ready_at`, once.
    pub const EVENT_READY: &str = "INSERT INTO events (session_id, tenant, session_seq, at)
         SELECT id, tenant, CAST(?2 AS BIGINT), ready_at FROM sessions
         WHERE id = ?1 AND ready_at IS NOT NULL
         ON CONFLICT DO NOTHING";

    /// Up to `?1` events not fanned out yet, in the order they were written; SQLite's. Each
    /// row is an event, and for an `ended` event, each of the usage records its end wrote
    /// (their `usage.recorded` events are written when it is fanned out:
    /// `MATERIALIZE_USAGE_EVENTS`), one row per record: sequence, time.
    pub const UNDISPATCHED: &str =
        "SELECT NULL, e.session_id, e.tenant, e.session_seq, e.at, s.callback_url, e.id,
                u.seq, u.recorded_at
         FROM (SELECT id, session_id, tenant, session_seq, at, usage_from FROM events
               WHERE position IS NULL ORDER BY id LIMIT ?1) e
         JOIN sessions s ON s.id = e.session_id
         LEFT JOIN usage_records u ON u.session_id = e.session_id AND u.seq >= e.usage_from
         ORDER BY e.id, u.seq";

    /// Event `?1` (an `ended` one) is being fanned out: the `usage.recorded` events
    /// (sequence `?2` + record) of the usage records its end wrote, once; SQLite's.
    pub const MATERIALIZE_USAGE_EVENTS: &str =
        "INSERT INTO events (session_id, tenant, session_seq, at)
         SELECT u.session_id, u.tenant, ?2 + u.seq, u.recorded_at
         FROM events e JOIN usage_records u ON u.session_id = e.session_id
         WHERE e.id = ?1 AND e.usage_from IS NOT NULL AND u.seq >= e.usage_from
         ORDER BY u.seq
         ON CONFLICT DO NOTHING";

    /// The stream position of the last event fanned out.
    pub const LAST_POSITION: &str = "SELECT last_position FROM event_stream";

    /// The next place in the event stream. Its row lock is held to the commit, so places
    /// commit in order: a reader never sees a later one before an earlier one.
    pub const NEXT_POSITION: &str =
        "UPDATE event_stream SET last_position = last_position + 1 RETURNING last_position";

    /// The event of sequence `?2` of session `?1` takes stream place `?3`, unless it has
    /// one: its id, tenant and time.
    pub const PLACE_EVENT: &str = "UPDATE events SET position = ?3
         WHERE session_id = ?1 AND session_seq = ?2 AND position IS NULL
         RETURNING id, tenant, at";

    /// A pending delivery of event `?1` (session `?2`, sequence `?3`, tenant `?4`, at
    /// `?5`) to endpoint `?6` at URL `?7` of origin `?9`, made and due at `?8`.
    pub const INSERT_DELIVERY: &str =
        "INSERT INTO deliveries (event_id, session_id, session_seq, tenant, event_at, endpoint,
                                 url, origin, status, created_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?9, 'pending', ?8, ?8)
         ON CONFLICT DO NOTHING";

    /// Fanned out events after stream place `?1`, of tenant `?2` and session `?4` (each if
    /// not NULL), at most `?3`.
    pub const EVENTS_AFTER: &str =
        "SELECT e.position, e.session_id, e.tenant, e.session_seq, e.at, s.callback_url
         FROM events e JOIN sessions s ON s.id = e.session_id
         WHERE e.position > ?1 AND (CAST(?2 AS TEXT) IS NULL OR e.tenant = ?2)
           AND (CAST(?4 AS TEXT) IS NULL OR e.session_id = ?4)
         ORDER BY e.position LIMIT ?3";

    /// A claimed delivery's attempt: `?1` id, `?2` node, `?3` status, `?4` at, `?5` HTTP
    /// status, `?6` error, `?7` next attempt. The claim is given up.
    pub const RECORD_DELIVERY: &str = "UPDATE deliveries SET status = ?3,
            attempts = attempts + 1, last_attempt_at = ?4, last_status = ?5, last_error = ?6,
            next_attempt_at = ?7, claimed_by = NULL, claimed_until = NULL
         WHERE id = ?1 AND claimed_by = ?2 AND status = 'pending'";

    /// Node `?2` gives up its claim on delivery `?1`.
    pub const UNCLAIM_DELIVERY: &str =
        "UPDATE deliveries SET claimed_by = NULL, claimed_until = NULL
         WHERE id = ?1 AND claimed_by = ?2";

    /// Delivery `?1` of tenant `?2` (if not NULL) pending again, due at `?3`, unless it
    /// was delivered or an attempt of it is under way (a live claim).
    pub const RETRY_DELIVERY: &str = "UPDATE deliveries SET status = 'pending', created_at = ?3,
            next_attempt_at = ?3, claimed_by = NULL, claimed_until = NULL
         WHERE id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR tenant = ?2) AND status <> 'delivered'
           AND (claimed_until IS NULL OR claimed_until <= ?3)";

    /// Deliveries by status and whether they were attempted: count, oldest fan-out.
    pub const COUNT_DELIVERIES: &str =
        "SELECT status, CAST(CASE WHEN attempts > 0 THEN 1 ELSE 0 END AS BIGINT), COUNT(*),
                MIN(created_at)
         FROM deliveries GROUP BY status, CASE WHEN attempts > 0 THEN 1 ELSE 0 END";

    /// One more resource attached to session `?1` (an end reads the count, see
    /// `sql_release_due_at!`).
    pub const COUNT_ATTACHED: &str =
        "UPDATE sessions SET resource_count = resource_count + 1 WHERE id = ?1";

    /// The started sessions due to end at `?1` for the orphan timeout `?2` (ms), at most
    /// `?3`, most overdue first: id, whether it expired, and its deadline. A session whose
    /// client sockets some node holds is live as of `?1` (a dead node's hold is let go when
    /// its sessions are taken over, see `LET_GO_DEAD`).
    pub const DUE: &str = concat!(
        "SELECT id, ",
        sql_expired!("?2"),
        ", ",
        sql_deadline!("?2"),
        " AS deadline FROM (
            SELECT id, expires_at,
                   CASE WHEN EXISTS (SELECT 1 FROM session_presence p WHERE p.session_id = sessions.id)
                        THEN ?1 ELSE last_seen_at END AS last_seen_at
            FROM sessions
            WHERE status = 'started' AND (expires_at <= ?1 OR last_seen_at <= ?1 - ?2)
         ) candidates
         WHERE expires_at <= ?1 OR last_seen_at <= ?1 - ?2
         ORDER BY deadline, id LIMIT ?3"
    );

    /// What a release attempt did to resource (`?2` kind, `?3` handle) of session `?1`:
    /// its state (`?4` state, `?5` attempts, `?6` retry_at, `?7` released_at); on a
    /// success (`?8`), the note `?9` (after the note of a resource lost with its node and
    /// `?10`), on a failure the error `?9`. A resource released stays as it was.
    pub const RECORD_ATTEMPT: &str =
        "UPDATE resources SET state = ?4, attempts = ?5, retry_at = ?6, released_at = ?7,
            note = CASE WHEN NOT ?8 THEN note
                        WHEN lost_at IS NULL THEN ?9
                        ELSE note || ?10 || ?9 END,
            last_error = CASE WHEN ?8 THEN NULL ELSE ?9 END
         WHERE session_id = ?1 AND kind = ?2 AND handle = ?3 AND state <> 'released'";

    /// A release run's word on session `?1` of node `?2`: its next release due at `?3`,
    /// its claim kept until `?4` or given up (`NULL`).
    pub const RECORD_SESSION: &str = "UPDATE sessions SET release_due_at = ?3,
            release_claimed_by = CASE WHEN CAST(?4 AS BIGINT) IS NULL THEN NULL ELSE ?2 END,
            release_claimed_until = ?4
         WHERE id = ?1 AND node = ?2";

    /// Node `?1` restarted: its claims died with it.
    pub const DROP_CLAIMS: &str =
        "UPDATE sessions SET release_claimed_by = NULL, release_claimed_until = NULL
         WHERE release_claimed_by = ?1";

    /// Every pending release of dead node `?1` is lost with it (at `?2`, noted `?3` and
    /// the node's id): still owed by that node.
    pub const MARK_LOST: &str = "UPDATE resources SET lost_at = ?2, note = ?3 || node
         WHERE node = ?1 AND state = 'pending' AND lost_at IS NULL";

    /// A room event applied once: provider `?1`, event id `?2`, received at `?3`. Nothing
    /// written for an id seen before.
    pub const INSERT_ROOM_EVENT: &str =
        "INSERT INTO room_events (provider, event_id, received_at) VALUES (?1, ?2, ?3)
         ON CONFLICT DO NOTHING";

    /// Participant `?2` of session `?1` present or not (`?3`) as of provider time `?4`:
    /// the latest event by provider time wins, whatever the arrival order.
    pub const UPSERT_PARTICIPANT: &str =
        "INSERT INTO room_participants (session_id, identity, present, last_event_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (session_id, identity) DO UPDATE
         SET present = excluded.present, last_event_at = excluded.last_event_at
         WHERE excluded.last_event_at >= room_participants.last_event_at";

    /// A join is liveness: session `?1` seen at `?2` (never backwards).
    pub const SEEN: &str = concat!(
        "UPDATE sessions SET last_seen_at = ",
        sql_later!("last_seen_at", "?2"),
        " WHERE id = ?1"
    );

    /// The room of session `?1` finished (`?2`: true).
    pub const ROOM_FINISHED: &str = "UPDATE sessions SET room_finished = ?2 WHERE id = ?1";

    /// After a room event of session `?1` at `?2`: the room emptied then if nobody is
    /// present (`?3`: true) but someone had joined, unless it was empty already; else not
    /// empty.
    pub const ROOM_EMPTIED: &str = "UPDATE sessions SET room_emptied_at = CASE
            WHEN EXISTS (SELECT 1 FROM room_participants WHERE session_id = ?1 AND present = ?3)
              OR NOT EXISTS (SELECT 1 FROM room_participants WHERE session_id = ?1)
            THEN NULL
            ELSE COALESCE(room_emptied_at, ?2) END
         WHERE id = ?1";

    /// Session `?1`'s room: participants present (`?2`: true), participants ever seen,
    /// whether it finished, since when it is empty, and the session's wait after the last
    /// participant leaves.
    pub const ROOM_STATE: &str =
        "SELECT (SELECT COUNT(*) FROM room_participants WHERE session_id = ?1 AND present = ?2),
                (SELECT COUNT(*) FROM room_participants WHERE session_id = ?1),
                room_finished, room_emptied_at, participant_left_ms
         FROM sessions WHERE id = ?1";

    /// Room presence is liveness: every started session with someone present (`?2`: true)
    /// seen at `?1`; their ids.
    pub const TOUCH_PRESENT: &str = concat!(
        "UPDATE sessions SET last_seen_at = ",
        sql_later!("last_seen_at", "?1"),
        " WHERE status = 'started'
           AND id IN (SELECT session_id FROM room_participants WHERE present = ?2)
         RETURNING id"
    );

    /// Node `?2` holds client sockets of session `?1` (nothing written if it already did).
    pub const HOLD: &str = "INSERT INTO session_presence (session_id, node) VALUES (?1, ?2)
         ON CONFLICT DO NOTHING";

    /// Node `?2` no longer holds client sockets of session `?1` (after `SEEN`: the sockets
    /// were liveness until then).
    pub const LET_GO: &str = "DELETE FROM session_presence WHERE session_id = ?1 AND node = ?2";

    /// Dead node `?1` is taken over at `?2`: the started sessions it held sockets of were
    /// live until then (their clients get the orphan timeout to come back elsewhere).
    pub const SEEN_HELD_BY: &str = concat!(
        "UPDATE sessions SET last_seen_at = ",
        sql_later!("last_seen_at", "?2"),
        " WHERE status = 'started'
           AND id IN (SELECT session_id FROM session_presence WHERE node = ?1)"
    );

    /// Node `?1` started, or was taken over after `SEEN_HELD_BY`: it holds no sockets.
    pub const CLEAR_PRESENCE: &str = "DELETE FROM session_presence WHERE node = ?1";

    /// The socket presence of sessions that ended at or before `?1`.
    pub const PRUNE_PRESENCE: &str = "DELETE FROM session_presence WHERE session_id IN (
            SELECT p.session_id FROM session_presence p JOIN sessions s ON s.id = p.session_id
            WHERE s.status = 'ended' AND s.ended_at <= ?1)";

    /// The participants of at most `?2` sessions that ended at or before `?1`.
    pub const PRUNE_PARTICIPANTS: &str = "DELETE FROM room_participants WHERE session_id IN (
            SELECT DISTINCT p.session_id FROM room_participants p
            JOIN sessions s ON s.id = p.session_id
            WHERE s.status = 'ended' AND s.ended_at <= ?1 LIMIT ?2)";

    /// Deliveries of tenant `?1`, session `?2` and status `?3` (each if not NULL), at most
    /// `?4`, newest first.
    pub const LIST_DELIVERIES: &str = concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM deliveries
         WHERE (CAST(?1 AS TEXT) IS NULL OR tenant = ?1)
           AND (CAST(?2 AS TEXT) IS NULL OR session_id = ?2)
           AND (CAST(?3 AS TEXT) IS NULL OR status = ?3)
         ORDER BY id DESC LIMIT ?4"
    );

    /// Delivery `?1`, of tenant `?2` if not NULL.
    pub const GET_DELIVERY: &str = concat!(
        "SELECT ",
        delivery_columns!(),
        " FROM deliveries WHERE id = ?1 AND (CAST(?2 AS TEXT) IS NULL OR tenant = ?2)"
    );

    /// Idempotency key `?2` of tenant `?1`: body hash, session, answer status and body,
    /// taken and claimed times.
    pub const KEY_OF: &str = "SELECT request_hash, session_id, status, body, created_at, claimed_at
         FROM idempotency_keys WHERE tenant = ?1 AND key = ?2";

    /// Takes key `?2` of tenant `?1` for body hash `?3` and session `?4` at `?5`, unless
    /// it is held and was taken after `?6` (then nothing is written).
    pub const TAKE_KEY: &str =
        "INSERT INTO idempotency_keys (tenant, key, request_hash, session_id, created_at, claimed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT (tenant, key) DO UPDATE SET request_hash = excluded.request_hash,
            session_id = excluded.session_id, status = NULL, body = NULL,
            created_at = excluded.created_at, claimed_at = excluded.claimed_at
         WHERE idempotency_keys.created_at <= ?6";

    /// Takes over key `?2` of tenant `?1` at `?3` if its holder has been silent since `?4`.
    pub const TAKE_OVER_KEY: &str = "UPDATE idempotency_keys SET claimed_at = ?3
         WHERE tenant = ?1 AND key = ?2 AND status IS NULL AND claimed_at <= ?4";

    /// The answer (`?4` status, `?5` body) of key `?2` of tenant `?1` held for session `?3`.
    pub const FINISH_KEY: &str = "UPDATE idempotency_keys SET status = ?4, body = ?5
         WHERE tenant = ?1 AND key = ?2 AND session_id = ?3 AND status IS NULL";

    /// Key `?2` of tenant `?1`, held for session `?3` and unanswered, given up.
    pub const ABANDON_KEY: &str = "DELETE FROM idempotency_keys
         WHERE tenant = ?1 AND key = ?2 AND session_id = ?3 AND status IS NULL";

    /// At most `?2` idempotency keys taken at or before `?1`.
    pub const PRUNE_KEYS: &str = "DELETE FROM idempotency_keys WHERE (tenant, key) IN (
            SELECT tenant, key FROM idempotency_keys WHERE created_at <= ?1 LIMIT ?2)";

    /// At most `?2` deliveries done (delivered or failed) fanned out at or before `?1`.
    pub const PRUNE_DELIVERIES: &str = "DELETE FROM deliveries WHERE id IN (
            SELECT id FROM deliveries WHERE status <> 'pending' AND created_at <= ?1 LIMIT ?2)";

    /// At most `?2` fanned out events at or before `?1` with no delivery left.
    pub const PRUNE_EVENTS: &str = "DELETE FROM events WHERE id IN (
            SELECT e.id FROM events e
            WHERE e.position IS NOT NULL AND e.at <= ?1
              AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
            LIMIT ?2)";

    /// Room event ids received at or before `?1` (kept as long as the retention, for
    /// deduplicating a provider's retries).
    pub const PRUNE_ROOM_EVENTS: &str = "DELETE FROM room_events WHERE received_at <= ?1";

    /// The usage state of session `?1`, as `usage::sql::UsageStateRow` reads it.
    pub const USAGE_STATE: &str = concat!(
        "SELECT ",
        sql_usage_state_columns!(),
        " FROM sessions WHERE id = ?1"
    );

    // The usage record statements below are SQLite's: PostgreSQL keeps the identifier
    // columns SQLite dropped, for the previous release's instances (see its adapter).

    /// Every usage record of session `?1`, in the order written (`usage::sql::UsageRow`'s
    /// columns).
    pub const SESSION_USAGE: &str = "SELECT session_id, tenant, seq, span_from, span_to,
                from_ms, to_ms, revision, superseded, recorded_at
         FROM usage_records WHERE session_id = ?1 ORDER BY seq";

    /// Usage record `?2` of session `?1` (`usage::sql::UsageRow`'s columns).
    pub const USAGE_RECORD: &str = "SELECT session_id, tenant, seq, span_from, span_to,
                from_ms, to_ms, revision, superseded, recorded_at
         FROM usage_records WHERE session_id = ?1 AND seq = ?2";

    /// A new usage record: `usage::sql::UsageRow`'s columns in order as `?1` to `?10`, its
    /// billable milliseconds `?11`.
    pub const INSERT_USAGE: &str = "INSERT INTO usage_records (session_id, tenant, seq,
                span_from, span_to, from_ms, to_ms, revision, superseded, recorded_at, millis)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

    /// Usage record `?2` of session `?1` is replaced by a correction.
    pub const SUPERSEDE_USAGE: &str = "UPDATE usage_records SET superseded = TRUE
         WHERE session_id = ?1 AND seq = ?2 AND NOT superseded";

    /// Session `?1`'s usage is recorded up to `?2` (the end of its last closed period).
    pub const CLOSE_USAGE_TO: &str = "UPDATE sessions SET usage_closed_to = ?2 WHERE id = ?1";

    /// Up to `?3` started sessions of node `?1` with a usage period to close before `?2`,
    /// by id.
    pub const USAGE_TO_CLOSE: &str = "SELECT id FROM sessions
         WHERE node = ?1 AND status = 'started' AND started_at < ?2
           AND (usage_closed_to IS NULL OR usage_closed_to < ?2) AND id > ?3
         ORDER BY id LIMIT ?4";

    /// The usage state of up to `?4` sessions (as `USAGE_STATE`) whose life overlaps
    /// `[?1, ?2)` (a minute's rounding after its end counts as its life), by id, after id
    /// `?3` (`''`: from the first).
    pub const USAGE_STATES: &str = concat!(
        "SELECT ",
        sql_usage_state_columns!(),
        " FROM sessions
         WHERE started_at < ?2 AND (ended_at IS NULL OR ended_at + 60000 >= ?1) AND id > ?3
         ORDER BY id LIMIT ?4"
    );
}

/// PostgreSQL's form of a shared statement: `?N` parameters as `$N`. Made once per
/// statement and kept.
pub fn postgres(sql: &'static str) -> &'static str {
    static MADE: LazyLock<Mutex<HashMap<usize, &'static str>>> =
        LazyLock::new(|| Mutex::new(HashMap::new()));
    let mut made = crate::sync::lock(&MADE);
    made.entry(sql.as_ptr() as usize)
        .or_insert_with(|| Box::leak(dollar_parameters(sql).into_boxed_str()))
}

/// `?N` parameters as `$N` (a `?` not followed by a digit is left alone).
fn dollar_parameters(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests;
