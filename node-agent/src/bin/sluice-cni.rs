//! `sluice-cni`: the chained CNI plugin the node agent installs on its
//! node (see `node_agent::cni`). The container runtime runs it with the
//! command in `CNI_COMMAND` and the network configuration on standard
//! input; it answers on standard output and by its exit status.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    // (VERSION comes without a configuration; a read error is an empty one.)
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let outcome = node_agent::cni::plugin::run(&|k| std::env::var(k).ok(), &stdin);
    if outcome.code != 0 {
        // The runtime logs standard error next to the failed sandbox.
        eprintln!("{}", outcome.stdout);
    }
    let mut out = std::io::stdout();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.code);
}
