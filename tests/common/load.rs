//! A load client for restart tests: keep-alive clients and new-connection-per-request
//! clients hammer `GET /` and count every failed request and connection error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::client::{H1, H2};

/// Hard cap on how long a load may run, whatever the test does.
const MAX_RUN: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
pub struct Report {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, described.
    pub failures: Vec<String>,
    /// Body text -> count.
    pub bodies: BTreeMap<String, u64>,
    /// Connections opened, for the record.
    pub connections: u64,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    connections: AtomicU64,
    failures: Mutex<Vec<String>>,
    bodies: Mutex<BTreeMap<String, u64>>,
    latest: Mutex<String>,
}

impl Shared {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }

    fn record(&self, status: u16, body: &[u8]) {
        let text = String::from_utf8_lossy(body).into_owned();
        if status != 200 {
            self.fail(format!("status {status}: {text}"));
            return;
        }
        self.ok.fetch_add(1, Ordering::Relaxed);
        *self.bodies.lock().unwrap().entry(text.clone()).or_default() += 1;
        *self.latest.lock().unwrap() = text;
    }

    fn running(&self, start: Instant) -> bool {
        !self.stop.load(Ordering::Relaxed) && start.elapsed() < MAX_RUN
    }
}

/// A running load.
pub struct Load {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

impl Load {
    /// `keepalive` HTTP/1.1 keep-alive clients, `fresh` new-connection-per-request
    /// clients and `h2` HTTP/2 clients, all on `GET /`.
    pub fn start(addr: SocketAddr, keepalive: usize, fresh: usize, h2: usize) -> Load {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for _ in 0..keepalive {
                    tasks.push(tokio::spawn(keepalive_client(addr, s.clone())));
                }
                for _ in 0..fresh {
                    tasks.push(tokio::spawn(fresh_client(addr, s.clone())));
                }
                for _ in 0..h2 {
                    tasks.push(tokio::spawn(h2_client(addr, s.clone())));
                }
                for t in tasks {
                    t.await.unwrap();
                }
            });
        });
        Load { shared, thread }
    }

    /// Successful requests so far.
    pub fn ok(&self) -> u64 {
        self.shared.ok.load(Ordering::Relaxed)
    }

    /// Failed requests so far.
    pub fn failed(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    /// The body of the most recent successful response.
    pub fn latest(&self) -> String {
        self.shared.latest.lock().unwrap().clone()
    }

    /// Stops every client and reports.
    pub fn stop(self) -> Report {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        let s = &self.shared;
        Report {
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            failures: s.failures.lock().unwrap().clone(),
            bodies: s.bodies.lock().unwrap().clone(),
            connections: s.connections.load(Ordering::Relaxed),
        }
    }
}

async fn keepalive_client(addr: SocketAddr, s: Arc<Shared>) {
    let start = Instant::now();
    while s.running(start) {
        s.connections.fetch_add(1, Ordering::Relaxed);
        let mut conn = match H1::connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                s.fail(format!("keep-alive connect: {e}"));
                continue;
            }
        };
        while s.running(start) {
            match conn.get("/").await {
                Ok(resp) => {
                    s.record(resp.status, &resp.body);
                    if resp.close {
                        break;
                    }
                }
                Err(e) => {
                    s.fail(format!("keep-alive request: {e}"));
                    break;
                }
            }
            if !conn.is_open() {
                break;
            }
        }
    }
}

async fn fresh_client(addr: SocketAddr, s: Arc<Shared>) {
    let start = Instant::now();
    while s.running(start) {
        s.connections.fetch_add(1, Ordering::Relaxed);
        let result = async { H1::connect(addr).await?.get("/").await }.await;
        match result {
            Ok(resp) => s.record(resp.status, &resp.body),
            Err(e) => s.fail(format!("new-connection request: {e}")),
        }
    }
}

async fn h2_client(addr: SocketAddr, s: Arc<Shared>) {
    let start = Instant::now();
    while s.running(start) {
        s.connections.fetch_add(1, Ordering::Relaxed);
        let mut conn = match H2::connect(addr).await {
            Ok(c) => c,
            Err(e) => {
                s.fail(format!("h2 connect: {e}"));
                continue;
            }
        };
        while s.running(start) && conn.is_open() {
            match conn.get("/").await {
                Ok(resp) => s.record(resp.status, &resp.body),
                Err(e) if e.to_string().contains("GOAWAY") || !conn.is_open() => break,
                Err(e) => {
                    s.fail(format!("h2 request: {e}"));
                    break;
                }
            }
        }
    }
}
