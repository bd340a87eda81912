//! The moment a proxy begins its graceful shutdown: set once by the drain,
//! read by the accept loops, the admin endpoints and every tunnel that
//! must say goodbye (GOAWAY, `connection: close`). Both binaries hold one.

use std::future::Future;

use tokio::sync::watch;

/// A one-way latch: not begun, then begun for good.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown(watch::channel(false).0)
    }
}

impl Shutdown {
    /// Begin the shutdown (again is harmless).
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// True once the shutdown has begun.
    pub fn has_begun(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when the shutdown begins (at once if it has); owns what
    /// it needs, so it can be awaited in a spawned task.
    pub fn begun(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_wake_when_it_begins_and_late_ones_at_once() {
        let s = Shutdown::default();
        assert!(!s.has_begun());
        let early = tokio::spawn(s.begun());
        s.begin();
        early.await.unwrap();
        assert!(s.has_begun());
        s.begun().await;
        s.begin();
        assert!(s.has_begun());
    }
}
