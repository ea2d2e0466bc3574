//! The lifecycle of one server process: start serving, turn each signal or control
//! command into an action, hand over to a new process on restart, drain on shutdown or
//! after a handover, then return.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{Stream, StreamExt};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ListenAddr};
use crate::control::{self, Call, Command, Draining, LastUpgrade, Reply, ReplyBody, Status};
use crate::drain::{DrainOutcome, DrainSignal};
use crate::error::Error;
use crate::fds::{Inherited, open_listeners};
use crate::handler::Handler;
use crate::plugin::LoadedPlugin;
use crate::server::{ServeContext, accept_loop};
use crate::signals::{Action, Signal, SignalRegistry};
use crate::upgrade::{
    FromParent, Handover, Launch, ReadyChannel, UpgradeError, Upgraded, from_parent,
};

/// Where requests go.
#[derive(Clone)]
pub(crate) enum HandlerSource {
    /// A handler in this binary.
    InProcess(Arc<dyn Handler>),
    /// A plugin `.so`, loaded afresh by every generation.
    Plugin(PathBuf),
}

/// How [`crate::Server::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Shut down on a signal or `gem stop`; `cut` connections were still open at
    /// `wait_timeout`.
    Shutdown {
        /// Connections cut at the timeout.
        cut: usize,
    },
    /// A new process took over and this one drained.
    HandedOver {
        /// The new process.
        to: u32,
        /// Connections cut at the timeout.
        cut: usize,
    },
}

/// One listening socket being served.
struct Listening {
    addr: ListenAddr,
    local: SocketAddr,
    /// A duplicate kept for handing over; the accept loop owns the original.
    fd: OwnedFd,
    tracker: TaskTracker,
}

/// The control socket being served.
struct ControlSocket {
    path: PathBuf,
    fd: OwnedFd,
    /// Taken by the lifecycle loop.
    calls: Option<mpsc::Receiver<Call>>,
    stop: CancellationToken,
    /// Connections being answered, so a final reply is written before exit.
    answers: TaskTracker,
}

/// The serving state of this process.
pub(crate) struct Generation {
    pid: u32,
    number: u64,
    config: Config,
    handler: Arc<dyn Handler>,
    listening: Vec<Listening>,
    control: Option<ControlSocket>,
    drain: DrainSignal,
    started: Instant,
    /// The process that handed over to this one, for generations after the first.
    parent_pid: Option<u32>,
}

/// Loads the handler, opens the listeners and the control socket, starts accepting.
/// On failure, the error comes back with the parent's ready channel, to report on.
pub(crate) async fn start(
    config: Config,
    source: HandlerSource,
    inherited: Inherited,
) -> Result<(Generation, Option<ReadyChannel>), (Error, Option<ReadyChannel>)> {
    let ready = inherited.ready.map(ReadyChannel::new);
    let started = start_serving(
        config,
        source,
        inherited.listeners,
        inherited.control,
        inherited.generation,
    )
    .await;
    match started {
        Ok(generation) => Ok((generation, ready)),
        Err(err) => Err((err, ready)),
    }
}

async fn start_serving(
    config: Config,
    source: HandlerSource,
    inherited: Vec<(String, std::net::TcpListener)>,
    inherited_control: Option<StdUnixListener>,
    number: u64,
) -> Result<Generation, Error> {
    let pid = std::process::id();
    let handler = load_handler(source).await?;
    check_signal_hook(&config.signals, handler.as_ref())?;
    let sockets =
        open_listeners(&config.listen, inherited).map_err(|(addr, source)| Error::Listen {
            addr: addr.spec,
            source,
        })?;
    let control = match &config.control_socket {
        Some(path) => Some(open_control(path, inherited_control)?),
        None => None,
    };
    let drain = DrainSignal::new(config.idle_grace);
    let ctx = ServeContext::new(handler.clone(), config.limits, drain.clone());
    let mut listening = Vec::with_capacity(sockets.len());
    for (addr, socket) in sockets {
        listening.push(serve_listener(addr, socket, &ctx)?);
    }
    log_handler(pid, handler.as_ref());
    Ok(Generation {
        pid,
        number,
        config,
        handler,
        listening,
        control,
        drain,
        started: Instant::now(),
        parent_pid: (number > 1).then(std::os::unix::process::parent_id),
    })
}

fn serve_listener(
    addr: ListenAddr,
    socket: std::net::TcpListener,
    ctx: &ServeContext,
) -> Result<Listening, Error> {
    let fd = socket
        .as_fd()
        .try_clone_to_owned()
        .map_err(Error::io("duplicating a listener"))?;
    socket
        .set_nonblocking(true)
        .map_err(Error::io("configuring a listener"))?;
    let local = socket
        .local_addr()
        .map_err(Error::io("reading a listener's address"))?;
    let listener =
        tokio::net::TcpListener::from_std(socket).map_err(Error::io("registering a listener"))?;
    let tracker = TaskTracker::new();
    tokio::spawn(accept_loop(listener, ctx.clone(), tracker.clone()));
    info!(
        "[{}] listening on http://{local} (listen = {:?})",
        std::process::id(),
        addr.spec
    );
    Ok(Listening {
        addr,
        local,
        fd,
        tracker,
    })
}

/// Adopts the inherited control socket (a new generation never re-binds the live
/// path) or binds a fresh one, and starts answering on it.
fn open_control(path: &Path, inherited: Option<StdUnixListener>) -> Result<ControlSocket, Error> {
    let file_err = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    // The inherited socket serves only if the path is unchanged; a new path is bound
    // afresh and the old socket closes with the old generation.
    let same_path = |l: &StdUnixListener| {
        l.local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p == path))
            .unwrap_or(false)
    };
    let listener = match inherited.filter(same_path) {
        Some(l) => l,
        None => control::bind(path).map_err(file_err)?,
    };
    let fd = listener.as_fd().try_clone_to_owned().map_err(file_err)?;
    listener.set_nonblocking(true).map_err(file_err)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(file_err)?;
    let (tx, calls) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let answers = TaskTracker::new();
    tokio::spawn(control::serve(listener, tx, stop.clone(), answers.clone()));
    Ok(ControlSocket {
        path: path.to_owned(),
        fd,
        calls: Some(calls),
        stop,
        answers,
    })
}

fn log_handler(pid: u32, handler: &dyn Handler) {
    let info = handler.info();
    match (&info.path, info.abi) {
        (Some(path), Some(abi)) => info!(
            "[{pid}] handler {} {} (plugin ABI {abi}) from {}",
            info.name,
            info.version,
            path.display()
        ),
        _ => info!("[{pid}] handler {} (in-process)", info.name),
    }
}

async fn load_handler(source: HandlerSource) -> Result<Arc<dyn Handler>, Error> {
    match source {
        HandlerSource::InProcess(h) => Ok(h),
        HandlerSource::Plugin(path) => {
            // A plugin's init may block; keep it off the I/O threads.
            let loaded = tokio::task::spawn_blocking(move || LoadedPlugin::load(&path))
                .await
                .map_err(|e| Error::Io {
                    context: "loading the plugin",
                    source: std::io::Error::other(e.to_string()),
                })??;
            Ok(Arc::new(loaded))
        }
    }
}

/// The `plugin` action needs a handler with an `on_signal` hook.
pub(crate) fn check_signal_hook(
    signals: &SignalRegistry,
    handler: &dyn Handler,
) -> Result<(), Error> {
    match signals.iter().find(|(_, a)| *a == Action::Plugin) {
        Some((signal, _)) if !handler.has_signal_hook() => Err(Error::NoSignalHook {
            signal,
            handler: handler.info().name,
        }),
        _ => Ok(()),
    }
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) about a lifecycle step.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(err) = sd_notify::notify(states) {
        debug!(cause = %err, "sd_notify failed");
    }
}

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
    /// Announces that this generation serves: log line, pid file, parent's ready.
    pub(crate) async fn announce(
        &self,
        ready: Option<ReadyChannel>,
    ) -> Result<Option<BufReader<UnixStream>>, Error> {
        info!("Server started at process {}", self.pid);
        if let Some(path) = &self.config.pid_file {
            write_pid_file(path, self.pid)?;
        }
        match ready {
            Some(channel) => {
                let stream = channel
                    .ready()
                    .await
                    .map_err(Error::io("telling the old process we are ready"))?;
                Ok(Some(BufReader::new(stream)))
            }
            None => {
                notify(&[sd_notify::NotifyState::Ready]);
                Ok(None)
            }
        }
    }

    /// Runs the loop until shutdown or handover, then drains.
    pub(crate) async fn run(
        mut self,
        launch: Launch,
        mut signals: impl Stream<Item = Signal> + Unpin,
        mut parent: Option<BufReader<UnixStream>>,
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
                msg = async { from_parent(parent.as_mut()?).await }, if parent.is_some() => {
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
    async fn finish(
        mut self,
        next: Next,
        parent: Option<BufReader<UnixStream>>,
    ) -> Result<Exit, Error> {
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
    mut parent: Option<BufReader<UnixStream>>,
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
            msg = async { from_parent(parent.as_mut()?).await }, if parent.is_some() => match msg {
                Some(FromParent::Restart) => {}
                Some(msg) => { let _ = child.send(&msg).await; }
                None => parent = None,
            },
        }
    }
}

impl Generation {
    /// Lets control replies already decided reach their clients before the exit.
    async fn flush_answers(&self) {
        if let Some(control) = &self.control {
            control.answers.close();
            let _ = tokio::time::timeout(Duration::from_secs(1), control.answers.wait()).await;
        }
    }

    /// The drain, with the reference's log lines. Returns how many connections were cut.
    async fn drain_all(&self) -> usize {
        let pid = self.pid;
        for l in &self.listening {
            info!("[{pid}] shutting down the server({})...", l.local);
        }
        self.drain.begin();
        let deadline = tokio::time::Instant::now() + self.config.wait_timeout;
        let trackers: Vec<_> = self.listening.iter().map(|l| l.tracker.clone()).collect();
        let outcomes = self.drain.finish(&trackers, deadline).await;
        let mut total = 0;
        for (l, outcome) in self.listening.iter().zip(outcomes) {
            match outcome {
                DrainOutcome::Clean => info!("[{pid}] server({}) shutdown successfully.", l.local),
                DrainOutcome::TimedOut { cut } => {
                    total += cut;
                    warn!(
                        "[{pid}] server({}) has been shutdown, but some existing connections reach error: timeout. ({cut} cut after {})",
                        l.local,
                        humantime::format_duration(self.config.wait_timeout)
                    );
                }
            }
        }
        info!("[{pid}] all of old servers have been shutdown successfully.");
        total
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `pid` to `path` atomically: a temporary file in the same directory, renamed.
fn write_pid_file(path: &Path, pid: u32) -> Result<(), Error> {
    let file_err = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{pid}"));
    std::fs::write(&tmp, format!("{pid}\n")).map_err(file_err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_err(e)
    })
}

/// Removes the pid file on a final stop, unless another process has taken it over.
fn remove_pid_file(path: &Path, pid: u32) {
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        == Some(pid);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

/// Real Unix signals for every signal in `registry`, as a stream.
pub(crate) fn os_signals(
    registry: &SignalRegistry,
) -> Result<impl Stream<Item = Signal> + Unpin + use<>, Error> {
    let numbers: Vec<i32> = registry.iter().map(|(s, _)| s.number()).collect();
    let signals = signal_hook_tokio::Signals::new(numbers)
        .map_err(Error::io("installing signal handlers"))?;
    Ok(signals.filter_map(|n| std::future::ready(Signal::from_number(n))))
}
