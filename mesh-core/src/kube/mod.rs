//! The mesh model from a Kubernetes cluster: [`translate`] turns objects
//! into the model; [`watch`] keeps reflectors of every kind the model needs
//! and publishes a new model when any of them changes.

pub mod translate;
pub mod watch;

pub use translate::{translate, ClusterState, Translation};
