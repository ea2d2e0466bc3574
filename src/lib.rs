//! gem: an HTTP server that is upgraded and stopped without failing a request.
//!
//! # Layout
//!
//! - [`config`]: defaults < `gem.toml` < `GEM_*` env < flags, validated into [`config::Config`].
//! - [`signals`]: `Signal`, `Action` and the `SignalRegistry` with its fixed rules.
//! - [`handler`]: the request-handler seam (in-process function or plugin).
//! - [`plugin`]: loads a handler `.so`: private copy, dlopen, ABI handshake, panic-safe calls.

pub mod config;
pub mod handler;
pub mod plugin;
pub mod signals;
