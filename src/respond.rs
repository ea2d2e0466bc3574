//! One request: its checks and limits, the handler call and the answer, with what the
//! metrics and the access log are told of it.

use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, HeaderName, HeaderValue};
use http::{Request as HttpRequest, Response as HttpResponse, StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::access_log::Entry;
use crate::handler::{HandlerError, Request, Response};
use crate::server::{ConnFacts, ServeContext};

/// The body of every response gem sends.
pub(crate) type Body = Full<Bytes>;

/// The parts of a request the access log needs after the handler has taken it.
struct Head {
    time: SystemTime,
    method: http::Method,
    uri: http::Uri,
    referer: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

/// Turns one HTTP request into a handler call and back.
pub(crate) async fn respond(
    req: HttpRequest<Incoming>,
    facts: ConnFacts,
    ctx: ServeContext,
) -> Result<HttpResponse<Body>, std::convert::Infallible> {
    let _in_flight = ctx.drain.request();
    // Timed only when someone is told.
    let observed = ctx.observers.metrics.is_some() || ctx.observers.access_log.is_some();
    let started = observed.then(Instant::now);
    let version = req.version();
    // Copied only when an access log wants them.
    let head = ctx.observers.access_log.as_ref().map(|_| Head {
        time: SystemTime::now(),
        method: req.method().clone(),
        uri: req.uri().clone(),
        referer: req.headers().get(http::header::REFERER).cloned(),
        user_agent: req.headers().get(http::header::USER_AGENT).cloned(),
    });
    let mut resp = match call_handler(req, &ctx).await {
        Ok(resp) => resp,
        Err(resp) => resp,
    };
    if ctx.drain.is_draining() && version < Version::HTTP_2 {
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let Some(started) = started else {
        return Ok(resp);
    };
    let status = resp.status().as_u16();
    let took = started.elapsed();
    if let Some(metrics) = &ctx.observers.metrics {
        metrics.observe(status, took);
    }
    if let (Some(log), Some(head)) = (&ctx.observers.access_log, head) {
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
            version,
            referer: head.referer,
            user_agent: head.user_agent,
            status,
            bytes,
            took,
            generation: ctx.observers.generation,
        });
    }
    Ok(resp)
}

async fn call_handler(
    req: HttpRequest<Incoming>,
    ctx: &ServeContext,
) -> Result<HttpResponse<Body>, HttpResponse<Body>> {
    if let Some(why) = host_problem(&req) {
        return Err(plain(StatusCode::BAD_REQUEST, why));
    }
    let max = ctx.limits.max_body_size;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let (parts, body) = req.into_parts();
    let bodiless = body.is_end_stream();
    let body = if bodiless {
        Bytes::new()
    } else {
        match Limited::new(body, usize::try_from(max).unwrap_or(usize::MAX))
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<LengthLimitError>() => return Err(too_large()),
            Err(err) => {
                debug!(cause = %err, "failed to read the request body");
                return Err(plain(StatusCode::BAD_REQUEST, "bad request body\n"));
            }
        }
    };
    let handler = ctx.handler.clone();
    let call = move || {
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let headers = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        let result = handler.handle(&Request::new(parts.method.as_str(), target, headers, &body));
        (result, parts)
    };
    // Reading a body may have woken the connection task onto this worker (HTTP/2 flow
    // control); a handler run inline would hold it up, so only bodiless calls may. (The
    // shadowed `Incoming` body lives until the call is over, for the same reason.)
    let may_inline = bodiless && ctx.handler.runs_inline();
    let outcome = ctx.runner.run(may_inline, call).await;
    let (result, parts) = match outcome {
        Ok(done) => done,
        Err(why) => {
            warn!(
                "[{}] handler task failed: {why}; answered 500",
                std::process::id()
            );
            return Err(internal_error());
        }
    };
    result.and_then(to_http).map_err(|err| {
        warn!(
            "[{}] {} {}: {err}; answered 500",
            std::process::id(),
            parts.method,
            parts.uri
        );
        internal_error()
    })
}

/// RFC 9112 §3.2: an HTTP/1.1 request must name its host exactly once (HTTP/1.0 may
/// omit it; HTTP/2 names it in `:authority`, checked by hyper).
fn host_problem<B>(req: &HttpRequest<B>) -> Option<&'static str> {
    if req.version() >= Version::HTTP_2 {
        return None;
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == Version::HTTP_11 => Some("HTTP/1.1 requires a Host header\n"),
        (Some(_), Some(_)) => Some("more than one Host header\n"),
        _ => None,
    }
}

fn internal_error() -> HttpResponse<Body> {
    plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n")
}

/// Validates a handler's response and converts it for hyper.
fn to_http(resp: Response) -> Result<HttpResponse<Body>, HandlerError> {
    let status = StatusCode::from_u16(resp.status)
        .map_err(|_| HandlerError::Invalid(format!("status {} is not valid", resp.status)))?;
    let mut out = HttpResponse::new(Full::new(Bytes::from(resp.body)));
    *out.status_mut() = status;
    let headers = out.headers_mut();
    headers.reserve(resp.headers.len());
    for (name, value) in resp.headers {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| HandlerError::Invalid(format!("header name {name:?} is not valid")))?;
        let v = HeaderValue::from_str(&value).map_err(|_| {
            HandlerError::Invalid(format!("header {name:?} has an invalid value {value:?}"))
        })?;
        headers.append(n, v);
    }
    Ok(out)
}

fn too_large() -> HttpResponse<Body> {
    let mut resp = plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    // The unread body is still on the wire; this connection cannot be reused.
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

fn plain(status: StatusCode, text: &'static str) -> HttpResponse<Body> {
    let mut resp = HttpResponse::new(Full::new(Bytes::from_static(text.as_bytes())));
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
    fn invalid_handler_output_is_refused() {
        let bad_status = Response::new(1000);
        assert!(matches!(to_http(bad_status), Err(HandlerError::Invalid(m)) if m.contains("1000")));
        let bad_header = Response::new(200).with_header("bad name", "x");
        assert!(
            matches!(to_http(bad_header), Err(HandlerError::Invalid(m)) if m.contains("bad name"))
        );
        let bad_value = Response::new(200).with_header("x-a", "line\nbreak");
        assert!(to_http(bad_value).is_err());
        let ok = to_http(Response::text(201, "hi").with_header("x-a", "1")).unwrap();
        assert_eq!(ok.status(), 201);
        assert_eq!(ok.headers()["x-a"], "1");
    }

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
