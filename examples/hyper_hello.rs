//! The benchmark ceiling: a plain hyper server with gem's runtime settings (tokio
//! multi-thread with the default worker count and a shared-queue check every 61 tasks,
//! hyper-util's auto HTTP/1 + HTTP/2 builder), answering `Hello world.` in-process with
//! no plugin, no drain bookkeeping. `GET /stream?mb=N` streams N MiB generated the way
//! the demo plugin's `/stream` does (64 KiB chunks, each copied once), for the
//! streaming benchmark.
//!
//! `cargo run --release --example hyper_hello -- 127.0.0.1:8081`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{Either, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

fn main() -> anyhow::Result<()> {
    // gem's runtime settings (src/main.rs).
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .global_queue_interval(61)
        .build()?
        .block_on(serve())
}

async fn serve() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8081".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let http = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let http = http.clone();
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                if req.uri().path() == "/stream" {
                    return Ok::<_, Infallible>(generated(req.uri().query()));
                }
                let body = Full::new(Bytes::from_static(b"Hello world."));
                let mut resp = http::Response::new(Either::Left(body));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                Ok(resp)
            });
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// `mb` MiB (from `mb=N`, default 1) of the demo plugin's pattern, 64 KiB a chunk.
fn generated(query: Option<&str>) -> http::Response<Either<Full<Bytes>, StreamBody<Lazy>>> {
    let mb: usize = query
        .and_then(|q| q.strip_prefix("mb="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let block: Vec<u8> = (0..64 * 1024)
        .map(|i| b"0123456789abcdef"[i % 16])
        .collect();
    http::Response::new(Either::Right(StreamBody::new(Lazy {
        block,
        left: mb * 16,
    })))
}

/// Makes each chunk when hyper asks for it, as a producer behind backpressure would.
struct Lazy {
    block: Vec<u8>,
    left: usize,
}

impl futures_util::Stream for Lazy {
    type Item = Result<Frame<Bytes>, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        let chunk = Bytes::copy_from_slice(&self.block);
        std::task::Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}
