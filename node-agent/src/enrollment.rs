//! Enrollment: the set of local workloads the agent serves follows the
//! model — listeners inside each pod's namespace, then capture into them;
//! workloads that leave drain for a grace period; failures are retried
//! every second without touching the others.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::identity::SpiffeId;
use tokio::task::JoinHandle;

use crate::context::{AgentError, Ctx};
use crate::{capture, delivery, inbound, lock, outbound, podnet};

pub(crate) struct LocalWorkload {
    pub(crate) ips: Vec<IpAddr>,
    pub(crate) identity: SpiffeId,
    pub(crate) netns: Option<String>,
    pub(crate) net: podnet::PodNet,
    /// Each captured IP with its inbound plaintext listener (duplicate fds),
    /// to register again when a draining workload is re-enrolled.
    pub(crate) inbound_fds: Vec<(IpAddr, std::os::fd::OwnedFd)>,
    /// Every listener of the workload (duplicate fds), for a successor.
    pub(crate) listeners: Vec<std::os::fd::OwnedFd>,
    /// Its listeners' accept loops, stopped when it is dropped (held for
    /// that alone).
    pub(crate) _tasks: AbortOnDrop,
}

impl LocalWorkload {
    pub(crate) fn same(&self, ips: &[IpAddr], identity: &SpiffeId, netns: &Option<String>) -> bool {
        self.ips == ips && &self.identity == identity && &self.netns == netns
    }
}

/// Say loudly which policies have rules a node agent never matches (DENY or
/// AUDIT rules with an L7-only clause: no effect at L4, as in Istio): a
/// warning when such a policy appears or changes, and the
/// `sluice_policies_ineffective_at_l4` gauge.
pub(crate) fn report_policy_effect(ctx: &Ctx, seen: &mut std::collections::HashSet<String>) {
    let model = ctx.model();
    let mut now = std::collections::HashSet::new();
    for p in model
        .authorization_policies
        .iter()
        .filter(|p| p.spec.target_ref.is_none() && p.spec.target_refs.is_empty())
    {
        let clauses = mesh_core::policy::ineffective_at_l4(p);
        if clauses.is_empty() {
            continue;
        }
        let key = format!("{}: {}", p.key(), clauses.join(", "));
        if !seen.contains(&key) {
            tracing::warn!(
                policy = %p.key(),
                action = ?p.spec.action,
                clauses = %clauses.join(", "),
                "policy has rules that never match at the node agent: they hold only L7 attributes, so they have no effect here (as in Istio); attach the policy to a waypoint to enforce them"
            );
        }
        now.insert(key);
    }
    ctx.metrics.policies_ineffective_at_l4.set(now.len() as i64);
    *seen = now;
}

/// Re-reconcile local workloads whenever the model changes.
pub(crate) async fn follow_model(ctx: Arc<Ctx>) {
    let mut rx = ctx.model.clone();
    let mut policy_effect = std::collections::HashSet::new();
    report_policy_effect(&ctx, &mut policy_effect);
    // Also on a timer: retries enrollments that failed (a namespace not
    // there yet, a port still busy) and ends drain periods.
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        let changed = tokio::select! {
            r = rx.changed() => if r.is_err() { return } else { true },
            _ = tick.tick() => false,
        };
        reconcile(&ctx).await;
        if changed {
            report_policy_effect(&ctx, &mut policy_effect);
            let closed = ctx.live.revalidate(&ctx.model(), &ctx.metrics);
            if closed > 0 {
                tracing::info!(closed, "policy change closed existing connections");
            }
        }
    }
}

/// Make the set of running per-workload listeners match the model.
pub(crate) async fn reconcile(ctx: &Arc<Ctx>) {
    let model = ctx.model();
    type Want = (Vec<IpAddr>, SpiffeId, Option<String>);
    let mut want: HashMap<(String, String), Want> = HashMap::new();
    for w in model
        .workloads_on_node(&ctx.cfg.node)
        .filter(|w| model.is_enrolled(w))
    {
        want.insert(
            (w.namespace.clone(), w.name.clone()),
            (w.ips.clone(), model.identity(w), w.netns.clone()),
        );
    }
    let wanted = want.len();
    let now = std::time::Instant::now();
    let mut to_start = Vec::new();
    {
        let mut local = lock(&ctx.local);
        let mut draining = lock(&ctx.draining);
        draining.retain(|k, (_, deadline)| {
            let keep = *deadline > now;
            if !keep {
                tracing::info!(namespace = %k.0, workload = %k.1, "drain period over; listeners closed");
            }
            keep
        });
        let gone: Vec<_> = local
            .iter()
            .filter(|(k, l)| {
                !want
                    .get(*k)
                    .is_some_and(|(ips, id, ns)| l.same(ips, id, ns))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            let l = local.remove(&k).expect("listed above");
            // Stop capturing first: the pod's new connections flow directly
            // from now on, while those already redirected are still served.
            if let (Some(c), Some(ns)) = (&ctx.capture, l.net.netns()) {
                c.unenroll(ns.cookie(), &l.ips);
            }
            tracing::info!(namespace = %k.0, workload = %k.1, grace_ms = ctx.cfg.unenroll_grace.as_millis() as u64, "workload left this node's mesh; capture removed, listeners draining");
            draining.insert(k, (l, now + ctx.cfg.unenroll_grace));
        }
        for (k, (ips, id, ns)) in want {
            if !local.contains_key(&k) {
                to_start.push((k, ips, id, ns));
            }
        }
        let still: std::collections::HashSet<SpiffeId> = local
            .values()
            .chain(draining.values().map(|(l, _)| l))
            .map(|l| l.identity.clone())
            .collect();
        let starting: std::collections::HashSet<&SpiffeId> =
            to_start.iter().map(|(_, _, id, _)| id).collect();
        for id in ctx.certs.identities() {
            if !still.contains(&id) && !starting.contains(&id) {
                ctx.certs.forget(&id);
            }
        }
    }
    for (key, ips, identity, netns) in to_start {
        ctx.certs.ensure(&identity);
        let revived = match lock(&ctx.draining).remove(&key) {
            Some((l, _)) if l.same(&ips, &identity, &netns) => Some(l),
            _ => None, // a changed workload: the old listeners close now
        };
        let result = match revived {
            Some(l) => revive(ctx, l),
            None => start_workload(ctx, &ips, &identity, netns.as_deref()),
        };
        let (ns, name) = &key;
        match result {
            Ok(l) => {
                tracing::info!(namespace = %ns, workload = %name, identity = %identity, ?ips, netns = netns.as_deref().unwrap_or("-"), "workload enrolled");
                lock(&ctx.local).insert(key, l);
            }
            Err(e) => {
                ctx.metrics.enrollment_failures.inc();
                tracing::error!(namespace = %ns, workload = %name, error = %e, "cannot enroll workload (will retry); other workloads are unaffected");
            }
        }
    }
    let n = lock(&ctx.local).len();
    ctx.metrics.enrolled_workloads.set(n as i64);
    ctx.metrics
        .unenrollable_workloads
        .set(wanted.saturating_sub(n) as i64);
}

/// Enroll a draining workload again, reusing its open listeners.
fn revive(ctx: &Arc<Ctx>, l: LocalWorkload) -> Result<LocalWorkload, AgentError> {
    if let (Some(c), Some(ns)) = (&ctx.capture, l.net.netns()) {
        use std::os::fd::AsFd;
        let inbound: Vec<_> = l
            .inbound_fds
            .iter()
            .map(|(ip, fd)| (*ip, fd.as_fd()))
            .collect();
        c.enroll(ns, &inbound)?;
    }
    Ok(l)
}

/// Start serving a local workload: listeners in its namespace (or on its
/// IPs in the agent's namespace), then — for a pod namespace with capture
/// enabled — redirection into them.
fn start_workload(
    ctx: &Arc<Ctx>,
    ips: &[IpAddr],
    identity: &SpiffeId,
    netns: Option<&str>,
) -> Result<LocalWorkload, AgentError> {
    use podnet::PodNet;
    let net = match netns {
        // A captured pod is served in its own namespace, never the
        // agent's: not found yet (sandbox starting), it waits for the next
        // round. (Without capture — loopback tests — workloads live on
        // the agent's addresses.)
        None if ctx.cfg.kube.is_some() && ctx.capture.is_some() => return Err(AgentError::NoNetns),
        None => PodNet::Host,
        // Handed over by the CNI plugin, else opened by path.
        Some(name) => {
            let ns = match ctx.cni.netns(name) {
                Some(ns) => ns,
                None => Arc::new(capture::netns::Netns::open(name).map_err(|source| {
                    AgentError::Netns {
                        name: name.to_string(),
                        source,
                    }
                })?),
            };
            let ipv6 = ips.iter().any(IpAddr::is_ipv6);
            let transparent = match delivery::prepare(
                &ns,
                &ctx.cfg.net_sysctl_dir,
                ctx.cfg.mark,
                ipv6,
            ) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(netns = name, error = %e, "cannot prepare transparent delivery: this pod's applications see the agent (127.0.0.6), not their clients");
                    false
                }
            };
            PodNet::Netns { ns, transparent }
        }
    };
    // A listener handed over by the previous agent, else a fresh one.
    let mut listeners = Vec::new();
    let mut listen_or_inherit = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let l = match ctx.inherited.take(net.netns().map(|n| n.cookie()), addr) {
            Some(l) => tokio::net::TcpListener::from_std(l)?,
            None => net.listen(addr)?,
        };
        listeners.push(std::os::fd::AsFd::as_fd(&l).try_clone_to_owned()?);
        Ok(l)
    };
    let mut listen = |addr: SocketAddr| {
        listen_or_inherit(addr).map_err(|source| AgentError::Bind { addr, source })
    };
    let src_ip = ips[0];
    // Aborted if enrollment fails half-way: a listener task left running
    // would keep its port and make every retry fail.
    let mut tasks = AbortOnDrop(Vec::new());
    let mut inbound_fds = Vec::new();
    match &net {
        PodNet::Host => {
            for &ip in ips {
                let out = listen(SocketAddr::new(ip, ctx.cfg.outbound_port))?;
                let hbone = listen(SocketAddr::new(ip, ctx.cfg.hbone_port))?;
                tasks.spawn(outbound::serve(out, ctx.clone(), ip, None));
                tasks.spawn(inbound::serve(hbone, ctx.clone()));
            }
        }
        PodNet::Netns { ns, .. } => {
            use std::os::fd::AsFd;
            // Outbound capture listeners on both loopbacks: a pod may dial
            // IPv6 even when the model lists only its IPv4 address (the
            // IPv6 one is skipped when the namespace has no IPv6).
            let v4_lo = SocketAddr::new(IpAddr::from([127, 0, 0, 1]), ctx.cfg.outbound_port);
            let v6_lo = SocketAddr::new(
                IpAddr::from([0, 0, 0, 0, 0, 0, 0, 1u16]),
                ctx.cfg.outbound_port,
            );
            let origin = |ip| net.origin(ip, ctx.cfg.mark);
            tasks.spawn(outbound::serve(
                listen(v4_lo)?,
                ctx.clone(),
                src_ip,
                origin(src_ip),
            ));
            match listen(v6_lo) {
                Ok(out6) => {
                    let src6 = ips.iter().copied().find(IpAddr::is_ipv6).unwrap_or(src_ip);
                    tasks.spawn(outbound::serve(out6, ctx.clone(), src6, origin(src6)));
                }
                Err(e) => tracing::debug!(error = %e, "no IPv6 outbound listener in this pod"),
            }
            // HBONE and inbound plaintext per address family in use; the
            // IPv6 sockets are v6-only so both families share a port.
            for v4 in [true, false] {
                if !ips.iter().any(|ip| ip.is_ipv4() == v4) {
                    continue;
                }
                let any: IpAddr = if v4 {
                    IpAddr::from([0, 0, 0, 0])
                } else {
                    IpAddr::from([0u16; 8])
                };
                let hbone = listen(SocketAddr::new(any, ctx.cfg.hbone_port))?;
                let plain_addr = SocketAddr::new(any, ctx.cfg.inbound_port);
                let plain = listen(plain_addr)?;
                for ip in ips.iter().filter(|ip| ip.is_ipv4() == v4) {
                    let fd =
                        plain
                            .as_fd()
                            .try_clone_to_owned()
                            .map_err(|source| AgentError::Bind {
                                addr: plain_addr,
                                source,
                            })?;
                    inbound_fds.push((*ip, fd));
                }
                tasks.spawn(inbound::serve(hbone, ctx.clone()));
                tasks.spawn(inbound::serve_plaintext(plain, ctx.clone()));
            }
            // Redirect only once every listener is up.
            if let Some(c) = &ctx.capture {
                let inbound: Vec<_> = inbound_fds
                    .iter()
                    .map(|(ip, fd)| (*ip, fd.as_fd()))
                    .collect();
                c.enroll(ns, &inbound)?;
            }
        }
    }
    Ok(LocalWorkload {
        ips: ips.to_vec(),
        identity: identity.clone(),
        netns: netns.map(str::to_string),
        net,
        inbound_fds,
        listeners,
        _tasks: tasks,
    })
}

/// Tasks aborted when dropped.
pub(crate) struct AbortOnDrop(Vec<JoinHandle<()>>);

impl AbortOnDrop {
    fn spawn(&mut self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(f));
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}
