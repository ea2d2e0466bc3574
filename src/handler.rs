//! The request-handler seam: what the server calls for each request, whether the handler
//! is an in-process function or a loaded plugin.

use std::panic::{AssertUnwindSafe, catch_unwind};

pub use gem_plugin::{Request, Response};

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

/// Serves requests, many at once. A call may block. It runs on a tokio runtime worker
/// thread (a bodiless request, while another worker is free) or on the blocking pool, so
/// it must not itself block on the runtime: `Handle::block_on` panics on a worker, and
/// the panic is answered with a 500.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Must not unwind.
    fn handle(&self, req: &Request<'_>) -> Result<Response, HandlerError>;

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
    fn handle(&self, req: &Request<'_>) -> Result<Response, HandlerError> {
        catch_unwind(AssertUnwindSafe(|| (self.f)(req)))
            .map_err(|payload| HandlerError::Panicked(panic_message(payload.as_ref())))
    }

    fn info(&self) -> HandlerInfo {
        HandlerInfo {
            name: self.name.clone(),
            version: "in-process".into(),
            ..HandlerInfo::default()
        }
    }
}

/// The text of a panic payload, for the log line.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
