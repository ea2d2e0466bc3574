//! Operator control over the control socket: gem reload / stop / status, the pid file,
//! systemd notification and socket activation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::Digest as _;

use common::client::{get, spawn_get};
use common::{Gem, Signal, Spec, alive, plugin, run_gem, wait_for};

fn swappable(extra: &str, env: &[(&str, &str)]) -> (Gem, PathBuf) {
    let so_dir = tempfile::tempdir().unwrap().keep();
    let so = so_dir.join("handler.so");
    std::fs::copy(plugin("hello"), &so).unwrap();
    let mut spec = Spec::with_so(&so, extra);
    for (k, v) in env {
        spec = spec.env(k, v);
    }
    (Gem::start(spec), so)
}

fn install(so: &Path, name: &str) {
    let tmp = so.with_extension("new");
    std::fs::copy(plugin(name), &tmp).unwrap();
    std::fs::rename(&tmp, so).unwrap();
}

fn gem_cmd(gem: &Gem, args: &[&str]) -> (i32, String, String) {
    let (status, out, err) = run_gem(gem.dir.path(), args, &[]);
    (status.code().unwrap_or(-1), out, err)
}

#[test]
fn reload_reports_the_new_pid_and_the_new_handler_serves() {
    let (mut gem, so) = swappable("", &[]);
    let old = gem.pid();
    install(&so, "upgraded");
    let (code, out, err) = gem_cmd(&gem, &["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    let new = gem.pid();
    assert_ne!(new, old);
    assert!(
        out.starts_with(&format!("upgraded: pid {old} -> {new} (generation 2) in ")),
        "{out}"
    );
    assert!(out.trim_end().ends_with(" ms"), "{out}");
    assert_eq!(
        get(gem.addr, "/").unwrap().text(),
        "Congratulation! Server has been upgraded."
    );
}

#[test]
fn reload_with_a_wrong_abi_plugin_fails_and_says_why() {
    let (mut gem, so) = swappable("", &[]);
    let old = gem.pid();
    install(&so, "abi-v1");
    let (code, out, _) = gem_cmd(&gem, &["reload"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.starts_with("upgrade failed: "), "{out}");
    assert!(out.contains(&so.display().to_string()), "{out}");
    assert!(out.contains("ABI 1, but this gem speaks ABI 2"), "{out}");
    assert!(
        out.trim_end()
            .ends_with(&format!("; pid {old} still serving")),
        "{out}"
    );
    assert_eq!(gem.pid(), old);
    assert_eq!(get(gem.addr, "/").unwrap().text(), "Hello world.");
    let status = gem.status();
    assert_eq!(status["last_upgrade"]["result"], "failed");
    assert!(
        status["last_upgrade"]["reason"]
            .as_str()
            .unwrap()
            .contains("ABI 1, but this gem speaks ABI 2")
    );
}

#[test]
fn reload_with_nobody_listening_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let (status, _, err) = run_gem(dir.path(), &["reload"], &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("no gem is answering on"), "{err}");
}

#[test]
fn status_matches_reality() {
    let (mut gem, so) = swappable("", &[]);
    for _ in 0..2 {
        let (code, out, _) = gem_cmd(&gem, &["reload"]);
        assert_eq!(code, 0, "{out}");
    }
    let request = spawn_get(gem.addr, "/sleep?ms=1500");
    // The plugin's sha256 is computed on a side thread after the load.
    let status = wait_for("the request in flight and the plugin hashed", || {
        let s = gem.status();
        (s["in_flight"] == 1 && s["plugin"]["sha256"].is_string()).then_some(s)
    });
    assert_eq!(status["pid"], gem.pid());
    assert_eq!(status["generation"], 3);
    assert_eq!(status["listen"][0], gem.addr.to_string());
    assert_eq!(status["plugin"]["name"], "hello");
    assert_eq!(status["plugin"]["abi"], 2);
    let digest: String = sha2::Sha256::digest(std::fs::read(&so).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(status["plugin"]["sha256"], digest);
    assert!(status["connections"].as_u64().unwrap() >= 1);
    assert_eq!(status["last_upgrade"]["result"], "upgraded");
    assert!(status["uptime_ms"].is_u64());
    assert_eq!(request.join().unwrap().unwrap().status, 200);
    let (code, out, _) = gem_cmd(&gem, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("(generation 3, up "), "{out}");
    // `last upgrade: upgraded 2026-11-27 11:40:02 UTC (3 s ago)`
    let last = out
        .lines()
        .find_map(|l| l.strip_prefix("last upgrade: upgraded "))
        .unwrap_or_else(|| panic!("no last upgrade line: {out}"));
    let (date, ago) = last.split_once(" UTC (").expect("a UTC date");
    assert_eq!(date.len(), "2026-11-27 11:40:02".len(), "{last}");
    assert!(
        date.starts_with("20") && date.as_bytes()[10] == b' ',
        "{last}"
    );
    assert!(ago.ends_with(" s ago)"), "{last}");
    assert!(!out.contains("since epoch"), "{out}");
}

#[test]
fn status_lists_older_generations_still_draining() {
    // Without a probation, `reload` answers while the old generation still drains.
    let (mut gem, _) = swappable("probation = \"0s\"\n", &[]);
    let old = gem.pid();
    let request = spawn_get(gem.addr, "/sleep?ms=3000");
    wait_for("the request to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    let (code, out, _) = gem_cmd(&gem, &["reload"]);
    assert_eq!(code, 0, "{out}");
    let draining = wait_for("the old generation to be listed", || {
        let s = gem.status();
        let d = s["draining"].as_array()?.first()?.clone();
        Some(d)
    });
    assert_eq!(draining["pid"], old);
    assert_eq!(draining["connections"], 1);
    assert_eq!(request.join().unwrap().unwrap().status, 200);
    wait_for("the old generation to leave the list", || {
        gem.status()["draining"]
            .as_array()?
            .is_empty()
            .then_some(())
    });
}

#[test]
fn a_reload_during_an_upgrade_reports_the_follow_up() {
    let (gem, so) = swappable("", &[("SLOW_INIT_MS", "1000")]);
    let first = gem.first_pid();
    install(&so, "slow-init");
    let dir = gem.dir.path().to_owned();
    let reload = move || {
        let dir = dir.clone();
        std::thread::spawn(move || run_gem(&dir, &["reload"], &[]))
    };
    let one = reload();
    gem.wait_log("Fork-exec to");
    let two = reload();
    gem.wait_log("one more will follow it");
    let (s1, out1, err1) = one.join().unwrap();
    let (s2, out2, err2) = two.join().unwrap();
    assert!(s1.success() && s2.success(), "{out1}{err1}{out2}{err2}");
    let third = gem.wait_log_n("Server started at process", 3);
    let second: u32 = third.rsplit_once(' ').unwrap().1.parse().unwrap();
    assert!(
        out1.starts_with(&format!("upgraded: pid {first} -> ")),
        "{out1}"
    );
    assert!(out1.contains("(generation 2)"), "{out1}");
    assert!(
        out2.contains(&format!("-> {second} (generation 3)")),
        "{out2}"
    );
}

#[test]
fn stop_drains_and_cleans_up() {
    let (mut gem, _) = swappable("", &[]);
    let pid = gem.pid();
    let request = spawn_get(gem.addr, "/sleep?ms=1000");
    wait_for("the request to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    let (code, out, err) = gem_cmd(&gem, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.trim(), format!("stopped: pid {pid} drained cleanly"));
    assert!(!alive(pid));
    assert_eq!(request.join().unwrap().unwrap().status, 200);
    assert!(!gem.dir.path().join("gem.pid").exists());
    assert!(!gem.dir.path().join("gem.sock").exists());
}

#[test]
fn a_socket_left_by_a_killed_gem_does_not_block_the_next() {
    let (mut gem, so) = swappable("", &[]);
    let dir = gem.dir.path().to_owned();
    common::signal_pid(gem.pid(), Signal::KILL);
    gem.wait_exit();
    assert!(
        dir.join("gem.sock").exists(),
        "kill -9 leaves the socket file"
    );
    let toml = std::fs::read_to_string(dir.join("gem.toml")).unwrap();
    drop(gem);
    let again = tempfile::tempdir().unwrap();
    std::fs::write(
        again.path().join("gem.toml"),
        format!("{toml}\ncontrol_socket = {:?}\n", dir.join("gem.sock")),
    )
    .unwrap();
    let mut next = Gem::start(Spec::with_so(
        &so,
        &format!("control_socket = {:?}", dir.join("gem.sock")),
    ));
    assert_eq!(get(next.addr, "/").unwrap().status, 200);
    let (status, out, _) = run_gem(dir.as_path(), &["status", "--json"], &[]);
    assert!(status.success());
    assert!(out.contains(&format!("\"pid\": {}", next.pid())), "{out}");
}

#[test]
fn systemd_hears_ready_reloading_mainpid_and_stopping() {
    let sock_dir = tempfile::tempdir().unwrap();
    let notify_path = sock_dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let mut gem =
        Gem::start(Spec::new("hello", "").env("NOTIFY_SOCKET", notify_path.to_str().unwrap()));
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = notify.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = gem.pid();
    assert_eq!(recv(), "READY=1\n");
    let mut pids = vec![first];
    for _ in 0..2 {
        let new = gem.restart(Signal::HUP);
        let reloading = recv();
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading:?}"
        );
        assert_eq!(recv(), format!("MAINPID={new}\nREADY=1\n"));
        pids.push(new);
    }
    gem.signal(Signal::TERM);
    assert_eq!(recv(), "STOPPING=1\n");
    notify
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(notify.recv(&mut buf).is_err(), "nothing after STOPPING=1");
}

#[test]
fn socket_activation_serves_on_the_passed_listener() {
    use command_fds::{CommandFdExt, FdMapping};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gem.toml"),
        format!("listen = [\"{addr}\"]\nhandler = {:?}\n", plugin("hello")),
    )
    .unwrap();
    let mut cmd = Command::new("sh");
    // `exec` keeps the shell's pid, so $$ is the pid gem will run as.
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http exec {:?} serve",
            common::gem_bin()
        ))
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.fd_mappings(vec![FdMapping {
        parent_fd: OwnedFd::from(listener.try_clone().unwrap()),
        child_fd: 3,
    }])
    .unwrap();
    let mut child = cmd.spawn().unwrap();
    let _cleanup = common::KillAllIn(dir.path().to_owned());
    let resp = wait_for("gem to answer on the passed socket", || get(addr, "/").ok());
    assert_eq!(resp.text(), "Hello world.");
    common::signal_pid(child.id(), Signal::TERM);
    let status = child.wait().unwrap();
    assert!(status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(err.contains("systemd:http"), "{err}");
    // gem never bound the address itself: our listener is the same socket.
    drop(listener);
}
