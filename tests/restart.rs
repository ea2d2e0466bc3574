//! Zero-downtime restart: the sockets pass to a new process, which must report ready
//! before the old one drains; every failure is rolled back while the old one serves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::client::{self, H2, get, spawn_get};
use common::load::Load;
use common::{Gem, Signal, Spec, alive, plugin, wait_for};

const HELLO: &str = "Hello world.";
const UPGRADED: &str = "Congratulation! Server has been upgraded.";

/// A gem whose handler is `handler.so` in its own directory, so tests can swap it.
fn start_swappable(extra: &str) -> (Gem, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("handler.so");
    std::fs::copy(plugin("hello"), &so).unwrap();
    let gem = Gem::start(Spec::with_so(&so, extra));
    // Keep the directory alive as long as the gem.
    std::mem::forget(dir);
    (gem, so)
}

/// Replaces `so` the way an operator would: write a new file and rename it over.
fn install(so: &Path, from: &Path) {
    let tmp = so.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, so).unwrap();
}

/// Zombie children of `pid`: upgrades that were not reaped.
fn zombie_children(pid: u32) -> Vec<u32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<_> = rest.split_whitespace().collect();
        if fields.first() == Some(&"Z") && fields.get(1) == Some(&pid.to_string().as_str()) {
            zombies.push(child);
        }
    }
    zombies
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn restarts_under_load_fail_no_request() {
    let (mut gem, so) = start_swappable("");
    let load = Load::start(gem.addr, 6, 3, 0);
    wait_for("load to flow", || (load.ok() > 100).then_some(()));
    let mut pids = vec![gem.pid()];
    for round in 0..10 {
        let (plugin_name, body) = match round % 2 {
            0 => ("upgraded", UPGRADED),
            _ => ("hello", HELLO),
        };
        install(&so, &plugin(plugin_name));
        let new = gem.restart(Signal::HUP);
        assert!(alive(new));
        pids.push(new);
        let before = load.ok();
        wait_for(&format!("round {round} to answer {body:?}"), || {
            (load.latest() == body && get(gem.addr, "/").ok()?.text() == body).then_some(())
        });
        // Keep each generation under load for a while, so the test spans seconds.
        wait_for("load on the new generation", || {
            (load.ok() > before + 2500).then_some(())
        });
    }
    let before_stop = load.ok();
    wait_for("more load after the last restart", || {
        (load.ok() > before_stop + 100).then_some(())
    });
    let report = load.stop();
    println!(
        "load: {} requests ok, {} failed, over {} connections, across 10 restarts; bodies {:?}",
        report.ok, report.failed, report.connections, report.bodies
    );
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(report.bodies.contains_key(HELLO) && report.bodies.contains_key(UPGRADED));
    // Every old generation drains and exits; the pid file names the last one.
    let serving = gem.pid();
    assert_eq!(serving, *pids.last().unwrap());
    for pid in &pids[..pids.len() - 1] {
        wait_for(&format!("old pid {pid} to exit"), || {
            (!alive(*pid)).then_some(())
        });
    }
}

#[test]
fn a_request_in_flight_across_a_restart_completes() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let old = gem.pid();
    let request = spawn_get(gem.addr, "/sleep?ms=2000");
    wait_for("the request to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    let new = gem.restart(Signal::HUP);
    assert_ne!(old, new);
    let resp = request.join().unwrap().unwrap();
    assert_eq!((resp.status, resp.text().as_str()), (200, HELLO));
    wait_for("the old process to exit", || (!alive(old)).then_some(()));
    // The child's lines reached the same stderr the first process had.
    assert_eq!(
        gem.count_log(&format!("Server started at process {new}")),
        1
    );
    assert_eq!(gem.count_log(&format!("[{old}] Fork-exec to {new}.")), 1);
}

/// Sends HUP, waits for the n-th failure line, and checks the old process serves on.
fn expect_failed_upgrade(gem: &mut Gem, n: usize, reason: &str) {
    let pid = gem.pid();
    let load = Load::start(gem.addr, 2, 1, 0);
    gem.signal(Signal::HUP);
    let line = gem.wait_log_n("upgrade failed:", n);
    assert!(line.contains(reason), "expected {reason:?} in {line}");
    assert!(
        line.contains(&format!("process {pid} keeps serving")),
        "{line}"
    );
    assert_eq!(gem.pid(), pid, "the pid file still names the old process");
    assert!(alive(pid));
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    assert!(
        zombie_children(pid).is_empty(),
        "the failed child was not reaped"
    );
}

#[test]
fn failed_upgrades_keep_the_old_process_serving() {
    let (mut gem, so) = start_swappable("upgrade_timeout = \"2s\"");
    let toml = gem.dir.path().join("gem.toml");
    let good_toml = std::fs::read_to_string(&toml).unwrap();

    std::fs::write(so.with_extension("new"), b"not a shared object").unwrap();
    std::fs::rename(so.with_extension("new"), &so).unwrap();
    expect_failed_upgrade(&mut gem, 1, &so.display().to_string());

    install(&so, &plugin("abi-v1"));
    expect_failed_upgrade(&mut gem, 2, "ABI 1, but this gem speaks ABI 2");

    install(&so, &plugin("hello"));
    std::fs::write(&toml, format!("{good_toml}\nwait_timeout = \"never\"\n")).unwrap();
    expect_failed_upgrade(&mut gem, 3, "wait_timeout");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    std::fs::write(
        &toml,
        good_toml.replace(
            "listen = [\"127.0.0.1:0\"]",
            &format!("listen = [\"127.0.0.1:0\", \"{taken_addr}\"]"),
        ),
    )
    .unwrap();
    expect_failed_upgrade(&mut gem, 4, &taken_addr.to_string());

    std::fs::write(&toml, &good_toml).unwrap();
    install(&so, &plugin("slow-init"));
    expect_failed_upgrade(&mut gem, 5, "was not ready within 2s");

    // No latch: the next good restart works.
    install(&so, &plugin("upgraded"));
    gem.restart(Signal::HUP);
    wait_for("the upgraded body", || {
        (get(gem.addr, "/").ok()?.text() == UPGRADED).then_some(())
    });
}

#[test]
fn a_restart_storm_leaves_one_generation_and_leaks_nothing() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let first = gem.pid();
    for _ in 0..20 {
        common::signal_pid(first, Signal::HUP);
        std::thread::sleep(Duration::from_millis(5));
    }
    // One upgrade plus one coalesced follow-up: three generations in all.
    gem.wait_log_n("Server started at process", 3);
    let serving = wait_for("the follow-up to finish", || {
        let pid = gem.pid();
        (pid != first && gem.count_log("Server started at process") == 3 && alive(pid))
            .then_some(pid)
    });
    wait_for("older generations to exit", || {
        let started: Vec<u32> = gem
            .logs()
            .iter()
            .filter_map(|l| l.rsplit_once("process ")?.1.trim().parse().ok())
            .collect();
        started
            .iter()
            .all(|p| *p == serving || !alive(*p))
            .then_some(())
    });
    assert_eq!(
        gem.count_log("Server started at process"),
        3,
        "{:#?}",
        gem.logs()
    );
    assert!(zombie_children(serving).is_empty());
    assert_eq!(get(gem.addr, "/").unwrap().status, 200);
}

#[test]
fn ten_restarts_leak_no_fds() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let first = gem.pid();
    // The plugin is hashed on a side thread from its own fd; count once that is done.
    let hashed = |gem: &Gem| {
        wait_for("the plugin to be hashed", || {
            gem.status()["plugin"]["sha256"].is_string().then_some(())
        })
    };
    hashed(&gem);
    let before = fd_count(first);
    let mut last = first;
    for _ in 0..10 {
        last = gem.restart(Signal::HUP);
    }
    wait_for("the last generation to settle", || {
        (get(gem.addr, "/").ok()?.status == 200).then_some(())
    });
    // Let the previous generation finish draining so its relay fd is closed.
    wait_for("no older generation left", || {
        (gem.status()["draining"].as_array()?.is_empty()).then_some(())
    });
    hashed(&gem);
    assert_eq!(fd_count(last), before, "fds of gen 1 vs gen 11");
    assert!(zombie_children(last).is_empty());
}

#[test]
fn an_http2_stream_in_flight_completes_and_the_client_gets_goaway() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let addr = gem.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut conn = rt.block_on(H2::connect(addr)).unwrap();
    let mut stream_conn = conn.clone();
    let slow = rt.spawn(async move { stream_conn.get("/sleep?ms=1500").await });
    wait_for("the stream to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    gem.restart(Signal::HUP);
    let resp = rt.block_on(slow).unwrap().unwrap();
    assert_eq!((resp.status, resp.text().as_str()), (200, HELLO));
    // The old process sent GOAWAY: this connection takes no new streams, cleanly.
    wait_for("the connection to close", || {
        (!conn.is_open()).then_some(())
    });
    let err = rt.block_on(conn.get("/")).unwrap_err().to_string();
    assert!(!err.contains("reset"), "{err}");
    assert_eq!(client::get_h2(addr, "/").unwrap().status, 200);
}

#[test]
fn a_replaced_binary_is_what_the_next_generation_runs() {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("gem");
    std::fs::copy(common::gem_bin(), &bin).unwrap();
    let marker = bin_dir.path().join("new-binary-ran");
    let mut gem = Gem::start(Spec::new("hello", "").program(&bin));
    let script = bin_dir.path().join("gem.new");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho $$ > {marker:?}\nexec {:?} \"$@\"\n",
            common::gem_bin()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&script, &bin).unwrap();
    let new = gem.restart(Signal::HUP);
    let ran: u32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        ran, new,
        "the new generation is the replaced binary (exec keeps the pid)"
    );
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
}
