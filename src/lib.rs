//! gem: an HTTP server that is upgraded and stopped without failing a request. Its
//! handler is a plugin `.so` (or an in-process function), and a table says what each
//! Unix signal does.
//!
//! # Layout
//!
//! Public:
//! - [`config`]: defaults < `gem.toml` < `GEM_*` env < flags, validated into [`Config`].
//! - [`signals`]: [`Signal`], [`Action`] and the [`SignalRegistry`] with its fixed rules.
//! - [`handler`]: the request-handler seam (in-process function or plugin).
//! - [`control`]: the control socket: `reload`, `stop`, `status` with their outcome.
//! - [`error`]: the library's [`Error`].
//! - `builder`: the library API: [`Server::builder`], [`Server::run`], [`Server::phases`].
//!
//! Internal:
//! - `lifecycle`: the lifecycle state machine: events in, actions out, the [`Phase`].
//! - `runner`: the event loop that feeds it and carries out its actions.
//! - `generation`: one generation: load the handler, open or adopt sockets, serve, drain.
//! - `upgrade`: restart: start the new process, wait for ready, roll back on failure.
//! - `handover` and `exec`: the fds handed between generations, and the exact `execve`.
//! - `listeners`: an inherited socket or a freshly bound one for each address.
//! - `server`, `proto`, `accept`, `conns`, `drain`: serving connections (HTTP/1 or
//!   HTTP/2), accepting under fd exhaustion, the open-connection registry, the drain.
//! - `plugin` and `inline`: loading a handler `.so`, and where a handler call runs.
//! - `respond` and `pull`: one request's answer, and a body pulled from a handler's
//!   reader.
//! - `wire`: the framed JSON-lines protocol of the control socket and the handover.
//! - `service`: the pid file and systemd notifications.
//! - [`tls`]: a TLS listener's certificate and key, checked; the session-ticket keys
//!   handed from generation to generation.

mod accept;
mod access_log;
mod builder;
pub mod config;
mod conns;
pub mod control;
mod drain;
pub mod error;
mod exec;
mod generation;
pub mod handler;
mod handover;
mod inline;
mod lifecycle;
mod listeners;
mod metrics;
mod plugin;
mod proto;
mod pull;
mod respond;
mod runner;
mod server;
mod service;
pub mod signals;
mod supervisor;
pub mod tls;
mod upgrade;
mod wire;

pub use builder::{Builder, Role, Server, check, report_startup_failure, role};
pub use config::{Config, ServerConfig};
pub use error::Error;
pub use generation::Exit;
pub use handler::{Handler, Request, Response};
pub use handover::{FdError, claim_handover};
pub use inline::runtime;
pub use lifecycle::Phase;
pub use plugin::PluginError;
pub use signals::{Action, Signal, SignalRegistry};
pub use supervisor::{Loader, supervise};
pub use tls::{CertInfo, TlsError};
pub use upgrade::UpgradeError;
