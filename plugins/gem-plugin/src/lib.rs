//! The SDK for gem handler plugins: implement [`Plugin`] and call [`export_plugin!`] once.
//!
//! ```no_run
//! use gem_plugin::{Plugin, Request, Response};
//!
//! struct Hello;
//!
//! impl Plugin for Hello {
//!     fn init() -> Result<Self, String> {
//!         Ok(Hello)
//!     }
//!     fn handle(&self, _req: &Request<'_>) -> Response {
//!         Response::text(200, "Hello world.")
//!     }
//! }
//!
//! gem_plugin::export_plugin!(Hello);
//! ```
//!
//! Build it as a `cdylib`, with the default `panic = "unwind"`: gem refuses a plugin
//! built with `panic = "abort"`, whose first panic would kill the server (see
//! [`abi`](crate::abi#panics)). The SDK has no dependencies: no tokio, no hyper.

#[doc(hidden)]
#[path = "export.rs"]
pub mod __export;
pub mod abi;
mod http;

pub use http::{Request, Response};

/// A request handler loaded by gem. One instance serves every request, from many threads
/// at once, so it must be `Sync`.
pub trait Plugin: Sized + Send + Sync + 'static {
    /// Set to `true` when [`Plugin::on_signal`] is implemented, so gem accepts the
    /// `plugin` signal action for this handler.
    const HAS_SIGNAL_HOOK: bool = false;

    /// Builds the handler once, before the first request. An `Err` stops gem from
    /// serving with this plugin, and its message is shown to the operator.
    fn init() -> Result<Self, String>;

    /// Answers one request. Blocking is allowed: gem runs handlers off its I/O threads.
    /// A panic becomes a 500 response and a log line.
    fn handle(&self, req: &Request<'_>) -> Response;

    /// Called for a signal mapped to the `plugin` action (needs `HAS_SIGNAL_HOOK`).
    fn on_signal(&self, _signo: i32) {}
}
