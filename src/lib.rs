//! gem: an HTTP server that is upgraded and stopped without failing a request. Its
//! handler is a plugin `.so` (or an in-process function), and a table says what each
//! Unix signal does.
//!
//! # Layout
//!
//! - [`config`]: defaults < `gem.toml` < `GEM_*` env < flags, validated into [`Config`].
//! - [`signals`]: [`Signal`], [`Action`] and the [`SignalRegistry`] with its fixed rules.
//! - [`handler`]: the request-handler seam (in-process function or plugin).
//! - [`plugin`]: loads a handler `.so`: private copy, dlopen, ABI handshake, panic-safe calls.
//! - [`server`]: the accept loop and per-connection HTTP/1 + HTTP/2 serving.
//! - [`drain`]: the drain state machine used by shutdown and by the old side of a restart.
//! - [`conns`]: the open client connections, counted and cut from outside by a drain.
//! - `accept`: what accept loops share: backing off when out of fds, bounded admission.
//! - [`fds`]: inherited and handed-over sockets (gem's own handover and systemd's).
//! - [`control`]: the control socket: `reload`, `stop`, `status` with their outcome.
//! - `wire`: typed JSON messages, one per line, with a bounded line length.
//! - [`upgrade`]: restart: start the new process, wait for ready, roll back on failure.
//! - `generation`: one generation: load the handler, open or adopt sockets, serve, drain.
//! - `lifecycle`: one process's event loop: signals and commands to actions, upgrades.
//! - `builder`: the library API: [`Server::builder`], [`ServerConfig`].
//! - [`error`]: the library's [`Error`].

mod accept;
mod builder;
pub mod config;
pub mod conns;
pub mod control;
pub mod drain;
pub mod error;
pub mod fds;
mod generation;
pub mod handler;
mod inline;
mod lifecycle;
pub mod plugin;
pub mod server;
pub mod signals;
pub mod upgrade;
mod wire;

pub use builder::{Builder, Server, ServerConfig, check, report_startup_failure};
pub use config::Config;
pub use error::Error;
pub use generation::Exit;
pub use handler::{Handler, Request, Response};
pub use signals::{Action, Signal, SignalRegistry};
