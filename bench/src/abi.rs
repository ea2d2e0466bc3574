//! Scenario 13, plugin ABI 2: heap allocations per hello-world request (counted
//! exactly by a preloaded malloc counter, `alloc_count.c`), a streamed 1 GiB response
//! (gem's memory, and its rate beside hyper's), and a 1 GiB request body read in
//! chunks (gem's memory).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Plan;
use crate::peers::{Build, HELLO, free_port, rss_kib, wait_serving};
use crate::tools::wrk;

/// A server started for this scenario, stopped (SIGKILL is fine here) on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
    /// Where its allocation counters are, when counted.
    counts: Option<PathBuf>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Allocations and reallocations so far.
    fn counts(&self) -> Result<(u64, u64)> {
        let path = self.counts.as_ref().context("not counted")?;
        let bytes = std::fs::read(path)?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Ok((word(0), word(1)))
    }
}

/// Starts gem with the hello plugin, or the hyper example, optionally under the counter.
fn start(build: &Build, dir: &Path, gem: bool, shim: Option<&Path>) -> Result<Proc> {
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let name = if gem { "gem" } else { "hyper" };
    let mut cmd = if gem {
        let toml = format!(
            "listen = [\"127.0.0.1:{port}\"]\nhandler = {:?}\npid_file = \"{name}.pid\"\n\
             control_socket = \"{name}.sock\"\n",
            build.hello_so
        );
        std::fs::write(dir.join("gem.toml"), toml)?;
        let mut c = Command::new(&build.gem);
        c.args(["serve", "--config", "gem.toml"]);
        c
    } else {
        let mut c = Command::new(&build.hyper);
        c.arg(addr.to_string());
        c
    };
    cmd.current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let counts = match shim {
        Some(shim) => {
            let file = dir.join(format!("{name}.counts"));
            std::fs::write(&file, [0u8; 4096])?;
            cmd.env("LD_PRELOAD", shim)
                .env("GEM_ALLOC_COUNT_FILE", &file);
            Some(file)
        }
        None => None,
    };
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let proc = Proc {
        child,
        addr,
        counts,
    };
    wait_serving(addr, HELLO)?;
    Ok(proc)
}

/// Builds the malloc counter with the system C compiler.
fn build_shim(dir: &Path) -> Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/alloc_count.c");
    let out = dir.join("alloc_count.so");
    let status = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .context("running cc (apt-get install gcc)")?;
    if !status.success() {
        bail!("cc failed on {}", src.display());
    }
    Ok(out)
}

pub fn abi2(build: &Build, plan: &Plan) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let mut out = String::new();
    allocations(build, plan, dir.path(), &mut out)?;
    close(build, plan, dir.path(), &mut out)?;
    streamed(build, dir.path(), &mut out)?;
    events_through_restart(build, dir.path(), &mut out)?;
    Ok(out)
}

fn allocations(build: &Build, plan: &Plan, dir: &Path, out: &mut String) -> Result<()> {
    let shim = build_shim(dir)?;
    let _ = writeln!(
        out,
        "Heap allocations per `GET /` (keep-alive wrk, 64 connections, {} s after 1 s of \
         warm-up), counted exactly by a preloaded counter of malloc, calloc, realloc and \
         the aligned allocations (`bench/src/alloc_count.c`); reallocations of a live \
         block are shown apart.\n\n| server | requests | allocations/request | reallocations/request |\n|---|---|---|---|",
        plan.throughput.as_secs()
    );
    let mut per = Vec::new();
    for gem in [false, true] {
        let proc = start(build, dir, gem, Some(&shim))?;
        wrk(proc.addr, 64, Duration::from_secs(1), false)?;
        let (a0, r0) = proc.counts()?;
        let w = wrk(proc.addr, 64, plan.throughput, false)?;
        let (a1, r1) = proc.counts()?;
        let n = w.requests.max(1) as f64;
        let (allocs, reallocs) = ((a1 - a0) as f64 / n, (r1 - r0) as f64 / n);
        let name = if gem { "gem (hello plugin)" } else { "hyper" };
        let _ = writeln!(
            out,
            "| {name} | {} | {allocs:.2} | {reallocs:.2} |",
            w.requests
        );
        per.push(allocs);
    }
    let _ = writeln!(
        out,
        "\nTarget ≤ 4 allocations per request for gem: {}.\n",
        crate::verdict(per[1] <= 4.0, || format!("{:.2}", per[1]))
    );
    Ok(())
}

/// `Connection: close` throughput, gem beside hyper, interleaved rounds.
fn close(build: &Build, plan: &Plan, dir: &Path, out: &mut String) -> Result<()> {
    let hyper = start(build, dir, false, None)?;
    let gem = start(build, dir, true, None)?;
    let (mut h, mut g) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        h.push(wrk(hyper.addr, 64, plan.throughput, true)?.rps);
        g.push(wrk(gem.addr, 64, plan.throughput, true)?.rps);
    }
    let (h, g) = (crate::median(h), crate::median(g));
    let ratio = g / h;
    let _ = writeln!(
        out,
        "`Connection: close` (wrk, 64 connections, a new connection per request), {} \
         interleaved rounds of {} s; medians: hyper {h:.0} req/s, gem {g:.0} req/s, \
         gem/hyper = {ratio:.3}. Target ≥ 0.95: {}.\n",
        plan.rounds,
        plan.throughput.as_secs(),
        crate::verdict(ratio >= 0.95, || format!("short by {:.3}", 0.95 - ratio))
    );
    Ok(())
}

/// Samples `pid`'s resident memory until stopped; the peak, in KiB.
struct Peak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Peak {
    fn watch(pid: u32) -> Peak {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid).unwrap_or(0)));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = rss_kib(pid) {
                    p.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Peak {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// `GET path` with `Connection: close`, read to the end as fast as possible: the bytes
/// (head and chunk framing included) and the time.
fn download(addr: SocketAddr, path: &str) -> Result<(u64, Duration)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let started = Instant::now();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    Ok((total, started.elapsed()))
}

/// `POST /count` with a `len`-byte body: gem's answer.
fn upload(addr: SocketAddr, len: u64) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "POST /count HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
    )?;
    let block = vec![b'x'; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        s.write_all(&block[..n])?;
        left -= n as u64;
    }
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn streamed(build: &Build, dir: &Path, out: &mut String) -> Result<()> {
    const GIB: u64 = 1 << 30;
    /// One download's rate moves by a factor of two from run to run on this machine.
    const ROUNDS: usize = 5;
    let _ = writeln!(
        out,
        "`GET /stream?mb=1024` read as fast as the client can (one connection), beside \
         hyper serving the same generated stream (`examples/hyper_hello.rs`, 64 KiB \
         chunks, each copied once), {ROUNDS} interleaved rounds (hyper, gem, gem with \
         `&writer=1`, hyper, ...), median rate. The demo plugin's `/stream` is a \
         `Response::reader` that gem reads into 64 KiB buffers of its own; with \
         `&writer=1` a `Response::stream` producer writes the same bytes on a thread. \
         Then `POST /count` with a 1 GiB body, which the demo plugin reads in chunks. \
         RSS growth is the largest peak (sampled every 10 ms) over the RSS before a \
         download.\n\n| server | request | MiB/s | RSS growth KiB |\n|---|---|---|---|"
    );
    let procs = [
        start(build, dir, false, None)?,
        start(build, dir, true, None)?,
    ];
    // (name, server, target)
    let runs = [
        ("hyper", 0, "/stream?mb=1024"),
        ("gem", 1, "/stream?mb=1024"),
        ("gem", 1, "/stream?mb=1024&writer=1"),
    ];
    let mut rates = [Vec::new(), Vec::new(), Vec::new()];
    let mut grown = [0u64; 3];
    for (_, server, target) in runs {
        // Warm up: the stream thread, the buffers.
        download(procs[server].addr, &target.replace("1024", "8"))?;
    }
    for _ in 0..ROUNDS {
        for (i, (name, server, target)) in runs.into_iter().enumerate() {
            let proc = &procs[server];
            let peak = Peak::watch(proc.pid());
            let before = rss_kib(proc.pid()).unwrap_or(0);
            let (bytes, took) = download(proc.addr, target)?;
            grown[i] = grown[i].max(peak.finish().saturating_sub(before));
            if bytes < GIB {
                bail!("{name} sent {bytes} bytes for 1 GiB");
            }
            rates[i].push(bytes as f64 / (1 << 20) as f64 / took.as_secs_f64());
        }
    }
    let rates = rates.map(crate::median);
    for (i, (name, _, target)) in runs.into_iter().enumerate() {
        let _ = writeln!(
            out,
            "| {name} | GET {target} | {:.0} | {} |",
            rates[i], grown[i]
        );
    }
    let gem = &procs[1];
    let peak = Peak::watch(gem.pid());
    let before = rss_kib(gem.pid()).unwrap_or(0);
    let started = Instant::now();
    let answer = upload(gem.addr, GIB)?;
    let took = started.elapsed();
    let upload_grown = peak.finish().saturating_sub(before);
    if !answer.ends_with(&format!("\r\n\r\n{GIB}\n")) {
        bail!("POST /count answered {answer:?}");
    }
    let rate = GIB as f64 / (1 << 20) as f64 / took.as_secs_f64();
    let _ = writeln!(
        out,
        "| gem | POST /count (1 GiB) | {rate:.0} | {upload_grown} |"
    );
    let to_hyper = rates[1] / rates[0];
    let written = rates[2] / rates[0];
    let _ = writeln!(
        out,
        "\nStream rate gem/hyper = {to_hyper:.3} (with `&writer=1`: {written:.3}). Target \
         RSS growth < 8 MiB for the stream: {}; for the upload: {}. Target stream rate \
         within 20 % of hyper: {}.",
        crate::verdict(grown[1].max(grown[2]) < 8 * 1024, || format!(
            "{} KiB",
            grown[1].max(grown[2])
        )),
        crate::verdict(upload_grown < 8 * 1024, || format!("{upload_grown} KiB")),
        crate::verdict(to_hyper >= 0.8, || format!("{to_hyper:.3}")),
    );
    Ok(())
}

/// How one `/events` client's stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// `event: bye`, then the body's proper end.
    Bye,
    /// The body's proper end, without a goodbye.
    Clean,
    /// The connection ended or failed mid-body.
    Broken,
}

/// Reads a chunked `/events` body to its end; `ready` counts clients that got their
/// first event.
fn events_client(addr: SocketAddr, ready: &AtomicU64) -> Ended {
    use std::io::BufRead;
    let Ok(stream) = TcpStream::connect(addr) else {
        return Ended::Broken;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut w = &stream;
    if w.write_all(b"GET /events?n=100000&ms=100 HTTP/1.1\r\nHost: b\r\n\r\n")
        .is_err()
    {
        return Ended::Broken;
    }
    let mut r = std::io::BufReader::new(&stream);
    let mut line = String::new();
    // The head.
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return Ended::Broken,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let mut first = true;
    let mut bye = false;
    loop {
        line.clear();
        if !matches!(r.read_line(&mut line), Ok(n) if n > 0) {
            return Ended::Broken;
        }
        let Ok(size) = usize::from_str_radix(line.trim(), 16) else {
            return Ended::Broken;
        };
        let mut chunk = vec![0; size + 2];
        if r.read_exact(&mut chunk).is_err() {
            return Ended::Broken;
        }
        if size == 0 {
            return if bye { Ended::Bye } else { Ended::Clean };
        }
        if first {
            ready.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        bye |= chunk.starts_with(b"event: bye");
    }
}

fn events_through_restart(build: &Build, dir: &Path, out: &mut String) -> Result<()> {
    const CLIENTS: usize = 1000;
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let want = Some(8192.max(limit.current.unwrap_or(0)));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: want.min(limit.maximum).or(want),
            maximum: limit.maximum,
        },
    )
    .context("raising this process's open-file limit for 1000 clients")?;
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let gem_dir = dir.join("events");
    std::fs::create_dir_all(&gem_dir)?;
    let so = gem_dir.join("handler.so");
    std::fs::copy(&build.hello_so, &so)?;
    std::fs::write(
        gem_dir.join("gem.toml"),
        format!("listen = [\"127.0.0.1:{port}\"]\nhandler = {so:?}\n"),
    )?;
    let log = std::fs::File::create(gem_dir.join("gem.log"))?;
    let mut child = Command::new("prlimit")
        .arg("--nofile=8192:8192")
        .arg(&build.gem)
        .arg("serve")
        .current_dir(&gem_dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting gem under prlimit")?;
    let result = (|| -> Result<String> {
        wait_serving(addr, HELLO)?;
        let ready = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let ready = ready.clone();
                std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || events_client(addr, &ready))
            })
            .collect::<std::io::Result<_>>()?;
        let started = Instant::now();
        while ready.load(Ordering::Relaxed) < CLIENTS as u64 {
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "only {} of {CLIENTS} streams started",
                    ready.load(Ordering::Relaxed)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let load = std::thread::spawn(move || wrk(addr, 32, Duration::from_secs(4), false));
        std::thread::sleep(Duration::from_secs(1));
        let pid: u32 = std::fs::read_to_string(gem_dir.join("gem.pid"))?
            .trim()
            .parse()?;
        crate::peers::signal(pid, "HUP")?;
        let ends: Vec<Ended> = clients
            .into_iter()
            .map(|c| c.join().unwrap_or(Ended::Broken))
            .collect();
        let w = load
            .join()
            .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
        let count = |e: Ended| ends.iter().filter(|x| **x == e).count();
        let (bye, clean, broken) = (count(Ended::Bye), count(Ended::Clean), count(Ended::Broken));
        Ok(format!(
            "{CLIENTS} concurrent `GET /events?n=100000&ms=100` streams, then a restart \
             (SIGHUP) while wrk loads `/` on 32 other connections: {bye} ended with `bye`, \
             {clean} ended cleanly without it, {broken} were broken off; wrk: {} requests, \
             {} errors. Target every stream ends with `bye` or a clean end and 0 failed \
             requests: {}.\n",
            w.requests,
            w.errors(),
            crate::verdict(broken == 0 && w.errors() == 0, || format!(
                "{broken} broken, {} failed",
                w.errors()
            ))
        ))
    })();
    // Every generation of this gem: the first, and the one the restart started.
    if let Ok(pid) = std::fs::read_to_string(gem_dir.join("gem.pid"))
        && let Ok(pid) = pid.trim().parse::<u32>()
    {
        let _ = crate::peers::signal(pid, "TERM");
    }
    let _ = child.kill();
    let _ = child.wait();
    out.push_str(&result?);
    Ok(())
}
