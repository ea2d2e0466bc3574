//! Helpers for the fleet tests: the metrics listener (found through /proc, so the tests
//! depend on no log wording for it), Prometheus text read back, and the access log file.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::client::get;
use super::{Gem, Spec, wait_for};

/// A port the OS says is free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `Spec::new("hello", ...)` with `metrics_listen` on a port the OS chose, plus `extra`
/// top-level TOML lines (before any table). (A fixed port, so that a generation that
/// bound it anew instead of inheriting it would fail while the old one holds it.)
pub fn metrics_spec(extra: &str) -> Spec {
    Spec::new(
        "hello",
        &format!("metrics_listen = \"127.0.0.1:{}\"\n{extra}", free_port()),
    )
}

/// One HTTP/1.1 request in origin form (`GET /path`, as curl sends it; the hyper
/// client of `client.rs` sends the absolute form) on a new connection, with
/// `headers` (`"Name: value"`); the status and the body.
pub fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    assert!(!chunked, "a chunked answer to {method} {target}: {text:?}");
    (status, body.to_owned())
}

/// Starts `spec` and returns the gem, with `addr` taken from the `listen` log line (not
/// the metrics one), and the metrics listener's address.
pub fn start_with_metrics(spec: Spec) -> (Gem, SocketAddr) {
    let mut gem = Gem::start(spec);
    gem.addr = listen_addr(&gem);
    let pid = gem.pid();
    let metrics = metrics_addr(pid, gem.addr);
    (gem, metrics)
}

/// The address in the `[PID] listening on http://ADDR (listen = "...")` line.
pub fn listen_addr(gem: &Gem) -> SocketAddr {
    let line = gem.wait_log("(listen = ");
    let start = line.find("http://").expect("an http:// address") + "http://".len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    rest[..end].parse().expect("a socket address")
}

/// The TCP sockets `pid` listens on (IPv4), from its fds and `/proc/PID/net/tcp`.
pub fn listening(pid: u32) -> Vec<SocketAddr> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let inodes: HashSet<String> = fds
        .flatten()
        .filter_map(|fd| {
            let link = std::fs::read_link(fd.path()).ok()?;
            let link = link.to_str()?;
            Some(link.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                return None;
            }
            let (ip, port) = f[1].split_once(':')?;
            let ip = u32::from_str_radix(ip, 16).ok()?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // The kernel prints the network-order address as a native-endian word.
            let ip = Ipv4Addr::from(ip.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        })
        .collect()
}

/// The one listening socket of `pid` that is not `serving`: the metrics listener.
pub fn metrics_addr(pid: u32, serving: SocketAddr) -> SocketAddr {
    wait_for(
        &format!("process {pid} to listen on a metrics address"),
        || {
            let others: Vec<SocketAddr> = listening(pid)
                .into_iter()
                .filter(|a| *a != serving)
                .collect();
            match others.as_slice() {
                [one] => Some(*one),
                _ => None,
            }
        },
    )
}

/// `GET /metrics`: the exposition text, or why not.
pub fn scrape(metrics: SocketAddr) -> Result<String, String> {
    let resp = get(metrics, "/metrics").map_err(|e| e.to_string())?;
    if resp.status != 200 {
        return Err(format!("status {}: {}", resp.status, resp.text()));
    }
    Ok(resp.text())
}

/// The sum of every sample of metric `name` whose labels include all of `labels`;
/// `None` when there is no such sample.
pub fn sample_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match line.rsplit_once(' ') {
            Some(parts) => parts,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let has = |k: &str, v: &str| label_text.contains(&format!("{k}=\"{v}\""));
        if !labels.iter().all(|(k, v)| has(k, v)) {
            continue;
        }
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        found = Some(found.unwrap_or(0.0) + v);
    }
    found
}

/// `gem_requests_total`, summed over the status classes (0 before the first request).
pub fn requests_total(text: &str) -> f64 {
    sample_sum(text, "gem_requests_total", &[]).unwrap_or(0.0)
}

/// `gem_restarts_total{result="ok"}` (0 before the first restart).
pub fn restarts_ok(text: &str) -> f64 {
    sample_sum(text, "gem_restarts_total", &[("result", "ok")]).unwrap_or(0.0)
}

/// The lines of the file at `path` (none when it does not exist).
pub fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until the file at `path` has a line containing `needle`; returns it.
pub fn wait_line(path: &Path, needle: &str) -> String {
    wait_for(
        &format!("a line containing {needle:?} in {}", path.display()),
        || lines_of(path).into_iter().find(|l| l.contains(needle)),
    )
}
