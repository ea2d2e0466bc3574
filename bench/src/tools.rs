//! Runs the load generators (wrk, h2load) and reads their reports.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What one wrk run reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wrk {
    pub requests: u64,
    pub rps: f64,
    pub p99_ms: f64,
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
    pub non_2xx: u64,
}

impl Wrk {
    pub fn errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non_2xx
    }
}

/// `wrk -t2 -c{conns} -d{secs}s --latency`, with `Connection: close` when `close`.
pub fn wrk(addr: SocketAddr, conns: u32, duration: Duration, close: bool) -> Result<Wrk> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{}s", duration.as_secs().max(1)),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{addr}/"));
    let out = cmd.output().context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text)
}

pub(crate) fn parse_wrk(text: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse()?,
            [n, "requests", "in", ..] => w.requests = n.parse()?,
            ["99%", v] => w.p99_ms = millis(v)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => w.non_2xx = n.parse()?,
            [
                "Socket",
                "errors:",
                "connect",
                c,
                "read",
                r,
                "write",
                wr,
                "timeout",
                t,
            ] => {
                w.connect = c.trim_end_matches(',').parse()?;
                w.read = r.trim_end_matches(',').parse()?;
                w.write = wr.trim_end_matches(',').parse()?;
                w.timeout = t.parse()?;
            }
            _ => {}
        }
    }
    if w.requests == 0 {
        bail!("could not read wrk's report: {text}");
    }
    Ok(w)
}

/// wrk prints `1.23ms`, `456.00us` or `1.20s`.
fn millis(v: &str) -> Result<f64> {
    let (n, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown latency unit in {v:?}")
    };
    Ok(n.parse::<f64>()? * scale)
}

/// What one h2load run reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct H2load {
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
}

/// `h2load -c16 -m8 -D{secs}` over HTTP/2 prior knowledge.
pub fn h2load(addr: SocketAddr, duration: Duration) -> Result<H2load> {
    let out = Command::new("h2load")
        .args([
            "-c16",
            "-m8",
            "-t2",
            &format!("-D{}", duration.as_secs().max(1)),
            &format!("http://{addr}/"),
        ])
        .output()
        .context("running h2load (apt-get install nghttp2-client)")?;
    parse_h2load(&String::from_utf8_lossy(&out.stdout))
}

/// h2load's `requests:` line.
pub(crate) fn parse_h2load(text: &str) -> Result<H2load> {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("requests: ") else {
            continue;
        };
        let n = |word: &str| -> u64 {
            rest.split(',')
                .find(|p| p.trim().ends_with(word))
                .and_then(|p| p.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        return Ok(H2load {
            total: n("total"),
            succeeded: n("succeeded"),
            failed: n("failed"),
            errored: n("errored"),
            timeout: n("timeout"),
        });
    }
    bail!("could not read h2load's report: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let text = "Running 5s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n\
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            Latency   616.36us  312.51us  11.72ms   84.01%\n\
            Latency Distribution\n     50%  563.00us\n     99%    1.62ms\n\
            512345 requests in 5.00s, 61.08MB read\n\
            Socket errors: connect 1, read 2, write 3, timeout 4\n\
            Non-2xx or 3xx responses: 5\nRequests/sec: 102455.67\nTransfer/sec:     12.21MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.requests, 512345);
        assert!((w.rps - 102455.67).abs() < 0.01);
        assert!((w.p99_ms - 1.62).abs() < 1e-9);
        assert_eq!(
            (w.connect, w.read, w.write, w.timeout, w.non_2xx),
            (1, 2, 3, 4, 5)
        );
        assert_eq!(w.errors(), 15);
    }
}
