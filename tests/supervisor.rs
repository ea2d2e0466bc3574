//! Supervised mode (`gem serve --supervise`): one long-lived process keeps the pid, the
//! sockets and the control socket; each generation is a worker it starts, replaces when
//! it crashes (with backoff), rolls back during probation, and stops on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::client::{H1, get};
use common::load::Load;
use common::supervise::{
    Worker, children_of, crash_plugin, crashes, get_and_hold, get_until_a_request_fails,
    get_within, install_so, parent_of, pgid_of, replacement_delay, replacement_delays,
    server_pid_of, spawn_gem, swappable_so, wait_gone, wait_serving_worker, workers, zombies_of,
};
use common::{Gem, Signal, Spec, alive, plugin, run_gem, signal_pid, wait_for};

const HELLO: &str = "Hello world.";

/// Starts `gem serve --supervise` and waits for its first worker to serve; returns the
/// gem, the supervisor's pid and the worker.
fn start_supervised(spec: Spec) -> (Gem, u32, Worker) {
    let gem = Gem::start(spec.arg("--supervise"));
    let sup = gem.first_pid();
    gem.wait_log(&format!("[{sup}] supervising: "));
    let worker = wait_serving_worker(&gem, "the first worker to serve", |_| true);
    (gem, sup, worker)
}

fn gem_cmd(gem: &Gem, args: &[&str]) -> (i32, String, String) {
    let (status, out, err) = run_gem(gem.dir.path(), args, &[]);
    (status.code().unwrap_or(-1), out, err)
}

#[test]
fn the_supervisor_holds_the_pid_file_and_a_worker_serves() {
    let (mut gem, sup, worker) = start_supervised(Spec::new("hello", ""));
    assert_eq!(gem.pid(), sup, "the pid file names the supervisor");

    let status = gem.status();
    assert_eq!(status["supervisor"]["pid"], sup, "{status:#}");
    let ws = workers(&status);
    assert_eq!(ws.len(), 1, "{status:#}");
    assert_eq!(ws[0].state, "serving", "{status:#}");
    assert_ne!(worker.pid, sup);
    assert_eq!(
        status["pid"], worker.pid,
        "top-level pid is the serving worker's"
    );
    assert_eq!(status["generation"], worker.generation);
    assert_eq!(
        parent_of(worker.pid),
        Some(sup),
        "the worker is the supervisor's child"
    );
    assert_ne!(
        pgid_of(worker.pid),
        pgid_of(sup),
        "a worker has its own process group"
    );
    gem.wait_log(&format!("Server started at process {}", worker.pid));
    gem.wait_log(&format!(
        "[{sup}] worker {} (generation {}) serves.",
        worker.pid, worker.generation
    ));

    // The worker, not the supervisor, holds the accepted connection.
    let (conn, response) = get_and_hold(gem.addr);
    assert!(response.ends_with(HELLO), "{response}");
    let server = server_pid_of(gem.addr, conn.local_addr().unwrap());
    assert_eq!(server, Some(worker.pid), "who serves the connection");
    drop(conn);

    let (code, out, err) = gem_cmd(&gem, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("supervisor:   pid {sup}, 0 crashes")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "worker:       pid {}, generation {}, serving",
            worker.pid, worker.generation
        )),
        "{out}"
    );
}

#[test]
fn a_killed_worker_is_replaced_and_the_supervisor_keeps_its_pid() {
    let so = swappable_so(&plugin("hello"));
    let (mut gem, sup, first) = start_supervised(Spec::with_so(&so, ""));
    // A new handler on disk, not reloaded: the replacement runs the plugin that last
    // reached ready, not whatever the file holds now.
    install_so(&so, &plugin("upgraded"));
    signal_pid(first.pid, Signal::KILL);
    let second = wait_serving_worker(&gem, "a replacement worker", |w| w.pid != first.pid);
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
    assert_eq!(gem.pid(), sup);
    assert!(alive(sup));
    assert_eq!(parent_of(second.pid), Some(sup));

    let line = gem.wait_log(&format!(
        "[{sup}] worker {} (generation {}) died (signal 9",
        first.pid, first.generation
    ));
    assert!(line.contains("crash 1,"), "{line}");
    assert_eq!(
        replacement_delay(&line),
        Some(Duration::ZERO),
        "the first retry is at once: {line}"
    );
    let status = gem.status();
    assert!(crashes(&status) >= 1, "{status:#}");
    assert_eq!(status["supervisor"]["pid"], sup);
    assert!(!alive(first.pid));
    wait_for("the killed worker to be reaped", || {
        zombies_of(sup).is_empty().then_some(())
    });
}

#[test]
fn a_worker_that_dies_in_probation_is_rolled_back() {
    let so = swappable_so(&plugin("hello"));
    let (gem, sup, old) = start_supervised(Spec::with_so(&so, "probation = \"10s\""));
    install_so(&so, &crash_plugin());
    let reload = spawn_gem(gem.dir.path(), &["reload"]);
    let new = wait_serving_worker(&gem, "the new worker to serve", |w| w.pid != old.pid);
    let status = gem.status();
    assert!(
        workers(&status).contains(&Worker {
            state: "standby".into(),
            ..old.clone()
        }),
        "the old worker is on standby: {status:#}"
    );

    let answered = get_until_a_request_fails(gem.addr);
    assert!(answered.iter().all(|b| b == HELLO), "{answered:?}");
    let line = gem.wait_log(&format!(
        "[{sup}] rolled back: pid {} died (signal 6",
        new.pid
    ));
    assert!(
        line.contains(&format!("pid {} serves again", old.pid)),
        "{line}"
    );
    wait_for("the old worker to answer again", || {
        (get(gem.addr, "/").ok()?.text() == HELLO).then_some(())
    });
    let again = wait_serving_worker(&gem, "the old worker listed as serving", |_| true);
    assert_eq!(again.pid, old.pid);
    assert!(alive(old.pid));
    assert!(!alive(new.pid));

    let (status, out, err) = reload.join().unwrap();
    assert_eq!(status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("rolled back") || err.contains("rolled back"),
        "stdout: {out}\nstderr: {err}"
    );
}

/// Keeps sending `GET /` on new connections until dropped.
struct Poker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Poker {
    fn start(addr: std::net::SocketAddr) -> Poker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                // Failures are the point: every request kills the worker that takes it.
                let _ = get_within(addr, "/", Duration::from_millis(500));
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Poker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Poker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Delays never shrink, and the last is at least `min`.
fn assert_backoff(delays: &[Duration], min: Duration, logs: &[String]) {
    assert!(
        delays.windows(2).all(|w| w[0] <= w[1]),
        "delays shrank: {delays:?}\n{logs:#?}"
    );
    assert!(
        delays.last().is_some_and(|d| *d >= min),
        "delays never reached {min:?}: {delays:?}"
    );
}

#[test]
fn a_crash_loop_backs_off() {
    let (mut gem, sup, _) = start_supervised(Spec::with_so(&crash_plugin(), ""));
    let poker = Poker::start(gem.addr);

    let third = gem.wait_log_n("replacement in", 3);
    assert!(third.contains("(signal 6"), "{third}");
    let count = crashes(&gem.status());
    assert!(count >= 3, "{count}");
    wait_for("the crash count to grow", || {
        (crashes(&gem.status()) > count).then_some(())
    });
    let logs = gem.logs();
    let delays = replacement_delays(&logs);
    assert!(delays.len() >= 3, "{logs:#?}");
    assert_eq!(delays[0], Duration::ZERO, "the first retry is at once");
    assert_backoff(&delays, Duration::from_secs(1), &logs);
    assert!(
        delays[1] > delays[0] && delays[2] > delays[1],
        "the delays grow: {delays:?}"
    );

    signal_pid(sup, Signal::TERM);
    let (status, _) = gem.wait_exit();
    drop(poker);
    assert!(status.success(), "{status:?}");
    assert!(!gem.dir.path().join("gem.pid").exists());
}

#[test]
fn a_binary_that_cannot_be_executed_counts_as_crashes_and_the_supervisor_answers() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("gem");
    std::fs::copy(common::gem_bin(), &bin).unwrap();
    let (gem, sup, first) = start_supervised(Spec::new("hello", "").program(&bin));

    // Not an executable any more (garbage, and no x bit), replaced the way an
    // install would: a new file renamed over the old one.
    let garbage = bin_dir.path().join("gem.new");
    std::fs::write(&garbage, b"\x7fnot an ELF file\0\0\0garbage garbage").unwrap();
    std::fs::rename(&garbage, &bin).unwrap();
    signal_pid(first.pid, Signal::KILL);

    // The supervisor goes on answering while every start fails, and says nothing serves.
    let status = wait_for("three crashes", || {
        let status = gem.status();
        (crashes(&status) >= 3).then_some(status)
    });
    assert_eq!(status["supervisor"]["pid"], sup, "{status:#}");
    assert_eq!(status["pid"], sup, "no worker serves: {status:#}");
    assert!(
        workers(&status).iter().all(|w| w.state != "serving"),
        "{status:#}"
    );
    assert!(
        status["supervisor"]["next_start_ms"].is_u64(),
        "a next start is planned: {status:#}"
    );
    // Answered, but no worker serves: exit 1, for a health check.
    let (code, out, err) = gem_cmd(&gem, &["status"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains(&format!("supervisor:   pid {sup}, ")), "{out}");

    // Each failed start is logged, with a growing delay before the next: the kill
    // (crash 1), then two starts that fail (crashes 2 and 3).
    gem.wait_log_n("replacement in", 3);
    let logs = gem.logs();
    let failed: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("replacement in") && !l.contains(" died "))
        .collect();
    assert!(failed.len() >= 2, "{logs:#?}");
    for line in &failed {
        assert!(
            line.contains(&format!("[{sup}] could not start a worker: ")),
            "a failed start is logged as `could not start a worker: <why>`: {line}"
        );
    }
    let delays: Vec<Duration> = failed.iter().filter_map(|l| replacement_delay(l)).collect();
    assert!(delays[1] > delays[0], "the delays grow: {delays:?}");
    assert_backoff(&replacement_delays(&logs), delays[1], &logs);
    assert!(alive(sup));
}

#[test]
fn sigterm_drains_every_worker_and_cleans_up() {
    let (mut gem, sup, worker) = start_supervised(Spec::new("hello", ""));
    let addr = gem.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conns = rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..4 {
            let mut c = H1::connect(addr).await.unwrap();
            assert_eq!(c.get("/").await.unwrap().status, 200);
            conns.push(c);
        }
        conns
    });

    signal_pid(sup, Signal::TERM);
    let (status, took) = gem.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} with 4 idle keep-alive connections"
    );
    assert!(!alive(worker.pid), "the worker outlived its supervisor");
    assert!(!gem.dir.path().join("gem.pid").exists());
    assert!(!gem.dir.path().join("gem.sock").exists());
    assert_eq!(gem.count_log("reach error: timeout"), 0);
    drop(conns);
}

#[test]
fn workers_exit_when_the_supervisor_is_killed() {
    let (mut gem, sup, worker) = start_supervised(Spec::new("hello", ""));
    signal_pid(sup, Signal::KILL);
    gem.wait_exit();
    wait_gone(
        worker.pid,
        Duration::from_secs(3),
        "the worker of a SIGKILLed supervisor",
    );
}

#[test]
fn reload_binary_re_execs_the_supervisor_and_serving_goes_on() {
    let (mut gem, sup, worker) = start_supervised(Spec::new("hello", ""));
    let load = Load::start(gem.addr, 2, 1, 0);
    wait_for("load to flow", || (load.ok() > 50).then_some(()));

    let (code, out, err) = gem_cmd(&gem, &["reload", "--binary"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    gem.wait_log(&format!("[{sup}] re-executing "));
    gem.wait_log(&format!("[{sup}] supervisor re-executed; adopted 1 "));
    assert_eq!(gem.pid(), sup);
    assert!(alive(sup));

    let before = load.ok();
    wait_for("load after the re-exec", || {
        (load.ok() > before + 50).then_some(())
    });
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    let status = gem.status();
    assert_eq!(status["supervisor"]["pid"], sup, "{status:#}");
    let serving = wait_serving_worker(&gem, "the adopted worker", |_| true);
    assert_eq!(serving.pid, worker.pid, "the worker was kept");
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
    // The re-executed supervisor still restarts.
    let (code, out, err) = gem_cmd(&gem, &["reload"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
}

/// Whether this kernel and user may make a pid namespace; the reason if not.
fn pid_namespaces_work() -> Result<(), String> {
    let out = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run unshare: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "unshare --pid --fork --mount-proc failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Leaves an orphan in the pid namespace of `init` (a `sleep` whose shell exits at once,
/// so the kernel hands it to the namespace's pid 1) and checks that pid 1 reaps it.
fn reaps_an_orphan(init: u32) {
    let status = Command::new("nsenter")
        .args(["--target", &init.to_string(), "--pid", "--"])
        .args(["sh", "-c", "sleep 0.5 &"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {}
        other => {
            eprintln!("skipped the orphan check: nsenter: {other:?}");
            return;
        }
    }
    let is_sleep = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    };
    let orphan = wait_for("the orphan to be handed to pid 1", || {
        children_of(init).into_iter().find(is_sleep)
    });
    // Gone from the process table, not merely a zombie.
    wait_for("pid 1 to reap the orphan", || {
        (!std::path::Path::new(&format!("/proc/{orphan}")).exists()).then_some(())
    });
    assert!(zombies_of(init).is_empty());
}

#[test]
fn as_pid_1_restarts_fail_no_request_and_leave_no_zombie() {
    if let Err(why) = pid_namespaces_work() {
        eprintln!("skipped: {why}");
        return;
    }
    // A pid file of its own name: the pid in it is 1, a pid of the namespace, and
    // `Gem`'s drop must never signal that number on the host.
    let spec = Spec::new("hello", "pid_file = \"ns.pid\"\nprobation = \"100ms\"")
        .arg("--supervise")
        .under(&["unshare", "--pid", "--fork", "--mount-proc"]);
    let mut gem = Gem::start(spec);
    let unshare = gem.first_pid();
    // The namespace's pid 1, as the host sees it.
    let init = wait_for("unshare's child", || children_of(unshare).first().copied());
    gem.wait_log("[1] supervising: ");
    assert_eq!(gem.status()["supervisor"]["pid"], 1);

    let load = Load::start(gem.addr, 2, 1, 0);
    wait_for("load to flow", || (load.ok() > 50).then_some(()));
    for round in 1..=10 {
        let (code, out, err) = gem_cmd(&gem, &["reload"]);
        assert_eq!(code, 0, "round {round}: stdout: {out}\nstderr: {err}");
        assert!(out.starts_with("upgraded: "), "{out}");
        let before = load.ok();
        wait_for("load on the new worker", || {
            (load.ok() > before + 50).then_some(())
        });
    }
    let report = load.stop();
    println!(
        "load: {} ok, {} failed over {} connections across 10 restarts",
        report.ok, report.failed, report.connections
    );
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);

    wait_for("the old workers to be gone", || {
        (workers(&gem.status()).len() == 1 && children_of(init).len() == 1).then_some(())
    });
    wait_for("no zombie under the namespace's pid 1", || {
        zombies_of(init).is_empty().then_some(())
    });
    reaps_an_orphan(init);

    let started = Instant::now();
    signal_pid(init, Signal::TERM);
    let (status, _) = gem.wait_exit();
    assert!(status.success(), "unshare reports pid 1's exit: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!alive(init));
}
