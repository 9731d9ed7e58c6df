//! A service brings its own resource: each session books a seat in a pool the service
//! manages (licences of a speech engine, say), given back exactly once when the session
//! ends, whatever ends it. No HTTP: the service's own code starts and ends sessions.
//! Run: `cargo run --example custom_backend`

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use session_lifecycle::{EndReason, Resource, ResourceKind, SessionId};
use session_lifecycle_runtime::{
    AcquireError, AcquireRequest, Acquired, BoxFuture, Engine, EngineConfig, EngineError,
    EventSink, Plan, ReleaseError, ReleaseNote, ResourceBackend, StartRequest, SystemClock,
};
use session_lifecycle_sqlite::SqliteStore;

/// The kind of the pool's resources: any number unique among the engine's backends.
const SEAT: ResourceKind = ResourceKind(100);

/// A fixed number of seats, each free or booked by one session.
struct SeatPool {
    seats: Mutex<Vec<Option<SessionId>>>,
}

impl SeatPool {
    fn free_seats(&self) -> usize {
        let seats = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
        seats.iter().filter(|s| s.is_none()).count()
    }
}

impl ResourceBackend for SeatPool {
    fn kind(&self) -> ResourceKind {
        SEAT
    }
    fn name(&self) -> &'static str {
        "seat"
    }
    fn acquire<'a>(
        &'a self,
        request: AcquireRequest<'a>,
        _events: EventSink,
    ) -> BoxFuture<'a, Result<Acquired, AcquireError>> {
        Box::pin(async move {
            let mut seats = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(free) = seats.iter().position(Option::is_none) else {
                return Err(AcquireError::CapacityExhausted(
                    "every seat is booked".into(),
                ));
            };
            seats[free] = Some(request.session);
            println!("acquired: seat {free} for {}", request.session);
            let resource = Resource {
                kind: SEAT,
                handle: free as u64,
            };
            Ok(Acquired {
                resource,
                env: Vec::new(),
            })
        })
    }

    // Repeatable, as the engine requires: a seat already given back (a retry, or a
    // release run again after a crash) is left alone and the release succeeds.
    fn release(
        &self,
        session: SessionId,
        resource: Resource,
    ) -> BoxFuture<'_, Result<ReleaseNote, ReleaseError>> {
        Box::pin(async move {
            let mut seats = self.seats.lock().unwrap_or_else(PoisonError::into_inner);
            let seat = usize::try_from(resource.handle).ok();
            // A seat this pool never had holds nothing: nothing to give back.
            let Some(slot) = seat.and_then(|i| seats.get_mut(i)) else {
                return Ok(ReleaseNote::Other(format!("no seat {}", resource.handle)));
            };
            if *slot != Some(session) {
                return Ok(ReleaseNote::Other("seat already free".into()));
            }
            *slot = None;
            println!("released: seat {} of {session}", resource.handle);
            Ok(ReleaseNote::Other("seat returned".into()))
        })
    }
}

/// Waits until every resource of `id` is released (the engine releases in the background).
async fn wait_released(engine: &Engine, id: SessionId) -> Result<(), Box<dyn std::error::Error>> {
    for _ in 0..100 {
        if engine.get(None, id).await?.session.is_fully_released() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{id} was not released in 5 s").into())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("custom-backend-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(SqliteStore::open(dir.join("sessions.db"))?);
    let pool = Arc::new(SeatPool {
        seats: Mutex::new(vec![None; 2]),
    });
    let backends: Vec<Arc<dyn ResourceBackend>> = vec![pool.clone()];
    let engine = Engine::open(
        store,
        backends,
        Arc::new(SystemClock),
        EngineConfig::default(),
    )
    .await?;
    let background = engine.spawn_background();
    let plan = Plan::new(Some(10), Duration::from_secs(3600));
    let first = engine.start(StartRequest::new("acme", plan)).await?;
    let id = *first.session.id();
    println!("started: {id} at {}", first.session.started_at());
    let second = engine.start(StartRequest::new("acme", plan)).await?;
    println!("started: {}", second.session.id());

    // A third session finds no seat: it fails clearly and holds nothing.
    match engine.start(StartRequest::new("acme", plan)).await {
        Err(EngineError::CapacityExhausted(why)) => println!("refused: {why}"),
        other => return Err(format!("a third seat was booked: {other:?}").into()),
    }

    // The service's own code ends the first session; ending it again changes nothing.
    let ended = engine.end(None, id, EndReason::Requested).await?;
    let again = engine.end(None, id, EndReason::Expired).await?;
    assert_eq!(again.session.ended_at(), ended.session.ended_at());
    let when = ended.session.ended_at().ok_or("no ended_at")?;
    let reason = ended.session.end_reason().ok_or("no end reason recorded")?;
    println!("ended: {id} at {when}, reason {reason}");
    wait_released(&engine, id).await?;
    println!("free seats: {}", pool.free_seats());
    if pool.free_seats() != 1 {
        return Err("the first session's seat was not given back".into());
    }

    // Stopping the service ends what still runs (`shutdown`) and releases it.
    let stopped = engine.shutdown(Duration::from_secs(10)).await?;
    background.join().await;
    let free = pool.free_seats();
    println!("shutdown: {stopped} session(s) ended, free seats: {free}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
