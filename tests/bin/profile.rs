//! `sluice-bench --profile`: where the proxies spend their time at the
//! fixed rate, so work on speed starts from a picture rather than a guess.
//! For each mesh path, one run under `perf stat` (per request: CPU time,
//! context switches, CPU migrations, system calls) and one under
//! `perf record` with DWARF call graphs, folded and drawn by inferno:
//! `profile-<path>-<component>.svg` (and `.folded`) beside `profile.md`,
//! which has the counts, the share of time in system calls, and each
//! component's largest functions by total and by self time. Needs `perf` (Debian: `linux-perf`) and a build with debug info
//! (the release profile keeps it).

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use inferno::collapse::Collapse;

/// One proxy process to look at.
pub struct Component<'a> {
    pub name: &'a str,
    pub pid: u32,
}

/// One path's profile: what the load generator sent, and per component
/// its counters and its hottest functions.
pub struct PathProfile {
    pub label: String,
    pub requests: u64,
    pub rows: Vec<ComponentProfile>,
}

/// What one process did for a path's requests.
pub struct ComponentProfile {
    pub name: String,
    /// `perf stat` counters by event name.
    pub counters: HashMap<String, f64>,
    /// Where the sampled CPU time went.
    pub breakdown: Breakdown,
    pub flamegraph: String,
}

/// Where a component's sampled CPU time went, from its folded stacks.
#[derive(Debug, PartialEq)]
pub struct Breakdown {
    /// CPU time sampled, in nanoseconds (perf's cpu-clock period is the
    /// weight of each folded stack).
    pub sampled_ns: u64,
    /// Share (%) spent inside system calls.
    pub syscalls: f64,
    /// (share %, function) by self time, hottest first. In a VM without a
    /// PMU, samples taken with interrupts off land where they are turned
    /// back on (`finish_task_switch`, `_raw_spin_unlock_irqrestore`): read
    /// those as the scheduler's and wake-ups' cost.
    pub self_time: Vec<(f64, String)>,
    /// (share %, function) by total time (the function and its callees),
    /// largest first: which of Sluice's layers the time is under.
    pub total_time: Vec<(f64, String)>,
}

/// The counters read per request.
const EVENTS: &str = "task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter";

/// Whether `perf` can be run.
pub fn available() -> bool {
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn spawn(args: &[String]) -> Result<Child, String> {
    Command::new("perf")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("perf {}: {e}", args.join(" ")))
}

/// Stop a perf child the way Ctrl-C does (it then writes its output).
fn finish(child: Child) -> Result<(), String> {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for perf: {e}"))?;
    // perf exits non-zero after SIGINT on some versions; its output file
    // is what counts, checked by the caller.
    if !out.stderr.is_empty() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        if err.contains("Error") || err.contains("error") {
            return Err(format!("perf: {err}"));
        }
    }
    Ok(())
}

/// `perf stat -x,` output: event name → value.
fn parse_stat(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let value = f.first()?.trim().parse::<f64>().ok()?;
            Some((f.get(2)?.trim().to_string(), value))
        })
        .collect()
}

/// The kernel's system-call entry: stacks through it are time in syscalls.
const SYSCALL_ENTRY: &str = "entry_SYSCALL_64";

/// Self and total time per function of folded stacks (`a;b;c 12` lines,
/// the weight last), as shares of all weight, the `n` largest of each.
fn breakdown(folded: &str, n: usize) -> Breakdown {
    let mut by_leaf: HashMap<&str, u64> = HashMap::new();
    let mut by_frame: HashMap<&str, u64> = HashMap::new();
    let (mut total, mut in_syscalls) = (0u64, 0u64);
    for line in folded.lines() {
        let Some((stack, count)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        let frames: Vec<&str> = stack.split(';').collect();
        *by_leaf.entry(frames[frames.len() - 1]).or_default() += count;
        let mut seen: Vec<&str> = Vec::with_capacity(frames.len());
        for f in frames {
            // A recursive frame counts once per stack.
            if !seen.contains(&f) {
                seen.push(f);
                *by_frame.entry(f).or_default() += count;
            }
        }
        if seen.iter().any(|f| f.starts_with(SYSCALL_ENTRY)) {
            in_syscalls += count;
        }
        total += count;
    }
    let share = |c: u64| c as f64 * 100.0 / total.max(1) as f64;
    let top = |m: HashMap<&str, u64>| {
        let mut v: Vec<(u64, &str)> = m.into_iter().map(|(f, c)| (c, f)).collect();
        v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        v.into_iter()
            .take(n)
            .map(|(c, f)| (share(c), f.to_string()))
            .collect::<Vec<_>>()
    };
    Breakdown {
        sampled_ns: total,
        syscalls: share(in_syscalls),
        self_time: top(by_leaf),
        total_time: top(by_frame),
    }
}

/// Fold `perf.data` and draw it; returns the folded stacks.
fn flamegraph(data: &Path, svg: &Path, title: &str) -> Result<String, String> {
    // Inline frames are left out: resolving them costs minutes per run.
    let script = Command::new("perf")
        .args(["script", "--no-inline", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("perf script: {e}"))?;
    if !script.status.success() {
        return Err(format!("perf script failed: {}", script.status));
    }
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(BufReader::new(&script.stdout[..]), &mut folded)
        .map_err(|e| format!("folding the stacks: {e}"))?;
    let folded = String::from_utf8_lossy(&folded).into_owned();
    if folded.trim().is_empty() {
        return Err(format!("no samples in {}", data.display()));
    }
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = title.to_string();
    let mut out = std::fs::File::create(svg).map_err(|e| format!("{}: {e}", svg.display()))?;
    inferno::flamegraph::from_reader(&mut opts, folded.as_bytes(), &mut out)
        .map_err(|e| format!("drawing {}: {e}", svg.display()))?;
    out.flush().map_err(|e| e.to_string())?;
    Ok(folded)
}

/// Run `load` with one `perf` (arguments from `args`) attached to each of
/// `components`; returns what `load` returned once every perf has written
/// its output.
fn under_perf(
    components: &[Component<'_>],
    load: &mut impl FnMut() -> u64,
    args: impl Fn(&Component) -> Vec<String>,
) -> Result<u64, String> {
    let perfs = components
        .iter()
        .map(|c| spawn(&args(c)))
        .collect::<Result<Vec<_>, _>>()?;
    let loaded = load();
    for p in perfs {
        finish(p)?;
    }
    Ok(loaded)
}

/// Profile `components` while `load` runs the path's traffic twice (once
/// counted, once sampled); files go to `out` named after `path`.
pub fn profile_path(
    out: &Path,
    path: &str,
    label: &str,
    components: &[Component<'_>],
    mut load: impl FnMut() -> u64,
) -> Result<PathProfile, String> {
    let slug = |c: &Component| c.name.replace(' ', "-");
    // Counters.
    let stat_file = |c: &Component| out.join(format!("profile-{path}-{}.stat", slug(c)));
    let requests = under_perf(components, &mut load, |c| {
        vec![
            "stat".into(),
            "-x,".into(),
            "-e".into(),
            EVENTS.into(),
            "-p".into(),
            c.pid.to_string(),
            "-o".into(),
            stat_file(c).display().to_string(),
        ]
    })?;
    // Samples.
    let data_file = |c: &Component| out.join(format!("profile-{path}-{}.data", slug(c)));
    under_perf(components, &mut load, |c| {
        vec![
            "record".into(),
            "-q".into(),
            "-F".into(),
            "499".into(),
            "--call-graph".into(),
            "dwarf,16384".into(),
            "-p".into(),
            c.pid.to_string(),
            "-o".into(),
            data_file(c).display().to_string(),
        ]
    })?;
    let mut rows = vec![];
    for c in components {
        let counters = std::fs::read_to_string(stat_file(c))
            .map(|t| parse_stat(&t))
            .map_err(|e| format!("{}: {e}", stat_file(c).display()))?;
        let svg = out.join(format!("profile-{path}-{}.svg", slug(c)));
        let folded = flamegraph(&data_file(c), &svg, &format!("{label}: {}", c.name))?;
        let _ = std::fs::write(svg.with_extension("folded"), &folded);
        // perf.data files are large; the folded stacks keep what matters.
        let _ = std::fs::remove_file(data_file(c));
        rows.push(ComponentProfile {
            name: c.name.to_string(),
            counters,
            breakdown: breakdown(&folded, 12),
            flamegraph: svg
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
        });
    }
    Ok(PathProfile {
        label: label.to_string(),
        requests,
        rows,
    })
}

/// The report of all paths' profiles.
pub fn markdown(profiles: &[PathProfile], rate: u32, secs: f64) -> String {
    let mut md = format!(
        "# Sluice profile\n\n{rate} req/s for {secs:.0} s per run; per request = \
         the counter over the requests the load generator sent in the counted \
         run. Flame graphs: DWARF call graphs at 499 Hz, inline frames left out.\n\n\
         ## Per request (perf stat)\n\n\
         | path | component | requests | CPU µs | context switches | CPU migrations | system calls |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for p in profiles {
        for c in &p.rows {
            let per = |event: &str, scale: f64| {
                c.counters
                    .get(event)
                    .map(|v| format!("{:.2}", v * scale / p.requests.max(1) as f64))
                    .unwrap_or_else(|| "-".into())
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                p.label,
                c.name,
                p.requests,
                // task-clock is in milliseconds.
                per("task-clock", 1000.0),
                per("context-switches", 1.0),
                per("cpu-migrations", 1.0),
                per("raw_syscalls:sys_enter", 1.0),
            ));
        }
    }
    md.push_str(
        "\n## Where the time goes (share of sampled CPU time)\n\n\
         Total time counts a function with everything it calls; self time \
         only its own instructions.\n",
    );
    for p in profiles {
        for c in &p.rows {
            let b = &c.breakdown;
            md.push_str(&format!(
                "\n### {}: {} ({:.0} ms sampled, {:.0}% in system calls, [{}]({}))\n\n\
                 | total % | function | self % | function |\n|---|---|---|---|\n",
                p.label,
                c.name,
                b.sampled_ns as f64 / 1e6,
                b.syscalls,
                c.flamegraph,
                c.flamegraph
            ));
            let cell = |r: Option<&(f64, String)>| match r {
                Some((share, f)) => format!("{share:.1} | `{}`", f.replace('|', "\\|")),
                None => " | ".into(),
            };
            for i in 0..b.total_time.len().max(b.self_time.len()) {
                md.push_str(&format!(
                    "| {} | {} |\n",
                    cell(b.total_time.get(i)),
                    cell(b.self_time.get(i))
                ));
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_stat_csv_is_read_by_event() {
        let text = "# started on Wed\n\n2.07,msec,task-clock,2069222,100.00,0.020,CPUs utilized\n\
                    1,,context-switches,2069222,100.00,483.273,/sec\n\
                    <not counted>,,cpu-migrations,0,100.00,,\n\
                    109,,raw_syscalls:sys_enter,2069222,100.00,52.677,K/sec\n";
        let s = parse_stat(text);
        assert_eq!(s["task-clock"], 2.07);
        assert_eq!(s["raw_syscalls:sys_enter"], 109.0);
        assert!(!s.contains_key("cpu-migrations"));
    }

    #[test]
    fn time_is_counted_at_the_leaf_and_under_every_caller() {
        let folded = "main;a;write 30\nmain;b;write 10\nmain;a 40\n\
                      main;c;entry_SYSCALL_64_after_hwframe;read 15\nmain;c;c 5\n";
        let b = breakdown(folded, 2);
        assert_eq!(b.sampled_ns, 100);
        assert_eq!(b.syscalls, 15.0);
        assert_eq!(
            b.self_time,
            [(40.0, "a".to_string()), (40.0, "write".to_string())]
        );
        // `c` calls itself: its 5 count once.
        assert_eq!(
            b.total_time,
            [(100.0, "main".to_string()), (70.0, "a".to_string())]
        );
        let c = breakdown(folded, 10);
        assert!(c.total_time.contains(&(20.0, "c".to_string())));
    }
}
