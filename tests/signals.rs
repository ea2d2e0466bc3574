//! The signal table in gem.toml, driven with real signals against the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use common::client::{get, spawn_get};
use common::{Gem, Signal, Spec, alive, plugin, run_gem};

#[test]
fn a_signal_mapped_to_shutdown_drains_and_exits_zero() {
    let mut gem = Gem::start(Spec::new("hello", "[signals]\nUSR2 = \"shutdown\""));
    let request = spawn_get(gem.addr, "/sleep?ms=500");
    common::wait_for("the request to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    gem.signal(Signal::USR2);
    let (status, _) = gem.wait_exit();
    assert!(status.success(), "{status:?}");
    assert_eq!(request.join().unwrap().unwrap().status, 200);
    gem.wait_log("received signal \"user defined signal 2\".");
    gem.wait_log("all of old servers have been shutdown successfully.");
}

#[test]
fn an_ignored_sigint_is_logged_and_serving_goes_on() {
    let mut gem = Gem::start(Spec::new("hello", "[signals]\nINT = \"ignore\""));
    let pid = gem.pid();
    gem.signal(Signal::INT);
    gem.wait_log(&format!("[{pid}] ignored signal \"interrupt\"."));
    assert!(alive(pid));
    assert_eq!(get(gem.addr, "/").unwrap().status, 200);
}

#[test]
fn the_plugin_action_reaches_the_handlers_hook() {
    let mut gem = Gem::start(Spec::new("hello", "[signals]\nusr1 = \"plugin\""));
    assert_eq!(get(gem.addr, "/signals").unwrap().text(), "");
    // One at a time: the kernel merges a signal sent while the same one is pending.
    for n in 1..=2 {
        gem.signal(Signal::USR1);
        let body = common::wait_for("the hook to run", || {
            let text = get(gem.addr, "/signals").ok()?.text();
            (text.lines().count() == n).then_some(text)
        });
        assert_eq!(body, format!("{}\n", Signal::USR1.as_raw()).repeat(n));
    }
}

#[test]
fn an_unmapped_signal_keeps_its_os_default() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    gem.signal(Signal::QUIT);
    let (status, _) = gem.wait_exit();
    assert_eq!(status.signal(), Some(Signal::QUIT.as_raw()), "{status:?}");
}

fn refuses_to_start(table: &str, key: &str, why: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gem.toml"),
        format!(
            "listen = [\"127.0.0.1:0\"]\nhandler = {:?}\n[signals]\n{table}\n",
            plugin("hello")
        ),
    )
    .unwrap();
    let (status, _, err) = run_gem(dir.path(), &["serve"], &[]);
    assert!(!status.success());
    assert!(err.contains(&format!("`{key}`")), "{err}");
    assert!(err.contains(why), "{err}");
    assert!(!err.contains("Server started"), "{err}");
}

#[test]
fn forbidden_mappings_refuse_to_start_naming_the_key() {
    refuses_to_start(
        "TERM = \"restart\"",
        "signals.TERM",
        "SIGTERM is always \"shutdown\"",
    );
    refuses_to_start(
        "KILL = \"ignore\"",
        "signals.KILL",
        "SIGKILL cannot be mapped",
    );
    refuses_to_start(
        "SIGFOO = \"ignore\"",
        "signals.SIGFOO",
        "valid signals are HUP",
    );
    refuses_to_start(
        "HUP = \"reboot\"",
        "signals.HUP",
        "valid actions are restart",
    );
}

#[test]
fn the_plugin_action_needs_a_hook() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gem.toml"),
        format!(
            "listen = [\"127.0.0.1:0\"]\nhandler = {:?}\n[signals]\nUSR1 = \"plugin\"\n",
            plugin("slow-init")
        ),
    )
    .unwrap();
    let (status, _, err) = run_gem(dir.path(), &["serve"], &[("SLOW_INIT_MS", "0")]);
    assert!(!status.success());
    assert!(
        err.contains("signals.USR1 = \"plugin\" needs a handler with an on_signal hook"),
        "{err}"
    );
}

/// Starts gem with a 10 s request in flight, sends TERM, and returns the cut line.
fn cut_line(spec: Spec) -> (String, Duration) {
    let mut gem = Gem::start(spec);
    let _request = spawn_get(gem.addr, "/sleep?ms=10000");
    common::wait_for("the request to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    gem.signal(Signal::TERM);
    let (status, took) = gem.wait_exit();
    assert!(status.success());
    (gem.wait_log("reach error: timeout."), took)
}

#[test]
fn env_and_flag_override_wait_timeout_in_the_drain_itself() {
    let file = "wait_timeout = \"30s\"";
    let (line, took) = cut_line(Spec::new("hello", file).env("GEM_WAIT_TIMEOUT", "1s"));
    assert!(line.contains("cut after 1s"), "{line}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let (line, _) = cut_line(
        Spec::new("hello", file)
            .env("GEM_WAIT_TIMEOUT", "1s")
            .arg("--wait-timeout")
            .arg("2s"),
    );
    assert!(line.contains("cut after 2s"), "{line}");
}

#[test]
fn check_validates_without_serving() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("gem.toml");
    let write = |handler: &std::path::Path, table: &str| {
        std::fs::write(
            &toml,
            format!("listen = [\"127.0.0.1:0\"]\nhandler = {handler:?}\n[signals]\n{table}\n"),
        )
        .unwrap();
    };

    write(&plugin("hello"), "USR1 = \"plugin\"");
    let (status, out, err) = run_gem(dir.path(), &["check"], &[]);
    assert!(status.success(), "{err}");
    assert!(
        out.contains("plugin:              hello 0.1.0 (ABI 2)"),
        "{out}"
    );
    assert!(out.contains("  SIGUSR1    plugin"), "{out}");
    assert!(out.contains("  SIGHUP     restart"), "{out}");
    assert!(!err.contains("Server started"));

    write(&plugin("hello"), "TERM = \"ignore\"");
    let (status, _, err) = run_gem(dir.path(), &["check"], &[]);
    assert!(!status.success());
    assert!(err.contains("`signals.TERM`"), "{err}");

    write(&plugin("abi-v1"), "");
    let (status, _, err) = run_gem(dir.path(), &["check"], &[]);
    assert!(!status.success());
    assert!(
        err.contains(&plugin("abi-v1").display().to_string()),
        "{err}"
    );
    assert!(err.contains("ABI 1, but this gem speaks ABI 2"), "{err}");
}

#[test]
fn an_edited_signal_table_takes_effect_at_the_next_restart() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let toml = gem.dir.path().join("gem.toml");
    let edited = std::fs::read_to_string(&toml).unwrap() + "[signals]\nUSR1 = \"shutdown\"\n";
    std::fs::write(&toml, edited).unwrap();
    // The running process still ignores USR1: it read the file before the edit.
    let first = gem.pid();
    gem.signal(Signal::USR1);
    gem.wait_log(&format!(
        "[{first}] ignored signal \"user defined signal 1\"."
    ));
    let second = gem.restart(Signal::HUP);
    common::signal_pid(second, Signal::USR1);
    common::wait_for("the new generation to shut down on USR1", || {
        (!alive(second)).then_some(())
    });
    gem.wait_log(&format!(
        "[{second}] received signal \"user defined signal 1\"."
    ));
}
