//! `sluicectl`: the operator's troubleshooting tool, used the way `istioctl`
//! is. Against a node's agent (its localhost admin endpoint): `workloads`,
//! `certs`, `config-dump`. Against a mesh file, before applying it:
//! `analyze` (errors and conflicts) and `check` (which policies apply to a
//! source → destination and the verdict: a dry run). Tables for people,
//! `-o json` / `-o yaml` for scripts.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use mesh_core::analyze::{analyze, Level};
use mesh_core::identity::SpiffeId;
use mesh_core::model::MeshModel;
use mesh_core::policy::{applicable, authorize, mtls_mode, ConnInfo};
use serde::Serialize;
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "sluicectl",
    version,
    about = "Inspect Sluice node agents and check mesh files"
)]
struct Cli {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    /// The agent's admin endpoint (run on the node).
    #[arg(
        long,
        env = "SLUICE_ADMIN",
        default_value = "127.0.0.1:15000",
        global = true
    )]
    admin: SocketAddr,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Workloads enrolled on this node, with their identities.
    Workloads,
    /// Certificates the agent holds (public parts).
    Certs,
    /// The agent's effective configuration.
    ConfigDump,
    /// The agent's access log: recent connections (and denials).
    Logs {
        /// Keep printing new records as they come.
        #[arg(short, long)]
        follow: bool,
    },
    /// Check a mesh file for errors and conflicts.
    Analyze {
        mesh_file: PathBuf,
        /// Exit non-zero on warnings too.
        #[arg(long)]
        fail_on_warning: bool,
    },
    /// Which policies apply to a connection and what they decide (dry run).
    Check {
        #[arg(long, env = "SLUICE_MESH_FILE")]
        mesh_file: PathBuf,
        /// The source: `namespace/workload`, a workload IP, or a SPIFFE ID.
        #[arg(long)]
        from: String,
        /// The source has no mesh identity (plaintext).
        #[arg(long)]
        plaintext: bool,
        /// The destination `ip:port` (a workload address).
        #[arg(long)]
        to: SocketAddr,
    },
}

/// GET a path from the admin endpoint.
fn get(admin: SocketAddr, path: &str) -> Result<Value> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).with_context(|| {
        format!(
            "cannot reach the agent's admin endpoint at {admin} (run on the node, or set --admin)"
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {admin}\r\nconnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.split(' ').nth(1).unwrap_or("?");
    if status != "200" {
        bail!("{path}: HTTP {status}: {}", body.trim());
    }
    serde_json::from_str(body).with_context(|| format!("{path}: not JSON"))
}

/// Stream a close-delimited response line by line (HTTP/1.0, so the agent
/// does not chunk it).
fn stream_lines(
    admin: SocketAddr,
    path: &str,
    follow: bool,
    mut on_line: impl FnMut(&str) -> Result<()>,
) -> Result<()> {
    use std::io::BufRead;
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).with_context(|| {
        format!(
            "cannot reach the agent's admin endpoint at {admin} (run on the node, or set --admin)"
        )
    })?;
    if !follow {
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
    }
    write!(s, "GET {path} HTTP/1.0\r\nhost: {admin}\r\n\r\n")?;
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status)?;
    if status.split(' ').nth(1) != Some("200") {
        bail!("{path}: {}", status.trim());
    }
    let mut line = String::new();
    // Skip the headers.
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        on_line(line.trim_end())?;
    }
}

fn emit<T: Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> Vec<Vec<String>>,
) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        Output::Table => print_table(&table()),
    }
    Ok(())
}

/// Left-aligned columns; the first row is the header.
fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{s:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn time(secs: &Value) -> String {
    secs.as_u64()
        .map(|s| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string())
        .unwrap_or_else(|| "?".into())
}

fn s(v: &Value) -> String {
    v.as_str()
        .map(str::to_string)
        .unwrap_or_else(|| v.to_string())
}

fn main() {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("sluicectl: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Workloads => {
            let dump = get(cli.admin, "/config_dump")?;
            let list = dump["enrolled"].clone();
            emit(cli.output, &list, || {
                let mut rows = vec![vec![
                    "NAMESPACE".into(),
                    "NAME".into(),
                    "IPS".into(),
                    "IDENTITY".into(),
                ]];
                for w in list.as_array().into_iter().flatten() {
                    let ips: Vec<String> =
                        w["ips"].as_array().into_iter().flatten().map(s).collect();
                    rows.push(vec![
                        s(&w["namespace"]),
                        s(&w["name"]),
                        ips.join(","),
                        s(&w["identity"]),
                    ]);
                }
                rows
            })?;
        }
        Command::Certs => {
            let dump = get(cli.admin, "/config_dump")?;
            let certs = dump["certificates"].clone();
            emit(cli.output, &certs, || {
                let mut rows = vec![vec![
                    "IDENTITY".into(),
                    "SERIAL".into(),
                    "NOT AFTER".into(),
                    "ROTATES AT".into(),
                    "GEN".into(),
                ]];
                for c in certs.as_array().into_iter().flatten() {
                    rows.push(vec![
                        s(&c["identity"]),
                        s(&c["serial"]),
                        time(&c["notAfter"]),
                        time(&c["refreshAt"]),
                        s(&c["generation"]),
                    ]);
                }
                rows
            })?;
        }
        Command::ConfigDump => {
            let dump = get(cli.admin, "/config_dump")?;
            let out = if cli.output == Output::Table {
                Output::Json
            } else {
                cli.output
            };
            emit(out, &dump, Vec::new)?;
        }
        Command::Logs { follow } => {
            let path = if follow {
                "/access_log?follow=1"
            } else {
                "/access_log"
            };
            let output = cli.output;
            if output == Output::Table {
                print_table(&[vec![
                    "TIME".into(),
                    "DIRECTION".into(),
                    "SOURCE -> DESTINATION".into(),
                    "OUTCOME".into(),
                    "BYTES OUT/IN".into(),
                    "POLICY".into(),
                ]]);
            }
            stream_lines(cli.admin, path, follow, |line| {
                let v: Value =
                    serde_json::from_str(line).with_context(|| format!("bad record: {line}"))?;
                match output {
                    Output::Json => println!("{line}"),
                    Output::Yaml => print!("---\n{}", serde_yaml::to_string(&v)?),
                    Output::Table => {
                        let who = |id: &str, addr: &str| {
                            if v[id].is_string() {
                                format!("{} ({})", s(&v[id]), s(&v[addr]))
                            } else {
                                s(&v[addr])
                            }
                        };
                        let bytes = if v["bytes_sent"].is_null() {
                            "-".into()
                        } else {
                            format!("{}/{}", v["bytes_sent"], v["bytes_recv"])
                        };
                        let policy = v["policy"]
                            .as_str()
                            .or(v["reason"].as_str())
                            .unwrap_or("-")
                            .to_string();
                        println!(
                            "{}  {}  {} -> {}  {}  {}  {}",
                            s(&v["time"]),
                            s(&v["direction"]),
                            who("src.identity", "src.addr"),
                            who("dst.identity", "dst.addr"),
                            s(&v["outcome"]),
                            bytes,
                            policy
                        );
                    }
                }
                std::io::stdout().flush()?;
                Ok(())
            })?;
        }
        Command::Analyze {
            mesh_file,
            fail_on_warning,
        } => {
            let model = match MeshModel::load(&mesh_file) {
                Ok(m) => m,
                Err(e) => {
                    let finding = mesh_core::analyze::Finding {
                        level: Level::Error,
                        object: e.field.clone(),
                        message: e.to_string(),
                    };
                    emit(cli.output, &vec![&finding], || {
                        vec![
                            vec!["LEVEL".into(), "OBJECT".into(), "MESSAGE".into()],
                            vec![
                                "error".into(),
                                finding.object.clone(),
                                finding.message.clone(),
                            ],
                        ]
                    })?;
                    return Ok(1);
                }
            };
            let findings = analyze(&model);
            emit(cli.output, &findings, || {
                let mut rows = vec![vec!["LEVEL".into(), "OBJECT".into(), "MESSAGE".into()]];
                for f in &findings {
                    rows.push(vec![
                        format!("{:?}", f.level).to_lowercase(),
                        f.object.clone(),
                        f.message.clone(),
                    ]);
                }
                if findings.is_empty() {
                    rows.push(vec![
                        "ok".into(),
                        mesh_file.display().to_string(),
                        "no problems found".into(),
                    ]);
                }
                rows
            })?;
            let worst = findings.iter().map(|f| f.level).max();
            return Ok(match worst {
                Some(Level::Error) => 1,
                Some(Level::Warning) if fail_on_warning => 1,
                _ => 0,
            });
        }
        Command::Check {
            mesh_file,
            from,
            plaintext,
            to,
        } => {
            let model = MeshModel::load(&mesh_file)?;
            let (source_identity, source_ip): (Option<SpiffeId>, IpAddr) =
                if let Ok(ip) = from.parse::<IpAddr>() {
                    (model.workload_by_ip(ip).map(|w| model.identity(w)), ip)
                } else if from.starts_with("spiffe://") {
                    (
                        Some(from.parse().context("--from")?),
                        IpAddr::from([0, 0, 0, 0]),
                    )
                } else {
                    let (ns, name) = from
                        .split_once('/')
                        .context("--from: expected namespace/workload, an IP or a SPIFFE ID")?;
                    let w = model
                        .workloads
                        .iter()
                        .find(|w| w.namespace == ns && w.name == name)
                        .with_context(|| format!("no workload {from}"))?;
                    (Some(model.identity(w)), w.ips[0])
                };
            let source_identity = if plaintext { None } else { source_identity };
            let dst = model
                .workload_by_ip(to.ip())
                .with_context(|| format!("{} is not a workload address", to.ip()))?;
            let decision = authorize(
                &model,
                &ConnInfo {
                    source_identity: source_identity.as_ref(),
                    source_ip,
                    destination: dst,
                    destination_ip: to.ip(),
                    destination_port: to.port(),
                },
            );
            let (mode, pa) = mtls_mode(&model, dst, to.port());
            let strict_refuses =
                source_identity.is_none() && mode == mesh_core::model::policy::MtlsMode::Strict;
            let policies: Vec<String> = applicable(&model, dst)
                .map(|p| {
                    format!(
                        "{} {}/{}",
                        s(&serde_json::to_value(p.spec.action).unwrap_or_default()),
                        p.metadata.namespace,
                        p.metadata.name
                    )
                })
                .collect();
            #[derive(Serialize)]
            #[serde(rename_all = "camelCase")]
            struct Report {
                source: Option<String>,
                source_ip: IpAddr,
                destination: String,
                mtls_mode: String,
                peer_authentication: Option<String>,
                applicable_policies: Vec<String>,
                allowed: bool,
                reason: String,
                decision: mesh_core::policy::Decision,
            }
            let allowed = decision.allowed && !strict_refuses;
            let reason = if strict_refuses {
                format!(
                    "STRICT mutual TLS ({}): plaintext refused",
                    pa.as_deref().unwrap_or("mesh default")
                )
            } else {
                decision.reason.clone()
            };
            let report = Report {
                source: source_identity.map(|i| i.to_string()),
                source_ip,
                destination: format!("{}/{} ({})", dst.namespace, dst.name, model.identity(dst)),
                mtls_mode: format!("{mode:?}").to_uppercase(),
                peer_authentication: pa,
                applicable_policies: policies,
                allowed,
                reason,
                decision,
            };
            emit(cli.output, &report, || {
                vec![
                    vec![
                        "SOURCE".into(),
                        report
                            .source
                            .clone()
                            .unwrap_or_else(|| format!("plaintext from {}", report.source_ip)),
                    ],
                    vec![
                        "DESTINATION".into(),
                        format!("{} port {}", report.destination, to.port()),
                    ],
                    vec![
                        "MTLS".into(),
                        format!(
                            "{} ({})",
                            report.mtls_mode,
                            report.peer_authentication.as_deref().unwrap_or("default")
                        ),
                    ],
                    vec![
                        "POLICIES".into(),
                        if report.applicable_policies.is_empty() {
                            "none".into()
                        } else {
                            report.applicable_policies.join(", ")
                        },
                    ],
                    vec![
                        "NEEDS WAYPOINT".into(),
                        if report.decision.needs_waypoint.is_empty() {
                            "-".into()
                        } else {
                            report.decision.needs_waypoint.join(", ")
                        },
                    ],
                    vec![
                        "DRY RUN".into(),
                        if report.decision.dry_run.is_empty() {
                            "-".into()
                        } else {
                            report
                                .decision
                                .dry_run
                                .iter()
                                .map(|d| {
                                    format!(
                                        "{} would {}",
                                        d.policy,
                                        if d.allowed { "allow" } else { "deny" }
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join(", ")
                        },
                    ],
                    vec![
                        "VERDICT".into(),
                        format!(
                            "{}: {}",
                            if report.allowed { "ALLOW" } else { "DENY" },
                            report.reason
                        ),
                    ],
                ]
            })?;
            return Ok(if allowed { 0 } else { 3 });
        }
    }
    Ok(0)
}
