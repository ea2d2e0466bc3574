//! The event loop of a serving process: feeds signals, control calls, upgrade outcomes
//! and the previous generation's messages into the [`Lifecycle`], and carries out the
//! actions it returns. Starting a new process sits behind [`Spawner`], so tests drive
//! the whole loop with a fake.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::control::{Call, Reply, ReplyBody};
use crate::drain::DrainSignal;
use crate::error::Error;
use crate::generation::{Exit, Generation};
use crate::lifecycle::{Action, Ending, Event, Lifecycle, Phase};
use crate::service::{notify, remove_pid_file, write_pid_file};
use crate::signals::Signal;
use crate::upgrade::{
    Channel, FromParent, Handover, Launch, UpgradeError, Upgraded, next_from_parent,
};

/// Starts the next generation.
pub(crate) trait Spawner: Send + 'static {
    /// Starts generation `generation` and resolves once it serves, or failed. A child
    /// that failed, or whose start is cancelled, dropped or panics, is killed and reaped.
    fn spawn(
        &mut self,
        generation: u64,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Upgraded, UpgradeError>>;
}

/// The real one: fork and exec the recorded binary with the sockets handed over.
#[derive(Debug)]
pub(crate) struct ProcessSpawner {
    launch: Launch,
    /// Each listener's label and a duplicate of its socket.
    listeners: Vec<(String, OwnedFd)>,
    control: Option<OwnedFd>,
    timeout: Duration,
}

impl ProcessSpawner {
    /// Hands over `listeners` and `control`, giving each child `timeout` to be ready.
    pub(crate) fn new(
        launch: Launch,
        listeners: Vec<(String, OwnedFd)>,
        control: Option<OwnedFd>,
        timeout: Duration,
    ) -> Self {
        ProcessSpawner {
            launch,
            listeners,
            control,
            timeout,
        }
    }
}

impl Spawner for ProcessSpawner {
    fn spawn(
        &mut self,
        generation: u64,
        cancel: CancellationToken,
    ) -> BoxFuture<'static, Result<Upgraded, UpgradeError>> {
        let listeners: Vec<_> = self
            .listeners
            .iter()
            .map(|(label, fd)| (label.clone(), fd.as_fd()))
            .collect();
        let control = self.control.as_ref().map(AsFd::as_fd);
        let prepared = Handover::new(
            self.launch.clone(),
            &listeners,
            control,
            generation,
            self.timeout,
        );
        let pid = std::process::id();
        Box::pin(async move {
            prepared?
                .run(move |child| info!("[{pid}] Fork-exec to {child}."), cancel)
                .await
        })
    }
}

/// An upgrade under way.
struct Task {
    join: JoinHandle<Result<Upgraded, UpgradeError>>,
    cancel: CancellationToken,
}

/// Where events come from.
struct Sources<S> {
    signals: S,
    signals_open: bool,
    calls: Option<mpsc::Receiver<Call>>,
    parent: Option<Channel>,
}

impl<S: Stream<Item = Signal> + Unpin> Sources<S> {
    /// Whether an event may still come.
    fn open(&self) -> bool {
        self.signals_open || self.calls.is_some() || self.parent.is_some()
    }

    /// The next signal, call or message from the parent; `None` while none is possible.
    async fn next(&mut self) -> Option<Event> {
        loop {
            tokio::select! {
                sig = self.signals.next(), if self.signals_open => match sig {
                    Some(sig) => return Some(Event::Signal(sig)),
                    None => self.signals_open = false,
                },
                call = async { self.calls.as_mut()?.recv().await }, if self.calls.is_some() => {
                    match call {
                        Some(call) => return Some(Event::Call(call)),
                        None => self.calls = None,
                    }
                }
                msg = async { next_from_parent(self.parent.as_mut()?).await },
                    if self.parent.is_some() => match msg {
                    Some(msg) => return Some(Event::Parent(msg)),
                    None => {
                        self.parent = None;
                        return Some(Event::ParentGone);
                    }
                },
                else => return None,
            }
        }
    }
}

/// Runs `generation` until shutdown or handover, then drains. `parent` is the channel
/// from the generation that started this one.
pub(crate) async fn run<P: Spawner>(
    mut generation: Generation,
    mut spawner: P,
    signals: impl Stream<Item = Signal> + Unpin,
    parent: Option<Channel>,
    phase: watch::Sender<Phase>,
) -> Result<Exit, Error> {
    let calls = generation.control.as_mut().and_then(|c| c.calls.take());
    let mut life = Lifecycle::new(
        generation.identity(),
        generation.config.signals.clone(),
        generation.drain.clone(),
        phase,
    );
    let mut sources = Sources {
        signals,
        signals_open: true,
        calls,
        parent,
    };
    let mut task: Option<Task> = None;
    let mut upgraded: Option<Upgraded> = None;
    let ending = 'serve: loop {
        let event = tokio::select! {
            joined = async { (&mut task.as_mut()?.join).await.ok() }, if task.is_some() => {
                task = None;
                upgrade_done(joined, &mut upgraded)
            }
            event = sources.next(), if sources.open() => match event {
                Some(event) => event,
                None => continue,
            },
            // No signal or command can arrive any more: serve on.
            else => std::future::pending().await,
        };
        for action in life.handle(event) {
            match action {
                Action::StartUpgrade { generation: n } => {
                    let cancel = CancellationToken::new();
                    let join = tokio::spawn(spawner.spawn(n, cancel.clone()));
                    task = Some(Task { join, cancel });
                }
                Action::ForwardRestart => forward_restart(upgraded.as_mut()).await,
                Action::CallHook(sig) => {
                    let handler = generation.handler.clone();
                    let signo = sig.number();
                    tokio::task::spawn_blocking(move || handler.on_signal(signo));
                }
                Action::Notify(notice) => notify(&notice),
                Action::RestorePidFile => restore_pid_file(&generation),
                Action::Drain(ending) => break 'serve ending,
            }
        }
    };
    if let Some(control) = &generation.control {
        // New control clients must reach the new generation (or nobody).
        control.stop.cancel();
    }
    stop_upgrade(task, &mut life).await;
    let exit = finish(&generation, &mut life, &mut sources, ending, upgraded).await;
    life.set_phase(Phase::Exited);
    Ok(exit)
}

/// Turns a finished upgrade task into an event, keeping the new process's handle.
fn upgrade_done(
    joined: Option<Result<Upgraded, UpgradeError>>,
    upgraded: &mut Option<Upgraded>,
) -> Event {
    match joined {
        Some(Ok(child)) => {
            let pid = child.pid;
            *upgraded = Some(child);
            Event::UpgradeDone(Ok(pid))
        }
        Some(Err(err)) => Event::UpgradeDone(Err(err)),
        // Its child, if any, was killed as the task unwound.
        None => Event::UpgradeDone(Err(UpgradeError::Task("it panicked".into()))),
    }
}

async fn forward_restart(upgraded: Option<&mut Upgraded>) {
    let pid = std::process::id();
    let Some(child) = upgraded else { return };
    match child.send(FromParent::Restart).await {
        Ok(()) => info!("[{pid}] passed the pending restart to {}.", child.pid),
        Err(e) => warn!("[{pid}] could not pass the pending restart on: {e}"),
    }
}

fn restore_pid_file(generation: &Generation) {
    if let Some(path) = &generation.config.pid_file
        && let Err(e) = write_pid_file(path, generation.pid)
    {
        warn!("[{}] {e}", generation.pid);
    }
}

/// A shutdown during an upgrade stops it: its child is killed and reaped first.
async fn stop_upgrade(task: Option<Task>, life: &mut Lifecycle) {
    let Some(task) = task else { return };
    task.cancel.cancel();
    let outcome = match task.join.await {
        Ok(Err(err)) => err.to_string(),
        _ => "the upgrade was stopped by a shutdown".into(),
    };
    warn!("[{}] {outcome}", std::process::id());
    life.upgrade_stopped(&outcome);
}

/// Drains, while events that still arrive are answered or logged by the lifecycle.
async fn finish<S: Stream<Item = Signal> + Unpin>(
    generation: &Generation,
    life: &mut Lifecycle,
    sources: &mut Sources<S>,
    ending: Ending,
    upgraded: Option<Upgraded>,
) -> Exit {
    let pid = generation.pid;
    // The old generation's messages are relayed to the new one from here on.
    let parent = sources.parent.take();
    let drain = async {
        match (ending, upgraded) {
            (Ending::HandedOver { to }, Some(child)) => {
                let done = CancellationToken::new();
                let relay = tokio::spawn(relay_drain(
                    child,
                    parent,
                    generation.drain.clone(),
                    done.clone(),
                ));
                let cut = generation.drain_all().await;
                done.cancel();
                let _ = relay.await;
                Exit::HandedOver { to, cut }
            }
            _ => {
                let cut = generation.drain_all().await;
                Exit::Shutdown { cut }
            }
        }
    };
    tokio::pin!(drain);
    let exit = loop {
        tokio::select! {
            exit = &mut drain => break exit,
            Some(event) = sources.next(), if sources.open() => { life.handle(event); }
        }
    };
    if let Exit::Shutdown { cut } = exit {
        if let Some(path) = &generation.config.pid_file {
            remove_pid_file(path, pid);
        }
        if let Some(control) = &generation.control {
            let _ = std::fs::remove_file(&control.path);
        }
        for w in life.take_stop_waiters() {
            let _ = w.send(Reply::ok(ReplyBody::Stopped { pid, cut }));
        }
    }
    generation.flush_answers().await;
    exit
}

/// While this process drains after a handover, tells the new one how many connections
/// remain here (and relays what older generations report), so `gem status` can show it.
async fn relay_drain(
    mut child: Upgraded,
    mut parent: Option<Channel>,
    drain: DrainSignal,
    done: CancellationToken,
) {
    let pid = std::process::id();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = done.cancelled() => {
                let _ = child.send(FromParent::Drained { pid }).await;
                return;
            }
            _ = tick.tick() => {
                let connections = drain.connections();
                if child.send(FromParent::Draining { pid, connections }).await.is_err() {
                    return;
                }
            }
            msg = async { next_from_parent(parent.as_mut()?).await }, if parent.is_some() => {
                match msg {
                    Some(FromParent::Restart) => {}
                    Some(msg) => { let _ = child.send(msg).await; }
                    None => parent = None,
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "runner_tests.rs"]
mod tests;
