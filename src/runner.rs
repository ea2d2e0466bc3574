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
use tracing::{error, info, warn};

use crate::control::{Call, Reply, ReplyBody};
use crate::drain::DrainSignal;
use crate::error::Error;
use crate::generation::{Exit, Generation};
use crate::lifecycle::{Action, Ending, Event, Lifecycle, Phase, Role};
use crate::service::{notify, remove_pid_file, write_pid_file};
use crate::signals::Signal;
use crate::supervisor::seconds;
use crate::upgrade::{
    Channel, FromParent, Handover, Launch, UpgradeError, Upgraded, describe_exit, next_from_parent,
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
/// from the generation that started this one (or from the supervisor).
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
    // A worker reports its counters to its supervisor as it goes, and once more at
    // the end (its last requests and its drain).
    let final_report = match (&generation.role, &parent) {
        (Role::Worker { .. }, Some(channel)) => {
            report_totals(channel, &generation);
            crate::upgrade::second_handle(channel).ok()
        }
        _ => None,
    };
    let mut sources = Sources {
        signals,
        signals_open: true,
        calls,
        parent,
    };
    // A worker whose supervisor went away before it could report ready.
    let mut orphan = matches!(generation.role, Role::Worker { .. }) && sources.parent.is_none();
    let exit = loop {
        let (ending, upgraded) = if std::mem::take(&mut orphan) {
            warn!("[{}] the supervisor is gone; stopping.", generation.pid);
            life.set_phase(Phase::Draining);
            (Ending::Orphaned, None)
        } else {
            serve(&generation, &mut spawner, &mut life, &mut sources).await
        };
        if matches!(ending, Ending::Shutdown | Ending::Orphaned) {
            generation.ready.send_replace(false);
        }
        if ending != Ending::Shutdown {
            // Another generation answers on the metrics listener now (or nobody).
            generation.metrics_stop.cancel();
        }
        if ending == Ending::Shutdown {
            delay_shutdown(&generation, &mut life, &mut sources).await;
        }
        if let Some(control) = &generation.control {
            // New control clients must reach the new generation (or nobody).
            control.stop.cancel();
        }
        let drain = tokio::spawn(generation.drain_job().run());
        let drain = match (ending, upgraded) {
            (Ending::HandedOver { to }, Some(mut child)) => match life.probation() {
                Some(probation) => {
                    match on_probation(&generation, &mut life, &mut sources, &mut child, probation)
                        .await
                    {
                        Verdict::Died(why) => {
                            resume(&mut generation, &mut life, &mut sources, Some(why))?;
                            continue;
                        }
                        Verdict::Over => {}
                    }
                    Drain::HandedOver {
                        to,
                        child: Box::new(child),
                        drain,
                    }
                }
                None => Drain::HandedOver {
                    to,
                    child: Box::new(child),
                    drain,
                },
            },
            (Ending::Standby, _) => match stand_by(&generation, &mut life, &mut sources).await {
                Verdict::Died(_) => {
                    resume(&mut generation, &mut life, &mut sources, None)?;
                    continue;
                }
                Verdict::Over => Drain::Shutdown(drain),
            },
            (Ending::Orphaned, _) => {
                // Stop serving now; what is in flight gets a second at most.
                cut_soon(&generation.drain);
                Drain::Shutdown(drain)
            }
            _ => Drain::Shutdown(drain),
        };
        break finish(&generation, &mut life, &mut sources, drain).await;
    };
    if let Some(mut channel) = final_report {
        let now = (generation.endpoint.live)();
        let totals = crate::upgrade::FromWorker::Totals(generation.metrics.totals());
        let load = crate::upgrade::FromWorker::Load {
            in_flight: now.in_flight,
            connections: now.connections,
        };
        let _ = channel.send(&crate::upgrade::Msg::new(totals)).await;
        let _ = channel.send(&crate::upgrade::Msg::new(load)).await;
    }
    // The metrics listener's last answers go out before the exit.
    generation.metrics_stop.cancel();
    let metrics_task = generation
        .metrics_task
        .lock()
        .ok()
        .and_then(|mut t| t.take());
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    if let Some(log) = generation.access_log.clone() {
        // The runtime may not wait for the last clone to drop: write out the last
        // lines now.
        let _ = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(5))).await;
    }
    life.set_phase(Phase::Exited);
    Ok(exit)
}

/// A shutdown's delay: `/readyz` already answers 503 (load balancers take this
/// process out), while it still accepts and serves. A second shutdown signal ends it.
async fn delay_shutdown<S: Stream<Item = Signal> + Unpin>(
    generation: &Generation,
    life: &mut Lifecycle,
    sources: &mut Sources<S>,
) {
    let delay = generation.config.shutdown_delay;
    if delay.is_zero() {
        return;
    }
    let pid = generation.pid;
    life.set_phase(Phase::ShutdownDelay);
    info!(
        "[{pid}] shutting down in {}: /readyz answers 503 meanwhile.",
        humantime::format_duration(delay)
    );
    let until = tokio::time::sleep(delay);
    tokio::pin!(until);
    loop {
        tokio::select! {
            () = &mut until => break,
            Some(event) = sources.next(), if sources.open() => match event {
                Event::Signal(sig) if life.is_shutdown(sig) => {
                    info!(
                        "[{pid}] received signal {:?} again: skipping the rest of the shutdown delay.",
                        sig.description()
                    );
                    break;
                }
                Event::Parent(FromParent::Stop) => {
                    info!("[{pid}] the supervisor asks again: skipping the rest of the shutdown delay.");
                    break;
                }
                Event::ParentGone if matches!(generation.role, Role::Worker { .. }) => {
                    warn!("[{pid}] the supervisor is gone: skipping the rest of the shutdown delay.");
                    cut_soon(&generation.drain);
                    break;
                }
                event => {
                    for action in life.handle(event) {
                        act(generation, action, None).await;
                    }
                }
            },
        }
    }
    life.set_phase(Phase::Draining);
}

/// A worker tells its supervisor its counters every so often, so that the next worker
/// counts on from them, and its load, for `gem status`.
fn report_totals(channel: &Channel, generation: &Generation) {
    use crate::upgrade::{FromWorker, Msg};
    let Ok(mut writer) = crate::upgrade::second_handle(channel) else {
        return;
    };
    let metrics = generation.metrics.clone();
    let live = generation.endpoint.live.clone();
    let mut based = generation.based.subscribe();
    tokio::spawn(async move {
        // Counts without the predecessors' would look like a reset: wait for them.
        let _ = tokio::time::timeout(BASE_WAIT, based.wait_for(|b| *b)).await;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = live();
            let load = Msg::new(FromWorker::Load {
                in_flight: now.in_flight,
                connections: now.connections,
            });
            let totals = Msg::new(FromWorker::Totals(metrics.totals()));
            if writer.send(&totals).await.is_err() || writer.send(&load).await.is_err() {
                return;
            }
        }
    });
}

/// Cuts what is still open after [`ORPHAN_GRACE`]: a worker without its supervisor
/// must not serve on.
fn cut_soon(drain: &DrainSignal) {
    let cut = drain.cut().clone();
    tokio::spawn(async move {
        tokio::time::sleep(ORPHAN_GRACE).await;
        cut.cancel();
    });
}

/// How long a new generation waits for its predecessors' counters before it reports
/// or serves metrics without them.
pub(crate) const BASE_WAIT: Duration = Duration::from_secs(1);

/// How long a worker whose supervisor is gone lets open requests finish.
const ORPHAN_GRACE: Duration = Duration::from_secs(1);

/// Serves until the lifecycle decides to end; returns how, with the new process for a
/// handover.
async fn serve<P: Spawner, S: Stream<Item = Signal> + Unpin>(
    generation: &Generation,
    spawner: &mut P,
    life: &mut Lifecycle,
    sources: &mut Sources<S>,
) -> (Ending, Option<Upgraded>) {
    let mut task: Option<Task> = None;
    let mut upgraded: Option<Upgraded> = None;
    let ending = 'serve: loop {
        let event = tokio::select! {
            joined = async { (&mut task.as_mut()?.join).await.ok() }, if task.is_some() => {
                task = None;
                let event = upgrade_done(joined, &mut upgraded);
                match event {
                    Event::UpgradeDone(Err(_)) => generation.metrics.restart("failed"),
                    // On probation, it counts once the probation is over.
                    Event::UpgradeDone(Ok(_)) if life.probation().is_none() => {
                        generation.metrics.restart("ok");
                    }
                    _ => {}
                }
                event
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
                Action::Drain(ending) => break 'serve ending,
                action => act(generation, action, upgraded.as_mut()).await,
            }
        }
    };
    stop_upgrade(task, life).await;
    (ending, upgraded)
}

/// Carries out an action that does not change the loop.
async fn act(generation: &Generation, action: Action, upgraded: Option<&mut Upgraded>) {
    match action {
        Action::ForwardRestart => forward_restart(upgraded).await,
        Action::CallHook(sig) => {
            let handler = generation.handler.clone();
            let signo = sig.number();
            tokio::task::spawn_blocking(move || handler.on_signal(signo));
        }
        Action::Notify(notice) => notify(&notice),
        Action::RestorePidFile => restore_pid_file(generation),
        Action::ReopenLog => generation.reopen_log(),
        Action::CarryForward(totals) => {
            generation.metrics.set_base(&totals);
            generation.based.send_replace(true);
        }
        Action::CountRestart(result) => generation.metrics.restart(&result),
        Action::CountCrashes(count) => generation.metrics.set_crashes(count),
        Action::StartUpgrade { .. } | Action::Drain(_) => {}
    }
}

/// How a probation or a standby ended.
enum Verdict {
    /// The generation that took over died (`why`), or the supervisor says resume.
    Died(String),
    /// Over: exit once drained.
    Over,
}

/// The drain a generation finishes with.
enum Drain {
    /// After a handover: the new process is told how the drain goes.
    HandedOver {
        to: u32,
        child: Box<Upgraded>,
        drain: JoinHandle<usize>,
    },
    /// A final one.
    Shutdown(JoinHandle<usize>),
}

/// After handing over: drains, but watches the new process for `probation`. If it dies
/// (a signal or a failure exit) meanwhile, says why, to resume serving.
async fn on_probation<S: Stream<Item = Signal> + Unpin>(
    generation: &Generation,
    life: &mut Lifecycle,
    sources: &mut Sources<S>,
    child: &mut Upgraded,
    probation: Duration,
) -> Verdict {
    let pid = generation.pid;
    let to = child.pid;
    let since = tokio::time::Instant::now();
    let over = since + probation;
    let drain = generation.drain.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    info!(
        "[{pid}] on probation for {}: process {pid} stays loaded and takes over again if {to} dies.",
        humantime::format_duration(probation)
    );
    loop {
        tokio::select! {
            status = child.exited() => {
                let after = since.elapsed();
                if status.success() {
                    info!("[{pid}] process {to} exited normally during the probation; probation over.");
                    life.probation_passed();
                    generation.metrics.restart("ok");
                    return Verdict::Over;
                }
                let why = format!(
                    "rolled back: pid {to} died ({}) {} after taking over; pid {pid} serves again",
                    describe_exit(status),
                    seconds(after)
                );
                error!("[{pid}] {why}.");
                generation.metrics.restart("rolled_back");
                return Verdict::Died(why);
            }
            () = tokio::time::sleep_until(over) => {
                info!("[{pid}] probation over: process {to} has served for {}.", seconds(probation));
                life.probation_passed();
                generation.metrics.restart("ok");
                // Counted after the new process's last report: tell it now.
                let _ = child.send(FromParent::Totals(generation.metrics.totals())).await;
                return Verdict::Over;
            }
            _ = tick.tick() => {
                let connections = drain.connections();
                let _ = child.send(FromParent::Draining { pid, connections }).await;
                let _ = child.send(FromParent::Totals(generation.metrics.totals())).await;
            }
            Some(event) = sources.next(), if sources.open() => {
                // Only messages from an older generation still draining arrive, or
                // signals and calls, which the ended lifecycle logs or answers.
                match event {
                    Event::Parent(msg @ (FromParent::Draining { .. } | FromParent::Drained { .. })) => {
                        let _ = child.send(msg).await;
                    }
                    Event::Parent(FromParent::Totals(totals)) => generation.metrics.set_base(&totals),
                    event => {
                        for action in life.handle(event) {
                            act(generation, action, None).await;
                        }
                    }
                }
            }
        }
    }
}

/// A worker on standby: drains, and waits for its supervisor to resume or stop it.
async fn stand_by<S: Stream<Item = Signal> + Unpin>(
    generation: &Generation,
    life: &mut Lifecycle,
    sources: &mut Sources<S>,
) -> Verdict {
    let pid = std::process::id();
    info!("[{pid}] standing by: no longer accepting; the supervisor may resume this worker.");
    loop {
        match sources.next().await {
            Some(Event::Parent(FromParent::Resume)) => {
                return Verdict::Died("resumed by the supervisor".into());
            }
            Some(Event::Parent(FromParent::Stop)) => return Verdict::Over,
            Some(Event::ParentGone) | None => {
                warn!("[{pid}] the supervisor is gone; stopping.");
                cut_soon(&generation.drain);
                return Verdict::Over;
            }
            Some(Event::Signal(sig)) if life.is_shutdown(sig) => {
                info!(
                    "[{pid}] received signal {:?} on standby; exiting once drained.",
                    sig.description()
                );
                return Verdict::Over;
            }
            Some(event) => {
                for action in life.handle(event) {
                    act(generation, action, None).await;
                }
            }
        }
    }
}

/// Serves again after a drain began.
fn resume<S: Stream<Item = Signal> + Unpin>(
    generation: &mut Generation,
    life: &mut Lifecycle,
    sources: &mut Sources<S>,
    why: Option<String>,
) -> Result<(), Error> {
    let (drain, calls) = generation.resume()?;
    if calls.is_some() {
        sources.calls = calls;
    }
    for l in &generation.listening {
        info!("[{}] accepting on http://{} again", generation.pid, l.local);
    }
    for action in life.resume(drain, why) {
        match action {
            Action::Notify(notice) => notify(&notice),
            Action::RestorePidFile => restore_pid_file(generation),
            _ => {}
        }
    }
    Ok(())
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
    drain: Drain,
) -> Exit {
    let pid = generation.pid;
    // The old generation's messages are relayed to the new one from here on.
    let parent = sources.parent.take();
    let drained = async {
        match drain {
            Drain::HandedOver { to, child, drain } => {
                let done = CancellationToken::new();
                let relay = tokio::spawn(relay_drain(
                    *child,
                    parent,
                    (generation.drain.clone(), generation.metrics.clone()),
                    done.clone(),
                ));
                let cut = drain.await.unwrap_or_default();
                done.cancel();
                let _ = relay.await;
                Exit::HandedOver { to, cut }
            }
            Drain::Shutdown(drain) => Exit::Shutdown {
                cut: drain.await.unwrap_or_default(),
            },
        }
    };
    tokio::pin!(drained);
    let exit = loop {
        tokio::select! {
            exit = &mut drained => break exit,
            Some(event) = sources.next(), if sources.open() => {
                for action in life.handle(event) {
                    act(generation, action, None).await;
                }
            }
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
    (drain, metrics): (DrainSignal, crate::metrics::Metrics),
    done: CancellationToken,
) {
    let pid = std::process::id();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            () = done.cancelled() => {
                let _ = child.send(FromParent::Totals(metrics.totals())).await;
                let _ = child.send(FromParent::Drained { pid }).await;
                return;
            }
            _ = tick.tick() => {
                let connections = drain.connections();
                if child.send(FromParent::Draining { pid, connections }).await.is_err() {
                    return;
                }
                let _ = child.send(FromParent::Totals(metrics.totals())).await;
            }
            msg = async { next_from_parent(parent.as_mut()?).await }, if parent.is_some() => {
                match msg {
                    Some(FromParent::Restart) => {}
                    // Counted on here; this process's totals include them.
                    Some(FromParent::Totals(totals)) => metrics.set_base(&totals),
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
