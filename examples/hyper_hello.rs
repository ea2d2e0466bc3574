//! The benchmark ceiling: a plain hyper server with gem's runtime settings (tokio
//! multi-thread with the default worker count and a shared-queue check every 61 tasks,
//! hyper-util's auto HTTP/1 + HTTP/2 builder), answering `Hello world.` in-process with
//! no plugin, no drain bookkeeping.
//!
//! `cargo run --release --example hyper_hello -- 127.0.0.1:8081`

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
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
            let service = service_fn(|_req| async {
                let mut resp = http::Response::new(Full::new(Bytes::from_static(b"Hello world.")));
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                Ok::<_, Infallible>(resp)
            });
            let _ = http.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
