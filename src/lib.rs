//! gem: an HTTP server that is upgraded and stopped without failing a request.
//!
//! # Layout
//!
//! - [`handler`]: the request-handler seam (in-process function or plugin).
//! - [`plugin`]: loads a handler `.so`: private copy, dlopen, ABI handshake, panic-safe calls.

pub mod handler;
pub mod plugin;
