//! Graceful shutdown on SIGTERM: in-flight requests finish, idle connections do not hold
//! the exit, and `wait_timeout` cuts what is left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::client::{H1, spawn_get};
use common::{Gem, Signal, Spec};

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_exits_at_once() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let request = spawn_get(gem.addr, "/sleep?ms=1500");
    common::wait_for("the request to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    let signalled = std::time::Instant::now();
    gem.signal(Signal::TERM);
    gem.wait_log("shutting down the server(");
    let resp = request.join().unwrap().unwrap();
    assert_eq!((resp.status, resp.text().as_str()), (200, "Hello world."));
    // The process exits right after the last response, not at the 15 s wait_timeout.
    let (status, after_response) = gem.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(
        after_response < Duration::from_secs(1),
        "exited {after_response:?} after the response"
    );
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert_eq!(gem.count_log("server("), 2, "{:?}", gem.logs());
    gem.wait_log("shutdown successfully.");
    gem.wait_log("all of old servers have been shutdown successfully.");
    assert_eq!(gem.count_log("reach error: timeout"), 0);
}

#[test]
fn idle_keep_alive_connections_do_not_hold_the_exit() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let addr = gem.addr;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let conns = rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..20 {
            let mut c = H1::connect(addr).await.unwrap();
            assert_eq!(c.get("/").await.unwrap().status, 200);
            conns.push(c);
        }
        conns
    });
    gem.signal(Signal::TERM);
    let (status, took) = gem.wait_exit();
    assert!(status.success());
    assert!(
        took < Duration::from_secs(1),
        "took {took:?} with 20 idle connections"
    );
    assert_eq!(gem.count_log("reach error: timeout"), 0);
    drop(conns);
}

#[test]
fn wait_timeout_cuts_what_is_left_and_says_so() {
    let mut gem = Gem::start(Spec::new("hello", "wait_timeout = \"1s\""));
    let request = spawn_get(gem.addr, "/sleep?ms=10000");
    common::wait_for("the request to be in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    gem.signal(Signal::TERM);
    let (status, took) = gem.wait_exit();
    assert!(status.success());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    let line = gem.wait_log("reach error: timeout.");
    assert!(line.contains("(1 cut after 1s)"), "{line}");
    assert!(
        request.join().unwrap().is_err(),
        "the cut request must not succeed"
    );
}

#[test]
fn a_busy_keep_alive_client_is_told_to_close_and_loses_nothing() {
    let mut gem = Gem::start(Spec::new("hello", "idle_grace = \"2s\""));
    let addr = gem.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut conn = rt.block_on(H1::connect(addr)).unwrap();
    assert_eq!(rt.block_on(conn.get("/")).unwrap().status, 200);
    gem.signal(Signal::TERM);
    gem.wait_log("shutting down the server(");
    // Within the idle grace the same connection is served, with `Connection: close`.
    let resp = rt.block_on(conn.get("/")).unwrap();
    assert_eq!(resp.status, 200);
    assert!(resp.close, "draining responses carry Connection: close");
    let (status, _) = gem.wait_exit();
    assert!(status.success());
}
