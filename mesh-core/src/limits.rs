//! Bounds on what a proxy holds at once: connection slots (every accepted
//! connection and every tunnel inside an HBONE connection) and handshake
//! slots (TLS handshakes in progress). When the slots are gone the excess
//! is refused at once instead of queued, so a connection flood or peers
//! that never finish their handshake cost a bounded amount of memory and
//! never starve established traffic. The node agent and the waypoint both
//! use it; the same count tells a graceful drain when the last connection
//! is done.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Configured bounds (flags `--max-connections`, `--max-pending-handshakes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections and tunnels served at once.
    pub max_connections: usize,
    /// Inbound TLS handshakes in progress at once; a peer that connects and
    /// never finishes its handshake holds one until the handshake timeout.
    pub max_pending_handshakes: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            max_pending_handshakes: 1_024,
        }
    }
}

/// The slots themselves, shared by every listener of the agent.
pub struct Limiter {
    limits: ConnectionLimits,
    connections: Arc<Semaphore>,
    handshakes: Arc<Semaphore>,
    warned: RateLimitedWarning,
}

/// Held for as long as a connection (or tunnel, or handshake) lives.
pub type Slot = OwnedSemaphorePermit;

impl Limiter {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            handshakes: Arc::new(Semaphore::new(limits.max_pending_handshakes)),
            warned: RateLimitedWarning::default(),
        }
    }

    /// A connection slot, or `None` at the limit (the caller refuses).
    pub fn connection(&self) -> Option<Slot> {
        self.connections.clone().try_acquire_owned().ok()
    }

    /// A handshake slot, or `None` at the limit.
    pub fn handshake(&self) -> Option<Slot> {
        self.handshakes.clone().try_acquire_owned().ok()
    }

    /// Connections and tunnels being served now.
    pub fn active(&self) -> usize {
        self.limits.max_connections - self.connections.available_permits()
    }

    /// The waiting part of a graceful drain (listeners already closed):
    /// until every connection slot is back or `period` is over. Logs the
    /// start and the end; returns how many connections were still open.
    pub async fn drain(&self, period: std::time::Duration) -> usize {
        let started = tokio::time::Instant::now();
        tracing::info!(
            open = self.active(),
            period_ms = period.as_millis() as u64,
            "draining: listeners closed, waiting for established connections"
        );
        let deadline = started + period;
        while self.active() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let left = self.active();
        tracing::info!(
            left,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "drain over"
        );
        left
    }

    /// TLS handshakes in progress now.
    pub fn pending_handshakes(&self) -> usize {
        self.limits.max_pending_handshakes - self.handshakes.available_permits()
    }

    /// Log one refusal at a limit (the caller counts it in its metrics);
    /// the log line is written at most once a second (with how many were
    /// refused since), so a flood cannot flood the log too.
    pub fn log_refusal(&self, direction: &'static str, reason: &'static str) {
        if let Some(since_last) = self.warned.due() {
            tracing::warn!(
                direction,
                reason,
                refused = since_last,
                max_connections = self.limits.max_connections,
                max_pending_handshakes = self.limits.max_pending_handshakes,
                "at a connection limit: refusing new connections"
            );
        }
    }
}

#[derive(Default)]
struct RateLimitedWarning {
    /// Milliseconds since `origin` of the last warning, plus one (0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
    origin: std::sync::OnceLock<Instant>,
}

impl RateLimitedWarning {
    /// `Some(refusals since the last warning)` when a warning is due.
    fn due(&self) -> Option<u64> {
        let origin = *self.origin.get_or_init(Instant::now);
        let now = origin.elapsed().as_millis() as u64 + 1;
        let count = self.suppressed.fetch_add(1, Ordering::Relaxed) + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + 1000 {
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        self.suppressed.fetch_sub(count, Ordering::Relaxed);
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn slots_are_bounded_and_come_back() {
        let l = Limiter::new(ConnectionLimits {
            max_connections: 2,
            max_pending_handshakes: 1,
        });
        let a = l.connection().unwrap();
        let _b = l.connection().unwrap();
        assert!(l.connection().is_none());
        assert_eq!(l.active(), 2);
        drop(a);
        assert_eq!(l.active(), 1);
        assert!(l.connection().is_some());
        let h = l.handshake().unwrap();
        assert!(l.handshake().is_none());
        drop(h);
        assert!(l.handshake().is_some());
    }

    #[test]
    fn warnings_are_rate_limited_and_count_what_they_skipped() {
        let w = RateLimitedWarning::default();
        assert_eq!(w.due(), Some(1));
        for _ in 0..99 {
            assert_eq!(w.due(), None);
        }
        // A second later the next warning reports the 99 skipped and itself.
        std::thread::sleep(Duration::from_millis(1001));
        assert_eq!(w.due(), Some(100));
    }
}
