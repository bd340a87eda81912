//! `sluice-bench` (`cargo xtask bench`, as root): what Sluice adds per node,
//! measured in the demo's namespace topology (two nodes, client pods on
//! one, server pods on the other) side by side with the same traffic and no
//! mesh at all:
//!
//! - latency at a fixed rate (open loop, from intended send times,
//!   HdrHistogram) for direct, L4 (agents + HBONE) and L7 (a waypoint), and
//!   the added latency at each percentile;
//! - CPU and peak memory of each agent and the waypoint during those runs,
//!   per 1000 req/s;
//! - bulk throughput (1 and 16 streams) and new connections per second,
//!   direct and L4;
//! - agent memory with many idle tunnelled connections, and enrollment time
//!   and capture cost with 1, 100 and 1000 enrolled pods.
//!
//! Each measurement is repeated (default 3) and reported as the median with
//! its spread. Results: `target/bench/report.md`, `report.json` and
//! `latency.svg`. With `--profile`, instead: where the proxies spend their
//! time (see `profile.rs`).

mod profile;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use sluice_tests::loadgen::{self, LatencyRun};
use sluice_tests::netns::{e2e_available, Topology};
use sluice_tests::write_atomic;

static TOPOLOGY: Mutex<Option<Topology>> = Mutex::new(None);

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    about = "Per-node cost of the mesh, side by side with no mesh"
)]
struct Args {
    /// Requests per second of the fixed-rate runs.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Length of each fixed-rate run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Keep-alive connections the rate is spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Request body size in bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Runs of each measurement (the report gives the median and spread).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Length of each throughput and connection-rate run.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    throughput_duration: Duration,
    /// Idle tunnelled connections for the memory-at-scale measurement.
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Enrolled-pod counts for the enrollment measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    scale_pods: Vec<usize>,
    /// Skip throughput and scale (latency and cost only).
    #[arg(long)]
    latency_only: bool,
    /// Instead of the benchmark, a soak: L4 and L7 traffic at `--rate`
    /// plus connection churn for this long, sampling each proxy's memory
    /// every 10 s; fails when memory keeps growing or requests fail
    /// (`cargo xtask soak`).
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Instead of the benchmark, profile the proxies at the fixed rate:
    /// per-request counters and flame graphs for the L4 and L7 paths
    /// (`profile.md` and `profile-*.svg`; needs `perf`).
    #[arg(long)]
    profile: bool,
    /// Where the report goes.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Internal: run as the idle connections' echo server.
    #[arg(long, hide = true)]
    echo_server_in: Option<String>,
}

const MESH_BASE: &str = r#"services:
  - name: echo-l7
    namespace: bench
    vips: ["10.96.0.40"]
    ports: [{port: 80, targetPort: 8080}]
    selector: {app: server}
    labels: {istio.io/use-waypoint: waypoint}
gateways:
  - metadata: {name: waypoint, namespace: bench}
    spec: {gatewayClassName: istio-waypoint}
"#;

/// One way from the client side to a server.
struct Path {
    name: &'static str,
    label: &'static str,
    from: &'static str,
    dst: SocketAddr,
    host: &'static str,
}

/// Percentiles reported, and their labels.
const QUANTILES: [(f64, &str); 4] = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];

fn percentiles_us(run: &LatencyRun) -> Vec<f64> {
    let mut v: Vec<f64> = QUANTILES
        .iter()
        .map(|(q, _)| run.hist.value_at_quantile(*q) as f64 / 1000.0)
        .collect();
    v.push(run.hist.max() as f64 / 1000.0);
    v
}

/// Median, min and max of a set of runs.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    (median, s[0], s[n - 1])
}

fn spread_json(v: &[f64]) -> Value {
    let (m, lo, hi) = spread(v);
    json!({"median": m, "min": lo, "max": hi, "runs": v})
}

fn fmt_spread(v: &[f64], digits: usize) -> String {
    let (m, lo, hi) = spread(v);
    if v.len() == 1 {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ({lo:.digits$}–{hi:.digits$})")
    }
}

fn with_topology<T>(f: impl FnOnce(&mut Topology) -> T) -> T {
    let mut guard = TOPOLOGY.lock().unwrap_or_else(|p| p.into_inner());
    let t = guard.as_mut().expect("topology");
    f(t)
}

/// Open files: as many as allowed (agents and helpers inherit it).
fn raise_fd_limit() -> u64 {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut cur);
        let want = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return 1 << 20;
        }
        // Without CAP_SYS_RESOURCE: up to the hard limit.
        cur.rlim_cur = cur.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &cur);
    }
    cur.rlim_max
}

/// `--echo-server-in <netns>,<ip:port>`: this binary as a separate echo
/// process, so the idle connections' two ends do not share one process's
/// open-file limit.
fn echo_server_process(spec: &str) -> ! {
    let (ns, addr) = spec.split_once(',').expect("netns,ip:port");
    let addr: SocketAddr = addr.parse().expect("ip:port");
    let pod = sluice_tests::netns::Pod {
        name: "echo".into(),
        ns: ns.into(),
        ip: addr.ip(),
        ip6: addr.ip(),
        node: String::new(),
    };
    loadgen::enter(&pod);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    })
}

fn main() {
    let args = Args::parse();
    if let Some(spec) = &args.echo_server_in {
        raise_fd_limit();
        echo_server_process(spec);
    }
    if !e2e_available() {
        eprintln!("the benchmark needs root, the agent binary and the eBPF object: run `cargo xtask bench` as root");
        std::process::exit(2);
    }
    let fds = raise_fd_limit();
    if (fds as usize) < args.idle_connections + 2000 {
        eprintln!(
            "note: open-file limit {fds} may cap the idle connections below {}",
            args.idle_connections
        );
    }
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: cleaning up");
        drop(TOPOLOGY.lock().unwrap_or_else(|p| p.into_inner()).take());
        std::process::exit(130);
    })
    .expect("Ctrl-C handler");
    std::fs::create_dir_all(&args.out).expect("output directory");

    eprintln!("setting up: 2 nodes, client and server pods with and without the mesh, a waypoint");
    let mut t = Topology::new();
    t.reload_interval = "20ms";
    t.add_node("node-a");
    t.add_node("node-b");
    t.add_pod("node-a", "client", 1);
    t.add_pod("node-a", "plain-client", 2);
    t.add_pod("node-a", "waypoint", 5);
    t.add_pod("node-b", "server", 1);
    t.add_pod("node-b", "plain-server", 2);
    write_atomic(&t.mesh_file(), &mesh_yaml(&t, &[]));
    // Connection-rate runs close tens of thousands of connections: let new
    // ones reuse ports still in TIME_WAIT, as load generators do.
    for p in &t.pods {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &p.ns,
                "sysctl",
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
            ])
            .status();
        if !out.is_ok_and(|s| s.success()) {
            eprintln!("warning: tcp_tw_reuse not set in {}", p.ns);
        }
    }
    let server_stats = loadgen::serve_in(t.pod("server"), 8080, 9000, 9001);
    let plain_stats = loadgen::serve_in(t.pod("plain-server"), 8080, 9000, 9001);
    t.start_agent("node-a");
    t.start_agent("node-b");
    t.start_waypoint("waypoint", "bench/waypoint");
    let (server_ip, plain_ip) = (t.pod("server").ip, t.pod("plain-server").ip);
    *TOPOLOGY.lock().unwrap() = Some(t);

    let paths = [
        Path {
            name: "direct",
            label: "direct (no mesh)",
            from: "plain-client",
            dst: SocketAddr::new(plain_ip, 8080),
            host: "plain-server",
        },
        Path {
            name: "l4",
            label: "L4: agents + HBONE",
            from: "client",
            dst: SocketAddr::new(server_ip, 8080),
            host: "server",
        },
        Path {
            name: "l7",
            label: "L7: + waypoint",
            from: "client",
            dst: "10.96.0.40:80".parse().unwrap(),
            host: "echo-l7.bench.svc.cluster.local",
        },
    ];
    let pod = |name: &str| with_topology(|t| t.pod(name).clone());
    let pids = with_topology(|t| {
        vec![
            ("agent node-a", t.agent_pid("node-a").unwrap()),
            ("agent node-b", t.agent_pid("node-b").unwrap()),
            ("waypoint", t.waypoint_pids()[0]),
        ]
    });

    // Warm-up: connections, pools, caches, the waypoint's upstreams.
    for p in &paths {
        let run = fixed_rate(&args, &pod(p.from), p, Duration::from_secs(1));
        if run.errors > 0 || run.sent == 0 {
            eprintln!(
                "{}: {} of {} warm-up requests failed — is the path working?",
                p.name, run.errors, run.sent
            );
        }
    }

    if args.profile {
        let code = match run_profile(&args, &paths, &pids, &pod) {
            Ok(report) => {
                eprintln!("written: {}", report.display());
                0
            }
            Err(e) => {
                eprintln!("profile failed: {e}");
                1
            }
        };
        drop(TOPOLOGY.lock().unwrap_or_else(|p| p.into_inner()).take());
        std::process::exit(code);
    }

    if let Some(length) = args.soak {
        let flat = soak(
            &args,
            length,
            &paths,
            &pids,
            SocketAddr::new(server_ip, 9001),
        );
        drop(TOPOLOGY.lock().unwrap_or_else(|p| p.into_inner()).take());
        std::process::exit(if flat { 0 } else { 1 });
    }

    // Fixed rate: scenarios interleaved per repeat, so slow drift of the
    // machine spreads over all of them.
    let mut latency: Vec<Vec<Vec<f64>>> = vec![vec![]; paths.len()]; // [path][run][quantile]
    let mut errors = vec![0u64; paths.len()];
    // (vCPU per 1000 req/s, peak RSS MB, private (anonymous) RSS MB)
    let mut cost: Vec<Vec<(f64, f64, f64)>> = vec![vec![]; paths.len() * pids.len()];
    let mut median_runs: Vec<Option<LatencyRun>> = (0..paths.len()).map(|_| None).collect();
    for rep in 0..args.repeats {
        for (i, p) in paths.iter().enumerate() {
            eprintln!(
                "fixed rate {}/{}: {} at {} req/s for {:?}",
                rep + 1,
                args.repeats,
                p.name,
                args.rate,
                args.duration
            );
            let cpu0: Vec<f64> = pids
                .iter()
                .map(|(_, pid)| loadgen::cpu_seconds(*pid))
                .collect();
            for (_, pid) in &pids {
                loadgen::reset_peak(*pid);
            }
            let wall = Instant::now();
            let run = fixed_rate(&args, &pod(p.from), p, args.duration);
            let wall = wall.elapsed().as_secs_f64();
            for (j, (_, pid)) in pids.iter().enumerate() {
                let vcpu = (loadgen::cpu_seconds(*pid) - cpu0[j]) / wall;
                let peak_mb = loadgen::memory(*pid, "VmHWM") as f64 / 1e6;
                let anon_mb = loadgen::memory(*pid, "RssAnon") as f64 / 1e6;
                cost[i * pids.len() + j].push((vcpu * 1000.0 / args.rate as f64, peak_mb, anon_mb));
            }
            errors[i] += run.errors;
            latency[i].push(percentiles_us(&run));
            // Keep the run whose p99 is the median for the plot.
            if rep == args.repeats / 2 {
                median_runs[i] = Some(run);
            }
        }
    }

    let mut report = json!({
        "config": {
            "rate": args.rate, "duration_s": args.duration.as_secs_f64(),
            "connections": args.connections, "payload_bytes": args.payload,
            "repeats": args.repeats,
        },
        "machine": machine(),
    });
    let qnames: Vec<&str> = QUANTILES.iter().map(|(_, n)| *n).chain(["max"]).collect();
    let per_quantile =
        |runs: &[Vec<f64>], q: usize| -> Vec<f64> { runs.iter().map(|r| r[q]).collect() };
    let mut lat_json = serde_json::Map::new();
    let mut added_json = serde_json::Map::new();
    for (i, p) in paths.iter().enumerate() {
        let mut m = serde_json::Map::new();
        for (q, name) in qnames.iter().enumerate() {
            m.insert(name.to_string(), spread_json(&per_quantile(&latency[i], q)));
        }
        m.insert("errors".into(), json!(errors[i]));
        lat_json.insert(p.name.into(), Value::Object(m));
        if i > 0 {
            let mut a = serde_json::Map::new();
            for (q, name) in qnames.iter().enumerate() {
                // Added latency per run pair, then its median.
                let d: Vec<f64> = latency[i]
                    .iter()
                    .zip(&latency[0])
                    .map(|(mesh, direct)| mesh[q] - direct[q])
                    .collect();
                a.insert(name.to_string(), spread_json(&d));
            }
            added_json.insert(p.name.into(), Value::Object(a));
        }
    }
    report["latency_us"] = Value::Object(lat_json);
    report["added_latency_us"] = Value::Object(added_json);
    let mut cost_json = vec![];
    for (i, p) in paths.iter().enumerate() {
        for (j, (who, _)) in pids.iter().enumerate() {
            let c = &cost[i * pids.len() + j];
            let vcpu: Vec<f64> = c.iter().map(|x| x.0).collect();
            let mb: Vec<f64> = c.iter().map(|x| x.1).collect();
            let anon: Vec<f64> = c.iter().map(|x| x.2).collect();
            cost_json.push(json!({"path": p.name, "component": who,
                "vcpu_per_1000_rps": spread_json(&vcpu), "peak_rss_mb": spread_json(&mb),
                "anon_rss_mb": spread_json(&anon)}));
        }
    }
    report["cost"] = json!(cost_json);

    if !args.latency_only {
        // Throughput and connection rate, direct vs L4.
        let mut tp = serde_json::Map::new();
        for (name, from, dst_ip, stats) in [
            ("direct", "plain-client", plain_ip, &plain_stats),
            ("l4", "client", server_ip, &server_stats),
        ] {
            let (mut one, mut many, mut conns) = (vec![], vec![], vec![]);
            let mut failed = 0;
            for rep in 0..args.repeats {
                eprintln!("throughput {}/{}: {name}", rep + 1, args.repeats);
                let sink = SocketAddr::new(dst_ip, 9000);
                one.push(loadgen::bulk(&pod(from), sink, 1, args.throughput_duration, stats) / 1e9);
                many.push(
                    loadgen::bulk(&pod(from), sink, 16, args.throughput_duration, stats) / 1e9,
                );
                let (rate, f) = loadgen::connection_rate(
                    &pod(from),
                    SocketAddr::new(dst_ip, 9001),
                    4,
                    args.throughput_duration,
                );
                conns.push(rate);
                failed += f;
            }
            tp.insert(
                name.into(),
                json!({"single_stream_gbps": spread_json(&one), "streams16_gbps": spread_json(&many),
                       "new_connections_per_s": spread_json(&conns), "failed_connections": failed}),
            );
        }
        report["throughput"] = Value::Object(tp);
        report["idle_connections"] = idle_scale(&args, &pids, server_ip);
        report["enrollment"] = enrollment_scale(&args, pids[0].1, server_ip);
    }
    report["targets"] = targets(&report);

    let md = markdown(&report, &paths, &qnames);
    std::fs::write(args.out.join("report.md"), &md).expect("report.md");
    std::fs::write(
        args.out.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("report.json");
    let runs: Vec<(&str, &LatencyRun)> = paths
        .iter()
        .zip(&median_runs)
        .filter_map(|(p, r)| Some((p.label, r.as_ref()?)))
        .collect();
    if let Err(e) = plot(&args.out.join("latency.svg"), &runs) {
        eprintln!("latency plot: {e}");
    }
    println!("{md}");
    println!(
        "written: {}/report.md, report.json, latency.svg",
        args.out.display()
    );
    drop(TOPOLOGY.lock().unwrap().take());
}

/// The mesh file: the benchmark's pods, the waypoint's service, and
/// `extra` enrolled pods (name, IP) on node-a for the scale measurement.
/// The soak: windows of 10 s with L4 and L7 traffic at the fixed rate side
/// by side and a burst of new connections, then a memory sample of every
/// proxy. Memory is flat when the last sample is within 10 % (or 2 MB) of
/// the sample after the first fifth of the run (warm-up: pools, buffers,
/// allocator arenas). Writes soak.md and soak.json; true when flat and no
/// request failed.
fn soak(
    args: &Args,
    length: Duration,
    paths: &[Path],
    pids: &[(&str, u32)],
    churn_dst: SocketAddr,
) -> bool {
    const WINDOW: Duration = Duration::from_secs(10);
    const MB: f64 = 1024.0 * 1024.0;
    let windows = (length.as_secs_f64() / WINDOW.as_secs_f64())
        .ceil()
        .max(2.0) as usize;
    let pod = |name: &str| with_topology(|t| t.pod(name).clone());
    let traffic: Vec<(SocketAddr, &str, sluice_tests::netns::Pod)> = paths
        .iter()
        .filter(|p| p.name != "direct")
        .map(|p| (p.dst, p.host, pod(p.from)))
        .collect();
    let client = pod("client");
    let mut samples: Vec<(f64, Vec<u64>)> = vec![];
    let (mut sent, mut errors, mut churned, mut churn_failed) = (0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    eprintln!(
        "soak: {windows} windows of {WINDOW:?}: L4 and L7 at {} req/s each, plus connection churn",
        args.rate
    );
    for w in 0..windows {
        let runs: Vec<_> = traffic
            .iter()
            .map(|(dst, host, from)| {
                let (dst, host, from) = (*dst, host.to_string(), from.clone());
                let (rate, conns, payload) = (args.rate, args.connections, args.payload);
                std::thread::spawn(move || {
                    loadgen::fixed_rate(&from, dst, &host, rate, WINDOW, conns, payload)
                })
            })
            .collect();
        let (rate, failed) = loadgen::connection_rate(&client, churn_dst, 1, WINDOW / 5);
        churned += (rate * (WINDOW / 5).as_secs_f64()) as u64;
        churn_failed += failed;
        for r in runs {
            let r = r.join().expect("load thread");
            sent += r.sent;
            errors += r.errors;
        }
        let rss: Vec<u64> = pids
            .iter()
            .map(|(_, pid)| loadgen::memory(*pid, "VmRSS"))
            .collect();
        eprintln!(
            "soak {}/{windows}: RSS {}",
            w + 1,
            pids.iter()
                .zip(&rss)
                .map(|((n, _), b)| format!("{n} {:.1} MB", *b as f64 / MB))
                .collect::<Vec<_>>()
                .join(", ")
        );
        samples.push((started.elapsed().as_secs_f64(), rss));
    }
    let base = &samples[(samples.len() / 5).max(1) - 1].1;
    let last = &samples[samples.len() - 1].1;
    let mut flat = true;
    let mut rows = String::new();
    let mut procs = vec![];
    for (i, (name, _)) in pids.iter().enumerate() {
        let (b, l) = (base[i] as f64 / MB, last[i] as f64 / MB);
        let ok = l - b <= (b * 0.10).max(2.0);
        flat &= ok;
        rows.push_str(&format!(
            "| {name} | {b:.1} | {l:.1} | {:+.1} | {} |\n",
            l - b,
            if ok { "flat" } else { "GROWING" }
        ));
        procs.push(json!({"process": name, "after_warmup_mb": b, "end_mb": l, "flat": ok}));
    }
    let passed = flat && errors == 0;
    let md = format!(
        "# Soak\n\n{:.0} s of L4 and L7 traffic at {} req/s each ({} requests, {} failed) and {} new connections ({} failed).\n\n| process | RSS after warm-up (MB) | RSS at end (MB) | change (MB) | verdict |\n|---|---|---|---|---|\n{rows}\nFlat means the end is within 10 % (or 2 MB) of the sample after the first fifth of the run. Samples every {} s are in soak.json.\n\n**{}**\n",
        started.elapsed().as_secs_f64(),
        args.rate,
        sent,
        errors,
        churned,
        churn_failed,
        WINDOW.as_secs(),
        if passed { "PASS" } else { "FAIL" }
    );
    let report = json!({
        "seconds": started.elapsed().as_secs_f64(),
        "rate_per_path": args.rate,
        "requests": sent,
        "request_errors": errors,
        "new_connections": churned,
        "new_connection_errors": churn_failed,
        "processes": procs,
        "samples": samples.iter().map(|(t, rss)| json!({
            "t": t,
            "rss_bytes": pids.iter().zip(rss).map(|((n, _), b)| (n.to_string(), json!(b))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        "pass": passed,
    });
    std::fs::write(args.out.join("soak.md"), &md).expect("soak.md");
    std::fs::write(
        args.out.join("soak.json"),
        serde_json::to_string_pretty(&report).unwrap(),
    )
    .expect("soak.json");
    println!("{md}");
    passed
}

/// The fixed-rate load of `args` on path `p` from `from`.
fn fixed_rate(
    args: &Args,
    from: &sluice_tests::netns::Pod,
    p: &Path,
    duration: Duration,
) -> LatencyRun {
    loadgen::fixed_rate(
        from,
        p.dst,
        p.host,
        args.rate,
        duration,
        args.connections,
        args.payload,
    )
}

/// `--profile`: the L4 path with both agents, the L7 path with the
/// waypoint too, each at the fixed rate; `profile.md` under `--out`.
fn run_profile(
    args: &Args,
    paths: &[Path],
    pids: &[(&str, u32)],
    pod: &dyn Fn(&str) -> sluice_tests::netns::Pod,
) -> Result<PathBuf, String> {
    if !profile::available() {
        return Err("`perf` is not installed (Debian: linux-perf)".into());
    }
    let mut profiles = vec![];
    for p in paths.iter().filter(|p| p.name != "direct") {
        let components: Vec<profile::Component> = pids
            .iter()
            .filter(|(who, _)| p.name == "l7" || !who.starts_with("waypoint"))
            .map(|(name, pid)| profile::Component { name, pid: *pid })
            .collect();
        eprintln!("profile: {} ({} runs of {:?})", p.label, 2, args.duration);
        let from = pod(p.from);
        let load = || {
            let run = fixed_rate(args, &from, p, args.duration);
            if run.errors > 0 {
                eprintln!("{}: {} of {} requests failed", p.name, run.errors, run.sent);
            }
            run.sent
        };
        profiles.push(profile::profile_path(
            &args.out,
            p.name,
            p.label,
            &components,
            load,
        )?);
    }
    let report = args.out.join("profile.md");
    write_atomic(
        &report,
        &profile::markdown(&profiles, args.rate, args.duration.as_secs_f64()),
    );
    Ok(report)
}

fn mesh_yaml(t: &Topology, extra: &[(String, IpAddr)]) -> String {
    let mut y = String::from("nodes: [{name: node-a}, {name: node-b}]\nworkloads:\n");
    for p in t.pods.iter().filter(|p| !p.name.starts_with("scale-")) {
        let labels = match p.name.as_str() {
            "plain-client" | "plain-server" => {
                "app: plain, istio.io/dataplane-mode: none".to_string()
            }
            "waypoint" => {
                "gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none"
                    .to_string()
            }
            n => format!("app: {n}"),
        };
        y.push_str(&format!(
            "  - {{name: {n}, namespace: bench, serviceAccount: {n}, node: {node}, ips: [\"{ip}\"], netns: {ns}, labels: {{{labels}}}}}\n",
            n = p.name, node = p.node, ip = p.ip, ns = p.ns
        ));
    }
    for (name, ip) in extra {
        let ns = &t.pod(name).ns;
        y.push_str(&format!(
            "  - {{name: {name}, namespace: scale, serviceAccount: scale, node: node-a, ips: [\"{ip}\"], netns: {ns}, labels: {{app: scale}}}}\n"
        ));
    }
    y.push_str(MESH_BASE);
    y
}

fn machine() -> Value {
    let uname = std::process::Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    json!({"kernel": uname, "cpus": cpus, "cpu_model": model})
}

/// Agent memory and CPU with many idle tunnelled connections.
fn idle_scale(args: &Args, pids: &[(&str, u32)], server_ip: IpAddr) -> Value {
    eprintln!(
        "idle connections: opening {} through L4",
        args.idle_connections
    );
    let agents = &pids[..2];
    let before: Vec<u64> = agents
        .iter()
        .map(|(_, p)| loadgen::memory(*p, "VmRSS"))
        .collect();
    let (client, server_ns) =
        with_topology(|t| (t.pod("client").clone(), t.pod("server").ns.clone()));
    let echo = SocketAddr::new(server_ip, 9002);
    let mut holder = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--echo-server-in")
        .arg(format!("{server_ns},{echo}"))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("echo server process");
    std::thread::sleep(Duration::from_millis(300));
    let t_open = Instant::now();
    let (guard, opened) = loadgen::idle_connections(&client, echo, args.idle_connections);
    let open_s = t_open.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let cpu0: Vec<f64> = agents
        .iter()
        .map(|(_, p)| loadgen::cpu_seconds(*p))
        .collect();
    let idle_window = Duration::from_secs(5);
    std::thread::sleep(idle_window);
    let mut per_agent = vec![];
    let mut held = vec![];
    for (j, (who, pid)) in agents.iter().enumerate() {
        let after = loadgen::memory(*pid, "VmRSS");
        held.push(after);
        let vcpu = (loadgen::cpu_seconds(*pid) - cpu0[j]) / idle_window.as_secs_f64();
        per_agent.push(json!({
            "component": who,
            "rss_before_mb": before[j] as f64 / 1e6,
            "rss_after_mb": after as f64 / 1e6,
            "kb_per_connection": (after as f64 - before[j] as f64) / 1e3 / opened.max(1) as f64,
            "idle_vcpu": vcpu,
        }));
    }
    drop(guard);
    let _ = holder.kill();
    let _ = holder.wait();
    // Once they close: what each agent keeps. Sampled each second until
    // no new low for 5 s (the agents see the closes, free the tunnels and
    // give memory back on their own schedule), at most 30 s.
    let mut low = held.clone();
    let (started, mut last_low) = (Instant::now(), Instant::now());
    while last_low.elapsed() < Duration::from_secs(5) && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_secs(1));
        for (j, (_, pid)) in agents.iter().enumerate() {
            let now = loadgen::memory(*pid, "VmRSS");
            if now < low[j] {
                low[j] = now;
                last_low = Instant::now();
            }
        }
    }
    for (j, low) in low.iter().enumerate() {
        per_agent[j]["rss_closed_mb"] = json!(*low as f64 / 1e6);
        per_agent[j]["closed_over_before_pct"] =
            json!((*low as f64 - before[j] as f64) * 100.0 / before[j].max(1) as f64);
    }
    json!({"requested": args.idle_connections, "opened": opened, "open_seconds": open_s, "agents": per_agent})
}

/// Enrollment time and capture cost as enrolled pods grow.
fn enrollment_scale(args: &Args, agent_pid: u32, server_ip: IpAddr) -> Value {
    let enrolled = || -> usize {
        with_topology(|t| {
            t.config_dump("node-a")["enrolled"]
                .as_array()
                .map(|a| a.len())
                .unwrap_or(0)
        })
    };
    let base = enrolled();
    let mut extra: Vec<(String, IpAddr)> = vec![];
    let mut rows = vec![];
    let wait_for = |n: usize| -> f64 {
        let t0 = Instant::now();
        while enrolled() < n {
            if t0.elapsed() > Duration::from_secs(300) {
                eprintln!("enrollment did not reach {n} pods");
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        t0.elapsed().as_secs_f64()
    };
    for &n in &args.scale_pods {
        if n == 0 || n <= extra.len() {
            continue;
        }
        eprintln!("enrollment: {n} pods");
        // All but one as a batch, then the last one alone: what one pod
        // waits for when n-1 are enrolled.
        let add = |extra: &mut Vec<(String, IpAddr)>, upto: usize| {
            with_topology(|t| {
                while extra.len() < upto {
                    let i = extra.len();
                    let ip = IpAddr::from([10, 3, (i / 250) as u8, (i % 250 + 1) as u8]);
                    let name = format!("scale-{i}");
                    t.add_bare_pod("node-a", &name, ip);
                    extra.push((name, ip));
                }
                write_atomic(&t.mesh_file(), &mesh_yaml(t, extra));
            });
        };
        add(&mut extra, n - 1);
        let batch_s = wait_for(base + n - 1);
        add(&mut extra, n);
        let one_s = wait_for(base + n);
        // New-connection cost in an enrolled pod (the eBPF hooks and their
        // maps, then the agent's local listener) at this size.
        let probe = with_topology(|t| t.pod(&extra[0].0).clone());
        let h = loadgen::connect_latency(&probe, SocketAddr::new(server_ip, 9001), 2000);
        rows.push(json!({
            "pods": n,
            "batch_seconds": batch_s,
            "batch_size": n - 1,
            "one_more_pod_seconds": one_s,
            "connect_p50_us": h.value_at_quantile(0.5) as f64 / 1000.0,
            "connect_p99_us": h.value_at_quantile(0.99) as f64 / 1000.0,
            "agent_rss_mb": loadgen::memory(agent_pid, "VmRSS") as f64 / 1e6,
        }));
    }
    // Back to the base set (the namespaces go with the topology).
    with_topology(|t| write_atomic(&t.mesh_file(), &mesh_yaml(t, &[])));
    json!({"reload_interval": "20ms", "rows": rows})
}

/// The issue's targets against what was measured.
fn targets(r: &Value) -> Value {
    let med = |v: &Value| v["median"].as_f64();
    let cost = |path: &str, comp: &str, what: &str| {
        r["cost"].as_array().and_then(|a| {
            a.iter()
                .find(|c| c["path"] == path && c["component"] == comp)
                .and_then(|c| med(&c[what]))
        })
    };
    let tp = |path: &str| med(&r["throughput"][path]["single_stream_gbps"]);
    let ratio = match (tp("l4"), tp("direct")) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b * 100.0),
        _ => None,
    };
    let agent_cpu = [
        cost("l4", "agent node-a", "vcpu_per_1000_rps"),
        cost("l4", "agent node-b", "vcpu_per_1000_rps"),
    ]
    .into_iter()
    .flatten()
    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let agent_mb = [
        cost("l4", "agent node-a", "peak_rss_mb"),
        cost("l4", "agent node-b", "peak_rss_mb"),
    ]
    .into_iter()
    .flatten()
    .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    let idle = |what: &str| {
        r["idle_connections"]["agents"].as_array().and_then(|a| {
            a.iter()
                .filter_map(|x| x[what].as_f64())
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        })
    };
    // Memory held by the idle tunnels: (after − before), the larger agent.
    let idle_mb = r["idle_connections"]["agents"].as_array().and_then(|a| {
        a.iter()
            .filter_map(|x| Some(x["rss_after_mb"].as_f64()? - x["rss_before_mb"].as_f64()?))
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    });
    let many = |path: &str| med(&r["throughput"][path]["streams16_gbps"]);
    let many_ratio = match (many("l4"), many("direct")) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b * 100.0),
        _ => None,
    };
    let waypoint_over_l4 = match (
        med(&r["added_latency_us"]["l7"]["p50"]),
        med(&r["added_latency_us"]["l4"]["p50"]),
    ) {
        (Some(l7), Some(l4)) => Some(l7 - l4),
        _ => None,
    };
    let rows = [
        (
            "L4 added p50 (µs)",
            50.0,
            med(&r["added_latency_us"]["l4"]["p50"]),
            true,
        ),
        (
            "L4 added p99 (µs)",
            200.0,
            med(&r["added_latency_us"]["l4"]["p99"]),
            true,
        ),
        (
            "agent vCPU per 1000 req/s (busier agent)",
            0.04,
            agent_cpu,
            true,
        ),
        (
            "agent peak RSS MB at 1000 req/s (larger agent)",
            10.0,
            agent_mb,
            true,
        ),
        (
            "single-stream HBONE throughput, % of direct",
            60.0,
            ratio,
            false,
        ),
        (
            "16-stream HBONE throughput, % of direct",
            50.0,
            many_ratio,
            false,
        ),
        (
            "10 000 idle tunnels: MB over the agent's baseline (larger agent)",
            100.0,
            idle_mb,
            true,
        ),
        (
            "idle tunnels closed: % over the agent's baseline (larger agent)",
            10.0,
            idle("closed_over_before_pct"),
            true,
        ),
        (
            "waypoint added p99 (µs)",
            1000.0,
            med(&r["added_latency_us"]["l7"]["p99"]),
            true,
        ),
        (
            "waypoint vCPU per 1000 req/s",
            0.15,
            cost("l7", "waypoint", "vcpu_per_1000_rps"),
            true,
        ),
        (
            "waypoint peak RSS MB at 1000 req/s",
            30.0,
            cost("l7", "waypoint", "peak_rss_mb"),
            true,
        ),
        (
            "waypoint added p50 over L4 (µs)",
            150.0,
            waypoint_over_l4,
            true,
        ),
    ];
    json!(rows
        .iter()
        .map(|(name, target, measured, at_most)| {
            let met = measured.map(|m| if *at_most { m <= *target } else { m >= *target });
            json!({"target": name, "limit": target, "at_most": at_most, "measured": measured, "met": met})
        })
        .collect::<Vec<_>>())
}

fn markdown(r: &Value, paths: &[Path], qnames: &[&str]) -> String {
    let c = &r["config"];
    let m = &r["machine"];
    let mut s = format!(
        "# Sluice benchmark\n\n{} CPUs ({}), kernel {}. Fixed rate: {} req/s over {} keep-alive connections, {} B request bodies, {} s per run, {} runs; cells are median (min–max) over runs.\n\n",
        m["cpus"], m["cpu_model"].as_str().unwrap_or("?"), m["kernel"].as_str().unwrap_or("?"),
        c["rate"], c["connections"], c["payload_bytes"], c["duration_s"], c["repeats"]
    );
    let runs = |v: &Value| -> Vec<f64> {
        v["runs"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default()
    };
    s.push_str("## Latency (µs, from intended send time)\n\n| path | ");
    s.push_str(&qnames.join(" | "));
    s.push_str(" | errors |\n|---|");
    s.push_str(&"---|".repeat(qnames.len() + 1));
    s.push('\n');
    for p in paths {
        let l = &r["latency_us"][p.name];
        s.push_str(&format!("| {} |", p.label));
        for q in qnames {
            s.push_str(&format!(" {} |", fmt_spread(&runs(&l[*q]), 0)));
        }
        s.push_str(&format!(" {} |\n", l["errors"]));
    }
    // The difference of two maxima is noise, not an added latency.
    let added_q = &qnames[..qnames.len() - 1];
    s.push_str("\n## Added latency vs direct (µs)\n\n| path | ");
    s.push_str(&added_q.join(" | "));
    s.push_str(" |\n|---|");
    s.push_str(&"---|".repeat(added_q.len()));
    s.push('\n');
    for p in &paths[1..] {
        let a = &r["added_latency_us"][p.name];
        s.push_str(&format!("| {} |", p.label));
        for q in added_q {
            s.push_str(&format!(" {} |", fmt_spread(&runs(&a[*q]), 0)));
        }
        s.push('\n');
    }
    s.push_str("\n## Cost during the fixed-rate runs\n\nvCPU per 1000 req/s = CPU seconds / wall seconds × 1000 / rate; peak RSS is the process's high-water mark within the run (it counts the binary's code pages, shared between the agents); private is its anonymous memory (heap, stacks) at the end of the run.\n\n| path | component | vCPU per 1000 req/s | peak RSS (MB) | private (MB) |\n|---|---|---|---|---|\n");
    for row in r["cost"].as_array().into_iter().flatten() {
        let path = paths
            .iter()
            .find(|p| row["path"] == p.name)
            .map(|p| p.label)
            .unwrap_or("?");
        s.push_str(&format!(
            "| {path} | {} | {} | {} | {} |\n",
            row["component"].as_str().unwrap_or("?"),
            fmt_spread(&runs(&row["vcpu_per_1000_rps"]), 3),
            fmt_spread(&runs(&row["peak_rss_mb"]), 1),
            fmt_spread(&runs(&row["anon_rss_mb"]), 1)
        ));
    }
    if let Some(tp) = r.get("throughput") {
        s.push_str("\n## Throughput\n\n| path | 1 stream (Gbit/s) | 16 streams (Gbit/s) | new connections/s | failed |\n|---|---|---|---|---|\n");
        for (name, label) in [("direct", "direct (no mesh)"), ("l4", "L4: agents + HBONE")] {
            let t = &tp[name];
            s.push_str(&format!(
                "| {label} | {} | {} | {} | {} |\n",
                fmt_spread(&runs(&t["single_stream_gbps"]), 2),
                fmt_spread(&runs(&t["streams16_gbps"]), 2),
                fmt_spread(&runs(&t["new_connections_per_s"]), 0),
                t["failed_connections"]
            ));
        }
    }
    if let Some(idle) = r.get("idle_connections") {
        s.push_str(&format!(
            "\n## Idle tunnelled connections\n\n{} of {} opened (each proven end to end) in {:.1} s.\n\n| agent | RSS before (MB) | RSS holding them (MB) | KB per connection | idle vCPU | RSS once closed (MB) |\n|---|---|---|---|---|---|\n",
            idle["opened"], idle["requested"], idle["open_seconds"].as_f64().unwrap_or(0.0)
        ));
        for a in idle["agents"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.2} | {:.4} | {:.1} |\n",
                a["component"].as_str().unwrap_or("?"),
                a["rss_before_mb"].as_f64().unwrap_or(0.0),
                a["rss_after_mb"].as_f64().unwrap_or(0.0),
                a["kb_per_connection"].as_f64().unwrap_or(0.0),
                a["idle_vcpu"].as_f64().unwrap_or(0.0),
                a["rss_closed_mb"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    if let Some(en) = r.get("enrollment") {
        s.push_str(&format!(
            "\n## Enrollment at scale (node-a; mesh file polled every {})\n\n| enrolled pods | batch (pods, s) | one more pod (s) | connect() p50 / p99 (µs) | agent RSS (MB) |\n|---|---|---|---|---|\n",
            en["reload_interval"].as_str().unwrap_or("?")
        ));
        for row in en["rows"].as_array().into_iter().flatten() {
            s.push_str(&format!(
                "| {} | {}, {:.2} | {:.3} | {:.0} / {:.0} | {:.1} |\n",
                row["pods"],
                row["batch_size"],
                row["batch_seconds"].as_f64().unwrap_or(0.0),
                row["one_more_pod_seconds"].as_f64().unwrap_or(0.0),
                row["connect_p50_us"].as_f64().unwrap_or(0.0),
                row["connect_p99_us"].as_f64().unwrap_or(0.0),
                row["agent_rss_mb"].as_f64().unwrap_or(0.0)
            ));
        }
    }
    s.push_str("\n## Targets\n\n| target | limit | measured (median) | met |\n|---|---|---|---|\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        let dir = if t["at_most"] == true { "≤" } else { "≥" };
        let measured = t["measured"]
            .as_f64()
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| "—".into());
        let met = match t["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        s.push_str(&format!(
            "| {} | {dir} {} | {measured} | {met} |\n",
            t["target"].as_str().unwrap_or("?"),
            t["limit"]
        ));
    }
    s
}

/// The classic latency-by-percentile plot (x: percentile on a log scale of
/// 1/(1−q), y: µs), one line per path, from the median run.
fn plot(path: &std::path::Path, runs: &[(&str, &LatencyRun)]) -> Result<(), String> {
    use plotters::prelude::*;
    let quantiles: Vec<f64> = (0..=60)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) / 15.0))
        .collect();
    let series: Vec<(&str, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|(label, run)| {
            let pts = quantiles
                .iter()
                .map(|q| {
                    let x = (1.0 / (1.0 - q.min(0.9999))).log10();
                    (x, run.hist.value_at_quantile(*q) as f64 / 1000.0)
                })
                .collect();
            (*label, pts)
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency by percentile (µs)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..4f64, 0f64..ymax)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_labels(5)
        .x_label_formatter(&|x| match x.round() as i32 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            _ => "p99.99".into(),
        })
        .y_desc("µs")
        .draw()
        .map_err(|e| e.to_string())?;
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (i, (label, pts)) in series.into_iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
