//! The checks after every step, the quiet end of a run, and its verdict.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use session_lifecycle::{EndReason, Status, Timestamp};
use session_lifecycle_runtime::usage::reconcile_session;
use session_lifecycle_runtime::{ListQuery, RoomEvent, RoomEventKind, SessionRecord, lock};
use tokio::task::JoinHandle;

use crate::backend::{Held, Misbehaviour};

use crate::checks::{Down, SessionObs};

use super::Sim;
use crate::report::{Failure, Report};

impl Sim {
    /// Reads every session from the store (without faults) and checks it, and the
    /// backends' ledger.
    pub(super) async fn check(&mut self) {
        let records = self.all_records().await;
        // Usage is written with its cause, so whatever crashed, every session's latest
        // usage records agree with its record: reconciliation finds nothing, every step.
        let usage = self.usage_differences().await;
        let now = self.now();
        let mut shared = lock(&self.shared);
        let mut digest = DefaultHasher::new();
        for record in &records {
            let id = *record.session.id();
            if !shared.obs.sessions.contains_key(&id) {
                // Created, though its start was not answered (an answer lost, a crash).
                let label = format!("s{}", shared.obs.sessions.len());
                let owner = record.node.trim_start_matches('n').parse().unwrap_or(0);
                let obs = SessionObs::new(label, owner, record.tenant.clone(), now);
                shared.obs.sessions.insert(id, obs);
            }
            shared
                .obs
                .check_record(record, now, self.clock_now(), self.limits);
            (
                record.session.status() == Status::Started,
                record.session.end_reason().map(|r| r.as_str()),
                record.session.ended_at(),
                record.session.resources().len(),
                record.session.is_fully_released(),
            )
                .hash(&mut digest);
        }
        // A session whose start was answered must be in the store.
        let missing: Vec<String> = shared
            .obs
            .sessions
            .iter()
            .filter(|(id, _)| !records.iter().any(|r| r.session.id() == *id))
            .map(|(_, s)| format!("{}: started, but the store has no such session", s.label))
            .collect();
        shared.obs.violations.extend(missing);
        let ledger_broken = std::mem::take(&mut lock(&self.world.ledger).violations);
        shared.obs.violations.extend(ledger_broken);
        shared.obs.violations.extend(usage);
        shared.obs.last_check = now;
        let digest = digest.finish();
        shared.log(format!("check {} sessions {digest:016x}", records.len()));
    }

    /// Every session whose recorded usage disagrees with its record, in words.
    async fn usage_differences(&self) -> Vec<String> {
        let (from, to) = (
            Timestamp::from_millis(0),
            Timestamp::from_millis(u64::MAX / 2),
        );
        let mut found = Vec::new();
        let mut after = None;
        loop {
            let states = self
                .raw
                .usage_states(from, to, after, 500)
                .await
                .expect("the store without faults answers");
            for usage in &states {
                let records = usage.records.as_ref().expect("records are readable");
                let state = usage.state.as_ref().expect("states are readable");
                if let Some(d) = reconcile_session(state, records, from, to) {
                    found.push(format!(
                        "{}: usage {} ms recorded for {} ms billable: {}",
                        d.session, d.recorded_ms, d.expected_ms, d.problem
                    ));
                }
            }
            match states.last() {
                Some(last) if states.len() == 500 => after = Some(last.session),
                _ => return found,
            }
        }
    }

    pub(super) async fn all_records(&self) -> Vec<SessionRecord> {
        let mut all = Vec::new();
        let mut before = None;
        loop {
            let page = self
                .raw
                .list(ListQuery {
                    tenant: None,
                    status: None,
                    limit: 500,
                    before,
                    node: None,
                })
                .await
                .expect("the store without faults answers");
            let Some(last) = page.last() else { break };
            before = Some(*last.session.id());
            let full = page.len() == 500;
            all.extend(page);
            if !full {
                break;
            }
        }
        all
    }

    /// The faults stop: every node comes back, rooms finish, clients go away. Within the
    /// contract's three minutes every session must have ended, and soon after every
    /// resource must be given back, exactly once.
    pub(super) async fn quiesce(&mut self) {
        self.log("faults stop");
        self.outage_until = None;
        self.faults.with(|f| {
            f.outage = false;
            f.flaky = false;
            f.cut_off.iter_mut().for_each(|c| *c = false);
        });
        *lock(&self.world.misbehaviour) = Misbehaviour::default();
        let now = self.now();
        for i in 0..self.nodes.len() {
            self.nodes[i].cut_off_until = None;
            lock(&self.shared).obs.came_back(i, Down::CutOff, now);
        }
        // Every node comes back (a node that was crashed restarts now).
        while let Some(i) = (0..self.nodes.len()).find(|&i| self.nodes[i].engine.is_none()) {
            self.restart(i).await;
            if self.nodes[i].engine.is_none() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        // Calls still running finish (a socket opened now is closed below with the rest).
        let calls: Vec<JoinHandle<()>> = self
            .nodes
            .iter_mut()
            .flat_map(|n| n.calls.drain(..))
            .collect();
        for call in calls {
            let abort = call.abort_handle();
            if tokio::time::timeout(Duration::from_secs(60), call)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        // Clients go away; room providers report every room finished.
        for node in &self.nodes {
            lock(&node.sockets).clear();
        }
        {
            let mut shared = lock(&self.shared);
            for s in shared.obs.sessions.values_mut() {
                s.kept_alive = false;
                s.kept_alive_until = Some(now);
                for sock in &mut s.sockets {
                    sock.2.get_or_insert(now);
                }
            }
        }
        let rooms: Vec<usize> = (0..lock(&self.shared).rooms.len()).collect();
        for r in rooms {
            let event = {
                let mut shared = lock(&self.shared);
                let room = &mut shared.rooms[r];
                room.finished = true;
                room.events += 1;
                RoomEvent {
                    tenant: Some(room.tenant.clone()),
                    provider: room.provider,
                    room: room.name.clone(),
                    event_id: format!("{}-{}", room.name, room.events),
                    at: session_lifecycle::Clock::now(&self.clock),
                    kind: RoomEventKind::Finished,
                }
            };
            self.deliver(r, event);
        }
        // The bounds are on the wall clock, from the latest time it ever showed: a step
        // back delays every judgement of silence by as much (timestamps recorded before it
        // look recent), and ending a session late is safe where ending it early is not.
        let latest = self.wall_high_water.max(self.clock_now());
        let ended_by = latest.saturating_add(Duration::from_secs(180));
        let released_by = latest.saturating_add(Duration::from_secs(300));
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            self.scheduled().await;
            self.check().await;
            let now = self.clock_now();
            let records = self.all_records().await;
            let mut started: Vec<String> = Vec::new();
            for r in records
                .iter()
                .filter(|r| r.session.status() == Status::Started)
            {
                let id = *r.session.id();
                let wall = self.clock_now();
                let holders = self
                    .raw
                    .presence(id, wall, Duration::from_secs(3_600))
                    .await
                    .unwrap_or_default();
                let room = self.raw.room_state(id).await.ok().flatten();
                let label = lock(&self.shared).label(&id);
                started.push(format!(
                    "{label} (on {}, last seen {} ms ago, expires in {} ms, held by {holders:?}, room {room:?})",
                    r.node,
                    wall.as_millis() as i64 - r.session.last_seen_at().as_millis() as i64,
                    r.session.expires_at().as_millis() as i64 - wall.as_millis() as i64,
                ));
            }
            let unreleased: Vec<String> = {
                let ledger = lock(&self.world.ledger);
                let shared = lock(&self.shared);
                ledger
                    .entries
                    .iter()
                    .filter(|(_, e)| e.state != Held::Released)
                    .map(|(r, e)| {
                        format!(
                            "{} {:?} on n{} ({:?})",
                            shared.label(&e.session),
                            r,
                            e.node,
                            e.state,
                        )
                    })
                    .chain(
                        records
                            .iter()
                            .filter(|r| !r.session.is_fully_released())
                            .map(|r| {
                                format!(
                                    "{}: releases left in the store",
                                    shared.label(r.session.id())
                                )
                            }),
                    )
                    .collect()
            };
            let mut shared = lock(&self.shared);
            if !shared.obs.violations.is_empty() {
                return;
            }
            if started.is_empty() && unreleased.is_empty() {
                shared.log("quiet: every session ended, every resource given back");
                return;
            }
            if now >= ended_by && !started.is_empty() {
                shared.obs.violations.push(format!(
                    "not ended within 180 s (on the wall clock) of the faults stopping: {}",
                    started.join(", ")
                ));
                return;
            }
            if now >= released_by {
                shared.obs.violations.push(format!(
                    "not given back within 300 s (on the wall clock) of the faults stopping: {}",
                    unreleased.join("; ")
                ));
                return;
            }
        }
    }

    pub(super) fn finish(self) -> Result<Report, Failure> {
        let shared = lock(&self.shared);
        let trace_hash = shared.trace.hasher.clone().finish();
        if !shared.obs.violations.is_empty() {
            return Err(Failure {
                seed: self.seed,
                store: self.config.store,
                nodes: self.nodes.len(),
                planted: self.config.planted,
                violations: shared.obs.violations.clone(),
                trace_tail: shared.trace.tail.iter().cloned().collect(),
                trace_hash,
            });
        }
        let mut counts = shared.counts.clone();
        let mut expired = 0;
        for s in shared.obs.sessions.values() {
            if s.first_end.is_some_and(|(_, r)| r == EndReason::Expired) {
                expired += 1;
            }
        }
        if expired > 0 {
            counts.insert("expiry", expired);
        }
        let faults = self.faults.with(|f| (f.failed, f.lost_answers));
        if faults.0 > 0 {
            counts.insert("store_call_failed", faults.0 as u32);
        }
        if faults.1 > 0 {
            counts.insert("store_answer_lost", faults.1 as u32);
        }
        Ok(Report {
            seed: self.seed,
            nodes: self.nodes.len(),
            ops: self.ops,
            sessions: shared.obs.sessions.len(),
            virtual_time: self.clock.elapsed(),
            counts,
            trace_hash,
        })
    }
}
