//! lbd's state and every operation on it, in layers whose dependencies run one way: each may
//! use only those listed above it, and none uses this file (which only names what the rest of
//! lbd uses) nor `api` or `run`, which use it.
//!
//! - `model`: the runtime state (services, backends, hops, ids, health), plain data.
//! - `fill`: what every map holds for a runtime state (pure).
//! - `plan`: what a new config changes in the runtime state, and the state lbd starts from
//!   (pure).
//! - `resolve`: next hops from netlink, run without the daemon's lock.
//! - `apply`: the `Daemon` and its lock (`Shared`): the only code that changes the runtime
//!   state and writes the maps.
//! - `interfaces`: the configured interfaces and their pinned links.
//! - `follow`: kernel notifications and periodic refreshes, applied through `apply`.
//!
//! Every change, whatever its origin, goes through `Daemon::reconcile` (a `plan` carried out).

pub mod apply;
pub mod fill;
pub mod follow;
pub mod interfaces;
pub mod model;
pub mod plan;
pub mod resolve;
pub mod serving;
#[cfg(test)]
mod testing;

pub use apply::{ConntrackUse, Daemon, Shared};
pub use fill::fill;
pub use interfaces::{InterfaceNow, InterfaceState, interface_now};
pub use model::{
    BackendRuntime, BackendState, Hop, HopRequest, Hops, LastCheck, ResolveError, ServiceRuntime,
    mac_string, service_key,
};
