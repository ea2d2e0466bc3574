//! The event loop of a serving process: turn each signal or control command into an
//! action, run upgrades (one at a time, with one coalesced follow-up), and after a
//! shutdown or a handover, drain and return.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::control::{self, Call, Command, Draining, LastUpgrade, Reply, ReplyBody, Status};
use crate::drain::DrainSignal;
use crate::error::Error;
use crate::generation::{Exit, Generation, notify, remove_pid_file, unix_ms, write_pid_file};
use crate::signals::{Action, Signal};
use crate::upgrade::{Channel, FromParent, Handover, Launch, UpgradeError, Upgraded};

/// What the loop does next.
enum Next {
    Continue,
    Shutdown,
    HandedOver(Box<Upgraded>),
}

/// An upgrade under way.
struct Running {
    task: JoinHandle<Result<Upgraded, UpgradeError>>,
    cancel: CancellationToken,
    started: Instant,
    /// `gem reload` clients waiting for this upgrade's outcome.
    waiters: Vec<oneshot::Sender<Reply>>,
}

/// The event loop of a serving generation.
struct Lifecycle {
    generation: Generation,
    launch: Launch,
    upgrade: Option<Running>,
    /// A restart asked for while an upgrade ran (at most one follow-up), with the
    /// clients waiting for it.
    follow_up: Option<Vec<oneshot::Sender<Reply>>>,
    last_upgrade: Option<LastUpgrade>,
    /// The outcome of this generation's first upgrade, for `wait_upgrade`.
    first_outcome: Option<Reply>,
    first_waiters: Vec<oneshot::Sender<Reply>>,
    stop_waiters: Vec<oneshot::Sender<Reply>>,
    /// Older generations still draining: pid -> open connections.
    draining: BTreeMap<u32, usize>,
}

impl Generation {
    /// Runs the loop until shutdown or handover, then drains.
    pub(crate) async fn run(
        mut self,
        launch: Launch,
        mut signals: impl Stream<Item = Signal> + Unpin,
        mut parent: Option<Channel>,
    ) -> Result<Exit, Error> {
        let mut calls = self.control.as_mut().and_then(|c| c.calls.take());
        // A generation born of an upgrade reports that upgrade until it makes its own.
        let last_upgrade = self.parent_pid.map(|_| LastUpgrade {
            result: "upgraded".into(),
            at_unix_ms: unix_ms(),
            reason: String::new(),
            pid: Some(self.pid),
        });
        let mut life = Lifecycle {
            generation: self,
            launch,
            upgrade: None,
            follow_up: None,
            last_upgrade,
            first_outcome: None,
            first_waiters: Vec::new(),
            stop_waiters: Vec::new(),
            draining: BTreeMap::new(),
        };
        let mut signals_open = true;
        let next = loop {
            let next = tokio::select! {
                sig = signals.next(), if signals_open => match sig {
                    Some(sig) => life.on_signal(sig),
                    None => { signals_open = false; Next::Continue }
                },
                call = async { calls.as_mut()?.recv().await }, if calls.is_some() => match call {
                    Some(call) => life.on_call(call),
                    None => { calls = None; Next::Continue }
                },
                joined = async { (&mut life.upgrade.as_mut()?.task).await.ok() },
                    if life.upgrade.is_some() => life.on_upgrade_done(joined).await,
                msg = async { parent.as_mut()?.next().await }, if parent.is_some() => {
                    match msg {
                        Some(msg) => life.on_parent(msg),
                        None => { parent = None; life.draining.clear(); }
                    }
                    Next::Continue
                }
            };
            match next {
                Next::Continue => continue,
                other => break other,
            }
        };
        if let Some(control) = &life.generation.control {
            // New control clients must reach the new generation (or nobody).
            control.stop.cancel();
        }
        // Commands that still reach this process are told where to go instead.
        if let Some(calls) = calls {
            let to = match &next {
                Next::HandedOver(upgraded) => Some(upgraded.pid),
                _ => None,
            };
            tokio::spawn(turn_away(calls, to));
        }
        life.finish(next, parent).await
    }
}

impl Lifecycle {
    fn pid(&self) -> u32 {
        self.generation.pid
    }

    fn on_signal(&mut self, sig: Signal) -> Next {
        let pid = self.pid();
        let desc = sig.description();
        match self.generation.config.signals.action(sig) {
            Some(Action::Restart) => {
                info!("[{pid}] received signal {desc:?}.");
                self.request_restart(None);
                Next::Continue
            }
            Some(Action::Shutdown) => {
                info!("[{pid}] received signal {desc:?}.");
                Next::Shutdown
            }
            Some(Action::Plugin) => {
                info!("[{pid}] received signal {desc:?}; calling the handler's on_signal hook.");
                let handler = self.generation.handler.clone();
                let signo = sig.number();
                tokio::task::spawn_blocking(move || handler.on_signal(signo));
                Next::Continue
            }
            Some(Action::Ignore) | None => {
                info!("[{pid}] ignored signal {desc:?}.");
                Next::Continue
            }
        }
    }

    fn on_call(&mut self, call: Call) -> Next {
        let pid = self.pid();
        match call.cmd {
            Command::Status => {
                let status = self.status();
                let _ = call
                    .reply
                    .send(Reply::ok(ReplyBody::Status(Box::new(status))));
            }
            Command::Reload => {
                info!("[{pid}] reload requested on the control socket.");
                self.request_restart(Some(call.reply));
            }
            Command::WaitUpgrade { generation } => self.wait_upgrade(generation, call.reply),
            Command::Stop => {
                info!("[{pid}] stop requested on the control socket.");
                self.stop_waiters.push(call.reply);
                return Next::Shutdown;
            }
        }
        Next::Continue
    }

    fn on_parent(&mut self, msg: FromParent) {
        match msg {
            FromParent::Restart => {
                info!("[{}] restart passed on by the old process.", self.pid());
                self.request_restart(None);
            }
            FromParent::Draining { pid, connections } => {
                self.draining.insert(pid, connections);
            }
            FromParent::Drained { pid } => {
                self.draining.remove(&pid);
            }
        }
    }

    /// Answers with the outcome of generation `generation`'s first upgrade.
    fn wait_upgrade(&mut self, generation: u64, reply: oneshot::Sender<Reply>) {
        let me = self.generation.number;
        if generation < me {
            // That upgrade succeeded: this process is (a descendant of) its result.
            let _ = reply.send(Reply::ok(ReplyBody::Upgraded(control::Upgraded {
                from: self.generation.parent_pid.unwrap_or_default(),
                to: self.pid(),
                generation: me,
                ms: None,
            })));
        } else if generation > me {
            let _ = reply.send(Reply::error(
                format!("generation {generation} has not started; this is generation {me}"),
                self.pid(),
            ));
        } else if let Some(outcome) = &self.first_outcome {
            let _ = reply.send(outcome.clone());
        } else {
            self.first_waiters.push(reply);
        }
    }

    /// Starts an upgrade, or books the one follow-up if one is running.
    fn request_restart(&mut self, waiter: Option<oneshot::Sender<Reply>>) {
        let pid = self.pid();
        if self.upgrade.is_some() {
            let follow_up = self.follow_up.get_or_insert_with(|| {
                info!("[{pid}] an upgrade is already running; one more will follow it.");
                Vec::new()
            });
            follow_up.extend(waiter);
            return;
        }
        let waiters: Vec<_> = waiter.into_iter().collect();
        info!("[{pid}] Restarting...");
        notify(&[
            sd_notify::NotifyState::Reloading,
            sd_notify::NotifyState::monotonic_usec_now()
                .unwrap_or(sd_notify::NotifyState::Custom("")),
        ]);
        let g = &self.generation;
        let listeners: Vec<_> = g
            .listening
            .iter()
            .map(|l| (l.addr.spec.clone(), l.fd.as_fd()))
            .collect();
        let control = g.control.as_ref().map(|c| c.fd.as_fd());
        let handover = Handover::new(
            self.launch.clone(),
            &listeners,
            control,
            g.number + 1,
            g.config.upgrade_timeout,
        );
        let handover = match handover {
            Ok(h) => h,
            Err(err) => {
                self.upgrade_failed(UpgradeError::Io(err), waiters);
                return;
            }
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(handover.run(
            move |child| info!("[{pid}] Fork-exec to {child}."),
            cancel.clone(),
        ));
        self.upgrade = Some(Running {
            task,
            cancel,
            started: Instant::now(),
            waiters,
        });
    }

    async fn on_upgrade_done(&mut self, joined: Option<Result<Upgraded, UpgradeError>>) -> Next {
        let Some(running) = self.upgrade.take() else {
            return Next::Continue;
        };
        let result = joined.unwrap_or_else(|| {
            Err(UpgradeError::Io(std::io::Error::other(
                "the upgrade task panicked",
            )))
        });
        match result {
            Ok(upgraded) => self.upgrade_succeeded(upgraded, running).await,
            Err(err) => {
                self.upgrade_failed(err, running.waiters);
                if let Some(waiters) = self.follow_up.take() {
                    let mut waiters = waiters.into_iter();
                    self.request_restart(waiters.next());
                    if let Some(r) = &mut self.upgrade {
                        r.waiters.extend(waiters);
                    }
                }
                Next::Continue
            }
        }
    }

    async fn upgrade_succeeded(&mut self, mut upgraded: Upgraded, running: Running) -> Next {
        let pid = self.pid();
        let generation = self.generation.number + 1;
        let ms = u64::try_from(running.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(
            "[{pid}] process {} is ready (generation {generation}, {ms} ms); handing over.",
            upgraded.pid
        );
        notify(&[
            sd_notify::NotifyState::MainPid(upgraded.pid),
            sd_notify::NotifyState::Ready,
        ]);
        let reply = Reply::ok(ReplyBody::Upgraded(control::Upgraded {
            from: pid,
            to: upgraded.pid,
            generation,
            ms: Some(ms),
        }));
        self.record(reply, running.waiters, Some(upgraded.pid), String::new());
        if let Some(waiters) = self.follow_up.take() {
            match upgraded.send(&FromParent::Restart).await {
                Ok(()) => info!("[{pid}] passed the pending restart to {}.", upgraded.pid),
                Err(e) => warn!("[{pid}] could not pass the pending restart on: {e}"),
            }
            let forwarded = Reply::ok(ReplyBody::Forwarded {
                to: upgraded.pid,
                generation,
            });
            for w in waiters {
                let _ = w.send(forwarded.clone());
            }
        }
        Next::HandedOver(Box::new(upgraded))
    }

    fn upgrade_failed(&mut self, err: UpgradeError, waiters: Vec<oneshot::Sender<Reply>>) {
        let pid = self.pid();
        error!("[{pid}] upgrade failed: {err}; process {pid} keeps serving.");
        let reason = err.to_string();
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("upgrade failed: {reason}")),
        ]);
        // The child may have written the pid file before it failed.
        if let Some(path) = &self.generation.config.pid_file {
            if let Err(e) = write_pid_file(path, pid) {
                warn!("[{pid}] {e}");
            }
        }
        self.record(
            Reply::error(reason.clone(), pid),
            waiters,
            err.pid(),
            reason,
        );
    }

    /// Answers the waiters of an upgrade and remembers its outcome.
    fn record(
        &mut self,
        reply: Reply,
        waiters: Vec<oneshot::Sender<Reply>>,
        child: Option<u32>,
        reason: String,
    ) {
        for w in waiters.into_iter().chain(self.first_waiters.drain(..)) {
            let _ = w.send(reply.clone());
        }
        self.first_outcome.get_or_insert_with(|| reply.clone());
        self.last_upgrade = Some(LastUpgrade {
            result: if reply.ok { "upgraded" } else { "failed" }.into(),
            at_unix_ms: unix_ms(),
            reason,
            pid: child,
        });
    }

    fn status(&self) -> Status {
        let g = &self.generation;
        Status {
            pid: g.pid,
            generation: g.number,
            uptime_ms: u64::try_from(g.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            listen: g.listening.iter().map(|l| l.local.to_string()).collect(),
            plugin: g.handler.info(),
            in_flight: g.drain.in_flight(),
            connections: g.drain.connections(),
            last_upgrade: self.last_upgrade.clone(),
            draining: self
                .draining
                .iter()
                .map(|(pid, connections)| Draining {
                    pid: *pid,
                    connections: *connections,
                })
                .collect(),
        }
    }

    /// Stops a running upgrade (its child is killed and reaped), drains, cleans up.
    async fn finish(mut self, next: Next, parent: Option<Channel>) -> Result<Exit, Error> {
        let pid = self.pid();
        if let Some(running) = self.upgrade.take() {
            running.cancel.cancel();
            let outcome = match running.task.await {
                Ok(Err(err)) => err.to_string(),
                _ => "the upgrade was stopped by a shutdown".into(),
            };
            warn!("[{pid}] {outcome}");
            for w in running.waiters {
                let _ = w.send(Reply::error(outcome.clone(), pid));
            }
        }
        match next {
            Next::HandedOver(upgraded) => {
                let upgraded = *upgraded;
                let to = upgraded.pid;
                let done = CancellationToken::new();
                let relay = tokio::spawn(relay_drain(
                    upgraded,
                    parent,
                    self.generation.drain.clone(),
                    done.clone(),
                ));
                let cut = self.generation.drain_all().await;
                done.cancel();
                let _ = relay.await;
                self.generation.flush_answers().await;
                Ok(Exit::HandedOver { to, cut })
            }
            _ => {
                notify(&[sd_notify::NotifyState::Stopping]);
                let cut = self.generation.drain_all().await;
                if let Some(path) = &self.generation.config.pid_file {
                    remove_pid_file(path, pid);
                }
                if let Some(control) = &self.generation.control {
                    let _ = std::fs::remove_file(&control.path);
                }
                for w in self.stop_waiters {
                    let _ = w.send(Reply::ok(ReplyBody::Stopped { pid, cut }));
                }
                if let Some(control) = &self.generation.control {
                    control.answers.close();
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), control.answers.wait()).await;
                }
                Ok(Exit::Shutdown { cut })
            }
        }
    }
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
                let _ = child.send(&FromParent::Drained { pid }).await;
                return;
            }
            _ = tick.tick() => {
                let connections = drain.connections();
                if child.send(&FromParent::Draining { pid, connections }).await.is_err() {
                    return;
                }
            }
            msg = async { parent.as_mut()?.next().await }, if parent.is_some() => match msg {
                Some(FromParent::Restart) => {}
                Some(msg) => { let _ = child.send(&msg).await; }
                None => parent = None,
            },
        }
    }
}

/// Answers control commands that arrive after the loop ended: after a handover, "ask
/// the new process"; after a shutdown, "shutting down".
async fn turn_away(mut calls: mpsc::Receiver<Call>, handed_over_to: Option<u32>) {
    let pid = std::process::id();
    while let Some(call) = calls.recv().await {
        let reply = match handed_over_to {
            Some(to) => Reply::ok(ReplyBody::HandedOver { to }),
            None => Reply::error("the server is shutting down", pid),
        };
        let _ = call.reply.send(reply);
    }
}
