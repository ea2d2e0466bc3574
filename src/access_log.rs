//! The access log: one line per request, formatted and written on a thread of its own,
//! never on the request path.
//!
//! STUB: the interface is fixed; the bodies are to be written (helper "access log").

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::config::{AccessLog as Target, AccessLogFormat};
use crate::error::Error;

/// What the request path hands over, owned: the request's parts the line needs.
#[derive(Debug)]
pub(crate) struct Entry {
    /// When the request arrived.
    pub(crate) time: SystemTime,
    pub(crate) peer: SocketAddr,
    pub(crate) method: http::Method,
    pub(crate) uri: http::Uri,
    pub(crate) version: http::Version,
    pub(crate) referer: Option<http::HeaderValue>,
    pub(crate) user_agent: Option<http::HeaderValue>,
    pub(crate) status: u16,
    /// Response body bytes.
    pub(crate) bytes: u64,
    pub(crate) took: Duration,
    /// gem's generation that served it.
    pub(crate) generation: u64,
}

/// A running access log. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AccessLog {}

impl AccessLog {
    /// Opens `target` (a file is created or appended to; a missing directory or a file
    /// that cannot be written is an error naming the path). `None` for `"off"`.
    pub(crate) fn open(
        target: &Target,
        _format: AccessLogFormat,
    ) -> Result<Option<AccessLog>, Error> {
        match target {
            Target::Off => Ok(None),
            _ => Ok(Some(AccessLog {})),
        }
    }

    /// Queues one line; never blocks. A line that cannot be queued is dropped and
    /// counted.
    pub(crate) fn log(&self, _entry: Entry) {}

    /// Reopens the file (logrotate moved it); for `"stderr"`, nothing.
    pub(crate) fn reopen(&self) {}

    /// Lines dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        0
    }
}
