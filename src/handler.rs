//! The request-handler seam: what the server calls for each request, whether the handler
//! is an in-process function or a loaded plugin.

pub use crate::plugin::Exchange;
pub use gem_plugin::{
    Body, BodyReader, BodyWriter, Request, Response, Scheme, Text, Version, Wait,
};

/// Why a handler produced no usable response. The server answers 500 and logs it.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The handler panicked; the payload's message if it had one.
    #[error("handler panicked: {0}")]
    Panicked(String),
    /// The handler returned something that is not valid HTTP.
    #[error("handler returned an invalid response: {0}")]
    Invalid(String),
}

/// What the operator sees about the handler in logs, `gem check` and `gem status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HandlerInfo {
    /// Plugin or handler name.
    pub name: String,
    /// Its version string.
    pub version: String,
    /// The plugin ABI version, for plugins.
    pub abi: Option<u32>,
    /// Hex SHA-256 of the loaded `.so`, for plugins.
    pub sha256: Option<String>,
    /// The file the plugin was loaded from, for plugins.
    pub path: Option<std::path::PathBuf>,
}

/// Serves requests, many at once. A call may block: it runs on tokio's blocking pool,
/// or, for a handler that [`runs_inline`](Handler::runs_inline), possibly right on the
/// runtime worker thread that read the request.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request: reads it from `exchange` and writes the response into it
    /// (plugin ABI 2, which in-process handlers use too). Must not unwind.
    fn handle(&self, exchange: &mut Exchange<'_>);

    /// Asked, before the body is read, for a request that has one: whether the
    /// handler reads it in chunks (no `max_body_size`) instead of whole.
    fn streams_body(&self, _exchange: &mut Exchange<'_>) -> bool {
        false
    }

    /// Whether a call may run right on a runtime worker thread (one free worker is
    /// always kept, and a watchdog keeps I/O going behind a slow call). That saves two
    /// thread hops a request, but only suits a handler that never uses tokio itself:
    /// a task it spawned or woke would wait behind it on the same worker, and
    /// `Handle::block_on` panics there. Plugins qualify; the default is `false`.
    fn runs_inline(&self) -> bool {
        false
    }

    /// Whether [`Handler::on_signal`] does something (the `plugin` signal action needs it).
    fn has_signal_hook(&self) -> bool {
        false
    }

    /// The `plugin` signal action.
    fn on_signal(&self, _signo: i32) {}

    /// Name, version and provenance for logs and status.
    fn info(&self) -> HandlerInfo;
}

/// An in-process handler made from a function, for the library API.
pub struct FnHandler<F> {
    f: F,
    name: String,
}

impl<F> std::fmt::Debug for FnHandler<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnHandler")
            .field("name", &self.name)
            .finish()
    }
}

impl<F> FnHandler<F>
where
    F: Fn(&Request<'_>) -> Response + Send + Sync + 'static,
{
    /// Wraps `f`, reporting `name` in logs.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        FnHandler {
            f,
            name: name.into(),
        }
    }
}

impl<F> Handler for FnHandler<F>
where
    F: Fn(&Request<'_>) -> Response + Send + Sync + 'static,
{
    fn handle(&self, exchange: &mut Exchange<'_>) {
        exchange.respond_with(&self.f);
    }

    fn info(&self) -> HandlerInfo {
        HandlerInfo {
            name: self.name.clone(),
            version: "in-process".into(),
            ..HandlerInfo::default()
        }
    }
}
