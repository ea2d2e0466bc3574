//! The library's error type: each variant names what the user must fix.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::handover::FdError;
use crate::plugin::PluginError;
use crate::signals::{Signal, SignalError};

/// Why a server could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The handler plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr} (key `{key}`): {source}")]
    Listen {
        /// The address as configured.
        addr: String,
        /// The setting it comes from: `listen` or `metrics_listen`.
        key: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS listener's certificate or key cannot be used.
    #[error("cannot serve TLS on {addr} (key `listen`): {source}")]
    Tls {
        /// The address as configured.
        addr: String,
        /// Which file, and why.
        source: crate::tls::TlsError,
    },
    /// Inherited sockets were unusable.
    #[error(transparent)]
    Fds(#[from] FdError),
    /// A signal mapping broke a fixed rule (library API).
    #[error("signal {signal}: {source}")]
    Signal {
        /// The signal.
        signal: Signal,
        /// Which rule.
        source: SignalError,
    },
    /// `plugin` is mapped but the handler has no `on_signal` hook.
    #[error(
        "signals.{} = \"plugin\" needs a handler with an on_signal hook, but {handler} has none",
        .signal.short_name()
    )]
    NoSignalHook {
        /// The first signal mapped to `plugin`.
        signal: Signal,
        /// The handler's name.
        handler: String,
    },
    /// Neither `.handler()` nor `.plugin()` was given to the builder.
    #[error("no handler: call .handler() or .plugin() on the builder")]
    NoHandler,
    /// A file gem manages could not be written or removed.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Any other I/O failure, with what was being done.
    /// A supervisor's first worker failed to start: nothing ever served.
    #[error("the first worker failed to start: {0}")]
    FirstWorker(String),
    /// The access log file cannot be opened.
    #[error("cannot open the access log {} (key `access_log`): {source}", path.display())]
    AccessLog {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        /// What gem was doing.
        context: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl Error {
    /// Wraps an I/O error with what gem was doing.
    pub fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        move |source| Error::Io { context, source }
    }
}

impl Error {
    /// A socket of `Config::sockets` (labelled as in a handover) that could not be bound.
    pub(crate) fn listen(label: String, source: std::io::Error) -> Error {
        match label.strip_prefix(crate::config::METRICS_LABEL) {
            Some(addr) => Error::Listen {
                addr: addr.to_owned(),
                key: "metrics_listen",
                source,
            },
            None => Error::Listen {
                addr: label,
                key: "listen",
                source,
            },
        }
    }
}
