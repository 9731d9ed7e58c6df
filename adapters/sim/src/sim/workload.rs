//! The workload: what clients, room providers and avatars do, drawn from the seed.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::{EndReason, SessionId};
use session_lifecycle_runtime::{
    EngineError, RoomBinding, RoomEvent, RoomEventKind, RoomProvider, SessionTimeouts,
    StartRequest, lock,
};

use crate::backend::{self, Held, Misbehaviour, PROCESS};
use crate::checks::SessionObs;

use super::{Room, Sim, TENANTS, plan};

impl Sim {
    /// Sessions the run knows, started as far as it knows.
    pub(super) fn live_sessions(&self) -> Vec<SessionId> {
        lock(&self.shared)
            .obs
            .sessions
            .iter()
            .filter(|(_, s)| s.first_end.is_none() && !s.said_ended)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn any_session(&mut self) -> Option<SessionId> {
        let all: Vec<SessionId> = lock(&self.shared).obs.sessions.keys().copied().collect();
        (!all.is_empty()).then(|| all[self.rng.index(all.len())])
    }

    pub(super) fn pick_live(&mut self) -> Option<SessionId> {
        let live = self.live_sessions();
        (!live.is_empty()).then(|| live[self.rng.index(live.len())])
    }

    pub(super) async fn step(&mut self) {
        let draw = self.rng.below(100);
        match draw {
            0..=21 => self.create(),
            22..=31 => {
                if let Some(id) = self.any_session() {
                    self.end(id);
                }
            }
            32..=39 => self.open_socket(),
            40..=45 => self.lose_socket(),
            46..=55 => {
                if let Some(id) = self.pick_live() {
                    self.touch(id);
                }
            }
            56..=67 => self.room_event(),
            68..=69 if self.swarm.avatar_exits => self.avatar_exit().await,
            70..=72 if self.swarm.clock_steps => self.step_clock(),
            73..=76 if self.swarm.flaky_store => {
                let flaky = self.faults.with(|f| {
                    f.flaky = !f.flaky;
                    f.flaky
                });
                self.log(format!("store flaky: {flaky}"));
            }
            77 if self.swarm.outages && self.outage_until.is_none() => {
                let secs = self.rng.between(3, 120);
                self.outage_until = Some(self.now() + Duration::from_secs(secs));
                self.faults.with(|f| f.outage = true);
                self.count("db_outage");
                self.log(format!("store outage for {secs} s"));
            }
            78 if self.swarm.crashes => {
                let i = self.rng.index(self.nodes.len());
                let secs = self.rng.between(1, 60);
                self.crash(i, Duration::from_secs(secs)).await;
            }
            79 if self.swarm.cut_offs => self.cut_off(),
            80..=82 if self.swarm.backend_trouble => {
                let how = Misbehaviour {
                    slow: self.rng.chance(500),
                    failing: self.rng.chance(500),
                    hanging: self.rng.chance(300),
                };
                *lock(&self.world.misbehaviour) = how;
                if how.slow || how.failing || how.hanging {
                    self.count("backend_misbehaving");
                }
                self.log(format!("backends now {how:?}"));
            }
            _ => {
                if let Some(id) = self.pick_live() {
                    self.touch(id);
                }
            }
        }
    }

    pub(super) fn create(&mut self) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let tenant = TENANTS[self.rng.index(TENANTS.len())].to_owned();
        let duration = if self.rng.chance(200) {
            Some(Duration::from_secs(self.rng.between(20, 120)))
        } else if self.rng.chance(700) {
            Some(Duration::from_secs(self.rng.between(120, 900)))
        } else {
            None
        };
        let room = self.rng.chance(300).then(|| RoomBinding {
            provider: if self.rng.chance(500) {
                RoomProvider::Livekit
            } else {
                RoomProvider::Daily
            },
            name: format!("room-{}", self.rng.below(1 << 40)),
        });
        let timeouts = SessionTimeouts {
            participant_left: self
                .rng
                .chance(300)
                .then(|| Duration::from_secs(self.rng.below(30))),
            participant_absent: None,
            websocket_grace: self
                .rng
                .chance(400)
                .then(|| Duration::from_secs(self.rng.below(20))),
        };
        let kept_alive = self.rng.chance(500);
        let request = StartRequest {
            callback_url: None,
            tenant: tenant.clone(),
            plan: plan(&tenant),
            duration,
            metadata: None,
            room: room.clone(),
            timeouts,
            resources: Default::default(),
        };
        self.count("create");
        let shared = Arc::clone(&self.shared);
        let clock = self.clock.clone();
        self.spawn_call(i, async move {
            let answer = engine.start(request).await;
            let now = clock.elapsed();
            let mut shared = lock(&shared);
            match answer {
                Ok(record) => {
                    let id = *record.session.id();
                    let label = format!("s{}", shared.obs.sessions.len());
                    if let Some(binding) = room {
                        shared.rooms.push(Room {
                            tenant: tenant.clone(),
                            provider: binding.provider,
                            name: binding.name,
                            present: Vec::new(),
                            joined: 0,
                            events: 0,
                            sent: Vec::new(),
                            finished: false,
                        });
                    }
                    let entry = shared
                        .obs
                        .sessions
                        .entry(id)
                        .or_insert_with(|| SessionObs::new(label, i, tenant.clone(), now));
                    entry.kept_alive = kept_alive;
                    let label = entry.label.clone();
                    shared.log(format!("n{i} start {label} ({tenant}) -> started"));
                }
                Err(e) => {
                    if matches!(e, EngineError::PlanLimit(_)) {
                        shared.count("create_over_plan");
                    }
                    shared.log(format!("n{i} start ({tenant}) -> {e}"));
                }
            }
        });
    }

    pub(super) fn end(&mut self, id: SessionId) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let tenant = lock(&self.shared).obs.sessions[&id].tenant.clone();
        // Now and then through the operator's scope (any tenant).
        let scoped = self.rng.chance(800);
        self.count("end_api");
        let shared = Arc::clone(&self.shared);
        self.spawn_call(i, async move {
            let answer = engine
                .end(scoped.then_some(tenant.as_str()), id, EndReason::Requested)
                .await;
            let mut shared = lock(&shared);
            let label = shared.label(&id);
            match answer {
                Ok(record) => {
                    let ending = record.session.ended_at().zip(record.session.end_reason());
                    match ending {
                        Some(end) => {
                            if let Some(s) = shared.obs.sessions.get_mut(&id) {
                                s.acked_end.get_or_insert(end);
                            }
                            shared.log(format!("n{i} end {label} -> ended {:?}", end.1));
                        }
                        None => {
                            shared.obs.violations.push(format!(
                                "{label}: an end was answered with a started session"
                            ));
                        }
                    }
                }
                Err(e) => shared.log(format!("n{i} end {label} -> {e}")),
            }
        });
    }

    pub(super) fn touch(&mut self, id: SessionId) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let now = self.now();
        let tenant = {
            let mut shared = lock(&self.shared);
            let s = shared.obs.sessions.get_mut(&id).expect("a known session");
            s.last_touch = now;
            s.tenant.clone()
        };
        self.count("touch");
        let shared = Arc::clone(&self.shared);
        self.spawn_call(i, async move {
            let answer = engine.touch(Some(&tenant), id).await;
            let mut shared = lock(&shared);
            let label = shared.label(&id);
            let (acked, arrived) = match &answer {
                Ok(_) => (true, true),
                Err(EngineError::Store(e)) => (false, e.is_unavailable()),
                Err(EngineError::SessionEnded) => {
                    if let Some(s) = shared.obs.sessions.get_mut(&id) {
                        s.said_ended = true;
                    }
                    (false, false)
                }
                Err(_) => (false, false),
            };
            if arrived && let Some(s) = shared.obs.sessions.get_mut(&id) {
                // Sent at `now`: kept by the node if the store could not take it.
                s.touches.push((now, i, acked));
            }
            let said = match answer {
                Ok(_) => "ok".to_owned(),
                Err(e) => e.to_string(),
            };
            shared.log(format!("n{i} touch {label} -> {said}"));
        });
    }

    pub(super) fn open_socket(&mut self) {
        let Some(id) = self.pick_live() else { return };
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        let tenant = lock(&self.shared).obs.sessions[&id].tenant.clone();
        self.count("socket_open");
        let shared = Arc::clone(&self.shared);
        let sockets = Arc::clone(&self.nodes[i].sockets);
        let clock = self.clock.clone();
        self.spawn_call(i, async move {
            let answer = engine.hold_socket(Some(&tenant), id).await;
            let now = clock.elapsed();
            let mut shared = lock(&shared);
            let label = shared.label(&id);
            match answer {
                Ok((hold, _)) => {
                    lock(&sockets).push(hold);
                    if let Some(s) = shared.obs.sessions.get_mut(&id) {
                        s.sockets.push((i, now, None));
                    }
                    shared.log(format!("n{i} socket {label} -> open"));
                }
                Err(e) => {
                    if matches!(e, EngineError::SessionEnded)
                        && let Some(s) = shared.obs.sessions.get_mut(&id)
                    {
                        s.said_ended = true;
                    }
                    shared.log(format!("n{i} socket {label} -> {e}"));
                }
            }
        });
    }

    pub(super) fn lose_socket(&mut self) {
        let holders: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !lock(&self.nodes[i].sockets).is_empty())
            .collect();
        if holders.is_empty() {
            return;
        }
        let i = holders[self.rng.index(holders.len())];
        let hold = {
            let mut sockets = lock(&self.nodes[i].sockets);
            let k = self.rng.index(sockets.len());
            sockets.remove(k)
        };
        let id = hold.session();
        drop(hold);
        let now = self.now();
        self.count("socket_loss");
        let mut shared = lock(&self.shared);
        if let Some(s) = shared.obs.sessions.get_mut(&id)
            && let Some(sock) = s.sockets.iter_mut().find(|k| k.0 == i && k.2.is_none())
        {
            sock.2 = Some(now);
        }
        let label = shared.label(&id);
        shared.log(format!("n{i} socket {label} lost"));
    }

    pub(super) fn room_event(&mut self) {
        let rooms: Vec<usize> = {
            let shared = lock(&self.shared);
            (0..shared.rooms.len())
                .filter(|&r| !shared.rooms[r].finished)
                .collect()
        };
        if rooms.is_empty() {
            return;
        }
        let r = rooms[self.rng.index(rooms.len())];
        let at = self.clock_now();
        let event = {
            let mut shared = lock(&self.shared);
            let room = &mut shared.rooms[r];
            // Now and then a delivery of an event sent before (a provider's retry).
            if !room.sent.is_empty() && self.rng.chance(100) {
                let k = self.rng.index(room.sent.len());
                let again = room.sent[k].clone();
                shared.count("room_duplicate");
                drop(shared);
                self.deliver(r, again);
                return;
            }
            let kind = if room.present.is_empty() || self.rng.chance(350) {
                room.joined += 1;
                let who = format!("p{}", room.joined);
                room.present.push(who.clone());
                RoomEventKind::Joined { participant: who }
            } else if self.rng.chance(930) {
                let k = self.rng.index(room.present.len());
                RoomEventKind::Left {
                    participant: room.present.remove(k),
                }
            } else {
                room.finished = true;
                RoomEventKind::Finished
            };
            room.events += 1;
            let event = RoomEvent {
                tenant: Some(room.tenant.clone()),
                provider: room.provider,
                room: room.name.clone(),
                event_id: format!("{}-{}", room.name, room.events),
                at,
                kind,
            };
            room.sent.push(event.clone());
            event
        };
        if self.swarm.room_trouble && self.rng.chance(100) {
            self.count("room_lost");
            self.log(format!("room {r} event {} lost", event.event_id));
        } else if self.swarm.room_trouble && self.rng.chance(150) {
            let later = self.now() + Duration::from_millis(self.rng.between(500, 10_000));
            self.count("room_reorder");
            self.log(format!("room {r} event {} delayed", event.event_id));
            self.delayed.push((later, r, event));
        } else {
            self.deliver(r, event);
        }
    }

    pub(super) fn deliver(&mut self, room: usize, event: RoomEvent) {
        let Some((i, engine)) = self.pick_node() else {
            return;
        };
        self.count("room_event");
        let shared = Arc::clone(&self.shared);
        self.spawn_call(i, async move {
            let id = event.event_id.clone();
            let answer = engine.room_event(event).await;
            let said = match answer {
                Ok(report) if report.duplicate => "duplicate".to_owned(),
                Ok(report) => format!("ended {}", report.ended.len()),
                Err(e) => e.to_string(),
            };
            lock(&shared).log(format!("n{i} room {room} event {id} -> {said}"));
        });
    }

    pub(super) async fn avatar_exit(&mut self) {
        let held: Vec<(session_lifecycle::Resource, SessionId, usize)> = lock(&self.world.ledger)
            .entries
            .iter()
            .filter(|(r, e)| r.kind == PROCESS && e.state == Held::Held)
            .map(|(r, e)| (*r, e.session, e.node))
            .collect();
        if held.is_empty() {
            return;
        }
        let (resource, session, node) = held[self.rng.index(held.len())];
        if self.nodes[node].engine.is_none() {
            return;
        }
        self.count("avatar_exit");
        let label = lock(&self.shared).label(&session);
        self.log(format!("n{node} avatar of {label} exits"));
        backend::avatar_exits(&self.world, resource, session, node).await;
    }

    pub(super) fn step_clock(&mut self) {
        let ms = self.rng.between(1_000, 180_000) as i64;
        let ms = if self.rng.chance(500) {
            self.count("clock_forward");
            ms
        } else {
            self.count("clock_back");
            -ms
        };
        self.wall_high_water = self.wall_high_water.max(self.clock_now());
        self.clock.step(ms);
        self.log(format!("clock stepped {ms} ms"));
    }
}
