//! mesh-core: what Sluice's node agent and waypoint share — the mesh model,
//! workload identities and certificates, HBONE (HTTP/2 CONNECT over mutual
//! TLS) with its connection pool, Istio-compatible metrics, and the model's
//! two sources: the mesh file and a Kubernetes cluster.
#![forbid(unsafe_code)]

pub mod analyze;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod kube;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod runtime;
pub mod shutdown;
pub mod side_runtime;
pub mod source;
