//! The Go original's graceful-restart walkthrough, with an in-process handler.
//!
//! 1. `cargo run --example graceful` and open <http://127.0.0.1:8080>: `Hello world.`
//! 2. Change `handler` below to `new_handler`, then `cargo build --example graceful`.
//! 3. `kill -HUP $(cat graceful.pid)`: the new binary takes over the socket, the old
//!    one drains, and <http://127.0.0.1:8080> answers
//!    `Congratulation! Server has been upgraded.` No request fails on the way.
//! 4. `kill -TERM $(cat graceful.pid)` drains and exits.
//!
//! `GRACEFUL_LISTEN` overrides the address (e.g. `127.0.0.1:0` for an OS-chosen port).

use std::time::Duration;

use gem::{Request, Response, Server, ServerConfig};

#[allow(dead_code)]
fn handler(req: &Request<'_>) -> Response {
    reply(req, "Hello world.")
}

#[allow(dead_code)]
fn new_handler(req: &Request<'_>) -> Response {
    reply(req, "Congratulation! Server has been upgraded.")
}

/// `/sleep?ms=N` holds the request for N ms, to watch a drain wait for it.
fn reply(req: &Request<'_>, text: &'static str) -> Response {
    if req.path() == "/sleep" {
        let ms = req
            .query_param("ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        std::thread::sleep(Duration::from_millis(ms));
    }
    Response::text(200, text)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_target(false).init();
    let listen = std::env::var("GRACEFUL_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    Server::builder()
        .listen(listen)
        .handler(handler)
        .pid_file("graceful.pid")
        .load_config(ServerConfig {
            wait_timeout: Duration::from_secs(15),
            ..Default::default()
        })
        .build()?
        .run()
        .await?;
    Ok(())
}
