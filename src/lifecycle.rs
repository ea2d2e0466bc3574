//! The lifecycle of a serving process as a state machine: events go in (signals,
//! control calls, upgrade outcomes, messages from the previous generation), actions
//! come out (start an upgrade, call the plugin's hook, tell systemd, drain). It does no
//! I/O itself, except answering control calls on their channels; the runner (`runner.rs`)
//! carries out the actions.
//!
//! Upgrades run one at a time. A restart asked for while one runs is coalesced into one
//! follow-up: run here if the upgrade fails, or passed to the new process if it succeeds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::control::{self, Call, Command, Draining, LastUpgrade, Reply, ReplyBody, Status};
use crate::drain::DrainSignal;
use crate::handler::Handler;
use crate::service::Notice;
use crate::signals::{Action as SignalAction, Signal, SignalRegistry};
use crate::upgrade::{FromParent, UpgradeError};

/// Where a server is in its life, published on a watch channel
/// ([`crate::Server::phases`]) so that embedders and tests can wait for a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Loading the handler and opening the sockets.
    Starting,
    /// Serving.
    Serving,
    /// Serving, while a new process starts.
    Upgrading,
    /// A shutdown began: `/readyz` answers 503 for `shutdown_delay` while requests are
    /// still accepted and served.
    ShutdownDelay,
    /// Not accepting any more; finishing what is open.
    Draining,
    /// Done.
    Exited,
}

/// Something that happened to the serving process.
#[derive(Debug)]
pub(crate) enum Event {
    /// A signal arrived.
    Signal(Signal),
    /// A control-socket command arrived.
    Call(Call),
    /// The upgrade started by the last [`Action::StartUpgrade`] ended: the new process's
    /// pid, or why it failed.
    UpgradeDone(Result<u32, UpgradeError>),
    /// The previous generation sent a message.
    Parent(FromParent),
    /// The previous generation closed its channel: it is gone.
    ParentGone,
}

/// What the lifecycle wants done, in order.
#[derive(Debug, PartialEq)]
pub(crate) enum Action {
    /// Start generation `generation` and report back with [`Event::UpgradeDone`].
    StartUpgrade {
        /// The new generation's number.
        generation: u64,
    },
    /// Pass the pending restart to the new process (right before handing over).
    ForwardRestart,
    /// Call the handler's `on_signal` hook with this signal.
    CallHook(Signal),
    /// Reopen the access log.
    ReopenLog,
    /// Count on from the generations before (their latest totals).
    CarryForward(crate::metrics::Totals),
    /// Count an upgrade's outcome, as the supervisor saw it.
    CountRestart(String),
    /// The supervisor's crash count.
    CountCrashes(u64),
    /// Tell systemd.
    Notify(Notice),
    /// Write this process's pid into the pid file again (a failed child may have
    /// written its own).
    RestorePidFile,
    /// Stop: cancel any upgrade, drain, and end the loop.
    Drain(Ending),
}

/// How the loop ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// A shutdown: drain, then exit.
    Shutdown,
    /// A new process serves: drain, then exit (after the probation, unless the new
    /// process dies first and this one resumes).
    HandedOver {
        /// Its pid.
        to: u32,
    },
    /// A worker whose supervisor put it on standby: drain, then wait to be resumed or
    /// stopped.
    Standby,
    /// A worker whose supervisor is gone: stop serving now.
    Orphaned,
    /// A worker another one took over from: drain, then exit.
    Retired,
}

/// How this process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// On its own: it upgrades by starting its successor, and stays on probation after
    /// handing over for this long.
    Alone {
        /// How long to stay loaded after a handover.
        probation: Duration,
    },
    /// As a worker of a supervisor, which upgrades, stands by and resumes it.
    Worker {
        /// The supervisor's pid.
        supervisor: u32,
    },
}

/// Who this process is, for logs and `gem status`.
#[derive(Clone)]
pub(crate) struct Identity {
    pub(crate) pid: u32,
    pub(crate) generation: u64,
    /// The process that handed over to this one, for generations after the first.
    pub(crate) parent_pid: Option<u32>,
    pub(crate) started: Instant,
    pub(crate) listen: Vec<String>,
    /// Each TLS listener's certificate.
    pub(crate) tls: Vec<crate::control::ListenerTls>,
    /// Asked for its info at every `status` (its sha256 arrives after the start).
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) role: Role,
}

/// An upgrade under way.
#[derive(Debug)]
struct Running {
    started: Instant,
    /// `gem reload` clients waiting for this upgrade's outcome.
    waiters: Vec<oneshot::Sender<Reply>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("pid", &self.pid)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// The state machine. See the module documentation.
#[derive(Debug)]
pub(crate) struct Lifecycle {
    me: Identity,
    signals: SignalRegistry,
    /// Live counts for `gem status`.
    drain: DrainSignal,
    phase: watch::Sender<Phase>,
    upgrade: Option<Running>,
    /// A restart asked for while an upgrade ran (at most one), with its waiters.
    follow_up: Option<Vec<oneshot::Sender<Reply>>>,
    last_upgrade: Option<LastUpgrade>,
    /// The outcome of this generation's first upgrade, for `wait_upgrade`.
    first_outcome: Option<Reply>,
    first_waiters: Vec<oneshot::Sender<Reply>>,
    stop_waiters: Vec<oneshot::Sender<Reply>>,
    /// Older generations still draining: pid -> open connections.
    draining: BTreeMap<u32, usize>,
    ending: Option<Ending>,
    /// The answer to the upgrade that handed over, held until the probation is over.
    on_probation: Option<(Reply, Vec<oneshot::Sender<Reply>>)>,
}

impl Phase {
    /// As `gem status` shows it.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Upgrading => "upgrading",
            Phase::ShutdownDelay => "shutdown_delay",
            Phase::Draining => "draining",
            Phase::Exited => "exited",
        }
    }
}

impl Lifecycle {
    /// The lifecycle of a generation that serves now.
    pub(crate) fn new(
        me: Identity,
        signals: SignalRegistry,
        drain: DrainSignal,
        phase: watch::Sender<Phase>,
    ) -> Self {
        // A generation born of an upgrade reports that upgrade until it makes its own.
        let last_upgrade = me.parent_pid.map(|_| LastUpgrade {
            result: "upgraded".into(),
            at_unix_ms: unix_ms(),
            reason: String::new(),
            pid: Some(me.pid),
        });
        phase.send_replace(Phase::Serving);
        Lifecycle {
            me,
            signals,
            drain,
            phase,
            upgrade: None,
            follow_up: None,
            last_upgrade,
            first_outcome: None,
            first_waiters: Vec::new(),
            stop_waiters: Vec::new(),
            draining: BTreeMap::new(),
            ending: None,
            on_probation: None,
        }
    }

    /// The probation after a handover, if any.
    pub(crate) fn probation(&self) -> Option<Duration> {
        match self.me.role {
            Role::Alone { probation } if !probation.is_zero() => Some(probation),
            _ => None,
        }
    }

    /// The supervisor of a worker.
    fn supervisor(&self) -> Option<u32> {
        match self.me.role {
            Role::Worker { supervisor } => Some(supervisor),
            Role::Alone { .. } => None,
        }
    }

    /// Whether `sig` means shutdown here.
    pub(crate) fn is_shutdown(&self, sig: Signal) -> bool {
        self.signals.action(sig) == Some(SignalAction::Shutdown)
    }

    /// The probation passed: the upgrade's waiters learn it worked.
    pub(crate) fn probation_passed(&mut self) {
        if let Some((reply, waiters)) = self.on_probation.take() {
            let child = self.last_upgrade.as_ref().and_then(|u| u.pid);
            self.record(reply, waiters, child, String::new());
        }
    }

    /// Serving again: after the new process died on probation (`why` says so, and
    /// answers the upgrade's waiters), or a worker resumed by its supervisor. `drain`
    /// counts the new connections.
    pub(crate) fn resume(&mut self, drain: DrainSignal, why: Option<String>) -> Vec<Action> {
        let mut out = Vec::new();
        self.ending = None;
        self.drain = drain;
        self.phase.send_replace(Phase::Serving);
        if let Some(why) = why {
            let waiters = self.on_probation.take().map(|(_, w)| w).unwrap_or_default();
            let child = self.last_upgrade.as_ref().and_then(|u| u.pid);
            self.record(
                Reply::error(why.clone(), self.me.pid),
                waiters,
                child,
                why.clone(),
            );
            if let Some(last) = &mut self.last_upgrade {
                last.result = "rolled back".into();
                if let Some(rest) = why.strip_prefix("rolled back: ") {
                    last.reason = rest.to_owned();
                }
            }
            // systemd's main pid is this one again (it may have seen the other die
            // first: under systemd, supervised mode avoids that race).
            out.push(Action::Notify(Notice::HandedOver { pid: self.me.pid }));
            out.push(Action::Notify(Notice::Status(why)));
            out.push(Action::RestorePidFile);
        }
        out
    }

    /// Takes in one event; returns what to do about it.
    pub(crate) fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(ending) = self.ending {
            self.after_the_end(event, ending, &mut out);
            return out;
        }
        match event {
            Event::Signal(sig) => self.on_signal(sig, &mut out),
            Event::Call(call) => self.on_call(call, &mut out),
            Event::UpgradeDone(Ok(to)) => self.upgrade_succeeded(to, &mut out),
            Event::UpgradeDone(Err(err)) => self.upgrade_failed(&err, &mut out),
            Event::Parent(msg) => self.on_parent(msg, &mut out),
            Event::ParentGone => match self.me.role {
                Role::Worker { supervisor } => {
                    warn!(
                        "[{}] the supervisor (process {supervisor}) is gone; stopping.",
                        self.me.pid
                    );
                    self.end(Ending::Orphaned, &mut out);
                }
                Role::Alone { .. } => self.draining.clear(),
            },
        }
        out
    }

    /// The `gem stop` clients to answer once the drain is over.
    pub(crate) fn take_stop_waiters(&mut self) -> Vec<oneshot::Sender<Reply>> {
        std::mem::take(&mut self.stop_waiters)
    }

    /// The running upgrade was stopped by the drain: answers its waiters with `reason`.
    pub(crate) fn upgrade_stopped(&mut self, reason: &str) {
        let pid = self.me.pid;
        let waiters = self.upgrade.take().map(|r| r.waiters).unwrap_or_default();
        let follow_up = self.follow_up.take().unwrap_or_default();
        let first = std::mem::take(&mut self.first_waiters);
        for w in waiters.into_iter().chain(follow_up).chain(first) {
            let _ = w.send(Reply::error(reason, pid));
        }
    }

    /// Publishes a phase the runner reached (draining done, exited).
    pub(crate) fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    fn on_signal(&mut self, sig: Signal, out: &mut Vec<Action>) {
        let pid = self.me.pid;
        let desc = sig.description();
        match self.signals.action(sig) {
            Some(SignalAction::Restart) if self.supervisor().is_some() => {
                let supervisor = self.supervisor().unwrap_or_default();
                info!(
                    "[{pid}] received signal {desc:?}; this worker is supervised by process {supervisor}: signal it instead."
                );
            }
            Some(SignalAction::Restart) => {
                info!("[{pid}] received signal {desc:?}.");
                self.request_restart(None, out);
            }
            Some(SignalAction::Shutdown) => {
                info!("[{pid}] received signal {desc:?}.");
                self.end(Ending::Shutdown, out);
            }
            Some(SignalAction::Plugin) => {
                info!("[{pid}] received signal {desc:?}; calling the handler's on_signal hook.");
                out.push(Action::CallHook(sig));
            }
            Some(SignalAction::Reopen) => {
                info!("[{pid}] received signal {desc:?}; reopening the access log.");
                out.push(Action::ReopenLog);
            }
            Some(SignalAction::Ignore) | None => info!("[{pid}] ignored signal {desc:?}."),
        }
    }

    fn on_call(&mut self, call: Call, out: &mut Vec<Action>) {
        let pid = self.me.pid;
        match call.cmd {
            Command::Status => {
                let status = Box::new(self.status());
                let _ = call.reply.send(Reply::ok(ReplyBody::Status(status)));
            }
            Command::Reload => {
                info!("[{pid}] reload requested on the control socket.");
                self.request_restart(Some(call.reply), out);
            }
            Command::WaitUpgrade { generation } => self.wait_upgrade(generation, call.reply),
            Command::Reexec => {
                let _ = call.reply.send(Reply::error(
                    "only a supervisor re-executes its binary (gem serve --supervise)",
                    pid,
                ));
            }
            Command::Stop => {
                info!("[{pid}] stop requested on the control socket.");
                self.stop_waiters.push(call.reply);
                self.end(Ending::Shutdown, out);
            }
        }
    }

    fn on_parent(&mut self, msg: FromParent, out: &mut Vec<Action>) {
        match msg {
            FromParent::Standby => self.end(Ending::Standby, out),
            FromParent::Stop => {
                info!("[{}] stop requested by the supervisor.", self.me.pid);
                self.end(Ending::Shutdown, out);
            }
            FromParent::Resume => {}
            FromParent::Retire => self.end(Ending::Retired, out),
            FromParent::Totals(totals) => out.push(Action::CarryForward(totals)),
            FromParent::Restarted { result } => out.push(Action::CountRestart(result)),
            FromParent::Crashes { count } => out.push(Action::CountCrashes(count)),
            FromParent::Reopen => out.push(Action::ReopenLog),
            FromParent::Hook { signal } => {
                if let Some(sig) = Signal::from_number(signal) {
                    info!(
                        "[{}] the supervisor passed on signal {:?}; calling the handler's on_signal hook.",
                        self.me.pid,
                        sig.description()
                    );
                    out.push(Action::CallHook(sig));
                }
            }
            FromParent::Restart => {
                info!("[{}] restart passed on by the old process.", self.me.pid);
                self.request_restart(None, out);
            }
            FromParent::Draining { pid, connections } => {
                self.draining.insert(pid, connections);
            }
            FromParent::Drained { pid } => {
                self.draining.remove(&pid);
            }
        }
    }

    /// Events after the loop decided to end only reach the log.
    fn after_the_end(&mut self, event: Event, ending: Ending, out: &mut Vec<Action>) {
        let pid = self.me.pid;
        let state = match ending {
            Ending::Shutdown | Ending::Orphaned => "shutting down",
            Ending::HandedOver { .. } => "handing over",
            Ending::Standby => "standing by",
            Ending::Retired => "handing over",
        };
        match event {
            // Still writing the access log: logrotate's reopen must be heard.
            Event::Signal(sig) if self.signals.action(sig) == Some(SignalAction::Reopen) => {
                info!(
                    "[{pid}] received signal {:?} while {state}; reopening the access log.",
                    sig.description()
                );
                out.push(Action::ReopenLog);
            }
            Event::Signal(sig) => info!(
                "[{pid}] received signal {:?} while {state}; nothing more to do.",
                sig.description()
            ),
            // Still counting.
            Event::Parent(FromParent::Reopen) => out.push(Action::ReopenLog),
            Event::Parent(FromParent::Totals(totals)) => out.push(Action::CarryForward(totals)),
            Event::Parent(FromParent::Restarted { result }) => {
                out.push(Action::CountRestart(result));
            }
            Event::Parent(FromParent::Crashes { count }) => out.push(Action::CountCrashes(count)),
            // `gem stop` during a shutdown waits for its end like the first one.
            Event::Call(call) if ending == Ending::Shutdown && call.cmd == Command::Stop => {
                self.stop_waiters.push(call.reply);
            }
            // Still answering (a shutdown delay keeps the control socket): the phase.
            Event::Call(call) if ending == Ending::Shutdown && call.cmd == Command::Status => {
                let status = Box::new(self.status());
                let _ = call.reply.send(Reply::ok(ReplyBody::Status(status)));
            }
            Event::Call(call) => {
                let _ = call.reply.send(match ending {
                    Ending::HandedOver { to } => Reply::ok(ReplyBody::HandedOver { to }),
                    _ => Reply::error("the server is shutting down", pid),
                });
            }
            _ => {}
        }
    }

    fn end(&mut self, ending: Ending, out: &mut Vec<Action>) {
        self.ending = Some(ending);
        self.phase.send_replace(Phase::Draining);
        if ending == Ending::Shutdown {
            out.push(Action::Notify(Notice::Stopping));
        }
        out.push(Action::Drain(ending));
    }

    /// Answers with the outcome of generation `generation`'s first upgrade.
    fn wait_upgrade(&mut self, generation: u64, reply: oneshot::Sender<Reply>) {
        let me = self.me.generation;
        if generation < me {
            // That upgrade succeeded: this process is (a descendant of) its result.
            let _ = reply.send(Reply::ok(ReplyBody::Upgraded(control::Upgraded {
                from: self.me.parent_pid.unwrap_or_default(),
                to: self.me.pid,
                generation: me,
                ms: None,
            })));
        } else if generation > me {
            let _ = reply.send(Reply::error(
                format!("generation {generation} has not started; this is generation {me}"),
                self.me.pid,
            ));
        } else if let Some(outcome) = &self.first_outcome {
            let _ = reply.send(outcome.clone());
        } else {
            self.first_waiters.push(reply);
        }
    }

    /// Starts an upgrade, or books the one follow-up if one is running.
    fn request_restart(&mut self, waiter: Option<oneshot::Sender<Reply>>, out: &mut Vec<Action>) {
        let pid = self.me.pid;
        if self.upgrade.is_some() {
            book_follow_up(&mut self.follow_up, waiter, pid);
            return;
        }
        info!("[{pid}] Restarting...");
        self.upgrade = Some(Running {
            started: Instant::now(),
            waiters: waiter.into_iter().collect(),
        });
        self.phase.send_replace(Phase::Upgrading);
        out.push(Action::Notify(Notice::Reloading));
        out.push(Action::StartUpgrade {
            generation: self.me.generation + 1,
        });
    }

    fn upgrade_succeeded(&mut self, to: u32, out: &mut Vec<Action>) {
        let Some(running) = self.upgrade.take() else {
            return;
        };
        let pid = self.me.pid;
        let generation = self.me.generation + 1;
        let ms = millis(running.started.elapsed());
        info!("[{pid}] process {to} is ready (generation {generation}, {ms} ms); handing over.");
        out.push(Action::Notify(Notice::HandedOver { pid: to }));
        let reply = Reply::ok(ReplyBody::Upgraded(control::Upgraded {
            from: pid,
            to,
            generation,
            ms: Some(ms),
        }));
        if self.probation().is_some() {
            // Answered when the probation is over: "did my upgrade work?" is only
            // known then.
            let first = std::mem::take(&mut self.first_waiters);
            let waiters = running.waiters.into_iter().chain(first).collect();
            self.on_probation = Some((reply, waiters));
            self.last_upgrade = Some(LastUpgrade {
                result: "on probation".into(),
                at_unix_ms: unix_ms(),
                reason: String::new(),
                pid: Some(to),
            });
        } else {
            self.record(reply, running.waiters, Some(to), String::new());
        }
        if let Some(waiters) = self.follow_up.take() {
            out.push(Action::ForwardRestart);
            let forwarded = Reply::ok(ReplyBody::Forwarded { to, generation });
            for w in waiters {
                let _ = w.send(forwarded.clone());
            }
        }
        self.end(Ending::HandedOver { to }, out);
    }

    fn upgrade_failed(&mut self, err: &UpgradeError, out: &mut Vec<Action>) {
        let Some(running) = self.upgrade.take() else {
            return;
        };
        let pid = self.me.pid;
        error!("[{pid}] upgrade failed: {err}; process {pid} keeps serving.");
        let reason = err.to_string();
        self.phase.send_replace(Phase::Serving);
        out.push(Action::Notify(Notice::Ready {
            status: Some(format!("upgrade failed: {reason}")),
        }));
        out.push(Action::RestorePidFile);
        let reply = Reply::error(reason.clone(), pid);
        self.record(reply, running.waiters, err.pid(), reason);
        if let Some(waiters) = self.follow_up.take() {
            let mut waiters = waiters.into_iter();
            self.request_restart(waiters.next(), out);
            if let Some(running) = &mut self.upgrade {
                running.waiters.extend(waiters);
            }
        }
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
        Status {
            pid: self.me.pid,
            generation: self.me.generation,
            uptime_ms: millis(self.me.started.elapsed()),
            listen: self.me.listen.clone(),
            plugin: self.me.handler.info(),
            in_flight: self.drain.in_flight(),
            connections: self.drain.connections(),
            last_upgrade: self.last_upgrade.clone(),
            draining: self
                .draining
                .iter()
                .map(|(pid, connections)| Draining {
                    pid: *pid,
                    connections: *connections,
                })
                .collect(),
            supervisor: None,
            phase: Some(self.phase.borrow().name().to_owned()),
            tls: crate::tls::refreshed(&self.me.tls),
        }
    }
}

/// Coalesces a restart asked for while an upgrade runs into the one follow-up, with its
/// waiters.
pub(crate) fn book_follow_up(
    follow_up: &mut Option<Vec<oneshot::Sender<Reply>>>,
    waiters: impl IntoIterator<Item = oneshot::Sender<Reply>>,
    pid: u32,
) {
    let booked = follow_up.get_or_insert_with(|| {
        info!("[{pid}] an upgrade is already running; one more will follow it.");
        Vec::new()
    });
    booked.extend(waiters);
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
