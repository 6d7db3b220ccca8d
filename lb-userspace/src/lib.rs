//! lbd and lbctl: the control plane of lb.
//!
//! Parts, each with one job: `config` (parse and validate the TOML), `datapath` (the only code
//! that touches the XDP program and its maps), `netlink` (interfaces, routes, neighbours),
//! `state` (the desired state and what lbd keeps on disk), `lock` (one lbd at a time on its
//! pins, state and socket), `limits` (what clients may hold of lbd), `daemon` (the runtime state
//! and every operation on it, in one-way layers), `api` (the control socket, over `daemon`),
//! `run` (lbd as a process: wires `daemon` and `api` together and runs until told to stop) and
//! `client` (lbctl's side of the socket).

pub mod announce;
pub mod api;
pub mod cidr;
pub mod cli;
pub mod client;
pub mod config;
pub mod config_edit;
pub mod daemon;
pub mod datapath;
pub mod decap;
pub mod health;
pub mod limits;
pub mod lock;
pub mod metrics;
pub mod netlink;
pub mod run;
pub mod state;
pub mod sync;
