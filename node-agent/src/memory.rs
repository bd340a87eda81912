//! Giving memory back once connections are gone. glibc's malloc keeps what
//! a burst of connections freed inside its arenas: after 10 000 tunnels
//! close, the agent would stay at the size it had while holding them. When
//! the number of open connections has fallen to half its peak (and by
//! many) since the last trim, the agent asks malloc to return its free pages
//! (`malloc_trim`). Steady traffic never triggers it.

use std::sync::Arc;
use std::time::Duration;

use crate::Ctx;

/// How often the connection count is looked at.
const EVERY: Duration = Duration::from_secs(2);

/// When to trim: connections open now against the most seen since the
/// last trim.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    peak: usize,
}

impl TrimPolicy {
    /// Fewer than this many closed since the peak is not worth a trim.
    const MIN_CLOSED: usize = 256;

    /// Note `open` connections; true when memory should be trimmed now.
    pub fn observe(&mut self, open: usize) -> bool {
        self.peak = self.peak.max(open);
        let closed = self.peak - open;
        if closed >= Self::MIN_CLOSED && open <= self.peak / 2 {
            self.peak = open;
            return true;
        }
        false
    }
}

/// Follow the agent's connection count and trim after large drops.
pub async fn give_back(ctx: Arc<Ctx>) {
    let mut policy = TrimPolicy::default();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if policy.observe(ctx.limiter.active()) {
            // It walks every arena: off the data path's threads.
            let _ = tokio::task::spawn_blocking(trim).await;
        }
    }
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator that
    // all of the process's allocations go through; it has no preconditions.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released = released == 1, "freed memory given back");
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_many_connections_close() {
        let mut p = TrimPolicy::default();
        // Ramp up and steady traffic: never.
        for open in [0, 10, 5_000, 10_000, 9_900, 10_000] {
            assert!(!p.observe(open), "{open}");
        }
        // A small dip is not a drop.
        assert!(!p.observe(6_000));
        // Down to under half: trim, once.
        assert!(p.observe(100));
        assert!(!p.observe(100));
        assert!(!p.observe(0), "100 more closed is not many");
    }

    #[test]
    fn a_small_agent_is_left_alone() {
        let mut p = TrimPolicy::default();
        for open in [0, 200, 0, 200, 0] {
            assert!(!p.observe(open));
        }
    }
}
