//! A runtime of its own for what must never compete with the data path (or
//! stall with it): the proxies' admin, metrics and health endpoints run on
//! a single-threaded runtime on a dedicated OS thread, so a slow scrape or
//! a large dump never delays a connection, and a stuck data path still gets
//! its liveness probe answered "not alive".

use std::future::Future;

use tokio::sync::oneshot;

/// The thread; its work stops when this is stopped or dropped.
pub struct SideRuntime {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SideRuntime {
    /// Run `work()` on a new thread named `name` until stopped.
    pub fn start<F, Fut>(name: &str, work: F) -> std::io::Result<Self>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::select! {
                        () = work() => {}
                        _ = rx => {}
                    }
                });
            })?;
        Ok(Self {
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Stop the work and wait for the thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_runs_on_its_own_thread_until_stopped() {
        let (tx, rx) = std::sync::mpsc::channel();
        let side = SideRuntime::start("side-test", move || async move {
            tx.send(std::thread::current().name().map(str::to_string))
                .unwrap();
            std::future::pending::<()>().await
        })
        .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("side-test"));
        // Stopping returns although the work never ends on its own.
        side.stop();
    }
}
