//! The lifecycle loop driven with a fake [`Spawner`]: no fork, no log scraping. Each
//! test decides when and how every upgrade ends, and waits on phases and replies.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Spawner, run};
use crate::config::Config;
use crate::control::{Call, Command, Reply, ReplyBody};
use crate::error::Error;
use crate::generation::{ControlSocket, Exit, HandlerSource, start};
use crate::handler::{FnHandler, Response};
use crate::handover::Inherited;
use crate::lifecycle::Phase;
use crate::signals::Signal;
use crate::upgrade::{Channel, MAX_LINE, UpgradeError, Upgraded};
use crate::wire::Wire;

const DEADLINE: Duration = Duration::from_secs(10);

/// One upgrade the loop asked for; the test ends it.
struct Spawned {
    generation: u64,
    outcome: oneshot::Sender<Result<(), UpgradeError>>,
    cancel: CancellationToken,
    /// The new process's end of the channel, to see what the old one sends it.
    child_end: Channel,
}

impl Spawned {
    fn pid(&self) -> u32 {
        pid_of(self.generation)
    }

    fn succeed(self) -> Channel {
        let _ = self.outcome.send(Ok(()));
        self.child_end
    }

    fn fail(self) {
        let pid = self.pid();
        let _ = self.outcome.send(Err(UpgradeError::ChildFailed {
            pid,
            reason: "plugin refused".into(),
        }));
    }
}

/// Spawns nothing: each child "serves" with a fake pid once the test says so.
struct FakeSpawner(mpsc::UnboundedSender<Spawned>);

/// The fake pids, distinct per generation and not any real process.
fn pid_of(generation: u64) -> u32 {
    4_000_000 + u32::try_from(generation).unwrap()
}

impl Spawner for FakeSpawner {
    fn spawn(
        &mut self,
        generation: u64,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Upgraded, UpgradeError>> {
        let (tx, rx) = oneshot::channel();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let _ = self.0.send(Spawned {
            generation,
            outcome: tx,
            cancel: cancel.clone(),
            child_end: Wire::new(theirs, MAX_LINE),
        });
        let pid = pid_of(generation);
        Box::pin(async move {
            tokio::select! {
                outcome = rx => match outcome {
                    Ok(Ok(())) => Ok(Upgraded::new(pid, Wire::new(ours, MAX_LINE), None)),
                    Ok(Err(err)) => Err(err),
                    Err(_) => Err(UpgradeError::Task("the test dropped it".into())),
                },
                () = cancel.cancelled() => Err(UpgradeError::Cancelled { pid }),
            }
        })
    }
}

struct Harness {
    signals: mpsc::UnboundedSender<Signal>,
    calls: mpsc::Sender<Call>,
    spawned: mpsc::UnboundedReceiver<Spawned>,
    phase: watch::Receiver<Phase>,
    run: JoinHandle<Result<Exit, Error>>,
}

impl Harness {
    async fn start() -> Harness {
        let mut config = Config::default();
        config.listen.clear();
        let handler = Arc::new(FnHandler::new("test", |_| Response::text(200, "x")));
        let (mut generation, _) = start(
            config,
            HandlerSource::InProcess(handler),
            Inherited::fresh(),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
        let (calls, rx) = mpsc::channel(16);
        generation.control = Some(ControlSocket {
            path: "/nonexistent/gem.sock".into(),
            calls: Some(rx),
            stop: CancellationToken::new(),
            answers: TaskTracker::new(),
        });
        let (signals, mut signal_rx) = mpsc::unbounded_channel();
        let stream = futures_util::stream::poll_fn(move |cx| signal_rx.poll_recv(cx));
        let (spawn_tx, spawned) = mpsc::unbounded_channel();
        let phase = watch::Sender::new(Phase::Starting);
        let receiver = phase.subscribe();
        let run = tokio::spawn(run(generation, FakeSpawner(spawn_tx), stream, None, phase));
        let mut harness = Harness {
            signals,
            calls,
            spawned,
            phase: receiver,
            run,
        };
        harness.wait_phase(Phase::Serving).await;
        harness
    }

    fn signal(&self, sig: Signal) {
        self.signals.send(sig).unwrap();
    }

    async fn call(&self, cmd: Command) -> oneshot::Receiver<Reply> {
        let (reply, rx) = oneshot::channel();
        self.calls.send(Call { cmd, reply }).await.unwrap();
        rx
    }

    async fn next_spawn(&mut self) -> Spawned {
        tokio::time::timeout(DEADLINE, self.spawned.recv())
            .await
            .expect("an upgrade to be started")
            .unwrap()
    }

    async fn wait_phase(&mut self, phase: Phase) {
        tokio::time::timeout(DEADLINE, self.phase.wait_for(|p| *p == phase))
            .await
            .expect("the phase")
            .unwrap();
    }

    /// Lets the loop take in everything sent so far: a status call is answered only
    /// after every earlier event.
    async fn settle(&self) {
        reply(self.call(Command::Status).await).await;
    }

    async fn exit(mut self) -> (Exit, Vec<u64>) {
        let exit = tokio::time::timeout(DEADLINE, self.run)
            .await
            .expect("the loop to end")
            .unwrap()
            .unwrap();
        let mut late = Vec::new();
        while let Ok(s) = self.spawned.try_recv() {
            late.push(s.generation);
        }
        (exit, late)
    }
}

async fn reply(rx: oneshot::Receiver<Reply>) -> Reply {
    tokio::time::timeout(DEADLINE, rx)
        .await
        .expect("a reply in time")
        .expect("a reply, not a dropped waiter")
}

#[tokio::test]
async fn a_restart_during_an_upgrade_follows_a_failed_one() {
    let mut h = Harness::start().await;
    h.signal(Signal::HUP);
    let first = h.next_spawn().await;
    assert_eq!(first.generation, 2);
    h.wait_phase(Phase::Upgrading).await;
    h.signal(Signal::HUP);
    h.settle().await;
    first.fail();
    let second = h.next_spawn().await;
    assert_eq!(
        second.generation, 2,
        "the follow-up starts the same generation"
    );
    let to = second.pid();
    second.succeed();
    let (exit, late) = h.exit().await;
    assert_eq!(exit, Exit::HandedOver { to, cut: 0 });
    assert!(late.is_empty(), "no more upgrades: {late:?}");
}

#[tokio::test]
async fn two_restarts_during_an_upgrade_make_one_follow_up() {
    let mut h = Harness::start().await;
    h.signal(Signal::HUP);
    let first = h.next_spawn().await;
    h.signal(Signal::HUP);
    h.signal(Signal::HUP);
    let waiter = h.call(Command::Reload).await;
    h.settle().await;
    first.fail();
    let second = h.next_spawn().await;
    let to = second.pid();
    second.succeed();
    let ReplyBody::Upgraded(up) = reply(waiter).await.body else {
        panic!("the follow-up's waiter gets the follow-up's outcome");
    };
    assert_eq!((up.to, up.generation), (to, 2));
    let (exit, late) = h.exit().await;
    assert_eq!(exit, Exit::HandedOver { to, cut: 0 });
    assert!(late.is_empty(), "exactly one follow-up: {late:?}");
}

#[tokio::test]
async fn a_follow_up_after_a_success_goes_to_the_new_process() {
    let mut h = Harness::start().await;
    let first_waiter = h.call(Command::Reload).await;
    let first = h.next_spawn().await;
    let follow_up = h.call(Command::Reload).await;
    h.settle().await;
    let to = first.pid();
    let mut child = first.succeed();
    let ReplyBody::Upgraded(up) = reply(first_waiter).await.body else {
        panic!("the first waiter gets the upgrade");
    };
    assert_eq!((up.to, up.generation), (to, 2));
    assert_eq!(
        reply(follow_up).await.body,
        ReplyBody::Forwarded { to, generation: 2 }
    );
    let first_message =
        tokio::time::timeout(DEADLINE, crate::upgrade::next_from_parent(&mut child))
            .await
            .unwrap();
    assert_eq!(first_message, Some(crate::upgrade::FromParent::Restart));
    let (exit, late) = h.exit().await;
    assert_eq!(exit, Exit::HandedOver { to, cut: 0 });
    assert!(
        late.is_empty(),
        "the old process ran no follow-up itself: {late:?}"
    );
}

#[tokio::test]
async fn stop_during_an_upgrade_cancels_it_and_answers_everyone() {
    let mut h = Harness::start().await;
    let reload = h.call(Command::Reload).await;
    let spawned = h.next_spawn().await;
    let follow_up = h.call(Command::Reload).await;
    let stop = h.call(Command::Stop).await;
    tokio::time::timeout(DEADLINE, spawned.cancel.cancelled())
        .await
        .expect("the child is stopped");
    for waiter in [reload, follow_up] {
        let answer = reply(waiter).await;
        assert!(!answer.ok);
        let ReplyBody::Failed { reason, .. } = answer.body else {
            panic!("a failure");
        };
        assert!(
            reason.contains("a shutdown arrived during the upgrade"),
            "{reason}"
        );
    }
    let pid = std::process::id();
    assert_eq!(reply(stop).await.body, ReplyBody::Stopped { pid, cut: 0 });
    let mut phase = h.phase.clone();
    let (exit, late) = h.exit().await;
    assert_eq!(exit, Exit::Shutdown { cut: 0 });
    assert!(late.is_empty());
    assert_eq!(*phase.borrow_and_update(), Phase::Exited);
}

#[tokio::test]
async fn every_waiter_is_answered_once_through_a_failure_and_a_follow_up() {
    let mut h = Harness::start().await;
    let a = h.call(Command::Reload).await;
    let first = h.next_spawn().await;
    let b = h.call(Command::Reload).await;
    let c = h.call(Command::WaitUpgrade { generation: 1 }).await;
    h.settle().await;
    first.fail();
    let failed = reply(a).await;
    assert!(!failed.ok, "{failed:?}");
    assert_eq!(
        reply(c).await,
        failed,
        "wait_upgrade gets the first upgrade's outcome"
    );
    let second = h.next_spawn().await;
    let to = second.pid();
    h.wait_phase(Phase::Upgrading).await;
    let d = h.call(Command::WaitUpgrade { generation: 1 }).await;
    assert_eq!(
        reply(d).await,
        failed,
        "asked later, still the first outcome"
    );
    second.succeed();
    let ReplyBody::Upgraded(up) = reply(b).await.body else {
        panic!("b waited for the follow-up");
    };
    assert_eq!(up.to, to);
    let (exit, _) = h.exit().await;
    assert_eq!(exit, Exit::HandedOver { to, cut: 0 });
}
