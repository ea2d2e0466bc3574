//! gem in a fleet: a rolling upgrade of three instances behind HAProxy (Debian's
//! `haproxy`, active checks on `/readyz`), with and without `shutdown_delay`; and what
//! the access log and the metrics listener cost in keep-alive throughput.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::peers::{self, Build, HELLO, UPGRADED};
use crate::tools::{Wrk, wrk};
use crate::{Plan, median, verdict};

/// HAProxy's active check: every `CHECK_INTER`, down after `FALL` failures in a row, up
/// after `RISE` successes. The same figures as contrib/haproxy.cfg.
const CHECK_INTER: Duration = Duration::from_millis(200);
const FALL: u32 = 2;
const RISE: u32 = 2;
/// Longer than `CHECK_INTER` × `FALL` (400 ms), with room for the check in flight.
const SHUTDOWN_DELAY: &str = "1s";

/// A free loopback address.
fn free_addr() -> Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], peers::free_port()?)))
}

/// `GET path` over HTTP/1.0 on a new connection: status and body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: b\r\n\r\n").as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line from {addr}: {text:?}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // HAProxy's stats page answers chunked even to HTTP/1.0.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok((status, dechunk(body)?));
    }
    Ok((status, body.to_owned()))
}

/// A chunked body, joined.
fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .context("a chunk without its size")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).context("a chunk cut short")?;
        out.push_str(chunk);
        rest = after.get(size..).unwrap_or("").trim_start_matches("\r\n");
    }
}

/// Waits for `pid`'s child to exit, up to `limit`; SIGKILL after that.
fn wait_child(child: &mut Child, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    while child.try_wait()?.is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("process {} still ran {limit:?} after SIGTERM", child.id());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(t0.elapsed())
}

/// One gem instance on a fixed address, in a directory of its own that outlives the
/// process (the next one started in the slot uses it too).
struct Slot {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    gem: PathBuf,
    /// gem.toml lines besides `listen` and `handler`.
    extra: String,
    child: Option<Child>,
}

impl Slot {
    fn new(build: &Build, extra: &str) -> Result<Slot> {
        Ok(Slot {
            dir: tempfile::tempdir()?,
            addr: free_addr()?,
            gem: build.gem.clone(),
            extra: extra.to_owned(),
            child: None,
        })
    }

    /// Starts gem serving `so` (a copy of it) and waits until it answers `body`.
    fn launch(&mut self, so: &Path, body: &str) -> Result<()> {
        let handler = self.dir.path().join("handler.so");
        std::fs::copy(so, &handler)?;
        std::fs::write(
            self.dir.path().join("gem.toml"),
            format!(
                "listen = [\"{}\"]\nhandler = {handler:?}\n{}\n",
                self.addr, self.extra
            ),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gem.log"))?;
        let child = Command::new(&self.gem)
            .arg("serve")
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting gem")?;
        self.child = Some(child);
        peers::wait_serving(self.addr, body).with_context(|| {
            format!(
                "gem on {} did not start; its log: {}",
                self.addr,
                std::fs::read_to_string(self.dir.path().join("gem.log")).unwrap_or_default()
            )
        })
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM to the process (by pid), then waits for it to exit.
    fn stop(&mut self) -> Result<Duration> {
        let Some(mut child) = self.child.take() else {
            return Ok(Duration::ZERO);
        };
        if child.try_wait()?.is_none() {
            peers::signal(child.id(), "TERM")?;
        }
        wait_child(&mut child, Duration::from_secs(30))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = peers::signal(child.id(), "TERM");
            if wait_child(&mut child, Duration::from_secs(30)).is_err() {
                eprintln!("gem {} did not stop: SIGKILL", child.id());
            }
        }
    }
}

/// HAProxy in the foreground (`-db`) with a generated config, stopped by pid.
struct Haproxy {
    child: Option<Child>,
    _dir: tempfile::TempDir,
    addr: SocketAddr,
    stats: SocketAddr,
}

impl Haproxy {
    /// Balances over `servers` (serving address, check address); returns once every
    /// server is UP.
    fn start(servers: &[(SocketAddr, SocketAddr)]) -> Result<Haproxy> {
        let dir = tempfile::tempdir()?;
        let addr = free_addr()?;
        let stats = free_addr()?;
        let mut backend = String::new();
        for (i, (serve, check)) in servers.iter().enumerate() {
            let _ = writeln!(
                backend,
                "    server gem{} {serve} check port {}",
                i + 1,
                check.port()
            );
        }
        // contrib/haproxy.cfg's defaults and backend, on generated loopback ports, with
        // no logging, chroot or user switch (the bench runs unprivileged).
        let cfg = format!(
            "global\n    maxconn 4096\n\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    \
             timeout server 30s\n    timeout check 1s\n    retries 3\n    option redispatch\n    \
             retry-on conn-failure empty-response\n    option http-keep-alive\n    \
             http-reuse safe\n\n\
             frontend fleet\n    bind {addr}\n    default_backend gems\n\n\
             frontend stats\n    bind {stats}\n    stats enable\n    stats uri /stats\n\n\
             backend gems\n    balance roundrobin\n    option httpchk GET /readyz\n    \
             http-check expect status 200\n    \
             default-server inter {inter}ms fall {FALL} rise {RISE}\n{backend}",
            inter = CHECK_INTER.as_millis(),
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg)?;
        let log = std::fs::File::create(dir.path().join("haproxy.log"))?;
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting haproxy (apt-get install haproxy)")?;
        let proxy = Haproxy {
            child: Some(child),
            _dir: dir,
            addr,
            stats,
        };
        peers::wait_port(addr).with_context(|| {
            format!(
                "haproxy did not start: {}",
                std::fs::read_to_string(proxy._dir.path().join("haproxy.log")).unwrap_or_default()
            )
        })?;
        for i in 1..=servers.len() {
            proxy.wait_status(&format!("gem{i}"), "UP", Duration::from_secs(10))?;
        }
        Ok(proxy)
    }

    /// The stats CSV, one map per row (keyed by the header's column names).
    fn stats(&self) -> Result<Vec<HashMap<String, String>>> {
        let (status, csv) = http_get(self.stats, "/stats;csv")?;
        if status != 200 {
            bail!("haproxy stats answered {status}");
        }
        let mut lines = csv.lines();
        let header: Vec<String> = lines
            .next()
            .context("empty stats")?
            .trim_start_matches("# ")
            .split(',')
            .map(str::to_owned)
            .collect();
        Ok(lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                header
                    .iter()
                    .cloned()
                    .zip(l.split(',').map(str::to_owned))
                    .collect()
            })
            .collect())
    }

    /// Row `svname` of backend `gems`.
    fn row(&self, svname: &str) -> Result<HashMap<String, String>> {
        self.stats()?
            .into_iter()
            .find(|r| {
                r.get("pxname").map(String::as_str) == Some("gems")
                    && r.get("svname").map(String::as_str) == Some(svname)
            })
            .with_context(|| format!("no row gems/{svname} in haproxy stats"))
    }

    /// The check status of server `name`: "UP", "DOWN", "UP 1/2" (going down), ...
    fn status(&self, name: &str) -> Result<String> {
        Ok(self.row(name)?.get("status").cloned().unwrap_or_default())
    }

    fn wait_status(&self, name: &str, want: &str, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        while self.status(name)? != want {
            if t0.elapsed() > limit {
                bail!("haproxy did not see {name} {want} within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(t0.elapsed())
    }

    /// A counter of the backend's BACKEND row (0 when empty).
    fn backend_counter(&self, column: &str) -> Result<u64> {
        Ok(self
            .row("BACKEND")?
            .get(column)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGUSR1 would be a soft stop; the bench is over, so a hard one.
            let _ = peers::signal(child.id(), "TERM");
            if wait_child(&mut child, Duration::from_secs(10)).is_err() {
                eprintln!("haproxy {} did not stop: SIGKILL", child.id());
            }
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one rolling upgrade saw.
struct Roll {
    delay: &'static str,
    wrk: Wrk,
    /// Per instance: SIGTERM until HAProxy marked it DOWN (None: never seen down).
    down_ms: Vec<Option<f64>>,
    /// Per instance: SIGTERM until the process exited.
    exit_ms: Vec<f64>,
    retries: u64,
    redispatches: u64,
    conn_errors: u64,
    resp_errors: u64,
    /// Instances (direct) and HAProxy answers that serve the new body at the end.
    new_body: usize,
    proxied_new: usize,
}

const PROXIED_CHECKS: usize = 12;

/// Three instances behind HAProxy under `wrk -c64`; each in turn gets SIGTERM and is
/// started again with the other plugin once it has exited.
fn roll(build: &Build, delay: &'static str, duration: Duration) -> Result<Roll> {
    let mut slots = Vec::new();
    let mut servers = Vec::new();
    for _ in 0..3 {
        let metrics = free_addr()?;
        let mut slot = Slot::new(
            build,
            &format!("metrics_listen = \"{metrics}\"\nshutdown_delay = \"{delay}\""),
        )?;
        slot.launch(&build.hello_so, HELLO)?;
        servers.push((slot.addr, metrics));
        slots.push(slot);
    }
    let mut proxy = Haproxy::start(&servers)?;
    let front = proxy.addr;
    let load = std::thread::spawn(move || wrk(front, 64, duration, false));
    std::thread::sleep(Duration::from_secs(1));
    let (mut down_ms, mut exit_ms) = (Vec::new(), Vec::new());
    let rolled = (|| -> Result<()> {
        for (i, slot) in slots.iter_mut().enumerate() {
            let name = format!("gem{}", i + 1);
            let mut child = slot.child.take().context("slot without a process")?;
            let t0 = Instant::now();
            peers::signal(child.id(), "TERM")?;
            let mut down = None;
            // Until the process exits: when HAProxy takes it out.
            while child.try_wait()?.is_none() {
                if down.is_none() && proxy.status(&name)?.starts_with("DOWN") {
                    down = Some(t0.elapsed().as_secs_f64() * 1000.0);
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    bail!("{name} still ran 30 s after SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let exited = t0.elapsed().as_secs_f64() * 1000.0;
            let _ = child.wait();
            slot.launch(&build.upgraded_so, UPGRADED)?;
            if down.is_none() && proxy.status(&name)?.starts_with("DOWN") {
                down = Some(t0.elapsed().as_secs_f64() * 1000.0);
            }
            proxy.wait_status(&name, "UP", Duration::from_secs(10))?;
            down_ms.push(down);
            exit_ms.push(exited);
        }
        Ok(())
    })();
    let w = load
        .join()
        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
    rolled?;
    let new_body = slots
        .iter()
        .filter(|s| peers::get(s.addr).ok().as_deref() == Some(UPGRADED))
        .count();
    let proxied_new = (0..PROXIED_CHECKS)
        .filter(|_| peers::get(front).ok().as_deref() == Some(UPGRADED))
        .count();
    let roll = Roll {
        delay,
        wrk: w,
        down_ms,
        exit_ms,
        retries: proxy.backend_counter("wretr")?,
        redispatches: proxy.backend_counter("wredis")?,
        conn_errors: proxy.backend_counter("econ")?,
        resp_errors: proxy.backend_counter("eresp")?,
        new_body,
        proxied_new,
    };
    proxy.stop();
    for slot in &mut slots {
        slot.stop()?;
    }
    Ok(roll)
}

/// Scenario: a rolling upgrade behind HAProxy, with `shutdown_delay` and without.
pub fn rolling_upgrade(build: &Build, plan: &Plan) -> Result<String> {
    let duration = if plan.quick {
        Duration::from_secs(8)
    } else {
        Duration::from_secs(10)
    };
    let runs = [
        roll(build, SHUTDOWN_DELAY, duration)?,
        roll(build, "0s", duration)?,
    ];
    let inter = CHECK_INTER.as_millis();
    let mut out = format!(
        "{haproxy} on 127.0.0.1 in front of 3 gem instances, active checks \
         `GET /readyz` on each one's `metrics_listen` every {inter} ms, down after {FALL} \
         failures ({} ms), up after {RISE}; `retries 3`, `option redispatch`. wrk, 64 \
         keep-alive connections through HAProxy for {} s; 1 s in, each instance in turn \
         gets SIGTERM and, once it has exited, is started again on its port with the other \
         plugin (`libupgraded.so`), and the next one waits until HAProxy has it UP again. \
         Run twice, with `shutdown_delay = \"{SHUTDOWN_DELAY}\"` and with `\"0s\"`. \
         Down/exit: from each SIGTERM until HAProxy showed the instance DOWN (— when it \
         never saw it down) and until the process exited, ms. Retries, redispatches, \
         connection and response errors: HAProxy's backend counters.\n\n\
         | shutdown_delay | requests | req/s | failed (socket errors + non-2xx) | down ms | exit ms | HAProxy retries | redispatches | conn errors | resp errors | new body |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        inter * u128::from(FALL),
        duration.as_secs(),
        haproxy = haproxy_version(),
    );
    for r in &runs {
        let list = |v: Vec<String>| v.join(" / ");
        let _ = writeln!(
            out,
            "| \"{}\" | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} of 3 direct, {} of {PROXIED_CHECKS} via HAProxy |",
            r.delay,
            r.wrk.requests,
            r.wrk.rps,
            r.wrk.errors(),
            list(
                r.down_ms
                    .iter()
                    .map(|d| d.map_or("—".into(), |d| format!("{d:.0}")))
                    .collect()
            ),
            list(r.exit_ms.iter().map(|d| format!("{d:.0}")).collect()),
            r.retries,
            r.redispatches,
            r.conn_errors,
            r.resp_errors,
            r.new_body,
            r.proxied_new,
        );
    }
    let with = &runs[0];
    let without = &runs[1];
    let _ = writeln!(
        out,
        "\nWith \"0s\" an instance stops accepting before HAProxy's checks can notice: the \
         retries ({}), redispatches ({}) and response errors ({}) are requests HAProxy had \
         to move elsewhere (`retries`, `option redispatch`, `retry-on conn-failure \
         empty-response`); without those settings they are what its clients would see. \
         With the delay, HAProxy marks each instance DOWN before it stops accepting, and \
         has nothing to retry.",
        without.retries, without.redispatches, without.resp_errors
    );
    let failed = with.wrk.errors();
    let _ = writeln!(
        out,
        "\nTarget, with the delay: 0 failed requests: {}. The new body served by all three at \
         the end: {}.",
        verdict(failed == 0, || format!("{failed} failed")),
        verdict(
            with.new_body == 3 && with.proxied_new == PROXIED_CHECKS,
            || format!(
                "{} of 3 direct, {} of {PROXIED_CHECKS} via HAProxy",
                with.new_body, with.proxied_new
            )
        ),
    );
    Ok(out)
}

fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .nth(2)
                .map_or("HAProxy".into(), |v| format!("HAProxy {v}"))
        })
        .unwrap_or_else(|_| "HAProxy".into())
}

/// Newlines in the file at `path`.
fn count_lines(path: &Path) -> u64 {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0)
}

/// Scenario: keep-alive throughput of gem plain, with the access log to a file, and with
/// the metrics listener on.
pub fn cost(build: &Build, plan: &Plan) -> Result<String> {
    let (rounds, each) = if plan.quick {
        (1, Duration::from_secs(2))
    } else {
        (3, Duration::from_secs(3))
    };
    let metrics = free_addr()?;
    let mut slots = [
        ("plain", Slot::new(build, "")?),
        (
            "access_log = file (combined)",
            Slot::new(
                build,
                "access_log = \"access.log\"\naccess_log_format = \"combined\"",
            )?,
        ),
        (
            "metrics_listen on",
            Slot::new(build, &format!("metrics_listen = \"{metrics}\""))?,
        ),
    ];
    for (_, slot) in &mut slots {
        slot.launch(&build.hello_so, HELLO)?;
    }
    let mut rps: Vec<Vec<f64>> = vec![vec![]; slots.len()];
    let mut p99: Vec<Vec<f64>> = vec![vec![]; slots.len()];
    let mut sent = vec![0_u64; slots.len()];
    for _ in 0..rounds {
        for (i, (_, slot)) in slots.iter().enumerate() {
            let w = wrk(slot.addr, 64, each, false)?;
            rps[i].push(w.rps);
            p99[i].push(w.p99_ms);
            sent[i] += w.requests;
        }
    }
    // The access log's writer may still be behind: until its line count settles.
    let log = slots[1].1.dir.path().join("access.log");
    let t0 = Instant::now();
    let mut lines = count_lines(&log);
    while lines < sent[1] && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
        lines = count_lines(&log);
    }
    let counted = http_get(metrics, "/metrics")
        .ok()
        .and_then(|(_, text)| {
            text.lines()
                .filter(|l| l.starts_with("gem_requests_total"))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .reduce(|a, b| a + b)
        })
        .unwrap_or(f64::NAN);
    let pids: Vec<String> = slots
        .iter()
        .map(|(_, s)| s.pid().map_or("?".into(), |p| p.to_string()))
        .collect();
    for (_, slot) in &mut slots {
        slot.stop()?;
    }
    let med: Vec<(f64, f64)> = rps
        .iter()
        .zip(&p99)
        .map(|(r, p)| (median(r.clone()), median(p.clone())))
        .collect();
    let mut out = format!(
        "{rounds} interleaved round(s) (plain, access log, metrics, plain, ...) of {} s \
         keep-alive wrk, 64 connections, as in 3; medians. Three gem processes side by \
         side (pids {}), differing only in those keys.\n\n\
         | gem | req/s | p99 ms | ratio to plain |\n|---|---|---|---|\n",
        each.as_secs(),
        pids.join(", ")
    );
    for ((name, _), (r, p)) in slots.iter().zip(&med) {
        let _ = writeln!(out, "| {name} | {r:.0} | {p:.2} | {:.3} |", r / med[0].0);
    }
    let (log_ratio, metrics_ratio) = (med[1].0 / med[0].0, med[2].0 / med[0].0);
    let _ = writeln!(
        out,
        "\nAccess log: {lines} lines for {} requests wrk counted. Metrics: \
         gem_requests_total = {counted:.0} for {} requests wrk counted.\n\n\
         Target access log ≥ 0.90 of plain: {}. Target metrics ≥ 0.97 of plain: {}.",
        sent[1],
        sent[2],
        verdict(log_ratio >= 0.90, || format!("{log_ratio:.3}")),
        verdict(metrics_ratio >= 0.97, || format!("{metrics_ratio:.3}")),
    );
    Ok(out)
}
