//! The timeouts that drive automatic termination and release retries.

use core::fmt;
use core::time::Duration;

/// The bound CONTRACT.md sets: an orphaned session is ended and fully released within three
/// minutes of becoming orphaned, with default settings.
pub const CONTRACT_ORPHAN_BOUND: Duration = Duration::from_secs(180);

/// Time allowed for releasing a session's resources once it ends: the process adapter's
/// default graceful stop (10 s SIGTERM grace, then SIGKILL) plus a margin for the GPU driver.
pub const RELEASE_ALLOWANCE: Duration = Duration::from_secs(20);

/// Timeouts for automatic termination, sweeping, retention and release retries.
///
/// ```
/// use session_lifecycle::{Policy, CONTRACT_ORPHAN_BOUND};
/// let policy = Policy::DEFAULT;
/// assert!(policy.validate().is_ok());
/// assert!(policy.orphan_cleanup_bound() <= CONTRACT_ORPHAN_BOUND);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// A started session with no liveness signal (WebSocket ping, room presence, heartbeat)
    /// for this long is an orphan and ends with `orphaned`.
    pub orphan_timeout: Duration,
    /// How often a store-driven sweeper looks for orphans that in-memory timers missed
    /// (a crashed process, a dead node). A table's own timers fire at the exact deadline.
    pub sweep_interval: Duration,
    /// How long an ended, fully released session stays in a table, so that a late, repeated
    /// end still gets the idempotent answer from memory.
    pub retention: Duration,
    /// The wait before retrying a release that failed once; it doubles per failure.
    pub release_backoff_initial: Duration,
    /// The longest wait between two release attempts.
    pub release_backoff_max: Duration,
}

/// Why a [`Policy`] cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyError {
    /// A timeout that must be positive is zero (it would make a poll loop spin).
    ZeroDuration,
    /// `release_backoff_max` is shorter than `release_backoff_initial`.
    BackoffInverted,
}

impl core::error::Error for PolicyError {}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyError::ZeroDuration => {
                "orphan timeout, sweep interval and release backoff must be positive"
            }
            PolicyError::BackoffInverted => "release backoff max is shorter than its initial wait",
        })
    }
}

impl Policy {
    /// Defaults that meet the contract's 3-minute orphan bound: an orphan is detected at most
    /// 15 s after its liveness lapses past the 60 s timeout, and a failed release is retried
    /// at least every 8 s.
    pub const DEFAULT: Policy = Policy {
        orphan_timeout: Duration::from_secs(60),
        sweep_interval: Duration::from_secs(15),
        retention: Duration::from_secs(600),
        release_backoff_initial: Duration::from_millis(250),
        release_backoff_max: Duration::from_secs(8),
    };

    /// Checks that the policy cannot spin a poll loop or invert its backoff.
    pub const fn validate(&self) -> Result<(), PolicyError> {
        if self.orphan_timeout.is_zero()
            || self.sweep_interval.is_zero()
            || self.release_backoff_initial.as_millis() == 0
        {
            return Err(PolicyError::ZeroDuration);
        }
        if self.release_backoff_max.as_millis() < self.release_backoff_initial.as_millis() {
            return Err(PolicyError::BackoffInverted);
        }
        Ok(())
    }

    /// The longest time from a session's last liveness signal to the moment it is ended and
    /// its resources released, if releases succeed within [`RELEASE_ALLOWANCE`]: the orphan
    /// timeout, one sweep interval to notice, the allowance, and one backoff step of slack
    /// for a release that failed just before it could succeed.
    ///
    /// This counts from the last signal, which is stricter than the contract's "from the
    /// moment it became orphaned".
    pub const fn orphan_cleanup_bound(&self) -> Duration {
        self.orphan_timeout
            .saturating_add(self.sweep_interval)
            .saturating_add(RELEASE_ALLOWANCE)
            .saturating_add(self.release_backoff_max)
    }

    /// The wait after the `attempts`-th failed release: the initial backoff doubled per
    /// earlier failure, capped at the maximum.
    pub fn release_backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(31);
        self.release_backoff_initial
            .saturating_mul(1u32 << doublings)
            .min(self.release_backoff_max)
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::DEFAULT
    }
}

const _: () = {
    assert!(Policy::DEFAULT.validate().is_ok());
    assert!(
        Policy::DEFAULT.orphan_cleanup_bound().as_millis() <= CONTRACT_ORPHAN_BOUND.as_millis()
    );
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = Policy::DEFAULT;
        assert_eq!(p.release_backoff(1), Duration::from_millis(250));
        assert_eq!(p.release_backoff(2), Duration::from_millis(500));
        assert_eq!(p.release_backoff(6), Duration::from_secs(8));
        assert_eq!(p.release_backoff(u32::MAX), Duration::from_secs(8));
    }

    #[test]
    fn invalid_policies_are_refused() {
        let zero = Policy {
            release_backoff_initial: Duration::ZERO,
            ..Policy::DEFAULT
        };
        assert_eq!(zero.validate(), Err(PolicyError::ZeroDuration));
        let inverted = Policy {
            release_backoff_max: Duration::from_millis(1),
            ..Policy::DEFAULT
        };
        assert_eq!(inverted.validate(), Err(PolicyError::BackoffInverted));
    }

    #[test]
    fn default_meets_the_contract_bound() {
        assert!(Policy::DEFAULT.orphan_cleanup_bound() <= CONTRACT_ORPHAN_BOUND);
    }
}
