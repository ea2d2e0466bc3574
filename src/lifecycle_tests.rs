//! Unit tests of `lifecycle.rs`.
use super::*;
use crate::handler::{FnHandler, Response};

fn lifecycle() -> (Lifecycle, watch::Receiver<Phase>) {
    lifecycle_as(Role::Alone {
        probation: Duration::ZERO,
    })
}

fn lifecycle_as(role: Role) -> (Lifecycle, watch::Receiver<Phase>) {
    let me = Identity {
        pid: 10,
        generation: 1,
        parent_pid: None,
        started: Instant::now(),
        listen: Vec::new(),
        tls: Vec::new(),
        handler: Arc::new(FnHandler::new("t", |_| Response::text(200, "x"))),
        role,
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
    let ReplyBody::Status(s) = rx.try_recv().unwrap().body else {
        panic!("status is still answered, with the phase");
    };
    assert_eq!(s.phase.as_deref(), Some("draining"));
    let (reload, mut rx) = call(Command::Reload);
    life.handle(reload);
    assert!(!rx.try_recv().unwrap().ok, "no reload while shutting down");
    assert!(life.handle(Event::Signal(Signal::USR1)).is_empty());
}

#[test]
fn on_probation_the_reload_is_answered_when_it_is_over() {
    let (mut life, phase) = lifecycle_as(Role::Alone {
        probation: Duration::from_secs(3),
    });
    let (reload, mut rx) = call(Command::Reload);
    life.handle(reload);
    let done = life.handle(Event::UpgradeDone(Ok(77)));
    assert!(done.contains(&Action::Drain(Ending::HandedOver { to: 77 })));
    assert!(rx.try_recv().is_err(), "not answered during the probation");
    life.probation_passed();
    let reply = rx.try_recv().unwrap();
    assert!(reply.ok, "{reply:?}");
    assert!(matches!(reply.body, ReplyBody::Upgraded(u) if u.to == 77));
    assert_eq!(*phase.borrow(), Phase::Draining);
}

#[test]
fn a_rollback_answers_the_reload_and_serves_again() {
    let (mut life, phase) = lifecycle_as(Role::Alone {
        probation: Duration::from_secs(3),
    });
    let (reload, mut rx) = call(Command::Reload);
    life.handle(reload);
    life.handle(Event::UpgradeDone(Ok(77)));
    let why =
        "rolled back: pid 77 died (signal 6 SIGABRT) 5ms after taking over; pid 10 serves again";
    let actions = life.resume(DrainSignal::new(Duration::ZERO), Some(why.into()));
    assert_eq!(
        actions,
        vec![
            Action::Notify(Notice::HandedOver { pid: 10 }),
            Action::Notify(Notice::Status(why.into())),
            Action::RestorePidFile,
        ]
    );
    let reply = rx.try_recv().unwrap();
    assert!(!reply.ok);
    assert!(matches!(&reply.body, ReplyBody::Failed { reason, pid: 10 } if reason == why));
    assert_eq!(*phase.borrow(), Phase::Serving);
    // Serving again: a new restart starts an upgrade.
    assert!(
        life.handle(Event::Signal(Signal::HUP))
            .contains(&Action::StartUpgrade { generation: 2 })
    );
    let (status, mut rx) = call(Command::Status);
    life.handle(status);
    let ReplyBody::Status(s) = rx.try_recv().unwrap().body else {
        panic!("a status");
    };
    let last = s.last_upgrade.unwrap();
    assert_eq!(last.result, "rolled back");
    assert_eq!(last.pid, Some(77));
    assert!(last.reason.starts_with("pid 77 died"), "{last:?}");
}

#[test]
fn a_worker_leaves_restarts_to_its_supervisor_and_stands_by_when_told() {
    let (mut life, phase) = lifecycle_as(Role::Worker { supervisor: 1 });
    assert!(life.handle(Event::Signal(Signal::HUP)).is_empty());
    assert_eq!(
        life.handle(Event::Parent(FromParent::Hook { signal: 10 })),
        vec![Action::CallHook(Signal::USR1)]
    );
    assert_eq!(
        life.handle(Event::Parent(FromParent::Standby)),
        vec![Action::Drain(Ending::Standby)]
    );
    assert_eq!(*phase.borrow(), Phase::Draining);
    life.resume(DrainSignal::new(Duration::ZERO), None);
    assert_eq!(*phase.borrow(), Phase::Serving);
    assert_eq!(
        life.handle(Event::ParentGone),
        vec![Action::Drain(Ending::Orphaned)]
    );
}
