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
//! A request is a view into what gem holds ([`Request`]): method, target, headers,
//! body, and the connection's facts ([`Request::peer_addr`], [`Request::version`],
//! [`Request::scheme`]) plus a request id. A response is a value ([`Response`]);
//! static text in it (`&'static str`) reaches the client without a copy.
//!
//! Streams, both ways: a request body read in chunks; a response body gem reads from
//! an [`io::Read`](std::io::Read) ([`Response::reader`]), or one a producer writes on a
//! thread of gem's ([`Response::stream`]), for a body that waits.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use std::time::Duration;
//! use gem_plugin::{Plugin, Request, Response, Wait};
//!
//! struct Streams;
//!
//! impl Plugin for Streams {
//!     fn init() -> Result<Self, String> {
//!         Ok(Streams)
//!     }
//!
//!     // Read POST /upload in chunks, of any size; other bodies come whole.
//!     fn streams_body(&self, req: &Request<'_>) -> bool {
//!         req.path() == "/upload"
//!     }
//!
//!     fn handle(&self, req: &Request<'_>) -> Response {
//!         match req.path() {
//!             "/upload" => {
//!                 let n = std::io::copy(&mut req.body_reader(), &mut std::io::sink());
//!                 Response::text(200, format!("{n:?}"))
//!             }
//!             // A file of any size: gem reads it as the client takes it, no thread.
//!             "/export" => match std::fs::File::open("/var/lib/app/export.csv") {
//!                 Ok(file) => Response::reader(200, file).with_header("content-type", "text/csv"),
//!                 Err(err) => Response::text(404, format!("{err}\n")),
//!             },
//!             // Ten events a second until a drain begins: then a last one.
//!             _ => Response::stream(200, |w| loop {
//!                 w.write_all(b"data: tick\n\n")?;
//!                 match w.wait(Duration::from_millis(100)) {
//!                     Wait::Elapsed => {}
//!                     Wait::Draining => return w.send(b"event: bye\ndata:\n\n"),
//!                     Wait::Gone => return Ok(()),
//!                 }
//!             })
//!             .with_header("content-type", "text/event-stream"),
//!         }
//!     }
//! }
//!
//! gem_plugin::export_plugin!(Streams);
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

pub use http::{
    Body, BodyReader, BodyWriter, Producer, Request, Response, Scheme, Text, Version, Wait,
};

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

    /// Called, before its body is read, for a request that has one: `true` to read the
    /// body chunk by chunk with [`Request::body_reader`] while the client sends it
    /// (of any size: `max_body_size` does not apply), `false` (the default) to get it
    /// whole in [`Request::body`] (up to `max_body_size`, or gem answers 413). Only
    /// the head is known here; [`Request::body`] is empty.
    fn streams_body(&self, _req: &Request<'_>) -> bool {
        false
    }

    /// Called for a signal mapped to the `plugin` action (needs `HAS_SIGNAL_HOOK`).
    fn on_signal(&self, _signo: i32) {}
}
