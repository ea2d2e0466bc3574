//! A small HTTP/1.1 and HTTP/2 client on hyper's connection API, with blocking
//! wrappers so tests stay plain `#[test]` functions.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A response, fully read.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Bytes,
    /// The server asked to close the connection.
    pub close: bool,
    pub version: http::Version,
    pub headers: http::HeaderMap,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub type Error = Box<dyn std::error::Error + Send + Sync>;

fn request(method: &str, addr: SocketAddr, path: &str, body: Bytes) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::HOST, addr.to_string())
        .body(Full::new(body))
        .unwrap()
}

async fn read(resp: http::Response<hyper::body::Incoming>) -> Result<Resp, Error> {
    let status = resp.status().as_u16();
    let version = resp.version();
    let close = resp
        .headers()
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(Resp {
        status,
        body,
        close,
        version,
        headers,
    })
}

/// One HTTP/1.1 keep-alive connection.
pub struct H1 {
    addr: SocketAddr,
    sender: http1::SendRequest<Full<Bytes>>,
}

impl H1 {
    pub async fn connect(addr: SocketAddr) -> Result<H1, Error> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(H1 { addr, sender })
    }

    pub async fn send(&mut self, method: &str, path: &str, body: Bytes) -> Result<Resp, Error> {
        self.sender.ready().await?;
        let resp = self
            .sender
            .send_request(request(method, self.addr, path, body))
            .await?;
        read(resp).await
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp, Error> {
        self.send("GET", path, Bytes::new()).await
    }

    /// Whether the connection can take another request.
    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// One HTTP/2 connection (prior knowledge, no TLS).
#[derive(Clone)]
pub struct H2 {
    addr: SocketAddr,
    sender: http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    pub async fn connect(addr: SocketAddr) -> Result<H2, Error> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(H2 { addr, sender })
    }

    pub async fn get(&mut self, path: &str) -> Result<Resp, Error> {
        self.send("GET", path).await
    }

    pub async fn send(&mut self, method: &str, path: &str) -> Result<Resp, Error> {
        self.sender.ready().await?;
        let resp = self
            .sender
            .send_request(request(method, self.addr, path, Bytes::new()))
            .await?;
        read(resp).await
    }

    pub fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }
}

/// Runs `fut` on a fresh single-threaded runtime.
pub fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

/// `GET path` on a new HTTP/1.1 connection.
pub fn get(addr: SocketAddr, path: &str) -> Result<Resp, Error> {
    block_on(async { H1::connect(addr).await?.get(path).await })
}

/// `POST path` with `body` on a new HTTP/1.1 connection.
pub fn post(addr: SocketAddr, path: &str, body: Vec<u8>) -> Result<Resp, Error> {
    block_on(async {
        H1::connect(addr)
            .await?
            .send("POST", path, Bytes::from(body))
            .await
    })
}

/// `GET path` on a new HTTP/2 connection.
pub fn get_h2(addr: SocketAddr, path: &str) -> Result<Resp, Error> {
    block_on(async { H2::connect(addr).await?.get(path).await })
}

/// A bodiless `method path` on a new HTTP/1.1 or HTTP/2 connection.
pub fn send(addr: SocketAddr, h2: bool, method: &str, path: &str) -> Result<Resp, Error> {
    block_on(async {
        match h2 {
            true => H2::connect(addr).await?.send(method, path).await,
            false => {
                H1::connect(addr)
                    .await?
                    .send(method, path, Bytes::new())
                    .await
            }
        }
    })
}

/// Starts `GET path` on its own thread; join the handle for the result.
pub fn spawn_get(addr: SocketAddr, path: &str) -> std::thread::JoinHandle<Result<Resp, String>> {
    let path = path.to_owned();
    std::thread::spawn(move || get(addr, &path).map_err(|e| e.to_string()))
}
