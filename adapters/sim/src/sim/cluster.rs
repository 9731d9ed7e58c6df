//! The nodes: starting and restarting them, crashing them, cutting them off from the store.

use std::sync::Arc;
use std::time::Duration;

use session_lifecycle::SessionId;
use session_lifecycle_runtime::faults::FaultyStore;
use session_lifecycle_runtime::{Engine, Store, lock};

use super::{Sim, engine_config};
use crate::checks::Down;

impl Sim {
    /// Starts node `i`'s engine (again), if the store lets it.
    pub(super) async fn restart(&mut self, i: usize) {
        let node = &self.nodes[i];
        let store: Arc<dyn Store> = Arc::new(FaultyStore::deciding(
            Arc::clone(&self.raw),
            self.faults.decider(i),
        ));
        let opened = Engine::open(
            store,
            node.backends.clone(),
            Arc::new(self.clock.clone()),
            engine_config(&node.name),
        )
        .await;
        match opened {
            Ok(engine) => {
                let background = engine.spawn_background();
                let node = &mut self.nodes[i];
                node.engine = Some(engine);
                node.background = Some(background);
                node.restart_at = None;
                self.log(format!("n{i} up"));
                let now = self.now();
                lock(&self.shared).obs.came_back(i, Down::Crashed, now);
            }
            Err(e) => {
                self.nodes[i].restart_at = Some(self.now() + Duration::from_secs(2));
                self.log(format!("n{i} restart failed: {e}"));
            }
        }
    }

    /// Crashes node `i`: its memory is lost, its machine and the store are kept. Calls in
    /// flight are dropped where they stand, sockets go without a word, and the engine's
    /// own tasks stop at their next wait (its stop: `handover`, which also cuts a start
    /// short before its next acquire), so a store call is never cut in half: as a crash
    /// between two store calls.
    pub(super) async fn crash(&mut self, i: usize, down_for: Duration) {
        let now = self.now();
        let node = &mut self.nodes[i];
        let Some(engine) = node.engine.take() else {
            return;
        };
        for call in node.calls.drain(..) {
            call.abort();
        }
        for hold in lock(&node.sockets).drain(..) {
            hold.abandon();
        }
        engine.handover().await;
        node.background = None;
        node.restart_at = Some(now + down_for);
        {
            let mut shared = lock(&self.shared);
            let sockets_closed: Vec<SessionId> = shared.obs.sessions.keys().copied().collect();
            for id in sockets_closed {
                if let Some(s) = shared.obs.sessions.get_mut(&id) {
                    for sock in &mut s.sockets {
                        if sock.0 == i && sock.2.is_none() {
                            sock.2 = Some(now);
                        }
                    }
                }
            }
            shared.obs.went_down(i, Down::Crashed, now);
        }
        self.count("node_crash");
        self.log(format!("n{i} crashed for {} s", down_for.as_secs()));
    }

    pub(super) fn cut_off(&mut self) {
        let i = self.rng.index(self.nodes.len());
        if self.nodes[i].cut_off_until.is_some() || self.nodes[i].engine.is_none() {
            return;
        }
        let secs = self.rng.between(5, 90);
        let now = self.now();
        self.nodes[i].cut_off_until = Some(now + Duration::from_secs(secs));
        self.faults.with(|f| f.cut_off[i] = true);
        self.count("node_death");
        let mut shared = lock(&self.shared);
        shared.obs.went_down(i, Down::CutOff, now);
        shared.log(format!("n{i} cut off from the store for {secs} s"));
    }

    pub(super) fn up_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].engine.is_some())
            .collect()
    }

    pub(super) fn pick_node(&mut self) -> Option<(usize, Engine)> {
        let up = self.up_nodes();
        if up.is_empty() {
            return None;
        }
        let i = up[self.rng.index(up.len())];
        self.nodes[i].engine.clone().map(|e| (i, e))
    }

    pub(super) fn spawn_call<F>(&mut self, node: usize, call: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::spawn(call);
        let calls = &mut self.nodes[node].calls;
        calls.retain(|c| !c.is_finished());
        calls.push(handle);
    }
}
