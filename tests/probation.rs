//! Probation without a supervisor: after a new generation reports ready, the old one
//! stops accepting but stays, and takes over again at once if the new one dies before
//! `probation` has passed; a `gem reload` is answered with the outcome.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::client::get;
use common::supervise::{
    crash_plugin, get_until_a_request_fails, install_so, spawn_gem, swappable_so, wait_gone,
    zombies_of,
};
use common::{DEADLINE, Gem, Spec, alive, plugin, wait_for};

const HELLO: &str = "Hello world.";
const UPGRADED: &str = "Congratulation! Server has been upgraded.";

/// Waits for the generation after `old` to be ready (it writes the pid file); its pid.
fn next_generation(gem: &mut Gem, old: u32) -> u32 {
    gem.wait_log_n("Server started at process", 2);
    wait_for("the new generation in the pid file", || {
        let pid = gem.pid();
        (pid != old).then_some(pid)
    })
}

#[test]
fn a_new_generation_that_dies_in_probation_is_rolled_back() {
    let so = swappable_so(&plugin("hello"));
    let mut gem = Gem::start(Spec::with_so(&so, "probation = \"10s\""));
    let old = gem.pid();
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);

    install_so(&so, &crash_plugin());
    let reload = spawn_gem(gem.dir.path(), &["reload"]);
    let new = next_generation(&mut gem, old);
    // The old process stops accepting once the new one is ready; the first request
    // the new one takes kills it (abort).
    let answered = get_until_a_request_fails(gem.addr);
    assert!(answered.iter().all(|b| b == HELLO), "{answered:?}");

    let line = gem.wait_log(&format!("rolled back: pid {new} died (signal 6"));
    assert!(line.contains(&format!("[{old}] rolled back")), "{line}");
    assert!(line.contains(&format!("pid {old} serves again")), "{line}");
    // The old process answers again, with the old handler.
    wait_for("the old process to answer again", || {
        (get(gem.addr, "/").ok()?.text() == HELLO).then_some(())
    });
    for _ in 0..10 {
        assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
    }
    assert!(alive(old));
    assert!(!alive(new));
    assert_eq!(
        gem.status()["pid"],
        old,
        "status names the process serving again"
    );
    wait_for("the pid file to name the old process again", || {
        (gem.pid() == old).then_some(())
    });

    let (status, out, err) = reload.join().unwrap();
    assert_eq!(status.code(), Some(1), "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("rolled back") || err.contains("rolled back"),
        "stdout: {out}\nstderr: {err}"
    );
    wait_for("the dead generation to be reaped", || {
        zombies_of(old).is_empty().then_some(())
    });
}

#[test]
fn a_good_upgrade_passes_probation_then_the_old_process_exits() {
    let so = swappable_so(&plugin("hello"));
    let mut gem = Gem::start(Spec::with_so(&so, "probation = \"1s\""));
    let old = gem.pid();

    install_so(&so, &plugin("upgraded"));
    let asked = Instant::now();
    let reload = spawn_gem(gem.dir.path(), &["reload"]);
    let new = next_generation(&mut gem, old);
    // The old process stops accepting ...
    gem.wait_log(&format!("[{old}] shutting down the server("));
    let stopped = Instant::now();
    // ... but stays, on standby, while only the new one accepts.
    assert!(
        alive(old),
        "the old process exited before its probation ended"
    );
    for _ in 0..20 {
        assert_eq!(get(gem.addr, "/").unwrap().text(), UPGRADED);
    }

    let (status, out, err) = reload.join().unwrap();
    let answered_after = asked.elapsed();
    assert!(status.success(), "stdout: {out}\nstderr: {err}");
    assert!(
        out.starts_with(&format!("upgraded: pid {old} -> {new} ")),
        "{out}"
    );
    assert!(
        answered_after >= Duration::from_secs(1),
        "gem reload answered after {answered_after:?}, before the 1s probation passed"
    );

    wait_gone(old, DEADLINE, "the old process after its probation");
    let lived = stopped.elapsed();
    assert!(
        lived >= Duration::from_millis(900),
        "the old process exited {lived:?} after it stopped accepting, before its probation ended"
    );
    assert!(alive(new));
    assert_eq!(gem.pid(), new);
    assert_eq!(get(gem.addr, "/").unwrap().text(), UPGRADED);
    assert_eq!(gem.count_log("rolled back"), 0, "{:#?}", gem.logs());
}
