//! Core benchmarks: start, end, repeated end and timeouts on tables of 1,024 and 65,536
//! sessions, and the bare `started -> ended` transition next to the same transition written
//! with `smlang`.
//!
//! Run: `cargo bench -p session-lifecycle-benches --bench core`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BatchSize, BenchmarkId, Criterion};
use session_lifecycle::*;

const T0: u64 = 1_705_314_600_000;
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
/// Sessions started, ended or made due per measured batch.
const BATCH: usize = 256;

struct Noop;
impl Effects for Noop {
    fn release(&mut self, _: &SessionId, _: Resource) -> ReleaseOutcome {
        ReleaseOutcome::Released
    }
}

fn policy() -> Policy {
    // Pre-filled sessions never come due during a run; ended ones are evicted 1 ms later.
    Policy {
        orphan_timeout: YEAR,
        retention: Duration::from_millis(1),
        ..Policy::DEFAULT
    }
}

/// A table of `N` slots holding `N - 2 * BATCH` long-lived sessions, and a clock.
struct Bed<const N: usize> {
    table: SessionTable<N>,
    now: u64,
    random: u128,
}

impl<const N: usize> Bed<N> {
    fn fill(&mut self) {
        for _ in 0..N - 2 * BATCH {
            self.start(YEAR);
        }
    }

    fn ts(&self) -> Timestamp {
        Timestamp::from_millis(self.now)
    }

    fn start(&mut self, lifetime: Duration) -> SessionId {
        self.random += 1;
        let id = *self
            .table
            .start(self.ts(), self.random, lifetime)
            .unwrap()
            .id();
        self.table
            .attach(
                &id,
                Resource {
                    kind: ResourceKind(1),
                    handle: self.random as u64,
                },
            )
            .unwrap();
        id
    }

    /// Ends `ids`, then moves the clock past their retention and evicts them.
    fn clean(&mut self, ids: &[SessionId]) {
        for id in ids {
            self.table
                .end_and_release(self.ts(), id, EndReason::Requested, &mut Noop)
                .unwrap();
        }
        self.now += 2;
        self.table.handle_timeout(self.ts(), &mut Noop);
    }
}

fn table_benches<const N: usize>(c: &mut Criterion, bed: &mut Bed<N>) {
    let mut group = c.benchmark_group("table");
    let mut ids = Vec::with_capacity(BATCH);

    group.bench_function(BenchmarkId::new("start", N), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64);
                let now = bed.ts();
                ids.clear();
                let t = Instant::now();
                for _ in 0..n {
                    bed.random += 1;
                    ids.push(*bed.table.start(now, bed.random, YEAR).unwrap().id());
                }
                total += t.elapsed();
                bed.clean(&ids);
                left -= n;
            }
            total
        })
    });

    group.bench_function(BenchmarkId::new("end", N), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(BATCH as u64);
                ids.clear();
                for _ in 0..n {
                    ids.push(bed.start(YEAR));
                }
                let now = bed.ts();
                let t = Instant::now();
                for id in &ids {
                    black_box(
                        bed.table
                            .end_and_release(now, id, EndReason::Requested, &mut Noop)
                            .is_ok(),
                    );
                }
                total += t.elapsed();
                bed.clean(&ids);
                left -= n;
            }
            total
        })
    });

    let ended = bed.start(YEAR);
    bed.table
        .end_and_release(bed.ts(), &ended, EndReason::Requested, &mut Noop)
        .unwrap();
    group.bench_function(BenchmarkId::new("repeated_end", N), |b| {
        let now = bed.ts();
        b.iter(|| {
            let out =
                bed.table
                    .end_and_release(now, black_box(&ended), EndReason::Requested, &mut Noop);
            black_box(out.map(|o| o.transition).ok())
        })
    });
    bed.clean(&[ended]);

    group.bench_function(BenchmarkId::new("timeout_none_due", N), |b| {
        let now = bed.ts();
        b.iter(|| black_box(bed.table.handle_timeout(black_box(now), &mut Noop)))
    });

    for due in [1usize, 16, 256] {
        group.bench_function(BenchmarkId::new(format!("timeout_{due}_due"), N), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for _ in 0..due {
                        bed.start(Duration::from_millis(1));
                    }
                    let at = Timestamp::from_millis(bed.now + 1);
                    let t = Instant::now();
                    let sweep = bed.table.handle_timeout(at, &mut Noop);
                    total += t.elapsed();
                    assert_eq!(sweep.expired as usize, due);
                    bed.now += 3;
                    bed.table.handle_timeout(bed.ts(), &mut Noop);
                }
                // Per due session, so sizes and batch sizes compare directly.
                total / due as u32
            })
        });
    }
    group.finish();
}

mod with_smlang {
    use session_lifecycle::{EndReason, Ending, Timestamp};
    use smlang::statemachine;

    /// The event's data: when, and why.
    #[derive(Clone, Copy, PartialEq)]
    pub struct End {
        pub now: Timestamp,
        pub reason: EndReason,
    }

    statemachine! {
        transitions: {
            *Started + End(End) / record = Ended,
            Ended + End(End) = Ended,
        }
    }

    /// The same record our `Session::end` keeps: start time and the first ending.
    pub struct Record {
        pub started_at: Timestamp,
        pub ending: Option<Ending>,
    }

    impl StateMachineContext for Record {
        fn record(&mut self, end: End) -> Result<(), ()> {
            self.ending = Some(Ending {
                at: end.now.max(self.started_at),
                reason: end.reason,
            });
            Ok(())
        }
    }
}

fn transition_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("bare_transition");
    let t0 = Timestamp::from_millis(T0);
    let t1 = Timestamp::from_millis(T0 + 300_000);
    let id = SessionId::from_ulid_parts(t0, 1);
    group.bench_function("session_lifecycle", |b| {
        b.iter_batched_ref(
            || Session::new(id, t0, t0),
            |s| black_box(s.end(black_box(t1), EndReason::Requested)),
            BatchSize::NumIterations(256),
        )
    });
    group.bench_function("smlang", |b| {
        b.iter_batched_ref(
            || {
                with_smlang::StateMachine::new(with_smlang::Record {
                    started_at: t0,
                    ending: None,
                })
            },
            |sm| {
                let end = with_smlang::End {
                    now: black_box(t1),
                    reason: EndReason::Requested,
                };
                black_box(sm.process_event(with_smlang::Events::End(end)).is_ok())
            },
            BatchSize::NumIterations(256),
        )
    });
    group.finish();
}

fn run() {
    println!(
        "size_of::<Session>() = {} bytes; table storage per slot = {} bytes; \
         SessionTable<1024> = {} bytes; SessionTable<65536> = {} bytes",
        std::mem::size_of::<Session>(),
        SessionTable::<1024>::BYTES_PER_SLOT,
        std::mem::size_of::<SessionTable<1024>>(),
        std::mem::size_of::<SessionTable<65536>>(),
    );
    let mut c = Criterion::default().configure_from_args();
    transition_benches(&mut c);
    let mut small = Bed::<1024> {
        table: SessionTable::new(policy()).unwrap(),
        now: T0,
        random: 0,
    };
    small.fill();
    table_benches(&mut c, &mut small);
    let mut large = Bed::<65536> {
        table: SessionTable::new(policy()).unwrap(),
        now: T0,
        random: 0,
    };
    large.fill();
    table_benches(&mut c, &mut large);
    c.final_summary();
}

fn main() {
    // Tables live inline (no allocation in the core); a 65,536-slot one is ~20 MB, more
    // than a default main-thread stack.
    std::thread::Builder::new()
        .stack_size(1 << 30)
        .spawn(run)
        .expect("spawn bench thread")
        .join()
        .expect("bench thread panicked");
}
