//! The accept loop and per-connection serving (HTTP/1 or HTTP/2, see `proto`), with
//! request limits and the drain's `Connection: close` / GOAWAY.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::Version;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::accept::Backoff;
use crate::access_log::AccessLog;
use crate::config::{HYPER_MAX_BUF, HYPER_MAX_HEADERS, Limits};
use crate::conns::{HeadDeadline, TrackedStream};
use crate::drain::DrainSignal;
use crate::handler::Handler;
use crate::inline::Runner;
use crate::metrics::Metrics;
use crate::proto::Conn;
use crate::respond::respond;

/// What a request's handler may know of the connection it came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnFacts {
    /// The client's address.
    pub(crate) peer: SocketAddr,
    /// The listener's address the client connected to.
    pub(crate) local: SocketAddr,
    /// `http` or `https`.
    pub(crate) scheme: Scheme,
}

/// How a connection is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// Cleartext.
    Http,
    /// Over TLS.
    Https,
}

#[allow(dead_code)]
impl Scheme {
    /// `http` or `https`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Everything a connection task needs, shared by all connections of a generation
/// (one reference count per request, not one per field).
#[derive(Clone, Debug)]
pub struct ServeContext(Arc<Shared>);

/// The part of a [`ServeContext`] all its clones share.
pub struct Shared {
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) limits: Limits,
    pub(crate) drain: DrainSignal,
    pub(crate) h1: http1::Builder,
    pub(crate) h2: http2::Builder<TokioExecutor>,
    pub(crate) runner: Runner,
    pub(crate) observers: Observers,
}

/// Where each answered request is reported: the metrics (when served) and the access
/// log (when on).
#[derive(Debug, Clone, Default)]
pub(crate) struct Observers {
    pub(crate) metrics: Option<Metrics>,
    pub(crate) access_log: Option<AccessLog>,
    /// The generation serving, for the access log.
    pub(crate) generation: u64,
}

impl std::ops::Deref for ServeContext {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ServeContext {
    /// Builds the shared HTTP settings from `limits`.
    pub(crate) fn new(
        handler: Arc<dyn Handler>,
        limits: Limits,
        drain: DrainSignal,
        observers: Observers,
    ) -> Self {
        // `header_read_timeout` is kept by the connections' registry, not by hyper (see
        // `conns`): hyper's timer costs an allocation and two locks a request.
        drain.limit_heads(limits.header_read_timeout);
        // hyper's `max_buf_size` bounds what it queues of a response before it writes
        // (and what it buffers of a request head, which `max_header_size` bounds
        // tighter): held to `max_header_size`, a streamed body went out one 64 KiB
        // `writev` at a time, at half hyper's rate.
        let mut h1 = http1::Builder::new();
        h1.header_read_timeout(None)
            .max_header_size(limits.max_header_size)
            .max_buf_size(limits.max_header_size.max(HYPER_MAX_BUF));
        // hyper parses up to 100 headers in a stack array; any explicit limit makes it
        // allocate per request (about 5 % of throughput, says its documentation).
        if limits.max_headers != HYPER_MAX_HEADERS {
            h1.max_headers(limits.max_headers);
        }
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_size).unwrap_or(u32::MAX))
            .max_concurrent_streams(256);
        ServeContext(Arc::new(Shared {
            handler,
            limits,
            drain,
            h1,
            h2,
            runner: Runner::for_current_runtime(),
            observers,
        }))
    }
}

/// Starts accepting on `listener` (see [`accept_loop`]), as a task of `tracker` itself:
/// the drain waits until the tracker is empty, and the loop counts until it has
/// returned, so a connection accepted at the last instant has its task spawned before
/// the drain can find the tracker empty. Spawned beside the tracker, the loop could
/// accept a connection while the drain, finding no connection left, let the process
/// exit: that client's request was lost unanswered.
pub fn spawn_accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: ServeContext,
    tracker: &TaskTracker,
) {
    tracker.spawn(accept_loop(listener, tls, ctx, tracker.clone()));
}

/// Accepts connections on `listener` until the drain begins, spawning each onto
/// `tracker`; with `tls`, each is served over TLS. Returns when accepting has stopped;
/// dropping the listener closes this process's copy of the socket (a new generation
/// may still hold its own).
async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: ServeContext,
    tracker: TaskTracker,
) {
    let stop = ctx.drain.stop_accepting().clone();
    let bound = listener.local_addr().ok();
    let mut backoff = Backoff::new(bound.map_or_else(|| "a listener".into(), |a| a.to_string()));
    // A listener bound to one address is every connection's local address; only a
    // wildcard one needs asking, connection by connection.
    let fixed = bound.filter(|a| !a.ip().is_unspecified());
    while let Some((stream, peer)) = backoff.accept(&stop, || listener.accept()).await {
        let Some(local) = fixed.or_else(|| stream.local_addr().ok()) else {
            continue;
        };
        let facts = ConnFacts {
            peer,
            local,
            scheme: Scheme::Http,
        };
        match &tls {
            None => tracker.spawn(serve_plain(stream, facts, ctx.clone())),
            Some(tls) => tracker.spawn(serve_tls(stream, facts, tls.clone(), ctx.clone())),
        };
    }
}

/// A freshly accepted socket, registered for the drain's cut. TLS runs on top of the
/// tracked socket, so the cut at `wait_timeout` shuts the TCP socket down from outside
/// whatever state the TLS session is in.
fn track(stream: TcpStream, ctx: &ServeContext) -> TrackedStream {
    let _ = stream.set_nodelay(true);
    ctx.drain.track(stream)
}

/// Serves one cleartext connection.
async fn serve_plain(stream: TcpStream, facts: ConnFacts, ctx: ServeContext) {
    let stream = track(stream, &ctx);
    let head = stream.head_deadline();
    serve_connection(stream, head, facts, ctx).await;
}

/// Serves one connection over TLS once its handshake is done. A handshake must finish
/// within `header_read_timeout` (a client that never finishes one is bounded as a
/// slowloris is), and is dropped at the drain's cut.
async fn serve_tls(stream: TcpStream, facts: ConnFacts, tls: TlsAcceptor, ctx: ServeContext) {
    let stream = track(stream, &ctx);
    let head = stream.head_deadline();
    let peer = facts.peer;
    let limit = ctx.limits.header_read_timeout;
    let stream = tokio::select! {
        res = tokio::time::timeout(limit, tls.accept(stream)) => match res {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                debug!(%peer, cause = %err, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!(%peer, "TLS handshake not done within header_read_timeout: closed");
                return;
            }
        },
        () = ctx.drain.cut().cancelled() => {
            debug!(%peer, "TLS handshake cut at wait_timeout");
            return;
        }
    };
    let facts = ConnFacts {
        scheme: Scheme::Https,
        ..facts
    };
    serve_connection(stream, head, facts, ctx).await;
}

/// Serves one connection, plain or TLS, following the drain: once draining, HTTP/2
/// gets GOAWAY at once; HTTP/1 gets `Connection: close` on its next response and, if it
/// stays idle for the grace, is closed (over TLS with a close_notify). At the cut the
/// connection is dropped.
async fn serve_connection<S>(stream: S, head: HeadDeadline, facts: ConnFacts, ctx: ServeContext)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = facts.peer;
    let is_h2 = Arc::new(AtomicBool::new(false));
    let service = {
        let (ctx, is_h2) = (ctx.clone(), is_h2.clone());
        service_fn(move |req| {
            // HTTP/2 awaits no request head after a response: its streams interleave.
            head.head_arrived();
            let after = if req.version() == Version::HTTP_2 {
                is_h2.store(true, Ordering::Relaxed);
                None
            } else {
                Some(&head)
            };
            respond(req, facts, &ctx, after)
        })
    };
    let conn = Conn::new(stream, service, &ctx.h1, &ctx.h2);
    tokio::pin!(conn);
    let drain = &ctx.drain;
    let result = tokio::select! {
        biased;
        res = conn.as_mut() => Some(res),
        () = drain.draining() => None,
    };
    let result = match result {
        Some(res) => res,
        None => {
            if !is_h2.load(Ordering::Relaxed) {
                // Give a request that may already be on its way the chance to arrive and
                // be answered with `Connection: close`.
                tokio::select! {
                    res = conn.as_mut() => return log_conn_end(peer, res),
                    () = tokio::time::sleep(drain.idle_grace()) => {}
                    () = drain.cut().cancelled() => {
                        debug!(%peer, "connection cut at wait_timeout");
                        return;
                    }
                }
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                res = conn.as_mut() => res,
                () = drain.cut().cancelled() => {
                    debug!(%peer, "connection cut at wait_timeout");
                    return;
                }
            }
        }
    };
    log_conn_end(peer, result);
}

fn log_conn_end(peer: SocketAddr, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(err) = result {
        debug!(%peer, cause = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::handler::{FnHandler, Response};

    /// The drain is over once the listener's tracker is empty. The accept loop counts
    /// in it until it has returned, so a connection it accepts just as the drain begins
    /// is spawned (and answered) before the drain can be over.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_drain_is_not_over_while_the_accept_loop_may_still_accept() {
        let drain = DrainSignal::new(Duration::from_secs(5));
        let handler = Arc::new(FnHandler::new(
            "test",
            |_req: &crate::handler::Request<'_>| Response::text(200, "hi"),
        ));
        let ctx = ServeContext::new(
            handler,
            Limits::default(),
            drain.clone(),
            Observers::default(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tracker = TaskTracker::new();
        spawn_accept_loop(listener, None, ctx, &tracker);
        tracker.close();
        let wait = tracker.wait();
        tokio::pin!(wait);
        assert!(
            futures_util::poll!(wait.as_mut()).is_pending(),
            "no connection is open, but the accept loop still runs: the drain must wait"
        );
        // A client the loop accepted is answered, once the drain has begun too.
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        drain.begin();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.contains("connection: close"), "{rest}");
        assert!(rest.ends_with("hi"), "{rest}");
        // The loop has stopped and the connection has ended: now the drain is over.
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the drain ends once the loop and its connection have");
    }
}
