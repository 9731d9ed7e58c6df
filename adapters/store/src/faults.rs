//! A store wrapper that fails on purpose, for testing how callers survive store faults.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::error::StoreError;
use crate::store::Store;

/// The error of a call a [`FaultyStore`] failed on purpose: the k-th call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("injected fault at call {0}")]
pub struct InjectedFault(pub u64);

/// When a [`FaultyStore`] fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPlan {
    /// Never.
    None,
    /// The k-th call (counting from 1, every method alike) fails, once.
    Once(u64),
    /// Every call from the k-th on fails, until [`FaultyStore::restore`].
    From(u64),
}

/// What a [`FaultyStore`] built with [`FaultyStore::deciding`] does with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFault {
    /// The call goes through.
    Pass,
    /// The call fails without reaching the inner store (a lost connection).
    Fail,
    /// The call reaches the inner store and commits, then its answer is lost: the caller
    /// sees the store as unreachable.
    LoseAnswer,
    /// The call goes through after this long (on tokio's clock; zero: after letting the
    /// other ready tasks run once): a slower store, and another order of events.
    Late(Duration),
}

/// Decides each call's fault from its number (counting from 1) and the method's name.
pub type FaultDecider = Box<dyn Fn(u64, &'static str) -> CallFault + Send + Sync>;

/// Wraps a store and fails calls per its [`FaultPlan`] (or its decider). A failed call does
/// not reach the inner store, so it changes nothing, as a lost connection would; a call
/// whose answer is lost changed what it changed.
pub struct FaultyStore {
    inner: Arc<dyn Store>,
    plan: FaultPlan,
    decider: Option<FaultDecider>,
    calls: AtomicU64,
    failures: AtomicU64,
    restored: AtomicBool,
    down: AtomicBool,
}

impl FaultyStore {
    /// Wraps `inner` with `plan`.
    pub fn new(inner: Arc<dyn Store>, plan: FaultPlan) -> FaultyStore {
        FaultyStore {
            inner,
            plan,
            decider: None,
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            restored: AtomicBool::new(false),
            down: AtomicBool::new(false),
        }
    }

    /// Wraps `inner`; `decider` chooses each call's fault (while the store is not taken
    /// down, and until [`restore`](Self::restore)).
    pub fn deciding(inner: Arc<dyn Store>, decider: FaultDecider) -> FaultyStore {
        FaultyStore {
            decider: Some(decider),
            ..FaultyStore::new(inner, FaultPlan::None)
        }
    }

    /// Calls made so far, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls failed on purpose so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Ends the faults: every later call goes through.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.restored.store(true, Ordering::SeqCst);
    }

    /// Makes every call fail from now on, whatever the plan, until [`restore`](Self::restore).
    pub fn take_down(&self) {
        self.restored.store(false, Ordering::SeqCst);
        self.down.store(true, Ordering::SeqCst);
    }

    /// Before a call: fails it (`Err`), or lets it through (late, if so decided), saying
    /// whether its answer is to be lost (`Some(k)`, the call's number).
    async fn check(&self, method: &'static str) -> Result<Option<u64>, StoreError> {
        let k = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.restored.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let fault = if self.down.load(Ordering::SeqCst) {
            CallFault::Fail
        } else if let Some(decide) = &self.decider {
            decide(k, method)
        } else {
            let fail = match self.plan {
                FaultPlan::None => false,
                FaultPlan::Once(n) => k == n,
                FaultPlan::From(n) => k >= n,
            };
            if fail {
                CallFault::Fail
            } else {
                CallFault::Pass
            }
        };
        match fault {
            CallFault::Pass => Ok(None),
            CallFault::Fail => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::unavailable(InjectedFault(k)))
            }
            CallFault::LoseAnswer => Ok(Some(k)),
            CallFault::Late(by) if by.is_zero() => {
                tokio::task::yield_now().await;
                Ok(None)
            }
            CallFault::Late(by) => {
                tokio::time::sleep(by).await;
                Ok(None)
            }
        }
    }

    /// After a call let through: its answer, or the lost answer's error.
    fn answer<T>(&self, lost: Option<u64>, answer: Result<T, StoreError>) -> Result<T, StoreError> {
        match lost {
            Some(k) if answer.is_ok() => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::unavailable(InjectedFault(k)))
            }
            _ => answer,
        }
    }
}

macro_rules! guarded {
    ($self:ident, $method:literal, $call:expr) => {
        Box::pin(async move {
            let lost = $self.check($method).await?;
            let answer = $call.await;
            $self.answer(lost, answer)
        })
    };
}

crate::delegate_store!(FaultyStore, guarded);
