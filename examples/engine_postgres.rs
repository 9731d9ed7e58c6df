//! Two engines (two nodes of one service, here in one program) on one PostgreSQL database.
//! Node `a` starts a session; node `b` ends it, in one write to the shared store; node `a`,
//! which holds the session's resource, learns of it (LISTEN/NOTIFY) and releases it.
//!
//! `cargo run --example engine_postgres -- postgres://postgres@127.0.0.1:5432/test`
//! (or set `DATABASE_URL`). It creates the tables it needs in that database.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use session_lifecycle::{EndReason, Resource, ResourceKind, SessionId};
use session_lifecycle_postgres::PostgresStore;
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, Engine, EngineConfig, EventSink, Plan,
    ReleaseError, ReleaseNote, ResourceBackend, StartRequest, SystemClock,
};

const TICKET: ResourceKind = ResourceKind(100);

/// A resource each node holds in its own memory: what it holds, and what it released.
#[derive(Default)]
struct Tickets {
    node: &'static str,
    released: Mutex<Vec<SessionId>>,
}

impl ResourceBackend for Tickets {
    fn kind(&self) -> ResourceKind {
        TICKET
    }
    fn name(&self) -> &'static str {
        "ticket"
    }
    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        println!(
            "node {}: acquired a ticket for {}",
            self.node, request.session
        );
        let resource = Resource {
            kind: TICKET,
            handle: 1,
        };
        Box::pin(async move {
            Ok(Acquired {
                resource,
                env: Vec::new(),
            })
        })
    }
    fn release(
        &self,
        session: SessionId,
        _resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        let mut released = self.released.lock().unwrap_or_else(PoisonError::into_inner);
        if !released.contains(&session) {
            released.push(session);
            println!("node {}: released the ticket of {session}", self.node);
        }
        Box::pin(async { Ok(ReleaseNote::Other("ticket returned".into())) })
    }
}

async fn node(
    url: &str,
    name: &'static str,
) -> Result<(Engine, Arc<Tickets>), Box<dyn std::error::Error>> {
    let store = Arc::new(PostgresStore::connect(url).await?);
    let tickets = Arc::new(Tickets {
        node: name,
        ..Tickets::default()
    });
    let config = EngineConfig {
        node: name.to_owned(),
        ..EngineConfig::default()
    };
    let backends = vec![Arc::clone(&tickets) as Arc<dyn ResourceBackend>];
    let engine = Engine::open(store, backends, Arc::new(SystemClock), config).await?;
    Ok((engine, tickets))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .ok_or("give a postgres:// URL as the argument or in DATABASE_URL")?;
    let (a, tickets_a) = node(&url, "a").await?;
    let (b, tickets_b) = node(&url, "b").await?;
    let (background_a, background_b) = (a.spawn_background(), b.spawn_background());

    let plan = Plan::new(None, Duration::from_secs(3600));
    let started = a.start(StartRequest::new("acme", plan)).await?;
    let id = *started.session.id();
    println!("node a: started {id} (runs on node {})", started.node);

    // Any node can end any session: one conditional write in the shared store.
    let ended = b.end(None, id, EndReason::Requested).await?;
    let reason = ended.session.end_reason().ok_or("no end reason recorded")?;
    println!("node b: ended {id}, reason {reason}");
    assert_eq!(
        ended.node, "a",
        "the session still belongs to the node that holds it"
    );

    // Node a releases what it holds; b, which holds nothing of it, releases nothing.
    let mut released = false;
    for _ in 0..100 {
        if b.get(None, id).await?.session.is_fully_released() {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let by_a = tickets_a
        .released
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let by_b = tickets_b
        .released
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    // Exactly once by a, whatever else a released; never by b.
    let released_by_a = by_a.iter().filter(|s| **s == id).count();
    if !released || released_by_a != 1 || !by_b.is_empty() {
        return Err(format!("released: {released}, by a: {by_a:?}, by b: {by_b:?}").into());
    }
    println!("released on node a, as the store records");

    for (engine, background) in [(a, background_a), (b, background_b)] {
        engine.shutdown(Duration::from_secs(10)).await?;
        background.join().await;
    }
    Ok(())
}
