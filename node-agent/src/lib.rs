//! The Sluice node agent: one per node. It keeps the mesh model current,
//! holds a certificate for every identity running on its node, and for each
//! local enrolled workload runs an outbound capture listener (15001) and an
//! HBONE listener (15008). Outbound connections are tunnelled over HBONE to
//! the destination's agent; inbound tunnels are terminated and connected to
//! the application. Admin, metrics and readiness run on their own small
//! runtime so a slow scrape never stalls the data path.
//!
//! Where things are: [`agent`](crate::start) (start-up, the handle, the
//! tasks that follow the model's source), `enrollment` (local workloads
//! follow the model), `context` ([`Ctx`], [`AgentError`]), and one module
//! per stage: [`outbound`], [`inbound`] (each a pure `plan` and its I/O),
//! [`authz`], [`capture`], [`cni`], [`delivery`], [`handover`].

pub mod admin;
mod agent;
pub mod authz;
pub mod capture;
pub mod cni;
pub mod config;
mod context;
pub mod delivery;
mod enrollment;
pub mod fdpass;
pub mod handover;
pub mod inbound;
pub mod limits;
pub mod memory;
pub mod orig_dst;
pub mod outbound;
pub mod podnet;
pub mod podns;
pub mod telemetry;
pub mod uninstall;

pub use agent::{kube_client, start, AgentHandle};
pub use config::{AgentConfig, CaSource, KubeSource, OutboundTrafficPolicy};
pub use context::{AgentError, Ctx, EnrolledWorkload};

/// A poisoned lock is still the data: a panicked task must not take the
/// agent down with it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
