//! The library API with an injected signal source: the lifecycle is driven without any
//! real signal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use futures_util::Stream;
use gem::{Action, Exit, Response, Server, ServerConfig, Signal};
use tokio::sync::mpsc;

/// A signal source the test controls.
fn channel_stream() -> (
    mpsc::UnboundedSender<Signal>,
    impl Stream<Item = Signal> + Unpin,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    (
        tx,
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)),
    )
}

#[test]
fn set_signal_refuses_what_the_rules_forbid() {
    let builder = || Server::builder().handler(|_| Response::text(200, "x"));
    let err = builder().signal(Signal::TERM, Action::Restart).unwrap_err();
    assert!(
        err.to_string().contains("SIGTERM is always \"shutdown\""),
        "{err}"
    );
    let err = builder().signal(Signal::KILL, Action::Ignore).unwrap_err();
    assert!(
        err.to_string().contains("SIGKILL cannot be mapped"),
        "{err}"
    );
    assert!(builder().signal(Signal::USR2, Action::Restart).is_ok());
    let err = Server::builder().build().unwrap_err();
    assert!(err.to_string().contains("no handler"), "{err}");
}

#[test]
fn load_config_keeps_current_values_for_zero_fields() {
    let server = Server::builder()
        .handler(|_| Response::text(200, "x"))
        .load_config(ServerConfig {
            wait_timeout: Duration::from_secs(30),
            ..Default::default()
        })
        .load_config(ServerConfig {
            max_body_size: 10,
            ..Default::default()
        })
        .build()
        .unwrap();
    let config = server.config();
    assert_eq!(config.wait_timeout, Duration::from_secs(30));
    assert_eq!(config.limits.max_body_size, 10);
    assert_eq!(
        config.upgrade_timeout,
        Duration::from_secs(30),
        "default kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_signals_drive_the_lifecycle() {
    let server = Server::builder()
        .listen("127.0.0.1:0")
        .handler(|_| Response::text(200, "Hello world."))
        .signal(Signal::USR2, Action::Shutdown)
        .unwrap()
        .build()
        .unwrap();
    let (tx, signals) = channel_stream();
    let run = tokio::spawn(server.run_with_signals(signals));
    // Ignored signals leave it running.
    tx.send(Signal::USR1).unwrap();
    tx.send(Signal::USR1).unwrap();
    tokio::task::yield_now().await;
    assert!(!run.is_finished());
    tx.send(Signal::USR2).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("shutdown in time")
        .unwrap()
        .unwrap();
    assert_eq!(exit, Exit::Shutdown { cut: 0 });
}
