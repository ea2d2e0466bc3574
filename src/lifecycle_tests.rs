//! Unit tests of `lifecycle.rs`.
use super::*;
use crate::handler::{FnHandler, Response};

fn lifecycle() -> (Lifecycle, watch::Receiver<Phase>) {
    let me = Identity {
        pid: 10,
        generation: 1,
        parent_pid: None,
        started: Instant::now(),
        listen: Vec::new(),
        handler: Arc::new(FnHandler::new("t", |_| Response::text(200, "x"))),
        role: Role::Alone {
            probation: Duration::ZERO,
        },
    };
    let phase = watch::Sender::new(Phase::Starting);
    let rx = phase.subscribe();
    let drain = DrainSignal::new(Duration::ZERO);
    (
        Lifecycle::new(me, SignalRegistry::default(), drain, phase),
        rx,
    )
}

fn call(cmd: Command) -> (Event, oneshot::Receiver<Reply>) {
    let (reply, rx) = oneshot::channel();
    (Event::Call(Call { cmd, reply }), rx)
}

#[test]
fn a_failed_upgrade_restores_the_pid_file_and_tells_systemd_why() {
    let (mut life, phase) = lifecycle();
    let started = life.handle(Event::Signal(Signal::HUP));
    assert_eq!(
        started,
        vec![
            Action::Notify(Notice::Reloading),
            Action::StartUpgrade { generation: 2 }
        ]
    );
    assert_eq!(*phase.borrow(), Phase::Upgrading);
    let err = UpgradeError::Timeout {
        pid: 11,
        after: Duration::from_secs(1),
    };
    let after = life.handle(Event::UpgradeDone(Err(err)));
    assert_eq!(
        after,
        vec![
            Action::Notify(Notice::Ready {
                status: Some("upgrade failed: new process 11 was not ready within 1s".into())
            }),
            Action::RestorePidFile,
        ]
    );
    assert_eq!(*phase.borrow(), Phase::Serving);
    let (status, mut rx) = call(Command::Status);
    assert!(life.handle(status).is_empty());
    let ReplyBody::Status(s) = rx.try_recv().unwrap().body else {
        panic!("a status");
    };
    let last = s.last_upgrade.unwrap();
    assert_eq!((last.result.as_str(), last.pid), ("failed", Some(11)));
}

#[test]
fn after_a_handover_calls_are_redirected_and_signals_only_logged() {
    let (mut life, phase) = lifecycle();
    life.handle(Event::Signal(Signal::HUP));
    let done = life.handle(Event::UpgradeDone(Ok(77)));
    assert_eq!(
        done,
        vec![
            Action::Notify(Notice::HandedOver { pid: 77 }),
            Action::Drain(Ending::HandedOver { to: 77 })
        ]
    );
    assert_eq!(*phase.borrow(), Phase::Draining);
    assert!(life.handle(Event::Signal(Signal::TERM)).is_empty());
    assert!(life.handle(Event::Signal(Signal::HUP)).is_empty());
    let (status, mut rx) = call(Command::Reload);
    assert!(life.handle(status).is_empty());
    assert_eq!(
        rx.try_recv().unwrap().body,
        ReplyBody::HandedOver { to: 77 }
    );
}

#[test]
fn shutdown_tells_systemd_and_ends_once() {
    let (mut life, _) = lifecycle();
    assert_eq!(
        life.handle(Event::Signal(Signal::INT)),
        vec![
            Action::Notify(Notice::Stopping),
            Action::Drain(Ending::Shutdown)
        ]
    );
    let (stop, mut rx) = call(Command::Stop);
    assert!(life.handle(stop).is_empty(), "already ending");
    assert!(rx.try_recv().is_err(), "answered when the drain is over");
    assert_eq!(life.take_stop_waiters().len(), 1);
    let (status, mut rx) = call(Command::Status);
    assert!(life.handle(status).is_empty());
    assert!(!rx.try_recv().unwrap().ok, "shutting down");
    assert!(life.handle(Event::Signal(Signal::USR1)).is_empty());
}
