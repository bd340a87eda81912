//! `cargo xtask …`: the project's tasks in one place, so the README and CI
//! run exactly the same commands.
//!
//! - `demo`: build and run the local multi-node demo.
//! - `test`: everything CI runs (formatting, lints, all tests).

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
    /// Build everything and run the local demo cluster.
    Demo,
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

fn main() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    std::env::set_current_dir(&root)?;
    match Cli::parse().task {
        Task::Demo => run(cargo().args([
            "run",
            "--release",
            "-p",
            "sluice-tests",
            "--bin",
            "sluice-demo",
        ])),
        Task::Test { no_lint } => {
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--check"]))?;
                run(cargo().args([
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]))?;
            }
            run(cargo().args(["test", "--workspace"]))
        }
    }
}
