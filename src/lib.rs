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
//! - [`fds`]: inherited and handed-over sockets (gem's own handover and systemd's).
//! - [`control`]: the control socket: `reload`, `stop`, `status` with their outcome.
//! - [`upgrade`]: restart: start the new process, wait for ready, roll back on failure.
//! - `generation`: one generation: load the handler, open or adopt sockets, serve, drain.
//! - `lifecycle`: one process's event loop: signals and commands to actions, upgrades.
//! - `builder`: the library API: [`Server::builder`] (tuned with [`ServerConfig`]).
//! - [`error`]: the library's [`Error`].

mod builder;
pub mod config;
pub mod control;
mod drain;
pub mod error;
mod exec;
mod fds;
mod generation;
pub mod handler;
mod handover;
mod inline;
mod lifecycle;
mod listeners;
mod plugin;
mod runner;
mod server;
mod service;
pub mod signals;
mod upgrade;
mod wire;

pub use builder::{Builder, Server, check, report_startup_failure};
pub use config::{Config, ServerConfig};
pub use error::Error;
pub use generation::Exit;
pub use handler::{Handler, Request, Response};
pub use handover::{FdError, claim_handover};
pub use inline::runtime;
pub use lifecycle::Phase;
pub use plugin::PluginError;
pub use signals::{Action, Signal, SignalRegistry};
pub use upgrade::UpgradeError;
