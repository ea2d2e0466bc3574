//! One request: its checks and limits, the handler call and the answer, with what the
//! metrics and the access log are told of it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderValue};
use http::{Request as HttpRequest, Response as HttpResponse, StatusCode, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Body as _;
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::access_log::Entry;
use crate::conns::HeadDeadline;
use crate::drain::Counted;
use crate::handler::HandlerError;
use crate::plugin::{BodyIn, Exchange, Head, Stream, recycle_headers, start_stream};
use crate::pull::Pull;
use crate::server::{ConnFacts, ServeContext};

/// The body of every response gem sends: bytes it holds whole, a stream a handler's
/// producer writes on a thread of its own, or one gem reads from a handler's reader as
/// hyper asks for it. Once it is sent (dropped), an HTTP/1
/// connection's next request head is due ([`HeadDeadline`]).
#[derive(Debug)]
pub(crate) struct Body {
    kind: Kind,
    then: Option<HeadDeadline>,
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Some(head) = &self.then {
            head.response_sent();
        }
    }
}

#[derive(Debug)]
pub(crate) enum Kind {
    Whole(Option<Bytes>),
    Stream {
        rx: mpsc::Receiver<Result<Bytes, StreamCut>>,
        /// The stream counts as a request in flight until it ends.
        _in_flight: Counted,
    },
    Pull(Box<Pull>),
}

/// A streamed body that ended early: its producer or reader failed or panicked. hyper
/// then ends the connection without the body's proper end, so the client sees the cut.
#[derive(Debug, thiserror::Error)]
#[error("the handler's stream was cut")]
pub(crate) struct StreamCut;

impl Body {
    fn of(kind: Kind) -> Body {
        Body { kind, then: None }
    }

    /// The bytes of a whole body (`None` for a stream).
    #[cfg(test)]
    pub(crate) fn whole(&mut self) -> Option<Bytes> {
        match &mut self.kind {
            Kind::Whole(bytes) => Some(bytes.take().unwrap_or_default()),
            Kind::Stream { .. } | Kind::Pull(_) => None,
        }
    }

    pub(crate) fn empty() -> Body {
        Body::of(Kind::Whole(None))
    }

    pub(crate) fn full(bytes: Bytes) -> Body {
        Body::of(Kind::Whole((!bytes.is_empty()).then_some(bytes)))
    }

    pub(crate) fn stream(rx: mpsc::Receiver<Result<Bytes, StreamCut>>, in_flight: Counted) -> Body {
        Body::of(Kind::Stream {
            rx,
            _in_flight: in_flight,
        })
    }

    pub(crate) fn pull(pull: Pull) -> Body {
        Body::of(Kind::Pull(Box::new(pull)))
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = StreamCut;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamCut>>> {
        match &mut self.get_mut().kind {
            Kind::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream { rx, .. } => rx
                .poll_recv(cx)
                .map(|next| next.map(|chunk| chunk.map(Frame::data))),
            Kind::Pull(pull) => pull
                .poll_chunk(cx)
                .map(|next| next.map(|chunk| chunk.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Kind::Whole(None))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Kind::Stream { .. } | Kind::Pull(_) => SizeHint::default(),
        }
    }
}

/// Numbers requests within this process, for handlers (and later the access log):
/// unique, not consecutive. Each thread takes a block of numbers at a time, so the
/// serving threads do not write one shared counter per request.
fn next_request_id() -> u64 {
    const BLOCK: u64 = 1 << 16;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static MINE: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    }
    MINE.with(|mine| {
        let (mut next, mut end) = mine.get();
        if next == end {
            next = NEXT.fetch_add(BLOCK, Ordering::Relaxed);
            end = next + BLOCK;
        }
        mine.set((next + 1, end));
        next
    })
}

/// The parts of a request the access log needs after the handler has taken it.
struct LoggedHead {
    time: SystemTime,
    method: http::Method,
    uri: http::Uri,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

/// What is noted of a request before its handler takes it, for what is told of it
/// after: nothing when neither metrics nor an access log is on.
struct Observed {
    started: Option<Instant>,
    /// Copied only when an access log wants it; boxed, so that what is moved along
    /// with every request stays small when none does.
    head: Option<Box<LoggedHead>>,
    version: Version,
}

impl Observed {
    fn before<B>(req: &HttpRequest<B>, ctx: &ServeContext) -> Observed {
        let observers = &ctx.observers;
        let observed = observers.metrics.is_some() || observers.access_log.is_some();
        Observed {
            started: observed.then(Instant::now),
            head: observers.access_log.as_ref().map(|_| {
                Box::new(LoggedHead {
                    time: SystemTime::now(),
                    method: req.method().clone(),
                    uri: req.uri().clone(),
                    referer: req.headers().get(http::header::REFERER).cloned(),
                    user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
                })
            }),
            version: req.version(),
        }
    }

    /// Finishes `resp` in place (`Connection: close` once draining; `then` due once it
    /// is sent) and tells the metrics and the access log of it.
    fn after(
        self,
        resp: &mut HttpResponse<Body>,
        facts: ConnFacts,
        ctx: &ServeContext,
        then: Option<HeadDeadline>,
    ) {
        resp.body_mut().then = then;
        if ctx.drain.is_draining() && self.version < Version::HTTP_2 {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let Some(started) = self.started else {
            return;
        };
        let status = resp.status().as_u16();
        let took = started.elapsed();
        if let Some(metrics) = &ctx.observers.metrics {
            metrics.observe(status, took);
        }
        if let (Some(log), Some(head)) = (&ctx.observers.access_log, self.head) {
            let head = *head;
            // No body goes out for these, whatever the handler returned.
            let bytes = if head.method == http::Method::HEAD || matches!(status, 204 | 304) {
                0
            } else {
                resp.body().size_hint().exact().unwrap_or_default()
            };
            log.log(Entry {
                time: head.time,
                peer: facts.peer,
                method: head.method,
                uri: head.uri,
                version: self.version,
                referer: head.referer,
                user_agent: head.user_agent,
                status,
                bytes,
                took,
                generation: ctx.observers.generation,
            });
        }
    }
}

/// The answer to one request: ready at once when its handler ran inline, else a
/// future (boxed: only requests with bodies, or whose handler runs off the workers,
/// pay for it, and hyper moves a small future per request instead of a large one).
pub(crate) enum Respond {
    Ready(Option<HttpResponse<Body>>),
    Later(Pin<Box<dyn Future<Output = HttpResponse<Body>> + Send>>),
}

impl Future for Respond {
    type Output = Result<HttpResponse<Body>, std::convert::Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Respond::Ready(resp) => match resp.take() {
                Some(resp) => Poll::Ready(Ok(resp)),
                // hyper polls a service future no more once it is ready.
                None => Poll::Pending,
            },
            Respond::Later(fut) => fut.as_mut().poll(cx).map(Ok),
        }
    }
}

/// Turns one HTTP request into a handler call and back. `then` is the connection's
/// deadline for its next request head, due once this response is sent (HTTP/1).
pub(crate) fn respond(
    mut req: HttpRequest<Incoming>,
    facts: ConnFacts,
    ctx: &ServeContext,
    then: Option<&HeadDeadline>,
) -> Respond {
    let observed = Observed::before(&req, ctx);
    let then = then.cloned();
    // Built in place, from the handler's call to hyper: a response is a few hundred
    // bytes, and each move of it is a copy.
    let mut resp = HttpResponse::new(Body::empty());
    if answer_now(&mut req, &mut resp, facts, ctx) {
        observed.after(&mut resp, facts, ctx, then);
        return Respond::Ready(Some(resp));
    }
    let ctx = ctx.clone();
    Respond::Later(Box::pin(async move {
        let in_flight = ctx.drain.request();
        let mut resp = match call_handler(req, facts, &ctx).await {
            Ok(resp) | Err(resp) => resp,
        };
        drop(in_flight);
        observed.after(&mut resp, facts, &ctx, then);
        resp
    }))
}

/// Answers a request right here, into `resp`, when that is all it takes: a bad one, or
/// a bodiless one whose handler runs inline and finds a free place to. `false` if not:
/// the request (and `resp`) are then as they came.
fn answer_now(
    req: &mut HttpRequest<Incoming>,
    resp: &mut HttpResponse<Body>,
    facts: ConnFacts,
    ctx: &ServeContext,
) -> bool {
    if let Some(why) = host_problem(req) {
        *resp = plain(StatusCode::BAD_REQUEST, why);
        return true;
    }
    // Reading a body may wake the connection task onto this worker (HTTP/2 flow
    // control); a handler run inline would hold it up, so only bodiless calls may.
    // An HTTP/2 service call runs in the connection's own task (hyper polls what it
    // returns in a task per stream): answered here, one call would hold up every
    // stream of the connection.
    if !req.body().is_end_stream() || !ctx.handler.runs_inline() || req.version() >= Version::HTTP_2
    {
        return false;
    }
    let _in_flight = ctx.drain.request_ref();
    let id = next_request_id();
    let (ran, outcome) = {
        let mut exchange =
            Exchange::new(Head::of(req), facts, id, BodyIn::Whole(Bytes::new()), resp);
        let ran = ctx.runner.try_inline(|| ctx.handler.handle(&mut exchange));
        (ran, exchange.finish())
    };
    match ran {
        Some(Ok(())) => {
            answer(resp, outcome, Head::of(req), ctx);
            recycle_headers(std::mem::take(req.headers_mut()));
            true
        }
        Some(Err(why)) => {
            *resp = task_failed(&why);
            true
        }
        // No free place: the request goes the long way.
        None => false,
    }
}

async fn call_handler(
    req: HttpRequest<Incoming>,
    facts: ConnFacts,
    ctx: &ServeContext,
) -> Result<HttpResponse<Body>, HttpResponse<Body>> {
    // `answer_now` has checked the head.
    let (parts, body) = req.into_parts();
    let id = next_request_id();
    let bodiless = body.is_end_stream();
    // Only the handler knows whether it reads this body in chunks; it is asked on the
    // head alone, before anything is read.
    let chunked = !bodiless && {
        let mut unused = HttpResponse::new(Body::empty());
        let head = Head::of_parts(&parts);
        let mut head = Exchange::new(head, facts, id, BodyIn::Whole(Bytes::new()), &mut unused);
        ctx.handler.streams_body(&mut head)
    };
    let max = ctx.limits.max_body_size;
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if !chunked && declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let body_in = if chunked {
        // A handler reading its body in chunks blocks on the runtime, which it may
        // only do off the runtime's workers.
        BodyIn::Chunks(body, ctx.limits.header_read_timeout)
    } else if bodiless {
        BodyIn::Whole(Bytes::new())
    } else {
        match Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
            .collect()
            .await
        {
            Ok(collected) => BodyIn::Whole(collected.to_bytes()),
            Err(err) if err.is::<LengthLimitError>() => return Err(too_large()),
            Err(err) => {
                debug!(cause = %err, "failed to read the request body");
                return Err(plain(StatusCode::BAD_REQUEST, "bad request body\n"));
            }
        }
    };
    let handler = ctx.handler.clone();
    let call = move || {
        let mut parts = parts;
        let mut resp = HttpResponse::new(Body::empty());
        let mut exchange = Exchange::new(Head::of_parts(&parts), facts, id, body_in, &mut resp);
        handler.handle(&mut exchange);
        let outcome = exchange.finish();
        drop(exchange);
        // Only the method, target and version are looked at from here on.
        recycle_headers(std::mem::take(&mut parts.headers));
        (resp, outcome, parts)
    };
    // A bodiless call that found no free inline place waits for one; the others
    // (and all of an in-process handler's) run on the blocking pool.
    let outcome = if bodiless && ctx.handler.runs_inline() {
        ctx.runner.run(call).await
    } else {
        ctx.runner.run_blocking(call).await
    };
    match outcome {
        Ok((mut resp, outcome, parts)) => {
            answer(&mut resp, outcome, Head::of_parts(&parts), ctx);
            Ok(resp)
        }
        Err(why) => Err(task_failed(&why)),
    }
}

/// A handler call that did not return (it panicked): logged and answered 500.
fn task_failed(why: &str) -> HttpResponse<Body> {
    warn!(
        "[{}] handler task failed: {why}; answered 500",
        std::process::id()
    );
    internal_error()
}

/// Makes `resp`, what a handler wrote, the answer: an invalid response is logged and
/// answered 500; a streamed body gets its producer started, or its reader attached.
fn answer(
    resp: &mut HttpResponse<Body>,
    outcome: Result<Option<Stream>, HandlerError>,
    head: Head<'_>,
    ctx: &ServeContext,
) {
    // hyper sends no body for HEAD on HTTP/1, but does on HTTP/2 (RFC 9110 §9.3.2 says
    // it must not): there the body is dropped here, a whole one's length kept.
    let bodiless = *head.method == http::Method::HEAD && head.version >= Version::HTTP_2;
    match outcome {
        Ok(None) if bodiless => {
            let len = resp.body().size_hint().exact().unwrap_or_default();
            // 1xx, 204 and 304 never carry a length.
            let lengthless = matches!(resp.status().as_u16(), 100..=199 | 204 | 304);
            if !lengthless && !resp.headers().contains_key(CONTENT_LENGTH) {
                resp.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(len));
            }
            *resp.body_mut() = Body::empty();
        }
        Ok(None) => {}
        // The stream is dropped unread.
        Ok(Some(_)) if bodiless => {}
        Ok(Some(stream)) => {
            let what = format!("{} {}", head.method, head.uri);
            let in_flight = ctx.drain.request();
            *resp.body_mut() = match stream {
                Stream::Push(producer) => {
                    start_stream(producer, ctx.drain.clone(), in_flight, what)
                }
                Stream::Pull(reader) => Body::pull(Pull::new(reader, ctx.clone(), in_flight, what)),
            };
        }
        Err(err) => {
            warn!(
                "[{}] {} {}: {err}; answered 500",
                std::process::id(),
                head.method,
                head.uri
            );
            *resp = internal_error();
        }
    }
}

/// RFC 9112 §3.2: an HTTP/1.1 request must name its host exactly once (HTTP/1.0 may
/// omit it; HTTP/2 names it in `:authority`, checked by hyper).
fn host_problem<B>(req: &HttpRequest<B>) -> Option<&'static str> {
    if req.version() >= Version::HTTP_2 {
        return None;
    }
    // A scan rather than a lookup: cheaper for the few headers most requests have.
    let hosts = req
        .headers()
        .iter()
        .filter(|(name, _)| *name == HOST)
        .take(2)
        .count();
    match hosts {
        0 if req.version() == Version::HTTP_11 => Some("HTTP/1.1 requires a Host header\n"),
        2 => Some("more than one Host header\n"),
        _ => None,
    }
}

fn internal_error() -> HttpResponse<Body> {
    plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
}

fn too_large() -> HttpResponse<Body> {
    let mut resp = plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    // The unread body is still on the wire; this connection cannot be reused.
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn plain(status: StatusCode, text: &'static str) -> HttpResponse<Body> {
    let mut resp = HttpResponse::new(Body::full(Bytes::from_static(text.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http1_1_needs_exactly_one_host_and_http1_0_and_h2_need_none() {
        let req = |version, hosts: &[&str]| {
            let mut b = HttpRequest::builder().version(version).uri("/");
            for h in hosts {
                b = b.header(HOST, *h);
            }
            b.body(()).unwrap()
        };
        assert!(host_problem(&req(Version::HTTP_11, &[])).is_some());
        assert!(host_problem(&req(Version::HTTP_11, &["a", "b"])).is_some());
        assert!(host_problem(&req(Version::HTTP_10, &["a", "b"])).is_some());
        assert!(host_problem(&req(Version::HTTP_11, &["a"])).is_none());
        assert!(host_problem(&req(Version::HTTP_10, &[])).is_none());
        assert!(host_problem(&req(Version::HTTP_2, &[])).is_none());
    }
}
