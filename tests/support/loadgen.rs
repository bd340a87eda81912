//! Load generation and accounting for `sluice-bench`: an open-loop HTTP/1.1
//! generator that measures latency from each request's *intended* send time
//! (so a stall delays every request scheduled behind it, as users see it,
//! instead of silently lowering the rate — no coordinated omission), bulk
//! TCP throughput, connection rate, and CPU/memory of processes from /proc.
//! The servers these talk to run in-process, inside a pod's namespace.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::netns::Pod;

/// Enter `pod`'s network namespace on the calling thread (threads it then
/// spawns inherit it).
pub fn enter(pod: &Pod) {
    use std::os::fd::AsFd;
    let path = format!("/var/run/netns/{}", pod.ns);
    let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Counters of the servers in one pod.
#[derive(Default)]
pub struct ServerStats {
    /// Bytes received by the sink (bulk throughput).
    pub sunk: AtomicU64,
}

/// The benchmark's servers inside `pod`, on a runtime of their own:
/// HTTP/1.1 keep-alive on `http` (reads the body, answers `ok`), a sink on
/// `sink` (reads and discards) and an echo on `echo` (connection rate and
/// idle connections).
pub fn serve_in(pod: &Pod, http: u16, sink: u16, echo: u16) -> Arc<ServerStats> {
    let stats = Arc::new(ServerStats::default());
    let (pod, st) = (pod.clone(), stats.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter(&pod);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let bind = |port| {
                let addr = SocketAddr::new(pod.ip, port);
                let s = tokio::net::TcpSocket::new_v4().unwrap();
                s.set_reuseaddr(true).unwrap();
                s.bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                s.listen(4096).unwrap()
            };
            let (h, k, e) = (bind(http), bind(sink), bind(echo));
            tokio::spawn(http_server(h));
            tokio::spawn(sink_server(k, st));
            tokio::spawn(echo_server(e));
            tx.send(()).unwrap();
            std::future::pending::<()>().await
        });
    });
    rx.recv().expect("servers started");
    stats
}

async fn http_server(l: tokio::net::TcpListener) {
    use http_body_util::{BodyExt, Full};
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async {
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        bytes::Bytes::from_static(b"ok"),
                    )))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn sink_server(l: tokio::net::TcpListener, stats: Arc<ServerStats>) {
    use tokio::io::AsyncReadExt;
    loop {
        let Ok((mut tcp, _)) = l.accept().await else {
            continue;
        };
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    return;
                }
                stats.sunk.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
}

async fn echo_server(l: tokio::net::TcpListener) {
    loop {
        let Ok((tcp, _)) = l.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut r, mut w) = tcp.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// One fixed-rate run's result.
pub struct LatencyRun {
    /// Latency from intended send time to the end of the response, in
    /// nanoseconds.
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub sent: u64,
}

/// Open-loop HTTP/1.1: `rate` requests per second spread evenly over
/// `conns` keep-alive connections from `pod` to `dst`, each a POST with a
/// `payload`-byte body, for `duration`.
pub fn fixed_rate(
    pod: &Pod,
    dst: SocketAddr,
    host: &str,
    rate: u32,
    duration: Duration,
    conns: usize,
    payload: usize,
) -> LatencyRun {
    let mut req = format!(
        "POST /bench HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/octet-stream\r\ncontent-length: {payload}\r\n\r\n"
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(b'x', payload));
    let req = Arc::new(req);
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Arc::new(Barrier::new(conns + 1));
    let t0 = Arc::new(std::sync::OnceLock::<Instant>::new());
    let workers: Vec<_> = (0..conns)
        .map(|c| {
            let (pod, req, start, t0) = (pod.clone(), req.clone(), start.clone(), t0.clone());
            std::thread::spawn(move || {
                enter(&pod);
                // Sleep precisely: the default 50 µs timer slack would add
                // itself to every send time.
                // SAFETY: PR_SET_TIMERSLACK takes integer arguments only and
                // affects this thread alone.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
                let mut hist = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3).unwrap();
                let (mut errors, mut sent) = (0u64, 0u64);
                let mut conn = connect(dst);
                start.wait();
                let t0 = *t0.wait();
                let end = t0 + duration;
                let mut buf = vec![0u8; 64 << 10];
                for k in 0u64.. {
                    let intended = t0 + period * (k as u32 * conns as u32 + c as u32);
                    if intended >= end {
                        break;
                    }
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    sent += 1;
                    let ok = match conn.as_mut() {
                        Some(s) => exchange(s, &req, &mut buf),
                        None => false,
                    };
                    if ok {
                        let _ = hist.record(intended.elapsed().as_nanos() as u64);
                    } else {
                        errors += 1;
                        conn = connect(dst);
                    }
                }
                (hist, errors, sent)
            })
        })
        .collect();
    // Every connection is open before the clock starts.
    start.wait();
    t0.set(Instant::now() + Duration::from_millis(20)).unwrap();
    let mut run = LatencyRun {
        hist: Histogram::new_with_bounds(1_000, 60_000_000_000, 3).unwrap(),
        errors: 0,
        sent: 0,
    };
    for w in workers {
        let (h, e, s) = w.join().expect("load thread");
        run.hist.add(h).unwrap();
        run.errors += e;
        run.sent += s;
    }
    run
}

fn connect(dst: SocketAddr) -> Option<std::net::TcpStream> {
    let s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5)).ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    Some(s)
}

/// Send one request and read one whole `200` response.
fn exchange(s: &mut std::net::TcpStream, req: &[u8], buf: &mut [u8]) -> bool {
    if s.write_all(req).is_err() {
        return false;
    }
    let mut have = 0;
    loop {
        let Ok(n) = s.read(&mut buf[have..]) else {
            return false;
        };
        if n == 0 {
            return false;
        }
        have += n;
        let Some(end) = find(&buf[..have], b"\r\n\r\n") else {
            if have == buf.len() {
                return false;
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return false;
        }
        let body_have = have - end - 4;
        if let Some(len) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            let mut left = len.saturating_sub(body_have);
            while left > 0 {
                let room = left.min(buf.len());
                match s.read(&mut buf[..room]) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => left -= n,
                }
            }
            return true;
        }
        // Chunked: read until the last chunk.
        let mut tail = buf[end + 4..have].to_vec();
        while !tail.ends_with(b"0\r\n\r\n") {
            match s.read(buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => tail.extend_from_slice(&buf[..n]),
            }
        }
        return true;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Bulk throughput in bits per second: `streams` connections from `pod`
/// writing to the sink at `dst` for `duration`, counted at the receiver
/// after a half-second ramp.
pub fn bulk(
    pod: &Pod,
    dst: SocketAddr,
    streams: usize,
    duration: Duration,
    stats: &ServerStats,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..streams)
        .map(|_| {
            let (pod, stop) = (pod.clone(), stop.clone());
            std::thread::spawn(move || {
                enter(&pod);
                let Ok(mut s) = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))
                else {
                    return;
                };
                let chunk = vec![0x5au8; 256 << 10];
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (b0, t0) = (stats.sunk.load(Ordering::Relaxed), Instant::now());
    std::thread::sleep(duration);
    let (b1, t1) = (stats.sunk.load(Ordering::Relaxed), Instant::now());
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    (b1 - b0) as f64 * 8.0 / (t1 - t0).as_secs_f64()
}

/// New connections per second: `threads` loops of connect, one byte there
/// and back, close, for `duration`.
pub fn connection_rate(
    pod: &Pod,
    dst: SocketAddr,
    threads: usize,
    duration: Duration,
) -> (f64, u64) {
    let end = Instant::now() + duration;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let pod = pod.clone();
            std::thread::spawn(move || {
                enter(&pod);
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    let done = (|| -> std::io::Result<()> {
                        let mut s =
                            std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    })();
                    if done.is_ok() {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let start = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.join().expect("connection thread");
        ok += o;
        failed += f;
    }
    (
        ok as f64 / start.elapsed().as_secs_f64().max(duration.as_secs_f64()),
        failed,
    )
}

/// Hold `n` connections from `pod` to the echo at `dst` (each proven end
/// to end with one byte) until the returned guard is dropped.
pub fn idle_connections(pod: &Pod, dst: SocketAddr, n: usize) -> (IdleGuard, usize) {
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = Arc::new(tokio::sync::Notify::new());
    let pod = pod.clone();
    let s2 = stop.clone();
    let handle = std::thread::spawn(move || {
        enter(&pod);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            use futures::StreamExt;
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let conns: Vec<_> = futures::stream::iter(0..n)
                .map(|_| async move {
                    let mut s = tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio::net::TcpStream::connect(dst),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    s.write_all(b"x").await.ok()?;
                    let mut b = [0u8; 1];
                    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
                        .await
                        .ok()?
                        .ok()?;
                    Some(s)
                })
                .buffer_unordered(256)
                .filter_map(|s| async move { s })
                .collect()
                .await;
            tx.send(conns.len()).unwrap();
            s2.notified().await;
            drop(conns);
        });
    });
    let opened = rx.recv().expect("idle connections opened");
    (
        IdleGuard {
            stop,
            handle: Some(handle),
        },
        opened,
    )
}

/// Closes the idle connections when dropped.
pub struct IdleGuard {
    stop: Arc<tokio::sync::Notify>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Time of `n` connect() calls from `pod` to `dst` (closed at once), as a
/// histogram in nanoseconds: the capture path's cost per new connection.
pub fn connect_latency(pod: &Pod, dst: SocketAddr, n: usize) -> Histogram<u64> {
    let pod = pod.clone();
    std::thread::spawn(move || {
        enter(&pod);
        let mut h = Histogram::<u64>::new_with_bounds(100, 10_000_000_000, 3).unwrap();
        for _ in 0..n {
            let t = Instant::now();
            if let Ok(s) = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5)) {
                let _ = h.record(t.elapsed().as_nanos() as u64);
                drop(s);
            }
        }
        h
    })
    .join()
    .expect("connect thread")
}

/// CPU time (user + system) of process `pid` so far, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line.
    // SAFETY: sysconf reads a constant of the system; no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

/// A memory figure of process `pid` from /proc/<pid>/status (`VmRSS`, or
/// `VmHWM` for the peak), in bytes.
pub fn memory(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Start a new peak-RSS window for `pid` (`VmHWM` restarts from `VmRSS`).
pub fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}
