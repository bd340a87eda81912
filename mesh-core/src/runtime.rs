//! The data path's runtime, built the same way by both proxies.
//!
//! With one worker it is tokio's single-threaded runtime: a connection's
//! splice, its HTTP/2 connection and its sockets are all driven by one
//! thread, so a request costs no wake-up of a second thread and no futex
//! hand-off between workers (the profile mode of the benchmark shows both).
//! With more it is the work-stealing runtime, which spreads connections
//! over that many CPUs. The default is two workers, as ztunnel's: the
//! agent's share of a node stays bounded on large nodes, and one busy
//! connection never stalls the rest.

/// The `--worker-threads` flag, shared by both binaries.
#[cfg(feature = "cli")]
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Threads that carry connections: `1` runs everything on one thread
    /// (the least CPU per request); `0` means one per CPU.
    #[arg(long, env = "SLUICE_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,
}

#[cfg(feature = "cli")]
impl RuntimeArgs {
    /// Build the runtime these flags describe.
    pub fn build(&self) -> std::io::Result<tokio::runtime::Runtime> {
        build(self.worker_threads)
    }
}

/// Build the runtime: `workers == 1` is the single-threaded runtime, `0`
/// the work-stealing one with a worker per CPU, `n` with `n` workers.
pub fn build(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder.enable_all().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_worker_is_the_single_threaded_runtime() {
        use tokio::runtime::RuntimeFlavor;
        let flavor = |n| build(n).unwrap().handle().runtime_flavor();
        assert_eq!(flavor(1), RuntimeFlavor::CurrentThread);
        assert_eq!(flavor(0), RuntimeFlavor::MultiThread);
        let rt = build(3).unwrap();
        assert_eq!(rt.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(rt.metrics().num_workers(), 3);
    }
}
