//! Prometheus metrics and the health endpoints, served by gem itself on
//! `metrics_listen` (never by the plugin).
//!
//! STUB: the interface is fixed; the bodies are to be written (helper "metrics").

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::handler::HandlerInfo;

/// The counters a generation carries forward to the next one, so that totals never go
/// down while the service lives. Sent between processes as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Totals {}

impl Totals {
    /// The sum of two totals (a predecessor's and one's own).
    pub(crate) fn plus(&self, _other: &Totals) -> Totals {
        Totals::default()
    }
}

/// What a scrape reads live, besides the counters.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Live {
    /// Requests in flight.
    pub(crate) in_flight: usize,
    /// Open client connections.
    pub(crate) connections: usize,
    /// Access-log lines dropped (a full disk, a slow writer).
    pub(crate) dropped_log_lines: u64,
}

/// One process's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    _inner: Arc<()>,
}

impl Metrics {
    /// Metrics of generation `generation` serving `plugin`.
    pub(crate) fn new(_generation: u64, _plugin: &HandlerInfo) -> Metrics {
        Metrics {
            _inner: Arc::new(()),
        }
    }

    /// One request answered with `status` after `took`.
    pub(crate) fn observe(&self, _status: u16, _took: Duration) {}

    /// An upgrade this process started ended: `"ok"`, `"failed"` or `"rolled_back"`.
    pub(crate) fn restart(&self, _result: &str) {}

    /// A drain took `took` and cut `cut` connections.
    pub(crate) fn drained(&self, _took: Duration, _cut: usize) {}

    /// Crashes of workers so far (supervised mode), as the supervisor counts them.
    pub(crate) fn set_crashes(&self, _crashes: u64) {}

    /// The predecessors' totals (replacing any given before: each report is the
    /// latest).
    pub(crate) fn set_base(&self, _base: &Totals) {}

    /// This process's counters plus the base: what the next generation starts from.
    pub(crate) fn totals(&self) -> Totals {
        Totals::default()
    }

    /// The Prometheus text exposition of everything.
    pub(crate) fn render(&self, _live: Live) -> String {
        String::new()
    }
}

/// What the metrics listener serves from.
pub(crate) struct Endpoint {
    pub(crate) metrics: Metrics,
    /// Live values, read at each scrape.
    pub(crate) live: Arc<dyn Fn() -> Live + Send + Sync>,
    /// `true` while the service takes traffic: `/readyz` answers 200, else 503.
    pub(crate) ready: watch::Receiver<bool>,
}

/// Serves `/metrics`, `/healthz` and `/readyz` (404 for anything else) on `listener`
/// until `stop`; connections already open finish their request.
pub(crate) async fn serve(
    _listener: tokio::net::TcpListener,
    _endpoint: Arc<Endpoint>,
    _stop: CancellationToken,
) {
}
