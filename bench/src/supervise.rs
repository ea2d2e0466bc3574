//! Supervised mode and probation: restarts under load with `gem serve --supervise`, a
//! serving worker SIGKILLed under load, a crashing plugin rolled back by probation, and
//! restart latency in both modes.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, pidfd_open};

use crate::peers::{self, Build, Gem, HELLO, Mode, Peer};
use crate::tools::{Wrk, wrk};
use crate::{Plan, latencies, percentile, row, verdict, with_restarts};

const SUPERVISED: Mode = Mode {
    supervise: true,
    probation: Some("0s"),
};

/// Polls `GET /` on a new connection each time until it answers `body`; how long that took.
fn until_served(addr: SocketAddr, body: &str, limit: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    while peers::get(addr).ok().as_deref() != Some(body) {
        if t0.elapsed() > limit {
            bail!("{addr} did not answer {body:?} within {limit:?}");
        }
    }
    Ok(t0.elapsed())
}

/// wrk with 64 keep-alive connections for `duration`, in a thread.
fn load(addr: SocketAddr, duration: Duration) -> std::thread::JoinHandle<Result<Wrk>> {
    std::thread::spawn(move || wrk(addr, 64, duration, false))
}

fn join(load: std::thread::JoinHandle<Result<Wrk>>) -> Result<Wrk> {
    load.join()
        .map_err(|_| anyhow::anyhow!("wrk thread panicked"))?
}

/// Scenario 1 with `gem serve --supervise` (probation off, as there).
pub fn restarts_under_load(build: &Build, plan: &Plan) -> Result<String> {
    let duration = plan.load.min(Duration::from_secs(10));
    let mut out = format!(
        "`gem serve --supervise`, probation \"0s\"; wrk, 64 connections for {} s, a \
         restart every 0.5 s alternating two handlers (as in 1).\n\n\
         | server | mode | requests | req/s | connect | read | write | timeout | non-2xx | restarts |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        duration.as_secs()
    );
    let mut errors = 0;
    for close in [false, true] {
        let mode = if close {
            "Connection: close"
        } else {
            "keep-alive"
        };
        let mut gem = Gem::start_with(build, SUPERVISED)?;
        let before = gem.generation()?;
        let (w, sent) = with_restarts(&mut gem, duration, move |a, d| wrk(a, 64, d, close))?;
        let completed = gem.generation()? - before;
        gem.stop()?;
        errors += w.errors();
        row(
            &mut out,
            "gem supervised",
            mode,
            &w,
            &format!("{completed} of {sent}"),
        );
    }
    let _ = writeln!(
        out,
        "\nTarget: 0 errors of any kind in both modes: {}.",
        verdict(errors == 0, || format!("{errors} errors"))
    );
    Ok(out)
}

/// The serving worker SIGKILLed under load; the supervisor starts a replacement.
pub fn worker_killed(build: &Build, plan: &Plan) -> Result<String> {
    let rounds = if plan.quick { 1 } else { 3 };
    let mut out = format!(
        "`gem serve --supervise`; wrk, 64 keep-alive connections for 4 s; 1.5 s in, the \
         serving worker (from `gem status --json`) gets SIGKILL. Recovery: from the kill \
         until `GET /` on a new connection (polled back to back) is answered again, by the \
         replacement. {rounds} round(s), a fresh gem each (a second crash within 60 s \
         would wait for the backoff). Each of wrk's 64 connections has a request in \
         flight on the killed worker, so up to 64 failures are what a SIGKILL costs.\n\n\
         | round | requests | failed (socket errors + non-2xx) | recovery ms | killed pid | new pid |\n\
         |---|---|---|---|---|---|\n"
    );
    let (mut worst_failed, mut worst_ms) = (0, 0.0_f64);
    for round in 1..=rounds {
        let mut gem = Gem::start_with(build, SUPERVISED)?;
        let addr = gem.addr();
        let wrk = load(addr, Duration::from_secs(4));
        std::thread::sleep(Duration::from_millis(1500));
        let victim = gem.serving_worker()?;
        let t0 = Instant::now();
        peers::signal(victim, "KILL")?;
        let back = until_served(addr, HELLO, Duration::from_secs(10));
        let killed_for = t0.elapsed();
        let w = join(wrk)?;
        let back = back.context("no answer after the worker was killed")?;
        if peers::alive(victim) {
            bail!("worker {victim} survived SIGKILL for {killed_for:?}");
        }
        let new = gem.serving_worker()?;
        if new == victim {
            bail!("gem status still names the killed worker {victim} as serving");
        }
        let ms = back.as_secs_f64() * 1000.0;
        let failed = w.errors();
        worst_failed = worst_failed.max(failed);
        worst_ms = worst_ms.max(ms);
        let _ = writeln!(
            out,
            "| {round} | {} | {failed} | {ms:.1} | {victim} | {new} |",
            w.requests
        );
        gem.stop()?;
    }
    let _ = writeln!(
        out,
        "\nTarget: ≤ 64 failed requests: {}. Recovery ≤ 100 ms: {}.",
        verdict(worst_failed <= 64, || format!("{worst_failed} failed")),
        verdict(worst_ms <= 100.0, || format!("{worst_ms:.1} ms"))
    );
    Ok(out)
}

/// Waits for a child of `parent` that is not in `known`: the next generation.
fn new_child(parent: u32, known: &HashSet<u32>, limit: Duration) -> Result<u32> {
    let t0 = Instant::now();
    loop {
        if let Some(pid) = peers::children(parent)
            .into_iter()
            .find(|p| !known.contains(p))
        {
            return Ok(pid);
        }
        if t0.elapsed() > limit {
            bail!("{parent} started no new generation within {limit:?}");
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Blocks until `pid` exits (a pidfd turns readable); false if it lives past `limit`.
fn wait_exit(pid: u32, limit: Duration) -> Result<bool> {
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .with_context(|| format!("bad pid {pid}"))?;
    let fd = match pidfd_open(target, PidfdFlags::empty()) {
        Ok(fd) => fd,
        // Already gone (and reaped) between finding it and here.
        Err(rustix::io::Errno::SRCH) => return Ok(true),
        Err(e) => return Err(e).context("pidfd_open"),
    };
    let timeout = Timespec {
        tv_sec: limit.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: limit.subsec_nanos().into(),
    };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    Ok(poll(&mut fds, Some(&timeout)).context("poll on a pidfd")? > 0)
}

/// A plugin whose every request aborts, deployed under load with probation on: the new
/// generation dies on its first request and the old one takes over again.
pub fn bad_plugin(build: &Build, _plan: &Plan) -> Result<String> {
    let Some(crash) = &build.crash_so else {
        let why = "skipped: target/release/libcrash.so is missing (plugins/testing/crash \
                   not built)";
        eprintln!("{why}");
        return Ok(format!("{why}.\n"));
    };
    let mut out = String::from(
        "probation \"5s\"; wrk, 64 keep-alive connections for 5 s; 1.5 s in, \
         `libcrash.so` (aborts on every request) is renamed over the handler path and the \
         pid in the pid file (supervisor, or the serving process) gets SIGHUP. Crash: the \
         new generation's exit, seen through a pidfd. Recovery: from that exit until \
         `GET /` on a new connection (polled back to back) answers the old body again.\n\n\
         | mode | requests | failed (socket errors + non-2xx) | SIGHUP to crash ms | recovery ms | log |\n\
         |---|---|---|---|---|---|\n",
    );
    let (mut worst_failed, mut worst_ms) = (0, 0.0_f64);
    for supervise in [true, false] {
        let mode = Mode {
            supervise,
            probation: Some("5s"),
        };
        let mut gem = Gem::start_with(build, mode)?;
        let addr = gem.addr();
        let wrk = load(addr, Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(1500));
        let parent = gem.pid()?;
        let known: HashSet<u32> = peers::children(parent).into_iter().collect();
        gem.stage_so(crash)?;
        let t_hup = Instant::now();
        peers::signal(parent, "HUP")?;
        let measured = (|| -> Result<(Duration, Duration)> {
            let bad = new_child(parent, &known, Duration::from_secs(5))?;
            if !wait_exit(bad, Duration::from_secs(3))? {
                bail!("the crashing generation {bad} was still alive 3 s after it started");
            }
            let crashed = t_hup.elapsed();
            let back = until_served(addr, HELLO, Duration::from_secs(10))?;
            Ok((crashed, back))
        })();
        let w = join(wrk)?;
        let (crashed, back) = measured.with_context(|| format!("{} mode", mode.name()))?;
        let still = peers::get(addr)?;
        if still != HELLO {
            bail!("after the rollback gem answers {still:?}");
        }
        let rolled = gem.log_lines("rolled back");
        let log = match rolled.first() {
            Some(line) => format!(
                "`{}`",
                line.split_once("rolled back")
                    .map_or(line.as_str(), |(_, rest)| rest)
                    .trim_start_matches(':')
                    .trim()
                    .replace('`', "'")
            ),
            None => "no \"rolled back\" line".into(),
        };
        gem.stop()?;
        let ms = back.as_secs_f64() * 1000.0;
        let failed = w.errors();
        worst_failed = worst_failed.max(failed);
        worst_ms = worst_ms.max(ms);
        let _ = writeln!(
            out,
            "| {} | {} | {failed} | {:.1} | {ms:.1} | {log} |",
            mode.name(),
            w.requests,
            crashed.as_secs_f64() * 1000.0,
        );
    }
    let _ = writeln!(
        out,
        "\nTarget: ≤ 64 failed requests: {}. Recovery ≤ 50 ms: {}.",
        verdict(worst_failed <= 64, || format!("{worst_failed} failed")),
        verdict(worst_ms <= 50.0, || format!("{worst_ms:.1} ms"))
    );
    Ok(out)
}

/// Scenario 2's method, plain and supervised side by side.
pub fn restart_latency(build: &Build, plan: &Plan) -> Result<String> {
    let mut rows = Vec::new();
    for supervise in [false, true] {
        let mode = Mode {
            supervise,
            probation: Some("0s"),
        };
        let mut gem = Gem::start_with(build, mode)?;
        let v = latencies(&mut gem, plan.latency_restarts)?;
        gem.stop()?;
        rows.push((mode.name(), v));
    }
    let mut out = format!(
        "{} restarts each, probation \"0s\", alternating bodies; from the SIGHUP (to the \
         serving process, or to the supervisor) to the first new-body response on a fresh \
         connection.\n\n\
         | gem | min ms | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|\n",
        plan.latency_restarts
    );
    for (name, v) in &rows {
        crate::latency_row(&mut out, name, v);
    }
    let (plain, sup) = (percentile(&rows[0].1, 50.0), percentile(&rows[1].1, 50.0));
    let _ = writeln!(
        out,
        "\nSupervised p50 − plain p50 = {:+.1} ms.\n\n\
         Target: supervised p50 < 20 ms (scenario 2's bound): {}.",
        sup - plain,
        verdict(sup < 20.0, || format!("{sup:.1} ms"))
    );
    Ok(out)
}
