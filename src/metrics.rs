//! Prometheus metrics and the health endpoints, served by gem itself on
//! `metrics_listen` (never by the plugin).
//!
//! A request costs three relaxed atomic adds ([`Metrics::observe`]): its status
//! class, its duration bucket and the duration sum. Everything else (the base the
//! predecessors handed over, the live gauges, the labels) is read at scrape time, when
//! [`Metrics::render`] snapshots it all and encodes it with `prometheus-client`'s
//! OpenMetrics text encoder.
//!
//! prometheus-client's own `Counter` and `Histogram` cannot start from a value, and a
//! generation must go on from its predecessors' totals (counters never go down while
//! the service lives), so the exposed values are snapshots in small metric types of
//! this module ([`CounterFamily`], [`HistogramSnapshot`]) and the crate's const ones.
//!
//! | metric | type | labels | from |
//! | --- | --- | --- | --- |
//! | `gem_requests_total` | counter | `class` (`1xx` … `5xx`) | [`Metrics::observe`] |
//! | `gem_request_duration_seconds` | histogram | `le` | [`Metrics::observe`] |
//! | `gem_requests_in_flight` | gauge | | [`Live::in_flight`] |
//! | `gem_connections_open` | gauge | | [`Live::connections`] |
//! | `gem_restarts_total` | counter | `result` (`ok`, `failed`, `rolled_back`) | [`Metrics::restart`] |
//! | `gem_generation` | gauge | | [`Metrics::new`] |
//! | `gem_crashes_total` | counter | | [`Metrics::set_crashes`] |
//! | `gem_drain_seconds` | gauge | | [`Metrics::drained`] (0 before any drain) |
//! | `gem_connections_cut_total` | counter | | [`Metrics::drained`] |
//! | `gem_plugin_info` | info | `name`, `version`, `sha256` | [`Metrics::new`] |
//! | `gem_build_info` | info | `version` | gem's own version |
//! | `gem_access_log_dropped_total` | counter | | [`Live::dropped_log_lines`] |
//!
//! All but the live ones and the two info metrics and `gem_generation` are carried
//! forward in [`Totals`].

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::accept::Backoff;
use crate::handler::HandlerInfo;

/// Upper bounds of the request-duration histogram's buckets, in seconds; a last
/// bucket, `+Inf`, follows.
const DURATION_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// [`DURATION_BOUNDS`] in nanoseconds, for [`Metrics::observe`].
const DURATION_BOUNDS_NANOS: [u64; 16] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// The histogram's buckets, `+Inf` included.
const BUCKETS: usize = DURATION_BOUNDS.len() + 1;

/// The `class` label values of `gem_requests_total`, by `status / 100 - 1`.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `result` label values of `gem_restarts_total`.
const RESULTS: [&str; 3] = ["ok", "failed", "rolled_back"];

/// The content type of what [`Metrics::render`] returns.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long the metrics listener waits for a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a metrics connection may take to finish its request once `stop` fired.
/// After the stop, how long a metrics connection is still answered before it closes.
const IDLE_GRACE: Duration = Duration::from_millis(500);

const STOP_GRACE: Duration = Duration::from_secs(10);

/// The counters a generation carries forward to the next one, so that totals never go
/// down while the service lives. Sent between processes as JSON.
///
/// Every field defaults when missing, so a gem of another version can read it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct Totals {
    /// Requests answered, by status class (`"2xx"`).
    pub(crate) requests: BTreeMap<String, u64>,
    /// The upper bounds (seconds) of the duration histogram's finite buckets.
    pub(crate) duration_bounds: Vec<f64>,
    /// Requests per duration bucket (not cumulative): one per bound, then `+Inf`.
    pub(crate) duration_buckets: Vec<u64>,
    /// The sum of the request durations, in seconds.
    pub(crate) duration_sum_seconds: f64,
    /// How many durations the histogram holds.
    pub(crate) duration_count: u64,
    /// Upgrades, by result (`"ok"`, `"failed"`, `"rolled_back"`).
    pub(crate) restarts: BTreeMap<String, u64>,
    /// Worker crashes: the supervisor's own running count, so combining two totals
    /// takes the larger rather than the sum.
    pub(crate) crashes: u64,
    /// Connections cut at the end of a drain.
    pub(crate) connections_cut: u64,
    /// How long the last drain took, in seconds, if there was one.
    pub(crate) last_drain_seconds: Option<f64>,
}

impl Totals {
    /// The sum of two totals (a predecessor's and one's own).
    ///
    /// Counters and the histogram add up (a histogram with other buckets is first
    /// moved into this gem's, each count into the first bucket that holds its own);
    /// `crashes`, a running count already, takes the larger; the last drain is
    /// `other`'s if it has one (the later), else `self`'s.
    pub(crate) fn plus(&self, other: &Totals) -> Totals {
        let (a, b) = (self.buckets(), other.buckets());
        Totals {
            requests: add_maps(&self.requests, &other.requests),
            duration_bounds: DURATION_BOUNDS.to_vec(),
            duration_buckets: a.iter().zip(b).map(|(x, y)| x.saturating_add(y)).collect(),
            duration_sum_seconds: self.duration_sum_seconds + other.duration_sum_seconds,
            duration_count: self.duration_count.saturating_add(other.duration_count),
            restarts: add_maps(&self.restarts, &other.restarts),
            crashes: self.crashes.max(other.crashes),
            connections_cut: self.connections_cut.saturating_add(other.connections_cut),
            last_drain_seconds: other.last_drain_seconds.or(self.last_drain_seconds),
        }
    }

    /// The histogram's counts in this gem's buckets. Counts kept with other bounds
    /// go to the first of ours at least as large (a duration under their bound is
    /// under ours too); counts that do not match their bounds go to `+Inf`.
    fn buckets(&self) -> [u64; BUCKETS] {
        let mut out = [0; BUCKETS];
        if self.duration_bounds == DURATION_BOUNDS && self.duration_buckets.len() == BUCKETS {
            out.copy_from_slice(&self.duration_buckets);
        } else if self.duration_buckets.len() == self.duration_bounds.len() + 1 {
            for (i, &count) in self.duration_buckets.iter().enumerate() {
                let bound = self
                    .duration_bounds
                    .get(i)
                    .copied()
                    .unwrap_or(f64::INFINITY);
                let ours = DURATION_BOUNDS.partition_point(|&b| b < bound);
                out[ours] = out[ours].saturating_add(count);
            }
        } else {
            let all = self
                .duration_buckets
                .iter()
                .fold(0u64, |sum, &n| sum.saturating_add(n));
            out[BUCKETS - 1] = all;
        }
        out
    }
}

/// `a` and `b` added key by key.
fn add_maps(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    let mut out = a.clone();
    for (key, &n) in b {
        let sum = out.entry(key.clone()).or_insert(0);
        *sum = sum.saturating_add(n);
    }
    out
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
    inner: Arc<Inner>,
}

/// How many shards the per-request counts are spread over.
const SHARDS: usize = 16;

/// One thread's share of the per-request counts, on cache lines of its own: threads
/// answering requests at the same time never write the same line.
#[derive(Debug)]
#[repr(align(128))]
struct Shard {
    /// Requests by status class, as [`CLASSES`].
    requests: [AtomicU64; CLASSES.len()],
    /// Requests by duration bucket (not cumulative), `+Inf` last.
    duration_buckets: [AtomicU64; BUCKETS],
    /// The sum of the request durations, in nanoseconds (wraps after 584 years of
    /// request time in one process).
    duration_sum_nanos: AtomicU64,
}

impl Shard {
    const fn new() -> Shard {
        Shard {
            requests: [const { AtomicU64::new(0) }; CLASSES.len()],
            duration_buckets: [const { AtomicU64::new(0) }; BUCKETS],
            duration_sum_nanos: AtomicU64::new(0),
        }
    }
}

/// This thread's shard: threads take them by turns, once.
fn shard_index() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Relaxed) % SHARDS;
    }
    INDEX.with(|i| *i)
}

/// What all clones of a [`Metrics`] share: this process's own counts, and the base.
#[derive(Debug)]
struct Inner {
    generation: u64,
    /// The `gem_plugin_info` labels: name, version, sha256 (known a little after the
    /// start: the plugin is hashed on a side thread).
    plugin: Mutex<[(&'static str, String); 3]>,
    /// The per-request counts, one shard per thread (by turns).
    shards: [Shard; SHARDS],
    /// Upgrades by result, as [`RESULTS`].
    restarts: [AtomicU64; RESULTS.len()],
    crashes: AtomicU64,
    connections_cut: AtomicU64,
    last_drain: Mutex<Option<Duration>>,
    /// The predecessors' totals.
    base: Mutex<Totals>,
}

/// Locks `mutex`, whether or not a holder panicked (the data stays consistent: every
/// critical section is a single store or clone).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The values of `counts`, each read once.
fn read(counts: &[AtomicU64]) -> impl Iterator<Item = u64> + '_ {
    counts.iter().map(|n| n.load(Relaxed))
}

impl Metrics {
    /// Metrics of generation `generation` serving `plugin`.
    pub(crate) fn new(generation: u64, plugin: &HandlerInfo) -> Metrics {
        Metrics {
            inner: Arc::new(Inner {
                generation,
                plugin: Mutex::new([
                    ("name", plugin.name.clone()),
                    ("version", plugin.version.clone()),
                    ("sha256", plugin.sha256.clone().unwrap_or_default()),
                ]),
                shards: [const { Shard::new() }; SHARDS],
                restarts: [const { AtomicU64::new(0) }; RESULTS.len()],
                crashes: AtomicU64::new(0),
                connections_cut: AtomicU64::new(0),
                last_drain: Mutex::new(None),
                base: Mutex::new(Totals::default()),
            }),
        }
    }

    /// The plugin's SHA-256, once hashed.
    pub(crate) fn set_sha256(&self, sha256: String) {
        lock(&self.inner.plugin)[2].1 = sha256;
    }

    /// One request answered with `status` after `took`.
    ///
    /// A status outside 100–599 counts in the nearest class.
    pub(crate) fn observe(&self, status: u16, took: Duration) {
        let class = usize::from(status / 100).clamp(1, CLASSES.len()) - 1;
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = DURATION_BOUNDS_NANOS.partition_point(|&b| b < nanos);
        let shard = &self.inner.shards[shard_index()];
        shard.requests[class].fetch_add(1, Relaxed);
        shard.duration_buckets[bucket].fetch_add(1, Relaxed);
        shard.duration_sum_nanos.fetch_add(nanos, Relaxed);
    }

    /// An upgrade this process started ended: `"ok"`, `"failed"` or `"rolled_back"`.
    ///
    /// Any other result is logged and not counted.
    pub(crate) fn restart(&self, result: &str) {
        match RESULTS.iter().position(|&r| r == result) {
            Some(i) => {
                self.inner.restarts[i].fetch_add(1, Relaxed);
            }
            None => warn!("metrics: unknown upgrade result {result:?} not counted"),
        }
    }

    /// A drain took `took` and cut `cut` connections.
    pub(crate) fn drained(&self, took: Duration, cut: usize) {
        *lock(&self.inner.last_drain) = Some(took);
        let cut = u64::try_from(cut).unwrap_or(u64::MAX);
        self.inner.connections_cut.fetch_add(cut, Relaxed);
    }

    /// Crashes of workers so far (supervised mode), as the supervisor counts them.
    ///
    /// The exposed count never goes down: a smaller count than one given before (or
    /// than the base's) is ignored.
    pub(crate) fn set_crashes(&self, crashes: u64) {
        self.inner.crashes.fetch_max(crashes, Relaxed);
    }

    /// The predecessors' totals (replacing any given before: each report is the
    /// latest).
    pub(crate) fn set_base(&self, base: &Totals) {
        *lock(&self.inner.base) = base.clone();
    }

    /// This process's counters plus the base: what the next generation starts from.
    pub(crate) fn totals(&self) -> Totals {
        let base = lock(&self.inner.base).clone();
        base.plus(&self.own())
    }

    /// This process's own counts, every known label value included.
    fn own(&self) -> Totals {
        let inner = &*self.inner;
        let sum = |pick: fn(&Shard) -> &[AtomicU64]| -> Vec<u64> {
            let mut out = vec![0u64; pick(&inner.shards[0]).len()];
            for shard in &inner.shards {
                for (total, n) in out.iter_mut().zip(read(pick(shard))) {
                    *total = total.wrapping_add(n);
                }
            }
            out
        };
        let buckets = sum(|s| &s.duration_buckets);
        let sum_nanos = inner.shards.iter().fold(0u64, |t, s| {
            t.wrapping_add(s.duration_sum_nanos.load(Relaxed))
        });
        let label = |names: &[&str], counts: Vec<u64>| {
            names
                .iter()
                .map(|&name| name.to_owned())
                .zip(counts)
                .collect()
        };
        Totals {
            requests: label(&CLASSES, sum(|s| &s.requests)),
            duration_bounds: DURATION_BOUNDS.to_vec(),
            duration_count: buckets.iter().sum(),
            duration_buckets: buckets,
            duration_sum_seconds: Duration::from_nanos(sum_nanos).as_secs_f64(),
            restarts: label(&RESULTS, read(&inner.restarts).collect()),
            crashes: inner.crashes.load(Relaxed),
            connections_cut: inner.connections_cut.load(Relaxed),
            last_drain_seconds: lock(&inner.last_drain).map(|d| d.as_secs_f64()),
        }
    }

    /// The Prometheus text exposition of everything.
    ///
    /// It is OpenMetrics text (content type `application/openmetrics-text;
    /// version=1.0.0`), which Prometheus prefers, ending in `# EOF`.
    pub(crate) fn render(&self, live: Live) -> String {
        let t = self.totals();
        let buckets = t.buckets();
        let mut registry = Registry::default();
        registry.register(
            "gem_requests",
            "Requests answered, by status class",
            CounterFamily::new("class", t.requests),
        );
        registry.register_with_unit(
            "gem_request_duration",
            "How long requests took to answer",
            Unit::Seconds,
            HistogramSnapshot {
                sum: t.duration_sum_seconds,
                count: t.duration_count,
                buckets: DURATION_BOUNDS
                    .iter()
                    .copied()
                    .chain([f64::INFINITY])
                    .zip(buckets)
                    .collect(),
            },
        );
        registry.register(
            "gem_requests_in_flight",
            "Requests being answered now",
            ConstGauge::new(live.in_flight),
        );
        registry.register(
            "gem_connections_open",
            "Client connections open now",
            ConstGauge::new(live.connections),
        );
        registry.register(
            "gem_restarts",
            "Upgrades, by result",
            CounterFamily::new("result", t.restarts),
        );
        registry.register(
            "gem_generation",
            "The generation serving",
            ConstGauge::new(self.inner.generation),
        );
        registry.register(
            "gem_crashes",
            "Worker crashes counted by the supervisor",
            ConstCounter::new(t.crashes),
        );
        registry.register_with_unit(
            "gem_drain",
            "How long the last drain took (0 before any)",
            Unit::Seconds,
            ConstGauge::new(t.last_drain_seconds.unwrap_or(0.0)),
        );
        registry.register(
            "gem_connections_cut",
            "Connections still open when a drain ended, and cut",
            ConstCounter::new(t.connections_cut),
        );
        registry.register(
            "gem_plugin",
            "The handler plugin serving",
            Info::new(lock(&self.inner.plugin).clone()),
        );
        registry.register(
            "gem_build",
            "This gem",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register(
            "gem_access_log_dropped",
            "Access-log lines dropped by this process",
            ConstCounter::new(live.dropped_log_lines),
        );
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            warn!("metrics: encoding failed: {err}");
        }
        out
    }
}

/// A counter with one label, one series per value, from a snapshot.
#[derive(Debug)]
struct CounterFamily {
    label: &'static str,
    values: BTreeMap<String, u64>,
}

impl CounterFamily {
    fn new(label: &'static str, values: BTreeMap<String, u64>) -> CounterFamily {
        CounterFamily { label, values }
    }
}

impl TypedMetric for CounterFamily {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for CounterFamily {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        for (value, count) in &self.values {
            let labels = [(self.label, value.as_str())];
            encoder
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(count, None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A histogram from a snapshot: per-bucket (not cumulative) counts, `+Inf` last.
#[derive(Debug)]
struct HistogramSnapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl TypedMetric for HistogramSnapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// What the metrics listener serves from.
pub(crate) struct Endpoint {
    /// The metrics `/metrics` renders.
    pub(crate) metrics: Metrics,
    /// Live values, read at each scrape.
    pub(crate) live: Arc<dyn Fn() -> Live + Send + Sync>,
    /// `true` while the service takes traffic: `/readyz` answers 200, else 503.
    pub(crate) ready: watch::Receiver<bool>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("metrics", &self.metrics)
            .field("ready", &*self.ready.borrow())
            .finish_non_exhaustive()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` (404 for anything else) on `listener`
/// until `stop`; connections already open finish their request.
///
/// HTTP/1.1 with keep-alive; a request's headers must arrive within 10 s. `GET` and
/// `HEAD` are answered, other methods get 405. Once `stop` fires, accepting stops
/// (this returns) and each open connection closes after the request it is on, within
/// 10 s.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    endpoint: Arc<Endpoint>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(
        listener
            .local_addr()
            .map_or_else(|_| "the metrics listener".into(), |a| a.to_string()),
    );
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let connections = tokio_util::task::TaskTracker::new();
    while let Some((stream, peer)) = backoff.accept(&stop, || listener.accept()).await {
        let endpoint = endpoint.clone();
        let stopping = stop.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let mut resp = answer(&req, &endpoint);
            if stopping.is_cancelled() {
                // The next request goes to a new connection, to the generation that
                // took over.
                resp.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            async move { Ok::<_, Infallible>(resp) }
        });
        let conn = http.serve_connection(TokioIo::new(stream), service);
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::pin!(conn);
            let result = tokio::select! {
                res = conn.as_mut() => res,
                () = stop.cancelled() => {
                    // A request may already be on its way on this connection (a probe
                    // that keeps its connection open): answer what arrives for a
                    // moment, then close, as the main listeners do.
                    if let Ok(res) = tokio::time::timeout(IDLE_GRACE, conn.as_mut()).await {
                        if let Err(err) = res {
                            debug!(%peer, cause = %err, "metrics connection ended with an error");
                        }
                        return;
                    }
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(STOP_GRACE, conn).await {
                        Ok(res) => res,
                        Err(_) => {
                            debug!(%peer, "metrics connection cut after the stop grace");
                            return;
                        }
                    }
                }
            };
            if let Err(err) = result {
                debug!(%peer, cause = %err, "metrics connection ended with an error");
            }
        });
    }
    // Connections still open finish their request before this returns (the process
    // may exit right after).
    connections.close();
    connections.wait().await;
}

/// The response to one request on the metrics listener.
fn answer<B>(req: &Request<B>, endpoint: &Endpoint) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/metrics" | "/healthz" | "/readyz") {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/metrics" => {
            let body = endpoint.metrics.render((endpoint.live)());
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            resp
        }
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        _ if *endpoint.ready.borrow() => plain(StatusCode::OK, "ready\n"),
        _ => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}

/// A plain-text response.
fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::BodyExt;
    use tokio::net::{TcpListener, TcpStream};

    fn plugin() -> HandlerInfo {
        HandlerInfo {
            name: "hello".into(),
            version: "1.2.3".into(),
            sha256: Some("abcd".into()),
            ..HandlerInfo::default()
        }
    }

    /// The value of the exposition line for `series` (name and labels, exactly).
    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    /// The `gem_request_duration_seconds_bucket` values, in order.
    fn buckets(text: &str) -> Vec<(String, u64)> {
        text.lines()
            .filter_map(|l| l.strip_prefix("gem_request_duration_seconds_bucket{le=\""))
            .map(|l| {
                let (le, n) = l.split_once("\"} ").unwrap();
                (le.to_owned(), n.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn the_nanosecond_bounds_match_the_bounds() {
        for (s, ns) in DURATION_BOUNDS.iter().zip(DURATION_BOUNDS_NANOS) {
            assert_eq!(Duration::from_secs_f64(*s), Duration::from_nanos(ns));
        }
        assert!(DURATION_BOUNDS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn render_shows_every_metric_with_its_value() {
        let m = Metrics::new(7, &plugin());
        m.observe(200, Duration::from_millis(3));
        m.observe(204, Duration::from_micros(50));
        m.observe(404, Duration::from_micros(100)); // on a bound: counts in it
        m.observe(503, Duration::from_secs(20));
        m.observe(101, Duration::ZERO);
        m.restart("ok");
        m.restart("ok");
        m.restart("rolled_back");
        m.restart("bogus");
        m.drained(Duration::from_millis(1500), 2);
        m.set_crashes(3);
        let text = m.render(Live {
            in_flight: 4,
            connections: 9,
            dropped_log_lines: 11,
        });
        assert_eq!(value(&text, "gem_requests_total{class=\"1xx\"}"), 1.0);
        assert_eq!(value(&text, "gem_requests_total{class=\"2xx\"}"), 2.0);
        assert_eq!(value(&text, "gem_requests_total{class=\"3xx\"}"), 0.0);
        assert_eq!(value(&text, "gem_requests_total{class=\"4xx\"}"), 1.0);
        assert_eq!(value(&text, "gem_requests_total{class=\"5xx\"}"), 1.0);
        assert_eq!(value(&text, "gem_request_duration_seconds_count"), 5.0);
        let sum = value(&text, "gem_request_duration_seconds_sum");
        assert!((sum - 20.00315).abs() < 1e-9, "{sum}");
        assert_eq!(value(&text, "gem_requests_in_flight"), 4.0);
        assert_eq!(value(&text, "gem_connections_open"), 9.0);
        assert_eq!(value(&text, "gem_restarts_total{result=\"ok\"}"), 2.0);
        assert_eq!(value(&text, "gem_restarts_total{result=\"failed\"}"), 0.0);
        assert_eq!(
            value(&text, "gem_restarts_total{result=\"rolled_back\"}"),
            1.0
        );
        assert!(!text.contains("bogus"));
        assert_eq!(value(&text, "gem_generation"), 7.0);
        assert_eq!(value(&text, "gem_crashes_total"), 3.0);
        assert_eq!(value(&text, "gem_drain_seconds"), 1.5);
        assert_eq!(value(&text, "gem_connections_cut_total"), 2.0);
        assert_eq!(
            value(
                &text,
                "gem_plugin_info{name=\"hello\",version=\"1.2.3\",sha256=\"abcd\"}"
            ),
            1.0
        );
        let build = format!(
            "gem_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(value(&text, &build), 1.0);
        assert_eq!(value(&text, "gem_access_log_dropped_total"), 11.0);
        for ty in [
            "# TYPE gem_requests counter",
            "# TYPE gem_request_duration_seconds histogram",
            "# UNIT gem_request_duration_seconds seconds",
            "# TYPE gem_plugin info",
            "# TYPE gem_drain_seconds gauge",
        ] {
            assert!(text.contains(ty), "no {ty:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn an_unknown_sha256_is_an_empty_label_and_no_drain_shows_zero() {
        let info = HandlerInfo {
            name: "in \"quotes\"".into(),
            version: "in-process".into(),
            ..HandlerInfo::default()
        };
        let text = Metrics::new(1, &info).render(Live::default());
        assert_eq!(
            value(
                &text,
                "gem_plugin_info{name=\"in \\\"quotes\\\"\",version=\"in-process\",sha256=\"\"}"
            ),
            1.0
        );
        assert_eq!(value(&text, "gem_drain_seconds"), 0.0);
        assert_eq!(value(&text, "gem_request_duration_seconds_count"), 0.0);
        assert_eq!(value(&text, "gem_requests_total{class=\"2xx\"}"), 0.0);
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let m = Metrics::new(1, &plugin());
        for micros in [10, 100, 101, 300, 900, 4_000, 30_000, 2_000_000, 60_000_000] {
            m.observe(200, Duration::from_micros(micros));
        }
        let text = m.render(Live::default());
        let b = buckets(&text);
        assert_eq!(b.len(), BUCKETS);
        assert_eq!(b[0], ("0.0001".to_owned(), 2));
        assert_eq!(b[1], ("0.00025".to_owned(), 3));
        assert_eq!(b.last().unwrap(), &("+Inf".to_owned(), 9));
        assert_eq!(b[BUCKETS - 2], ("10.0".to_owned(), 8));
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{b:?}");
        assert_eq!(value(&text, "gem_request_duration_seconds_count"), 9.0);
    }

    #[test]
    fn totals_carry_forward_through_json_and_never_go_down() {
        // Generation 1 serves and hands its totals to generation 2.
        let g1 = Metrics::new(1, &plugin());
        g1.observe(200, Duration::from_millis(1));
        g1.observe(500, Duration::from_millis(30));
        g1.restart("ok");
        g1.drained(Duration::from_secs(2), 1);
        g1.set_crashes(1);
        let json = serde_json::to_string(&g1.totals()).unwrap();
        let t1: Totals = serde_json::from_str(&json).unwrap();
        assert_eq!(t1, g1.totals());
        assert_eq!(t1.duration_count, 2);
        assert_eq!(t1.requests["5xx"], 1);

        let g2 = Metrics::new(2, &plugin());
        g2.set_base(&t1);
        assert_eq!(g2.totals(), t1, "nothing of its own yet: the base");
        g2.observe(200, Duration::from_millis(2));
        g2.observe(404, Duration::from_micros(20));
        let text = g2.render(Live::default());
        assert_eq!(value(&text, "gem_requests_total{class=\"2xx\"}"), 2.0);
        assert_eq!(value(&text, "gem_requests_total{class=\"4xx\"}"), 1.0);
        assert_eq!(value(&text, "gem_requests_total{class=\"5xx\"}"), 1.0);
        assert_eq!(value(&text, "gem_request_duration_seconds_count"), 4.0);
        let sum = value(&text, "gem_request_duration_seconds_sum");
        assert!((sum - 0.03302).abs() < 1e-9, "{sum}");
        assert_eq!(value(&text, "gem_restarts_total{result=\"ok\"}"), 1.0);
        assert_eq!(
            value(&text, "gem_drain_seconds"),
            2.0,
            "the base's last drain"
        );
        assert_eq!(value(&text, "gem_connections_cut_total"), 1.0);
        assert_eq!(value(&text, "gem_crashes_total"), 1.0);
        assert_eq!(value(&text, "gem_generation"), 2.0);

        // Generation 1 goes on serving while it drains; its later report replaces
        // the first (it is the latest, not an increment).
        g1.observe(200, Duration::from_millis(1));
        g1.drained(Duration::from_secs(3), 2);
        let before = g2.totals();
        g2.set_base(&g1.totals());
        let after = g2.totals();
        assert_eq!(after.requests["2xx"], 3, "1 + 1 from g1, 1 of g2's own");
        assert_eq!(after.connections_cut, 3);
        assert_eq!(after.last_drain_seconds, Some(3.0));
        never_less(&before, &after);
        assert_eq!(after, g1.totals().plus(&g2.own()));

        // A drain of its own is the latest.
        g2.drained(Duration::from_millis(250), 0);
        assert_eq!(g2.totals().last_drain_seconds, Some(0.25));

        // Generation 3 starts from generation 2's totals: nothing is counted twice.
        let g3 = Metrics::new(3, &plugin());
        g3.set_base(&g2.totals());
        assert_eq!(g3.totals(), g2.totals());
        let b = buckets(&g3.render(Live::default()));
        assert_eq!(b.last().unwrap().1, 5);
        assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{b:?}");
    }

    /// Asserts that no counter of `after` is below `before`'s.
    fn never_less(before: &Totals, after: &Totals) {
        for (k, n) in before.requests.iter().chain(&before.restarts) {
            let later = after.requests.get(k).or(after.restarts.get(k));
            assert!(later >= Some(n), "{k}: {n} then {later:?}");
        }
        let (b, a) = (before.buckets(), after.buckets());
        assert!(b.iter().zip(a).all(|(b, a)| *b <= a), "{b:?} then {a:?}");
        assert!(before.duration_count <= after.duration_count);
        assert!(before.duration_sum_seconds <= after.duration_sum_seconds);
        assert!(before.crashes <= after.crashes);
        assert!(before.connections_cut <= after.connections_cut);
    }

    #[test]
    fn crashes_are_the_supervisors_count_not_a_sum() {
        let m = Metrics::new(2, &plugin());
        m.set_base(&Totals {
            crashes: 4,
            ..Totals::default()
        });
        assert_eq!(m.totals().crashes, 4, "the base's count until told");
        m.set_crashes(5);
        assert_eq!(m.totals().crashes, 5, "not 9");
        m.set_crashes(2);
        assert_eq!(m.totals().crashes, 5, "never down");
    }

    #[test]
    fn plus_adds_field_wise_and_moves_foreign_buckets_into_ours() {
        let a = Totals {
            requests: [("2xx".to_owned(), 3)].into(),
            restarts: [("ok".to_owned(), 1)].into(),
            connections_cut: 2,
            duration_sum_seconds: 1.5,
            duration_count: 3,
            // Another gem's layout: ≤ 0.003 s, ≤ 1 s, +Inf.
            duration_bounds: vec![0.003, 1.0],
            duration_buckets: vec![1, 1, 1],
            last_drain_seconds: Some(1.0),
            crashes: 1,
        };
        let b = Totals {
            requests: [("2xx".to_owned(), 1), ("5xx".to_owned(), 2)].into(),
            duration_sum_seconds: 0.5,
            duration_count: 1,
            duration_bounds: DURATION_BOUNDS.to_vec(),
            duration_buckets: {
                let mut v = vec![0; BUCKETS];
                v[0] = 1;
                v
            },
            ..Totals::default()
        };
        let sum = a.plus(&b);
        assert_eq!(sum.requests["2xx"], 4);
        assert_eq!(sum.requests["5xx"], 2);
        assert_eq!(sum.restarts["ok"], 1);
        assert_eq!(sum.connections_cut, 2);
        assert_eq!(sum.duration_sum_seconds, 2.0);
        assert_eq!(sum.duration_count, 4);
        assert_eq!(sum.last_drain_seconds, Some(1.0), "b drained never");
        assert_eq!(sum.crashes, 1);
        assert_eq!(sum.duration_bounds, DURATION_BOUNDS);
        let at = |bound: f64| DURATION_BOUNDS.iter().position(|&b| b == bound).unwrap();
        let mut want = vec![0; BUCKETS];
        want[0] = 1; // b's
        want[at(0.005)] = 1; // a's ≤ 0.003 s
        want[at(1.0)] = 1;
        want[BUCKETS - 1] = 1;
        assert_eq!(sum.duration_buckets, want);
        // Counts that do not match their bounds still count, in +Inf.
        let odd = Totals {
            duration_buckets: vec![2, 3],
            ..Totals::default()
        };
        assert_eq!(odd.buckets()[BUCKETS - 1], 5);
        // A report from a gem without some fields still reads.
        let old: Totals = serde_json::from_str(r#"{"requests":{"2xx":5}}"#).unwrap();
        assert_eq!(old.plus(&Totals::default()).requests["2xx"], 5);
    }

    /// A request on `sender`'s connection: status, content type and body.
    async fn get(
        sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        method: Method,
        path: &str,
    ) -> (StatusCode, String, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "gem")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let ty = resp
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, ty, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serve_answers_health_readiness_metrics_and_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Metrics::new(5, &plugin());
        metrics.observe(200, Duration::from_millis(1));
        let (ready_tx, ready) = watch::channel(false);
        let endpoint = Arc::new(Endpoint {
            metrics: metrics.clone(),
            live: Arc::new(|| Live {
                in_flight: 1,
                connections: 2,
                dropped_log_lines: 0,
            }),
            ready,
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, endpoint, stop.clone()));

        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        // All on one keep-alive connection.
        let (status, _, body) = get(&mut sender, Method::GET, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ok\n"));
        let (status, _, body) = get(&mut sender, Method::GET, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        );
        ready_tx.send(true).unwrap();
        let (status, _, body) = get(&mut sender, Method::GET, "/readyz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ready\n"));
        ready_tx.send(false).unwrap();
        let (status, _, _) = get(&mut sender, Method::GET, "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

        metrics.observe(404, Duration::from_millis(1));
        let (status, ty, body) = get(&mut sender, Method::GET, "/metrics?x=1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ty, OPENMETRICS);
        assert_eq!(value(&body, "gem_requests_total{class=\"2xx\"}"), 1.0);
        assert_eq!(value(&body, "gem_requests_total{class=\"4xx\"}"), 1.0);
        assert_eq!(value(&body, "gem_requests_in_flight"), 1.0);
        assert_eq!(value(&body, "gem_connections_open"), 2.0);
        assert_eq!(value(&body, "gem_generation"), 5.0);
        assert!(body.ends_with("# EOF\n"));

        let (status, _, body) = get(&mut sender, Method::HEAD, "/metrics").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
        let (status, _, _) = get(&mut sender, Method::GET, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = get(&mut sender, Method::POST, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = get(&mut sender, Method::POST, "/metrics").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, _, _) = get(&mut sender, Method::DELETE, "/readyz").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

        // Stop: accepting ends, and the idle keep-alive connection is closed.
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns once stopped")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the open connection closes")
            .unwrap()
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener is closed"
        );
    }

    #[tokio::test]
    async fn a_request_in_progress_at_stop_is_answered() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_ready_tx, ready) = watch::channel(true);
        let endpoint = Arc::new(Endpoint {
            metrics: Metrics::new(1, &plugin()),
            live: Arc::new(Live::default),
            ready,
        });
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, endpoint, stop.clone()));
        let mut stream = TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Half a request, then the stop, then the rest.
        stream.write_all(b"GET /readyz HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(50)).await;
        stream.write_all(b"Host: gem\r\n\r\n").await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
            .await
            .expect("answered, then closed")
            .unwrap();
        // `serve` returns once its connections are done.
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returns once stopped")
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
        assert!(out.ends_with("ready\n"), "{out}");
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let m = Metrics::new(1, &plugin());
        std::thread::scope(|scope| {
            for _ in 0..(SHARDS + 3) {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        m.observe(200, Duration::from_micros(150));
                    }
                });
            }
        });
        let t = m.totals();
        let n = u64::try_from((SHARDS + 3) * 1000).unwrap();
        assert_eq!(t.requests["2xx"], n);
        assert_eq!(t.duration_count, n);
        assert_eq!(t.duration_buckets.iter().sum::<u64>(), n);
    }
}
