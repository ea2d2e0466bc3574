//! `gem reload`, `gem stop` and `gem status`: control-socket clients that print the
//! outcome and turn it into an exit code.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use gem::Config;
use gem::control::{self, ClientError, Command, Reply, ReplyBody, Status};

/// Exit code when no server answers.
const UNREACHABLE: u8 = 2;

fn socket(config: &Config) -> anyhow::Result<&Path> {
    config
        .control_socket
        .as_deref()
        .context("no control_socket is configured")
}

/// Sends `cmd` to whichever process serves, until `deadline`: a process that has just
/// handed over says so, and the command goes to its successor.
fn ask(path: &Path, cmd: Command, timeout: Duration) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + timeout;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClientError::Unreachable {
            path: path.to_owned(),
            source,
        })?;
    loop {
        let reply = runtime.block_on(control::call(path, cmd.clone(), remaining(deadline)))?;
        match reply.body {
            ReplyBody::HandedOver { .. } if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => return Ok(reply),
        }
    }
}

/// Prints why nobody answered and returns exit code 2.
fn unreachable(err: &ClientError) -> ExitCode {
    eprintln!("{err}");
    ExitCode::from(UNREACHABLE)
}

pub fn reload(config: &Config, timeout: Option<Duration>) -> anyhow::Result<ExitCode> {
    let path = socket(config)?;
    // The answer comes once the probation is over.
    let deadline = Instant::now()
        + timeout.unwrap_or(config.upgrade_timeout + config.probation + Duration::from_secs(10));
    let mut reply = match ask(path, Command::Reload, remaining(deadline)) {
        Ok(reply) => reply,
        Err(err) => return Ok(unreachable(&err)),
    };
    // Coalesced into a follow-up that the new process runs: ask it for the outcome.
    while let ReplyBody::Forwarded { generation, .. } = reply.body {
        reply = loop {
            match ask(
                path,
                Command::WaitUpgrade { generation },
                remaining(deadline),
            ) {
                Ok(reply) => break reply,
                Err(ClientError::Unreachable { .. }) if Instant::now() < deadline => {
                    // The control socket is between generations for a moment.
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(err) => return Ok(unreachable(&err)),
            }
        };
    }
    Ok(match reply.body {
        ReplyBody::Upgraded(u) => {
            let ms = u.ms.map_or_else(String::new, |ms| format!(" in {ms} ms"));
            println!(
                "upgraded: pid {} -> {} (generation {}){ms}",
                u.from, u.to, u.generation
            );
            ExitCode::SUCCESS
        }
        ReplyBody::Failed { reason, .. } if reason.starts_with("rolled back") => {
            println!("{reason}");
            ExitCode::FAILURE
        }
        ReplyBody::Failed { reason, pid } => {
            println!("upgrade failed: {reason}; pid {pid} still serving");
            ExitCode::FAILURE
        }
        other => anyhow::bail!("unexpected answer to reload: {other:?}"),
    })
}

/// `gem reload --binary`: the supervisor re-executes its binary in place. Success shows
/// as the connection closing without an answer (the exec closed it), then the same pid
/// answering `status` with its `execs` one higher.
pub fn reexec(config: &Config, timeout: Option<Duration>) -> anyhow::Result<ExitCode> {
    let path = socket(config)?;
    let deadline = Instant::now() + timeout.unwrap_or(Duration::from_secs(30));
    let before = match supervisor_status(path, remaining(deadline)) {
        Ok(Some(s)) => s,
        Ok(None) => {
            println!(
                "re-executing failed: this gem runs without a supervisor (gem serve --supervise)"
            );
            return Ok(ExitCode::FAILURE);
        }
        Err(err) => return Ok(unreachable(&err)),
    };
    match ask(path, Command::Reexec, remaining(deadline)) {
        Ok(Reply {
            body: ReplyBody::Failed { reason, .. },
            ..
        }) => {
            println!("{reason}; supervisor {} carries on", before.pid);
            return Ok(ExitCode::FAILURE);
        }
        Ok(other) => anyhow::bail!("unexpected answer to reexec: {:?}", other.body),
        // The exec closed the connection.
        Err(ClientError::BadAnswer { .. }) => {}
        Err(err) => return Ok(unreachable(&err)),
    }
    loop {
        match supervisor_status(path, remaining(deadline)) {
            Ok(Some(now)) if now.execs > before.execs => {
                if now.pid != before.pid {
                    anyhow::bail!(
                        "the supervisor's pid changed from {} to {}",
                        before.pid,
                        now.pid
                    );
                }
                println!(
                    "re-executed: supervisor {} runs the new binary; {} workers kept",
                    now.pid,
                    now.workers.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            Err(err) if Instant::now() >= deadline => {
                // Gone: the new image did not start.
                println!(
                    "re-executing: supervisor {} did not answer again",
                    before.pid
                );
                return Ok(unreachable(&err));
            }
            _ if Instant::now() >= deadline => {
                println!(
                    "re-executing: supervisor {} did not answer again in time",
                    before.pid
                );
                return Ok(ExitCode::FAILURE);
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn supervisor_status(
    path: &Path,
    timeout: Duration,
) -> Result<Option<control::SupervisorStatus>, ClientError> {
    let reply = ask(path, Command::Status, timeout.min(Duration::from_secs(5)))?;
    Ok(match reply.body {
        ReplyBody::Status(s) => s.supervisor,
        _ => None,
    })
}

pub fn stop(config: &Config, timeout: Option<Duration>) -> anyhow::Result<ExitCode> {
    let path = socket(config)?;
    let deadline = Instant::now()
        + timeout.unwrap_or(config.shutdown_delay + config.wait_timeout + Duration::from_secs(10));
    if !config.shutdown_delay.is_zero() {
        println!(
            "stopping: /readyz answers 503 for {} (shutdown_delay) while requests are still served; then the drain",
            humantime::format_duration(config.shutdown_delay)
        );
    }
    let reply = match ask(path, Command::Stop, remaining(deadline)) {
        Ok(reply) => reply,
        Err(err) => return Ok(unreachable(&err)),
    };
    let ReplyBody::Stopped { pid, cut } = reply.body else {
        anyhow::bail!("unexpected answer to stop: {:?}", reply.body);
    };
    // The reply names the pid as the server sees it; in a container (another pid
    // namespace) that number means another process here. So: wait for the control
    // socket to go, then for the pid only if it runs this very binary.
    while std::os::unix::net::UnixStream::connect(path).is_ok() || (alive(pid) && same_binary(pid))
    {
        if Instant::now() >= deadline {
            anyhow::bail!("pid {pid} drained but has not exited yet");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    match cut {
        0 => println!("stopped: pid {pid} drained cleanly"),
        n => println!("stopped: pid {pid}; {n} connections were cut at wait_timeout"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let path = socket(config)?;
    let reply = match ask(path, Command::Status, Duration::from_secs(5)) {
        Ok(reply) => reply,
        Err(err) => return Ok(unreachable(&err)),
    };
    let ReplyBody::Status(status) = reply.body else {
        anyhow::bail!("unexpected answer to status: {:?}", reply.body);
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", describe(&status, SystemTime::now()));
    }
    // A supervisor answers even while no worker serves (a crash backoff): a health
    // check built on `gem status` must see that.
    let serving = status
        .supervisor
        .as_ref()
        .is_none_or(|s| s.workers.iter().any(|w| w.state == "serving"));
    Ok(if serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn describe(s: &Status, now: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let uptime = span(Duration::from_millis(s.uptime_ms));
    let _ = writeln!(
        out,
        "pid:          {} (generation {}, up {uptime})",
        s.pid, s.generation
    );
    match s.phase.as_deref() {
        None | Some("serving") => {}
        Some("shutdown_delay") => {
            let _ = writeln!(
                out,
                "phase:        shutdown delay (/readyz answers 503; still serving)"
            );
        }
        Some(phase) => {
            let _ = writeln!(out, "phase:        {phase}");
        }
    }
    let _ = writeln!(out, "listen:       {}", s.listen.join(", "));
    for l in &s.tls {
        let _ = writeln!(out, "tls {}: {}", l.listen, l.cert.line());
    }
    let p = &s.plugin;
    let abi = p.abi.map_or("-".into(), |a| a.to_string());
    let _ = writeln!(out, "plugin:       {} {} (ABI {abi})", p.name, p.version);
    if let Some(sha) = &p.sha256 {
        let _ = writeln!(out, "sha256:       {sha}");
    }
    let _ = writeln!(
        out,
        "in flight:    {} requests on {} connections",
        s.in_flight, s.connections
    );
    match &s.last_upgrade {
        Some(u) => {
            let reason = match u.reason.as_str() {
                "" => String::new(),
                r => format!(": {r}"),
            };
            let _ = writeln!(
                out,
                "last upgrade: {} {}{reason}",
                u.result,
                moment(u.at_unix_ms, now)
            );
        }
        None => {
            let _ = writeln!(out, "last upgrade: none by this process");
        }
    }
    if let Some(sup) = &s.supervisor {
        let crashes = match sup.crashes {
            1 => "1 crash".to_owned(),
            n => format!("{n} crashes"),
        };
        let next = sup.next_start_ms.map_or_else(String::new, |ms| {
            format!("; next worker in {}", span_ms(ms))
        });
        let _ = writeln!(out, "supervisor:   pid {}, {crashes}{next}", sup.pid);
        for w in &sup.workers {
            let _ = writeln!(
                out,
                "worker:       pid {}, generation {}, {}",
                w.pid, w.generation, w.state
            );
        }
    }
    for d in &s.draining {
        let _ = writeln!(
            out,
            "draining:     pid {} with {} connections",
            d.pid, d.connections
        );
    }
    out
}

/// `2026-11-27 11:40:02 UTC (3 s ago)`: when, and how long before `now`.
fn moment(at_unix_ms: u64, now: SystemTime) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(at_unix_ms);
    let date = humantime::format_rfc3339_seconds(at)
        .to_string()
        .replacen('T', " ", 1)
        .replace('Z', " UTC");
    match now.duration_since(at) {
        Ok(ago) => format!("{date} ({} ago)", span(ago)),
        // The server's clock is ahead of ours.
        Err(_) => date,
    }
}

/// A duration as a person says it, to the two largest units: `3 s`, `4 min 5 s`,
/// `2 h 3 min`, `3 days 4 h`.
fn span(d: Duration) -> String {
    let secs = d.as_secs();
    let (days, h, min, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (days, h, min) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, _) => format!("{min} min {s} s"),
        (0, _, _) => format!("{h} h {min} min"),
        (1, _, _) => format!("1 day {h} h"),
        _ => format!("{days} days {h} h"),
    }
}

/// A short wait: `250 ms`, `4 s`.
fn span_ms(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        span(Duration::from_millis(ms))
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Whether process `pid` runs the same executable file as this one.
fn same_binary(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let id = |path: String| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    match (id(format!("/proc/{pid}/exe")), id("/proc/self/exe".into())) {
        (Some(theirs), Some(ours)) => theirs == ours,
        // A process on its way out has no exe link any more (nor does one we may not
        // look at): its name has to do.
        _ => {
            let comm = |path: String| std::fs::read_to_string(path).ok();
            comm(format!("/proc/{pid}/comm"))
                .is_some_and(|c| Some(c) == comm("/proc/self/comm".into()))
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_like_a_person_says_them() {
        let s = Duration::from_secs;
        assert_eq!(span(Duration::from_millis(999)), "0 s");
        assert_eq!(span(s(3)), "3 s");
        assert_eq!(span(s(245)), "4 min 5 s");
        assert_eq!(span(s(2 * 3600 + 3 * 60 + 9)), "2 h 3 min");
        assert_eq!(span(s(86_400 + 3600)), "1 day 1 h");
        assert_eq!(span(s(3 * 86_400 + 4 * 3600)), "3 days 4 h");
    }

    #[test]
    fn a_moment_is_a_utc_date_and_how_long_ago() {
        let at_ms = 1_795_779_602_000; // 2026-11-27 11:40:02 UTC
        let now = UNIX_EPOCH + Duration::from_millis(at_ms + 3_400);
        assert_eq!(moment(at_ms, now), "2026-11-27 11:40:02 UTC (3 s ago)");
        let before = UNIX_EPOCH + Duration::from_millis(at_ms - 1000);
        assert_eq!(moment(at_ms, before), "2026-11-27 11:40:02 UTC");
    }
}
