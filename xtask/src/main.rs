//! `cargo xtask …`: the project's tasks in one place, so the README and CI
//! run exactly the same commands.
//!
//! - `setup`: install what building the eBPF programs needs (Debian's Rust
//!   and its source for `-Z build-std`, LLVM 22, `bpf-linker`, iproute2),
//!   skipping what is already there.
//! - `build-ebpf`: build `ebpf/programs` into `target/ebpf/sluice-ebpf.o`.
//! - `demo`: all of the above, then the local multi-node demo.
//! - `kube-apiserver`: build the Kubernetes API server the Kubernetes tests
//!   use (Debian's source package, once; cached outside the repository).
//! - `bench`: the per-node cost benchmark (release build), report under
//!   `target/bench/`.
//! - `soak`: a long run under load whose proxies' memory must stay flat.
//! - `fuzz`: every fuzz target in `fuzz/` for a fixed time each
//!   (nightly toolchain and cargo-fuzz; not part of `test`).
//! - `test`: all of the above but `fuzz`, then formatting, lints and every
//!   test.
#![forbid(unsafe_code)]

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools (needs root once).
    Setup,
    /// Build the eBPF programs.
    BuildEbpf,
    /// Build everything and run the local demo cluster.
    Demo,
    /// Build (once, cached outside the repository) the Kubernetes API
    /// server the Kubernetes tests run against, and what the real-node
    /// tests add: kubelet and the other node binaries, containerd and CNI
    /// plugins (Debian's), the pause and busybox images.
    KubeApiserver,
    /// Measure what the mesh adds per node against no mesh (latency at a
    /// fixed rate, cost, throughput, scale); report under target/bench.
    /// Arguments go to the benchmark (`cargo xtask bench -- --help`).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Soak: L4 and L7 traffic with connection churn for a long run (10
    /// minutes by default); fails when a proxy's memory keeps growing or
    /// requests fail. Report: target/bench/soak.md.
    Soak {
        #[arg(long, default_value = "10m")]
        duration: String,
    },
    /// Run the fuzz targets (all, or those named) for a fixed time each
    /// with their seed corpus; a crash stops the run and is kept under
    /// fuzz/artifacts. Needs the nightly toolchain; installs
    /// cargo-fuzz if missing.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Run formatting and lint checks and the whole test suite.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
    },
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Run `cargo test`, passing its output through, and end with one summary
/// line over all test binaries (cargo's own last line is often an empty
/// doc-test run).
fn run_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let out = child.stdout.take().context("test output")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |what: &str| {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(what)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

fn main() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    std::env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Setup => setup(),
        Task::BuildEbpf => build_ebpf(&root),
        Task::Demo => run_release_program(&root, "sluice-demo", &[]),
        Task::KubeApiserver => kube_apiserver(&root),
        Task::Soak { duration } => {
            run_release_program(&root, "sluice-bench", &["--soak", &duration])
        }
        Task::Fuzz { seconds, targets } => fuzz(&root, seconds, &targets),
        Task::Bench { args } => {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_release_program(&root, "sluice-bench", &args)
        }
        Task::Test { no_lint } => {
            setup()?;
            build_ebpf(&root)?;
            kube_apiserver(&root)?;
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--check"]))?;
                run(cargo()
                    .args(["fmt", "--check"])
                    .current_dir(root.join("ebpf/programs")))?;
                run(cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
            }
            // The end-to-end tests run the real agent binary; as root with the
            // eBPF object built they must run, not skip.
            run(cargo().args(["build", "-p", "node-agent", "-p", "waypoint", "--bins"]))?;
            run_tests(
                cargo()
                    .args(["test", "--workspace"])
                    .env("SLUICE_E2E_REQUIRED", "1")
                    .env("SLUICE_EBPF_OBJECT", ebpf_object(&root)),
            )
        }
    }
}

/// Debian packages the eBPF build and the namespace tests need (curl and
/// h2load are the real HTTP clients of the waypoint tests; perf is the
/// benchmark's `--profile`). `cargo-web` is
/// only a "recommends" of `rustc-web`, so it must be named: the eBPF build
/// runs Debian's own cargo.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "iproute2",
    "curl",
    "nghttp2-client",
    "linux-perf",
];

fn apt_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn cargo_bin_dir() -> std::path::PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cargo")
        });
    home.join("bin")
}

fn setup() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !apt_installed(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages {missing:?}");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let linker = cargo_bin_dir().join("bpf-linker");
    if !linker.exists() {
        eprintln!("xtask: building bpf-linker against Debian's LLVM 22 (about a minute)");
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        run(cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path)
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"))?;
    }
    Ok(())
}

/// Set up, build the eBPF object and the release binaries, then run one of
/// the tests crate's programs (the demo, the benchmark) with `args`.
fn run_release_program(root: &std::path::Path, bin: &str, args: &[&str]) -> Result<()> {
    setup()?;
    build_ebpf(root)?;
    run(cargo().args(["build", "--release", "-p", "node-agent", "-p", "waypoint"]))?;
    run(cargo()
        .args(["run", "--release", "-p", "sluice-tests", "--bin", bin, "--"])
        .args(args))
}

/// The fuzz targets of `fuzz/` (one per parser or decoder that
/// takes outside input).
const FUZZ_TARGETS: &[&str] = &[
    "mesh_file",
    "kube_objects",
    "hbone_server",
    "identity",
    "ca_request",
    "orig_dst",
    "waypoint_routes",
    "cni",
];

fn fuzz(root: &std::path::Path, seconds: u64, targets: &[String]) -> Result<()> {
    for t in targets {
        if !FUZZ_TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target {t:?}; targets: {}",
                FUZZ_TARGETS.join(", ")
            );
        }
    }
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nightly {
        bail!("cargo fuzz needs a nightly toolchain (`rustup toolchain install nightly`)");
    }
    if !cargo_bin_dir().join("cargo-fuzz").exists() {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let chosen: Vec<&str> = if targets.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for t in chosen {
        // New inputs go to a scratch corpus; the seeds in the repository
        // are only read.
        let scratch = root.join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        let seeds = root.join("fuzz/corpus").join(t);
        let mut cmd = Command::new("rustup");
        cmd.current_dir(root)
            .args(["run", "nightly", "cargo", "fuzz", "run", t])
            .arg(&scratch)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=4096",
                "-timeout=10",
            ]);
        for var in ["RUSTUP_TOOLCHAIN", "CARGO", "RUSTC", "RUSTC_WRAPPER"] {
            cmd.env_remove(var);
        }
        run(&mut cmd)?;
        eprintln!("xtask: fuzz target {t}: clean for {seconds} s");
    }
    Ok(())
}

/// kube-apiserver v1.20 from Debian's source package, cached in
/// /var/cache/sluice-kube (see the script).
fn kube_apiserver(root: &std::path::Path) -> Result<()> {
    run(Command::new("sh").arg(root.join("xtask/scripts/kube-apiserver.sh")))?;
    // The real-node tests: containerd, CNI, kubelet and the other node
    // binaries from the same source tree, and the base images.
    run(Command::new("sh").arg(root.join("xtask/scripts/kube-node.sh")))
}

/// Where the agent looks for the eBPF object by default.
fn ebpf_object(root: &std::path::Path) -> std::path::PathBuf {
    root.join("target/ebpf/sluice-ebpf.o")
}

fn build_ebpf(root: &std::path::Path) -> Result<()> {
    let dir = root.join("ebpf/programs");
    let path = format!(
        "{}:{}",
        cargo_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Debian's compiler (with its core source) builds for bpfel-unknown-none;
    // nothing of the outer rustup toolchain may leak in.
    let mut cmd = Command::new("/usr/bin/cargo");
    cmd.current_dir(&dir)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", path);
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd)?;
    let built = dir.join("target/bpfel-unknown-none/release/sluice-ebpf");
    let out = ebpf_object(root);
    std::fs::create_dir_all(out.parent().context("target dir")?)?;
    std::fs::copy(&built, &out)
        .with_context(|| format!("copying {} to {}", built.display(), out.display()))?;
    eprintln!("xtask: eBPF object at {}", out.display());
    Ok(())
}
