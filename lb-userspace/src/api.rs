//! The control API: HTTP/JSON on a unix socket (mode 0600, owner root, root peers only),
//! versioned under `/v1`. Every change is applied to the data path and written through to the
//! config file before the answer is sent.
//!
//! Parts, each calling only those below it (and `daemon`, `config`, `config_edit`; never
//! called by them):
//! - `server`: the socket (bind, stale sockets, root peers only, the 403 for others) and the
//!   router (every route and its handler);
//! - `edits`: the handlers that change something, through the config file and `reconcile`;
//! - `handlers`: the read-only handlers and the error answer ([`Refusal`]);
//! - `snapshot`: the one snapshot of counters behind `/v1/stats` and `/metrics`;
//! - `trace`: `lbctl trace`, packets streamed as the data path reports them;
//! - `types`: the wire types shared with lbctl (plain data).

mod edits;
mod handlers;
mod server;
mod snapshot;
mod trace;
pub mod types;

pub use handlers::Refusal;
pub use server::{
    ApiError, RootOnly, SocketFile, bind, remove_stale_socket, serve, socket_answers,
};
pub use snapshot::{counters, metrics_snapshot};
pub use types::*;
