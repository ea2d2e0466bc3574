//! gem's benchmarks, side by side with a plain hyper server and nginx in one run on this
//! machine: restarts under load, restart latency, throughput, memory and leaks, drain
//! time, HTTP/2 through restarts, and supervised mode (restarts, a killed worker, a
//! crashing plugin rolled back by probation, restart latency), a rolling upgrade behind
//! HAProxy, the cost of the access log and metrics, and TLS beside nginx. Prints a table and rewrites
//! BENCHMARKS.md.
//!
//! Run it through `bench/run [--quick] [--only 2,3]`, which installs the tools and builds
//! first.

mod abi;
mod fleet;
mod peers;
mod supervise;
mod tls;
mod tools;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use peers::{Build, Gem, HELLO, Hyper, Nginx, Peer, UPGRADED};
use tools::{Wrk, h2load, wrk};

/// What the figures above do not say by themselves; from experiments on this machine
/// (2026-11-25 and 2026-11-27), kept with every run because the reasons do not change
/// run to run.
const NOTES: &str = "## Reading the misses

- **Throughput.** On this machine the ratio moves from run to run by several
  hundredths (load generator and servers share 2 cores). The handler is synchronous
  and may block. Sending every call to tokio's blocking pool cost two cross-thread
  wake-ups a request and gave 0.39 of hyper. gem runs a bodiless request's handler on
  the worker thread that read it, at most `workers - 1` at once, with a watchdog
  thread that wakes a sleeping worker when such a call runs long (`src/inline.rs`;
  the test suite catches the stall if the watchdog is removed). What moved gem from
  0.71-0.79 of hyper to 0.89-0.98 (2026-11-27; each server's CPU time per request
  under the same wrk load was 7.9 µs against hyper's 5.4 before, 5.8-6.9 against
  5.4-5.9 after; after the fixes of a review, in a noisier hour, side runs read
  0.81-0.92): the calls that found the one inline place taken (on 2 workers,
  about one in six) spun, then hopped to the blocking pool; they now wait while their
  worker serves other connections and are woken, on the worker whose call ended, to
  run inline (about 5 %). The watchdog looked every 1 ms while calls ran inline, and each look
  woke a thread that preempted a busy one; it now looks every 4 ms until it has seen
  a slow call (about 4 %). The inline places were one shared table whose cache line
  moved between the workers on every call; each thread now marks its own line. A
  bodiless request is answered inside hyper's service call, so hyper moves a small
  future instead of a large one, and the response is moved once instead of through
  four wrappers. hyper's per-request header-read timer (a boxed sleep and two
  timer-wheel locks) is replaced by one deadline per connection, swept a few times a
  second, on the kernel's coarse clock. Later on 2026-11-27 (this scenario then read
  0.915-0.934), callgrind counted 10,600 instructions per hello-world request in gem
  against hyper's 7,700 (wrk -t1 -c8 for 10 s, under valgrind). Three changes took
  gem to about 9,300 (0.962, then 0.930 of hyper in the two full runs that followed;
  gem's own rate was the same in both): the request's header map,
  emptied, becomes the next response's, which hyper in turn keeps for the
  connection's next request (no header map is allocated at all: 0.00 allocations a
  request); header pairs a handler sends again and again are checked once per thread
  and then found by comparing bytes (`content-type` cost 600 instructions a response,
  now about 280, hyper's own map insert included); and the SDK writes a response in
  place and reads the addresses only when asked. On 2026-11-28 the copies went the
  same way: the handler's callbacks write into the very response that goes back to
  hyper, the answer and the drain's `Connection: close` are added to it in place, and
  the request is lent to the handler rather than taken apart and put back (about
  8,950 instructions with start-up left out, 9,270 before; memcpy 600 against hyper's
  350, from 970; the next full run read 0.970 of hyper and 0.954 of nginx, with nginx
  at 1.02 of hyper). The release profile then went to fat LTO with one codegen unit:
  about 12 % fewer instructions for gem (8,950 to 7,900 a request) and 10 % for hyper's
  ceiling, which is built the same way (7,720 to 6,930); in interleaved A/B runs gem
  gained 0.8 % and 3.1 %, hyper nothing measurable, and the two full runs after it
  read 0.995 and 0.983 of hyper, 0.990 and 0.982 of nginx. What is left: the plugin
  call (about 1,200 instructions with the SDK's side and the host's callbacks, 1,900
  before; gem's whole service call went from 3,200 to 2,300), the connection's own layers (the drain's select, the task
  tracker, the socket wrapper: about 300), the remaining copies (the SDK's `Response`,
  264 bytes, is moved twice inside a plugin's `route`), and the inline bookkeeping
  (about 140). Per request, both servers make the same syscalls
  (one recvfrom, one writev) and gem switches context no more often than hyper
  (0.017-0.021 against 0.019-0.028 a request, `perf stat`); its CPU time is 5.6-5.9
  µs against hyper's 5.3-5.5. In one interleaved run on 2026-11-28,
  each server's CPU time per request was hyper 5.19 µs, nginx 5.37 and gem 5.38, and
  `perf record` of every syscall counted the same per request for gem and hyper (one
  recvfrom, one writev, 0.12-0.14 epoll_wait, 0.01-0.02 futex): the gap was in user
  space only. Yet a gem whose handler call was replaced by writing the answer directly
  (about 1,100 fewer instructions a request) gained only 0.6 % in 6 A/B rounds: with
  wrk on the same 2 cores, instructions are not what sets the rate. The inline
  watchdog's 4 ms tick did, though it took only 250 wake-ups and 4 ms of CPU a
  second: in A/B runs of 8 and 10 rounds (nginx, A, B, ...; 4-5 s each; medians of
  the rounds' ratios; an A/A control read 0.994) a gem without any watchdog read
  1.020 and 1.017 of the same build with it, and one that looks every 16 ms 1.020.
  Each wake-up was, presumably, a timer interrupt of its own on a busy core. At its calm tick the
  watchdog now sets a timer slack of one more tick (`PR_SET_TIMERSLACK`), so the kernel
  wakes it on an interrupt it takes anyway (the scheduler's tick) within 4 to 8 ms:
  1.018 of the build without the slack, as much as no watchdog, and after a slow call
  it still looks every millisecond on time. The two full runs after it read gem/hyper
  1.020 and 0.993, gem/nginx 1.012 and 1.000 (by 70 requests a second): level with
  nginx rather than ahead of it. Tried and measured no gain: tokio's `event_interval` at 16,
  256, 512 or 1024 instead of 61 (1.001 and 1.002 over 4 and 8 rounds, single runs
  reading up to 1.034), and pinning gem's two workers to a core each (0.944-0.997).
  A thread-per-core hyper (two current-thread runtimes, `SO_REUSEPORT`) served 1.03 of
  the multi-thread ceiling and more than nginx in 5 of 5 rounds; gem keeps tokio's
  work-stealing runtime, because a synchronous handler that blocks would stall every
  connection of its thread there. nginx reads 0.97 to 1.03 of hyper here, but some
  rounds jump to 1.1-1.4 of it (up to 256k against 180k) or drop to 0.8: the bench
  takes the median.
  hyper's flattened writes (head and body copied into one buffer and sent with one
  `write`) measured no gain over the two-part `writev` (0.996 of it over 6 rounds), so
  gem keeps `writev`, which sends a streamed chunk without copying it. Scenario 13
  counts allocations exactly: hyper's ceiling makes 4.0 a request and gem 0.00 (2.0
  before the header maps were reused, 5.0 with hyper's header-read timer, 19.4 before
  ABI 2).
- **Stream rate (13).** The demo's `/stream` is a `Response::reader`: gem reads it
  where a handler call runs (on the worker serving the connection when an inline place
  is free), into 64 KiB buffers that hyper sends as they are and gives back once
  written; `&writer=1` is the same body from a `Response::stream` producer on a thread
  of its own. Until 2026-11-27 `/stream` was that producer, and read 0.4 to 0.7 of
  hyper. The thread hops were not the cause: `perf` put gem's time in the kernel's TCP
  push, with one `writev` per 64 KiB chunk (16,400 per GiB against hyper's 2,350). gem
  set hyper's `max_buf_size` to `max_header_size` (64 KiB) to bound a request head,
  and hyper uses the same bound for how much of a response it queues before a write.
  hyper-util's auto builder hides hyper's own `max_header_size`, so gem now tells
  HTTP/2 from HTTP/1 itself (`src/proto.rs`) and gives hyper's HTTP/1 builder both:
  `max_header_size` for the head, hyper's default `max_buf_size` (about 400 KiB) for
  the response. That alone took the producer from about 0.5 to 0.64-0.95 of hyper; the
  reader reads 0.86 to 1.3, as hyper's ceiling allocates a fresh 64 KiB buffer per
  chunk and gem reuses its own. One download's rate still moves by a factor of up to
  two between runs, hence the median of 5.
- **Restart latency.** nginx reloads by forking its master (no exec, no config parse,
  no dlopen); gem starts a fresh process, as the Go original did. From gem's own log
  timestamps over 15 restarts: 1.0-1.5 ms from the signal until the new process has
  exec'd (fork and exec of a 35 MB binary), then 3-3.5 ms until it is ready (dynamic
  linking, runtime start, config, the plugin copied by the kernel into a sealed memfd,
  dlopen, init, sockets adopted). Reading the .so through a heap buffer cost another
  1 ms of CPU; a plugin with debug info (4.4 MB) took 15 ms until its SHA-256 moved to
  a side thread. The clock starts at the signal: the files are staged first and the
  signal is sent in-process.
- **Restarts under load, supervised (7).** Two full runs on 2026-11-28 each counted
  one read error (a connection closed with no response) in the `Connection: close`
  half; 11 runs of this scenario alone, 40 runs of the same load by hand (760
  restarts) and one run of scenarios 1 to 7 counted none. A race fits it: the drain was
  over once each listener's task tracker was empty, but the accept loop ran beside the
  tracker, so a connection accepted in the instant the drain found the tracker empty
  (more likely when every connection is short-lived) was dropped when the process
  exited. The accept loop now runs on the tracker itself
  (`a_drain_is_not_over_while_the_accept_loop_may_still_accept` fails without that);
  the full run after it counted no error.
- **HTTP/2.** h2load (nghttp2 1.52) does not reconnect after a GOAWAY: a client stops
  at its first one, and the requests it had queued but not sent are counted as failed.
  gem sends GOAWAY at every restart (so the old process can drain and exit), hence few
  requests and, in most runs, a few failures (0 to 63 in the runs of 2026-11-27, as
  it depends on what each client had queued when its GOAWAY came); the same h2load
  against gem without restarts
  has 0 errors, and against nginx with its default `keepalive_requests` (1000 per
  connection, then GOAWAY) the same loss appears without any reload. nginx's own
  reload may leave HTTP/2 connections on its old workers, which then keep serving
  them; that is why its request count varies between runs. gem's test
  (`tests/restart.rs`) checks that a stream in flight during a restart completes and
  the client sees GOAWAY, not a reset. The same holds over TLS (scenario 14).
- **TLS handshakes and throughput (14).** Both servers offer TLS 1.3 and 1.2 on the
  same ECDSA P-256 certificate. wrk keeps the last session and resumes it when it
  reconnects, so under `Connection: close` each handshake is a TLS 1.3 resumption with
  a fresh X25519 exchange, not a certificate exchange; wrk itself takes about twice
  gem's CPU there, so the figure moves little with the server's speed. An earlier
  version of this scenario left nginx on TLS 1.2 (1.22's default), where a resumption
  needs no key exchange at all, and read gem at 0.60 of it. gem uses aws-lc-rs (about
  5 % more handshakes than ring, X25519 still about a quarter of its CPU) and sends one
  session ticket per handshake (about 3 % more than rustls's default of two).
  Keep-alive over TLS reads about 0.9 of nginx, against less in cleartext: what is
  behind there is the cleartext request path (scenario 3), not TLS.
";

/// How long and how often; `--quick` shrinks everything for a smoke run.
struct Plan {
    quick: bool,
    load: Duration,
    rounds: usize,
    throughput: Duration,
    latency_restarts: usize,
    leak_restarts: usize,
    drain_rounds: usize,
    h2: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        match quick {
            false => Plan {
                quick,
                load: Duration::from_secs(30),
                rounds: 5,
                throughput: Duration::from_secs(6),
                latency_restarts: 50,
                leak_restarts: 100,
                drain_rounds: 5,
                h2: Duration::from_secs(15),
            },
            true => Plan {
                quick,
                load: Duration::from_secs(4),
                rounds: 1,
                throughput: Duration::from_secs(3),
                latency_restarts: 10,
                leak_restarts: 10,
                drain_rounds: 2,
                h2: Duration::from_secs(4),
            },
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only 2,3` runs just those scenarios (and leaves BENCHMARKS.md alone).
    let only: Option<Vec<usize>> = match args.iter().position(|a| a == "--only") {
        Some(i) => Some(
            args.get(i + 1)
                .context("--only needs scenario numbers, e.g. --only 2,3")?
                .split(',')
                .map(|n| n.trim().parse().context("--only takes numbers 1 to 13"))
                .collect::<Result<_>>()?,
        ),
        None => None,
    };
    let wants = |n: usize| only.as_ref().is_none_or(|o| o.contains(&n));
    let plan = Plan::new(quick);
    let root = std::env::current_dir()?;
    let build = Build::at(&root)?;
    let started = Instant::now();
    let mut md = String::new();
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());

    type Scenario<'a> = (&'a str, Box<dyn Fn() -> Result<String> + 'a>);
    let scenarios: [Scenario; 14] = [
        (
            "1. Restarts under load",
            Box::new(|| restarts_under_load(&build, &plan, workers)),
        ),
        (
            "2. Restart latency",
            Box::new(|| restart_latency(&build, &plan, workers)),
        ),
        (
            "3. Throughput (keep-alive)",
            Box::new(|| throughput(&build, &plan, workers)),
        ),
        ("4. Memory and leaks", Box::new(|| memory(&build, &plan))),
        ("5. Drain time", Box::new(|| drain_time(&build, &plan))),
        (
            "6. HTTP/2 through restarts",
            Box::new(|| http2(&build, &plan, workers)),
        ),
        (
            "7. Restarts under load, supervised",
            Box::new(|| supervise::restarts_under_load(&build, &plan)),
        ),
        (
            "8. Worker killed under load, supervised",
            Box::new(|| supervise::worker_killed(&build, &plan)),
        ),
        (
            "9. Crashing plugin rolled back by probation",
            Box::new(|| supervise::bad_plugin(&build, &plan)),
        ),
        (
            "10. Restart latency, plain and supervised",
            Box::new(|| supervise::restart_latency(&build, &plan)),
        ),
        (
            "11. Rolling upgrade behind HAProxy",
            Box::new(|| fleet::rolling_upgrade(&build, &plan)),
        ),
        (
            "12. Cost of the access log and metrics",
            Box::new(|| fleet::cost(&build, &plan)),
        ),
        (
            "13. Plugin ABI 2: allocations, streams",
            Box::new(|| abi::abi2(&build, &plan)),
        ),
        (
            "14. TLS",
            Box::new(|| tls::scenario(&build, &plan, workers)),
        ),
    ];
    for (n, (title, run)) in (1..).zip(&scenarios) {
        if wants(n) {
            section(&mut md, title, &run()?);
        }
    }

    let doc = format!(
        "{}\n{md}\nWhole run: {:.0} s.\n\n{NOTES}",
        header(&plan, workers)?,
        started.elapsed().as_secs_f64()
    );
    print!("{doc}");
    if !quick && only.is_none() {
        std::fs::write(root.join("BENCHMARKS.md"), &doc).context("writing BENCHMARKS.md")?;
        eprintln!("wrote BENCHMARKS.md");
    }
    Ok(())
}

fn section(md: &mut String, title: &str, body: &str) {
    let _ = writeln!(md, "## {title}\n\n{body}");
    eprintln!("done: {title}");
}

fn header(plan: &Plan, workers: usize) -> Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown".into(), |s| s.trim().to_owned());
    let mem = std::fs::read_to_string("/proc/meminfo")?
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024 / 1024);
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()?;
    let tool = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                text.lines().next().unwrap_or_default().trim().to_owned()
            })
            .unwrap_or_default()
    };
    Ok(format!(
        "# Benchmarks\n\n\
         Measured side by side in one run by `bench/run{quick}`, on {workers} cores ({cpu}), \
         {mem} GiB, {date}. gem and the hyper ceiling run tokio's multi-thread runtime \
         with {workers} workers; nginx runs {workers} worker processes. Load generators \
         share the same cores, so absolute numbers are low and noisy: read the ratios and \
         error counts.\n\n\
         Tools: {wrk}; {h2load}; {nginx}.\n\n\
         Commands: `wrk -t2 -c64 -dNs --latency --timeout 5s [-H 'Connection: close'] URL`, \
         `h2load -c16 -m8 -t2 -DN URL`. A gem restart is a new .so renamed over the handler \
         path plus `kill -HUP`; an nginx restart is a rewritten `return 200` body plus \
         `kill -HUP` to the master (what `nginx -s reload` does).\n",
        quick = if plan.quick { " --quick" } else { "" },
        date = String::from_utf8_lossy(&date.stdout).trim(),
        wrk = tool("wrk", "--version"),
        h2load = tool("h2load", "--version"),
        nginx = tool("nginx", "-v"),
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One table row of restart latencies (sorted, in ms): min, p50, p99, max.
fn latency_row(out: &mut String, name: &str, v: &[f64]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
        v.first().copied().unwrap_or(f64::NAN),
        percentile(v, 50.0),
        percentile(v, 99.0),
        v.last().copied().unwrap_or(f64::NAN)
    );
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn verdict(ok: bool, miss: impl FnOnce() -> String) -> String {
    if ok {
        "met".into()
    } else {
        format!("**missed**: {}", miss())
    }
}

fn alternate(i: usize) -> &'static str {
    if i.is_multiple_of(2) { UPGRADED } else { HELLO }
}

/// Runs `load` against `peer` for `duration` while restarting the peer every 0.5 s;
/// returns the load's report and the number of restarts sent.
fn with_restarts<T: Send + 'static>(
    peer: &mut dyn Peer,
    duration: Duration,
    load: impl FnOnce(std::net::SocketAddr, Duration) -> Result<T> + Send + 'static,
) -> Result<(T, usize)> {
    let addr = peer.addr();
    let load = std::thread::spawn(move || load(addr, duration));
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() + Duration::from_millis(750) < duration && !load.is_finished() {
        std::thread::sleep(Duration::from_millis(500));
        peer.restart_to(alternate(sent))?;
        sent += 1;
    }
    let report = load
        .join()
        .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    Ok((report, sent))
}

fn restarts_under_load(build: &Build, plan: &Plan, workers: usize) -> Result<String> {
    let mut out = String::from(
        "wrk, 64 connections, a restart every 0.5 s alternating two handlers.\n\n\
         | server | mode | requests | req/s | connect | read | write | timeout | non-2xx | restarts |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut gem_errors = 0;
    for close in [false, true] {
        let mode = if close {
            "Connection: close"
        } else {
            "keep-alive"
        };
        let mut gem = Gem::start(build)?;
        let before = gem.generation()?;
        let (w, sent) = with_restarts(&mut gem, plan.load, move |a, d| wrk(a, 64, d, close))?;
        let completed = gem.generation()? - before;
        gem.stop()?;
        gem_errors += w.errors();
        row(&mut out, "gem", mode, &w, &format!("{completed} of {sent}"));
        let mut nginx = Nginx::start(workers)?;
        let (w, sent) = with_restarts(&mut nginx, plan.load, move |a, d| wrk(a, 64, d, close))?;
        nginx.stop()?;
        row(&mut out, "nginx", mode, &w, &format!("{sent} sent"));
    }
    let _ = writeln!(
        out,
        "\nTarget: 0 errors of any kind for gem in both modes: {}.",
        verdict(gem_errors == 0, || format!("{gem_errors} errors"))
    );
    Ok(out)
}

fn row(out: &mut String, name: &str, mode: &str, w: &Wrk, restarts: &str) {
    let _ = writeln!(
        out,
        "| {name} | {mode} | {} | {:.0} | {} | {} | {} | {} | {} | {restarts} |",
        w.requests, w.rps, w.connect, w.read, w.write, w.timeout, w.non_2xx
    );
}

/// Signal to the first response with the new body, on a new connection each poll;
/// sorted, in ms.
fn latencies(peer: &mut dyn Peer, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let body = alternate(i);
        peer.stage(body)?;
        let t0 = Instant::now();
        peer.signal_restart()?;
        while peers::get(peer.addr()).ok().as_deref() != Some(body) {
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("{} did not switch to {body:?}", peer.name());
            }
        }
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
        peer.settle()?;
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn restart_latency(build: &Build, plan: &Plan, workers: usize) -> Result<String> {
    let mut gem = Gem::start(build)?;
    let gem_ms = latencies(&mut gem, plan.latency_restarts)?;
    gem.stop()?;
    let mut nginx = Nginx::start(workers)?;
    let nginx_ms = latencies(&mut nginx, plan.latency_restarts)?;
    nginx.stop()?;
    let mut out = format!(
        "{} restarts each, alternating bodies; from the signal to the first new-body \
         response on a fresh connection.\n\n\
         | server | min ms | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n",
        plan.latency_restarts
    );
    for (name, v) in [("gem", &gem_ms), ("nginx", &nginx_ms)] {
        latency_row(&mut out, name, v);
    }
    let (g, n) = (percentile(&gem_ms, 50.0), percentile(&nginx_ms, 50.0));
    let _ = writeln!(
        out,
        "\nTarget: gem p50 ≤ nginx p50 and < 20 ms: {}.",
        verdict(g <= n && g < 20.0, || format!(
            "gem p50 {g:.1} ms vs nginx {n:.1} ms ({:+.1} ms)",
            g - n.min(20.0)
        ))
    );
    Ok(out)
}

fn throughput(build: &Build, plan: &Plan, workers: usize) -> Result<String> {
    let mut hyper = Hyper::start(build)?;
    let mut nginx = Nginx::start(workers)?;
    let mut gem = Gem::start(build)?;
    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("hyper", vec![], vec![]),
        ("nginx", vec![], vec![]),
        ("gem", vec![], vec![]),
    ];
    for _ in 0..plan.rounds {
        for (i, peer) in [&hyper as &dyn Peer, &nginx, &gem].into_iter().enumerate() {
            let w = wrk(peer.addr(), 64, plan.throughput, false)?;
            results[i].1.push(w.rps);
            results[i].2.push(w.p99_ms);
        }
    }
    hyper.stop()?;
    nginx.stop()?;
    gem.stop()?;
    let mut out = format!(
        "{} interleaved rounds (hyper, nginx, gem, hyper, ...) of {} s keep-alive wrk, 64 \
         connections; medians.\n\n| server | req/s | p99 ms |\n|---|---|---|\n",
        plan.rounds,
        plan.throughput.as_secs()
    );
    let med: Vec<(f64, f64)> = results
        .iter()
        .map(|(_, r, p)| (median(r.clone()), median(p.clone())))
        .collect();
    for ((name, _, _), (rps, p99)) in results.iter().zip(&med) {
        let _ = writeln!(out, "| {name} | {rps:.0} | {p99:.2} |");
    }
    let (hyper_rps, nginx_rps, gem_rps) = (med[0].0, med[1].0, med[2].0);
    let to_hyper = gem_rps / hyper_rps;
    let to_nginx = gem_rps / nginx_rps;
    let _ = writeln!(
        out,
        "\ngem/hyper = {to_hyper:.3}; gem/nginx = {to_nginx:.3}.\n\n\
         Target gem/hyper ≥ 0.95: {}. Target gem ≥ nginx: {}.",
        verdict(to_hyper >= 0.95, || format!(
            "short by {:.3}",
            0.95 - to_hyper
        )),
        verdict(to_nginx >= 1.0, || format!(
            "short by {:.3}",
            1.0 - to_nginx
        )),
    );
    Ok(out)
}

fn memory(build: &Build, plan: &Plan) -> Result<String> {
    let mut gem = Gem::start(build)?;
    let pid = gem.pid()?;
    let idle = peers::rss_kib(pid).unwrap_or(0);
    let addr = gem.addr();
    let load = std::thread::spawn(move || wrk(addr, 64, Duration::from_secs(5), false));
    let mut loaded = 0;
    while !load.is_finished() {
        loaded = loaded.max(peers::rss_kib(pid).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    load.join()
        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))??;
    let first = gem.pid()?;
    let before = (
        peers::fd_count(first).unwrap_or(0),
        peers::rss_kib(first).unwrap_or(0),
        peers::count_processes("gem"),
    );
    for i in 0..plan.leak_restarts {
        gem.restart_to(alternate(i))?;
        gem.settle()?;
    }
    let last = gem.pid()?;
    let start = Instant::now();
    while peers::count_processes("gem") > 1 && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = peers::get(gem.addr());
    // The new process closes its end of the handover channel once it notices that the
    // old one has exited; give it that moment before counting.
    let start = Instant::now();
    while peers::fd_count(last).unwrap_or(0) > before.0 && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = (
        peers::fd_count(last).unwrap_or(0),
        peers::rss_kib(last).unwrap_or(0),
        peers::count_processes("gem"),
    );
    gem.stop()?;
    let mut out = format!(
        "| measure | value |\n|---|---|\n| idle RSS | {:.1} MiB |\n| RSS under load (max) | {:.1} MiB |\n\n\
         Before and after {} restarts (the serving process each time):\n\n\
         | | fds | RSS | gem processes |\n|---|---|---|---|\n\
         | before | {} | {:.1} MiB | {} |\n| after | {} | {:.1} MiB | {} |\n",
        idle as f64 / 1024.0,
        loaded as f64 / 1024.0,
        plan.leak_restarts,
        before.0,
        before.1 as f64 / 1024.0,
        before.2,
        after.0,
        after.1 as f64 / 1024.0,
        after.2,
    );
    let grew = after.0 > before.0 || after.2 > before.2 || after.1 > before.1 + 1024;
    let _ = writeln!(
        out,
        "\nTarget: idle RSS < 10 MiB: {}. Nothing grows (RSS within 1 MiB): {}.",
        verdict(idle < 10 * 1024, || format!(
            "{:.1} MiB over",
            (idle as f64 - 10240.0) / 1024.0
        )),
        verdict(!grew, || "see the table".into()),
    );
    Ok(out)
}

fn drain_time(build: &Build, plan: &Plan) -> Result<String> {
    let mut times = Vec::new();
    for _ in 0..plan.drain_rounds {
        let mut gem = Gem::start(build)?;
        let mut conns = Vec::with_capacity(64);
        for _ in 0..64 {
            let mut s = TcpStream::connect(gem.addr())?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")?;
            let mut buf = [0u8; 512];
            let mut got = Vec::new();
            while !got.ends_with(HELLO.as_bytes()) {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    bail!("connection closed early");
                }
                got.extend_from_slice(&buf[..n]);
            }
            conns.push(s);
        }
        let t0 = Instant::now();
        peers::signal(gem.pid()?, "TERM")?;
        gem.child.wait()?;
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        drop(conns);
    }
    let m = median(times.clone());
    let grace = 500.0;
    let mut out = format!(
        "64 idle keep-alive connections, nothing in flight; SIGTERM to exit, {} rounds: \
         median {m:.0} ms (all: {}).\n",
        plan.drain_rounds,
        times
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "\nTarget: under the idle grace ({grace:.0} ms) + 50 ms: {}.",
        verdict(m < grace + 50.0, || format!(
            "{:.0} ms over",
            m - grace - 50.0
        ))
    );
    Ok(out)
}

fn http2(build: &Build, plan: &Plan, workers: usize) -> Result<String> {
    let mut gem = Gem::start(build)?;
    let before = gem.generation()?;
    let (g, sent) = with_restarts(&mut gem, plan.h2, h2load)?;
    let completed = gem.generation()? - before;
    gem.stop()?;
    let mut nginx = Nginx::start_h2(workers)?;
    let (n, nginx_sent) = with_restarts(&mut nginx, plan.h2, h2load)?;
    nginx.stop()?;
    // h2load's "failed" already counts the errored and timed-out streams.
    let bad = g.failed;
    let mut out = format!(
        "h2load, 16 connections × 8 streams for {} s, a restart every 0.5 s.\n\n\
         | server | requests | succeeded | failed | errored | timeout | restarts |\n\
         |---|---|---|---|---|---|---|\n",
        plan.h2.as_secs()
    );
    for (name, h, restarts) in [
        ("gem", &g, format!("{completed} of {sent}")),
        ("nginx", &n, format!("{nginx_sent} sent")),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {restarts} |",
            h.total, h.succeeded, h.failed, h.errored, h.timeout
        );
    }
    let _ = writeln!(
        out,
        "\nTarget: 0 failed or errored streams for gem: {}.",
        verdict(bad == 0, || format!("{bad} streams"))
    );
    Ok(out)
}
