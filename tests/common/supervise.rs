//! Helpers for the supervisor and probation tests: the crash plugin, the supervisor's
//! view of its workers, process-table checks and the backoff delays in the log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::client::get;
use super::{DEADLINE, Gem, alive, plugin, run_gem, wait_for};

/// `libcrash.so`: loads fine, then aborts the process on every request.
/// (`plugin()` builds only the plugins the older tests use.)
pub fn crash_plugin() -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "crash"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for the crash plugin");
        assert!(status.success(), "building the crash plugin failed");
    });
    plugin("crash")
}

/// Replaces `so` the way an operator would: write a new file and rename it over.
pub fn install_so(so: &Path, from: &Path) {
    let tmp = so.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, so).unwrap();
}

/// A copy of `from` at `handler.so` in a directory of its own that outlives the test's
/// gem, so the test can swap the handler.
pub fn swappable_so(from: &Path) -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    let so = dir.join("handler.so");
    std::fs::copy(from, &so).unwrap();
    so
}

/// Runs `gem args...` in `dir` on its own thread (e.g. a `gem reload` that waits for
/// probation); join for (status, stdout, stderr).
pub fn spawn_gem(dir: &Path, args: &[&str]) -> JoinHandle<(ExitStatus, String, String)> {
    let dir = dir.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_gem(&dir, &args, &[])
    })
}

/// One worker as `gem status --json` lists it under `supervisor.workers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: u32,
    pub generation: u64,
    pub state: String,
}

/// The workers in a status object (empty when it has no supervisor).
pub fn workers(status: &serde_json::Value) -> Vec<Worker> {
    status["supervisor"]["workers"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| Worker {
                    pid: w["pid"].as_u64().unwrap() as u32,
                    generation: w["generation"].as_u64().unwrap(),
                    state: w["state"].as_str().unwrap().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until the supervisor lists a serving worker that `accept` agrees to; returns it.
pub fn wait_serving_worker(gem: &Gem, what: &str, accept: impl Fn(&Worker) -> bool) -> Worker {
    wait_for(what, || {
        workers(&gem.status())
            .into_iter()
            .find(|w| w.state == "serving" && accept(w))
    })
}

/// The supervisor's crash count in a status object.
pub fn crashes(status: &serde_json::Value) -> u64 {
    status["supervisor"]["crashes"].as_u64().unwrap()
}

/// Waits at most `within` for process `pid` to be gone (or a zombie).
pub fn wait_gone(pid: u32, within: Duration, what: &str) {
    let start = Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < within,
            "{what}: pid {pid} still alive after {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Fields of /proc/PID/stat after the command name: [0] state, [1] ppid, [2] pgrp, ...
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The parent of `pid`.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The process group of `pid`.
pub fn pgid_of(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(2)?.parse().ok()
}

/// Children of `pid`, from /proc/PID/task/*/children.
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    children.sort_unstable();
    children.dedup();
    children
}

/// Zombies (state Z) whose parent is `ppid`, from the whole host's /proc.
pub fn zombies_of(ppid: u32) -> Vec<u32> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            stat_fields(*pid).is_some_and(|f| {
                f.first().map(String::as_str) == Some("Z")
                    && f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(ppid)
            })
        })
        .collect()
}

/// The delay D of every `... replacement in D.` line, in log order.
pub fn replacement_delays(logs: &[String]) -> Vec<Duration> {
    logs.iter().filter_map(|l| replacement_delay(l)).collect()
}

/// The delay in one `... replacement in D.` line, e.g. `0s`, `500ms`, `1s`.
pub fn replacement_delay(line: &str) -> Option<Duration> {
    let rest = line.split_once("replacement in ")?.1.trim_end();
    let text = rest.strip_suffix('.').unwrap_or(rest);
    Some(parse_delay(text).unwrap_or_else(|| panic!("bad delay {text:?} in {line:?}")))
}

/// `500ms`, `1s`, `1.5s` (Debug style) or anything gem's own duration parser reads.
fn parse_delay(text: &str) -> Option<Duration> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        _ => return gem::config::parse_duration(text).ok(),
    };
    Duration::try_from_secs_f64(number.parse::<f64>().ok()? * scale).ok()
}

/// The first number after `prefix` in `line`, e.g. the W of `worker W (generation 2)`.
pub fn number_after(line: &str, prefix: &str) -> Option<u32> {
    let rest = line.split_once(prefix)?.1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Sends `GET /` on new connections until one fails (the handler killed the process
/// that took it), failing the test at the deadline; returns the bodies answered before.
pub fn get_until_a_request_fails(addr: SocketAddr) -> Vec<String> {
    let mut answered = Vec::new();
    let start = Instant::now();
    loop {
        match get(addr, "/") {
            Ok(resp) => answered.push(resp.text()),
            Err(_) => return answered,
        }
        // Pace the requests; the loop ends on the first failure, not on a timer.
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            start.elapsed() < DEADLINE,
            "no request failed within {DEADLINE:?}; answers: {answered:?}"
        );
    }
}

/// `GET path` on a new connection, given up after `within` (a request queued while no
/// process accepts would otherwise wait as long as the socket stays open).
pub fn get_within(
    addr: SocketAddr,
    path: &str,
    within: Duration,
) -> Result<super::client::Resp, super::client::Error> {
    super::client::block_on(async {
        tokio::time::timeout(within, async {
            super::client::H1::connect(addr).await?.get(path).await
        })
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
    })
}

/// `GET /` on a plain TCP connection that stays open, so the process serving it can be
/// found; returns the connection and the raw response.
pub fn get_and_hold(addr: SocketAddr) -> (std::net::TcpStream, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(stream, "GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "the connection closed before a whole response");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .expect("a Content-Length");
            if body.len() >= length {
                return (stream, text);
            }
        }
    }
}

/// `ADDR:PORT` as /proc/net/tcp writes an IPv4 socket address.
fn proc_net_addr(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(a.ip().octets()),
            a.port()
        ),
        SocketAddr::V6(_) => panic!("IPv4 only"),
    }
}

/// The process holding the server side of the TCP connection `client` -> `server`.
pub fn server_pid_of(server: SocketAddr, client: SocketAddr) -> Option<u32> {
    let (local, remote) = (proc_net_addr(server), proc_net_addr(client));
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f.get(9).map(|i| (*i).to_owned()))?
    })?;
    let target = PathBuf::from(format!("socket:[{inode}]"));
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
            })
        })
}
