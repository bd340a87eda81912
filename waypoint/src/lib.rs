//! Sluice's waypoint: the optional L7 proxy of a namespace or service
//! (`istio.io/use-waypoint`). Node agents send service traffic to it over
//! HBONE with the source pod's identity; it terminates the tunnel, speaks
//! HTTP/1.1 or HTTP/2 inside, routes and enforces L7 policy
//! ([`proxy`]), and forwards over HBONE to the chosen endpoint's node
//! agent with its own identity.
//!
//! Stages: [`inbound`] (tunnels in) → [`proxy`] (the request phases:
//! route with [`routes`], policy, limits, faults, retries; [`extauthz`] for
//! `CUSTOM` policies) → [`backend`] ([`balancer`] → [`upstream`], tunnels
//! out); [`telemetry`] and the admin endpoint on the side.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backend;
pub mod balancer;
pub mod config;
pub mod context;
pub mod extauthz;
pub mod inbound;
pub mod lifecycle;
pub mod otlp;
pub mod proxy;
pub mod ratelimit;
pub mod route_status;
pub mod routes;
pub mod telemetry;
pub mod upstream;

pub use config::{WaypointConfig, WaypointError};
pub use context::Ctx;
pub use lifecycle::{start, WaypointHandle};
