//! Supervisor mode: a small process that keeps its pid for the life of the service.
//!
//! It owns the listening sockets and the control socket, applies the signal table, and
//! runs each generation as a worker process (the same binary, handed the sockets as in
//! an upgrade). It never loads a plugin and never serves HTTP, so the code that can
//! crash never runs in it:
//!
//! - A restart starts worker N+1 from the config on disk and a sealed copy of the
//!   plugin, waits for its ready, puts the old worker on standby for the probation, and
//!   stops it after. If the new worker dies on probation, the old one resumes.
//! - A serving worker that dies unasked is replaced from the config and plugin bytes
//!   that last reached ready, after a backoff: at once, then 500 ms, doubling to 30 s,
//!   back to "at once" after a worker served for a minute. The sockets stay open here
//!   meanwhile, so connections wait in the backlog instead of being refused.
//! - As PID 1 (a container), it reaps every child, orphans included.
//! - It can re-execute its own binary in place ([`Command::Reexec`]), keeping its pid,
//!   the sockets and its workers.
//!
//! Children are reaped here, by `waitpid(-1)` on `SIGCHLD`: nothing in this process
//! starts a child through tokio, whose own reaping would race it.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Config, ConfigError};
use crate::control::{
    self, Call, Command, LastUpgrade, Reply, ReplyBody, Status, SupervisorStatus, WorkerStatus,
};
use crate::error::Error;
use crate::handler::HandlerInfo;
use crate::lifecycle::{book_follow_up, millis, unix_ms};
use crate::listeners::open_listeners;
use crate::metrics::Totals;
use crate::service::{Notice, notify, remove_pid_file, write_pid_file};
use crate::signals::{Action as SignalAction, Signal, os_signals};
use crate::upgrade::{
    Channel, FromParent, FromWorker, Handover, Launch, Msg, UpgradeError, await_ready,
    describe_exit,
};

/// Reloads the configuration from where it came from (file, environment, flags), at
/// every restart.
pub type Loader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// The first delay after a crash that follows another (the first is none).
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest delay between replacements.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that served this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// How long a message to a worker may wait for room in its channel.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// After `wait_timeout`, how long stopping workers get before they are killed.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// What a worker is started from: the config and plugin bytes of one restart, and the
/// sockets for its `listen` entries.
struct Spec {
    config: Config,
    /// The config as handed to the worker.
    json: String,
    /// A sealed copy of the plugin.
    plugin: OwnedFd,
    /// Each listener's label and socket.
    listeners: Vec<(String, OwnedFd)>,
    /// The plugin's SHA-256, hashed here from the copy.
    sha256: Option<String>,
    /// Each TLS listener's certificate, checked when the spec was made.
    tls: Vec<control::ListenerTls>,
}

impl Spec {
    /// Loads nothing: copies the plugin, and opens the sockets `config` names, reusing
    /// `current` where the address is unchanged.
    fn new(config: Config, current: &[(String, OwnedFd)]) -> Result<Spec, Error> {
        let json = config.to_json()?;
        // A broken certificate or key fails the restart here, before a worker starts.
        let tls = crate::tls::check_listeners(&config.listen)?;
        let memfd = crate::plugin::sealed_copy(&config.handler, &config.handler)?;
        let sha256 = sha256_of(memfd.as_file());
        let plugin = OwnedFd::from(memfd.into_file());
        let inherited = current
            .iter()
            .map(|(label, fd)| Ok((label.clone(), TcpListener::from(fd.try_clone()?))))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(Error::io("duplicating a listener"))?;
        let listeners = open_listeners(&config.sockets(), inherited)
            .map_err(|(addr, source)| Error::listen(addr.spec, source))?
            .into_iter()
            .map(|(addr, l)| (addr.spec, OwnedFd::from(l)))
            .collect();
        Ok(Spec {
            config,
            json,
            plugin,
            listeners,
            sha256,
            tls,
        })
    }

    fn local_addrs(&self) -> Vec<String> {
        self.listeners
            .iter()
            .filter(|(label, _)| !label.starts_with(crate::config::METRICS_LABEL))
            .filter_map(|(_, fd)| {
                let l = TcpListener::from(fd.try_clone().ok()?);
                l.local_addr().ok().map(|a| a.to_string())
            })
            .collect()
    }
}

fn sha256_of(file: &std::fs::File) -> Option<String> {
    // A description of its own: reading must not move the offset workers share.
    let copy = std::fs::File::open(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
    crate::plugin::sha256_of(copy).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Starting,
    Serving,
    Standby,
    Draining,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Standby => "standby",
            State::Draining => "draining",
        }
    }
}

struct Worker {
    pid: u32,
    generation: u64,
    state: State,
    /// When it began serving.
    serving_since: Option<Instant>,
    spec: Arc<Spec>,
    /// Its channel: it stops serving when this closes (the supervisor is gone).
    channel: Option<Channel>,
    handler: Option<HandlerInfo>,
    /// Its counters, as it last reported them.
    totals: Option<Totals>,
    /// Its requests in flight and open connections, as it last reported them.
    load: (usize, usize),
}

impl Worker {
    /// A worker that is being killed and is listed until it is reaped.
    fn dying(pid: u32, generation: u64, spec: Arc<Spec>) -> Worker {
        Worker {
            pid,
            generation,
            state: State::Draining,
            serving_since: None,
            spec,
            channel: None,
            handler: None,
            totals: None,
            load: (0, 0),
        }
    }

    /// Tells the worker; a worker that does not read (stopped, wedged) within a
    /// second is not waited for: the supervisor must go on reaping and answering.
    async fn send(&mut self, msg: FromParent) {
        let pid = self.pid;
        if let Some(channel) = &mut self.channel {
            match tokio::time::timeout(SEND_TIMEOUT, channel.send(&Msg::new(msg))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!("could not tell worker {pid}: {e}"),
                Err(_) => warn!("worker {pid} does not read its channel; a message was dropped"),
            }
        }
    }
}

/// Why a worker is being started.
enum Purpose {
    /// A restart, with the `gem reload` clients waiting for it.
    Upgrade(Vec<oneshot::Sender<Reply>>),
    /// A replacement for one that died.
    Replace,
    /// The first worker: if it fails, the supervisor stops with its error, as
    /// `gem serve` without a supervisor would.
    First,
}

/// A worker being started.
struct Starting {
    pid: u32,
    generation: u64,
    spec: Arc<Spec>,
    purpose: Purpose,
    began: Instant,
    join: JoinHandle<(Channel, Result<Option<HandlerInfo>, UpgradeError>)>,
    cancel: CancellationToken,
    /// Told how the worker ended, if it dies before ready.
    died: Option<oneshot::Sender<String>>,
    /// How it ended, once reaped (it may have reported ready just before).
    exited: Option<String>,
}

/// A probation under way: `old` stands by while `new` proves itself.
struct Probation {
    old: u32,
    new: u32,
    since: Instant,
    until: tokio::time::Instant,
    reply: Reply,
    waiters: Vec<oneshot::Sender<Reply>>,
}

/// The supervisor's state. See the module documentation.
struct Supervisor {
    pid: u32,
    launch: Launch,
    loader: Loader,
    config: Config,
    control_path: Option<PathBuf>,
    control_fd: Option<OwnedFd>,
    workers: BTreeMap<u32, Worker>,
    /// The generation number of the newest worker started.
    generation: u64,
    /// The spec of the last worker that reached ready: what a replacement starts from.
    last_good: Option<Arc<Spec>>,
    starting: Option<Starting>,
    /// A restart asked for while a worker starts, with its waiters.
    follow_up: Option<Vec<oneshot::Sender<Reply>>>,
    probation: Option<Probation>,
    /// When the next replacement starts, if one is due.
    replace_at: Option<tokio::time::Instant>,
    crashes: u64,
    /// Crashes in a row, for the backoff.
    streak: u32,
    execs: u64,
    last_upgrade: Option<LastUpgrade>,
    started: Instant,
    stopping: Option<tokio::time::Instant>,
    stop_waiters: Vec<oneshot::Sender<Reply>>,
    ready_told: bool,
    /// Why the supervisor stops on its own (its first worker failed).
    fatal: Option<String>,
    /// Until when the workers keep serving in their shutdown delay, for `gem status`.
    delay_until: Option<Instant>,
    /// Where workers' reports arrive.
    reports: mpsc::Sender<(u32, FromWorker)>,
    /// What the serving worker counts on from: the counters of the one before it.
    carried: Option<Totals>,
    /// The worker whose reports update `carried` (the one the serving worker replaced,
    /// while it drains).
    predecessor: Option<u32>,
}

/// Runs the supervisor until a shutdown: `config` is the configuration loaded at start,
/// `loader` reloads it at every restart.
pub async fn supervise(config: Config, loader: Loader) -> Result<(), Error> {
    let launch = Launch::current().map_err(Error::io("recording how gem was started"))?;
    let pid = std::process::id();
    let inherited = crate::handover::take_inherited()?;
    let (reports_tx, mut reports) = mpsc::channel(64);
    let mut sup = Supervisor {
        pid,
        launch,
        loader,
        control_path: config.control_socket.clone(),
        control_fd: None,
        config,
        workers: BTreeMap::new(),
        generation: 0,
        last_good: None,
        starting: None,
        follow_up: None,
        probation: None,
        replace_at: None,
        crashes: 0,
        streak: 0,
        execs: 0,
        last_upgrade: None,
        started: Instant::now(),
        stopping: None,
        stop_waiters: Vec::new(),
        ready_told: false,
        fatal: None,
        delay_until: None,
        reports: reports_tx,
        carried: None,
        predecessor: None,
    };
    let (tx, mut calls) = mpsc::channel(16);
    let control_stop = CancellationToken::new();
    let answers = TaskTracker::new();
    let mut children = signal(SignalKind::child()).map_err(Error::io("watching children"))?;
    match inherited.supervisor_state {
        Some(saved) => sup.adopt(saved)?,
        None => {
            info!(
                "[{pid}] supervising: this process keeps the sockets; each generation is a worker process."
            );
            // Sockets from systemd's socket activation, if any.
            let activated: Vec<(String, OwnedFd)> = inherited
                .listeners
                .into_iter()
                .map(|(label, l)| (label, OwnedFd::from(l)))
                .collect();
            // Everything that can fail on bad input first: nothing is left behind then.
            let spec = Arc::new(Spec::new(sup.config.clone(), &activated)?);
            if let Some(path) = &sup.control_path {
                let listener = control::bind(path).map_err(|source| Error::File {
                    path: path.clone(),
                    source,
                })?;
                sup.control_fd = Some(OwnedFd::from(listener));
            }
            if let Some(path) = &sup.config.pid_file {
                write_pid_file(path, pid)?;
            }
            sup.start(spec, Purpose::First);
        }
    }
    if let Some(fd) = &sup.control_fd {
        let listener = StdUnixListener::from(fd.try_clone().map_err(Error::io("control socket"))?);
        listener
            .set_nonblocking(true)
            .map_err(Error::io("control socket"))?;
        let listener =
            tokio::net::UnixListener::from_std(listener).map_err(Error::io("control socket"))?;
        tokio::spawn(control::serve(
            listener,
            tx,
            control_stop.clone(),
            answers.clone(),
        ));
    }
    let mut installed = sup.config.signals.clone();
    let mut signals =
        Box::pin(os_signals(&installed).map_err(Error::io("installing signal handlers"))?);
    // Children that exited before the handler was installed (or during an exec).
    sup.reap().await;
    loop {
        if sup.stopping.is_some() && sup.workers.is_empty() && sup.starting.is_none() {
            break;
        }
        if sup.config.signals != installed {
            // A restart brought a new [signals] table: handle its signals from now on.
            match os_signals(&sup.config.signals) {
                Ok(stream) => {
                    signals = Box::pin(stream);
                    installed = sup.config.signals.clone();
                }
                Err(e) => {
                    warn!("[{pid}] could not install the new signal table: {e}");
                    installed = sup.config.signals.clone();
                }
            }
        }
        let start_done = async {
            match &mut sup.starting {
                Some(s) => (&mut s.join).await.ok(),
                None => std::future::pending().await,
            }
        };
        let probation_over = async {
            match &sup.probation {
                Some(p) => tokio::time::sleep_until(p.until).await,
                None => std::future::pending().await,
            }
        };
        let replace_due = async {
            match sup.replace_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let kill_due = async {
            match sup.stopping {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = children.recv() => sup.reap().await,
            outcome = start_done => sup.started(outcome).await,
            () = probation_over => sup.probation_over().await,
            () = replace_due => sup.replace_now(),
            () = kill_due => sup.kill_stragglers(),
            Some(sig) = signals.next() => sup.on_signal(sig).await,
            Some(call) = calls.recv() => sup.on_call(call).await,
            Some((pid, totals)) = reports.recv() => sup.reported(pid, totals).await,
        }
    }
    control_stop.cancel();
    if let Some(path) = &sup.config.pid_file {
        remove_pid_file(path, pid);
    }
    if let Some(path) = &sup.control_path {
        let _ = std::fs::remove_file(path);
    }
    for w in std::mem::take(&mut sup.stop_waiters) {
        let _ = w.send(Reply::ok(ReplyBody::Stopped { pid, cut: 0 }));
    }
    answers.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), answers.wait()).await;
    if let Some(why) = sup.fatal {
        return Err(Error::FirstWorker(why));
    }
    info!("[{pid}] all workers have exited; the supervisor exits.");
    Ok(())
}

impl Supervisor {
    fn serving(&self) -> Option<&Worker> {
        self.workers.values().find(|w| w.state == State::Serving)
    }

    fn serving_mut(&mut self) -> Option<&mut Worker> {
        self.workers
            .values_mut()
            .find(|w| w.state == State::Serving)
    }

    /// Starts worker `generation + 1` from `spec`.
    fn start(&mut self, spec: Arc<Spec>, purpose: Purpose) {
        let generation = self.generation + 1;
        match self.spawn(&spec, generation) {
            Ok((pid, channel)) => {
                self.generation = generation;
                info!(
                    "[{}] Fork-exec to {pid} (generation {generation}).",
                    self.pid
                );
                let (died_tx, died_rx) = oneshot::channel();
                let cancel = CancellationToken::new();
                let timeout = spec.config.upgrade_timeout;
                let token = cancel.clone();
                let join = tokio::spawn(async move {
                    let mut channel = channel;
                    let died = async {
                        match died_rx.await {
                            Ok(how) => how,
                            Err(_) => std::future::pending().await,
                        }
                    };
                    let outcome = await_ready(&mut channel, pid, timeout, &token, died).await;
                    (channel, outcome)
                });
                self.starting = Some(Starting {
                    pid,
                    generation,
                    spec,
                    purpose,
                    began: Instant::now(),
                    join,
                    cancel,
                    died: Some(died_tx),
                    exited: None,
                });
            }
            Err(err) => {
                let what = match purpose {
                    Purpose::Upgrade(_) => err.to_string(),
                    Purpose::Replace | Purpose::First => {
                        format!("could not start a worker: {err}")
                    }
                };
                self.start_failed(spec, purpose, &what);
            }
        }
    }

    fn spawn(&self, spec: &Spec, generation: u64) -> Result<(u32, Channel), UpgradeError> {
        let listeners: Vec<(String, BorrowedFd<'_>)> = spec
            .listeners
            .iter()
            .map(|(label, fd)| (label.clone(), fd.as_fd()))
            .collect();
        let mut handover = Handover::new(
            self.launch.clone(),
            &listeners,
            None,
            generation,
            spec.config.upgrade_timeout,
        )?;
        handover.worker(spec.json.clone(), spec.plugin.as_fd())?;
        handover.spawn_unreaped()
    }

    /// A worker could not be started, or died before it was ready.
    fn start_failed(&mut self, spec: Arc<Spec>, purpose: Purpose, why: &str) {
        let pid = self.pid;
        match purpose {
            Purpose::Upgrade(waiters) => {
                let serving = self.serving().map_or(pid, |w| w.pid);
                error!("[{pid}] upgrade failed: {why}; worker {serving} keeps serving.");
                // Told in the background: this path is not async.
                if let Some(w) = self.serving_mut()
                    && let Some(channel) = w.channel.as_ref()
                    && let Ok(mut writer) = crate::upgrade::second_handle(channel)
                {
                    tokio::spawn(async move {
                        let msg = Msg::new(FromParent::Restarted {
                            result: "failed".into(),
                        });
                        let _ = writer.send(&msg).await;
                    });
                }
                notify(&Notice::Ready {
                    status: Some(format!("upgrade failed: {why}")),
                });
                self.record("failed", why, None);
                for w in waiters {
                    let _ = w.send(Reply::error(why, serving));
                }
                if self.serving().is_none() && self.stopping.is_none() {
                    // Nothing serves (it died during the upgrade): replace it.
                    if let Some(good) = self.last_good.clone() {
                        self.crashed(good, &format!("could not start a worker: {why}"), None);
                    }
                }
                self.run_follow_up();
            }
            Purpose::Replace => {
                if self.stopping.is_none() {
                    self.crashed(spec, why, None);
                }
                // A restart asked for meanwhile may bring the fix.
                self.run_follow_up();
            }
            // A shutdown that stopped the start is no failure.
            Purpose::First if self.stopping.is_some() => {}
            Purpose::First => {
                error!("[{pid}] {why}; nothing serves, so the supervisor stops.");
                self.fatal = Some(why.to_owned());
                self.stopping = Some(tokio::time::Instant::now() + KILL_GRACE);
            }
        }
    }

    /// Counts a crash and schedules a replacement from `spec` after the backoff.
    /// `served` is how long the dead worker had served, if it had.
    fn crashed(&mut self, spec: Arc<Spec>, what: &str, served: Option<Duration>) {
        self.crashes += 1;
        if served.is_some_and(|s| s >= STABLE_AFTER) {
            self.streak = 0;
        }
        let delay = backoff(self.streak);
        self.streak = self.streak.saturating_add(1);
        let crash = self.crashes;
        error!(
            "[{}] {what}; crash {crash}, replacement in {}.",
            self.pid,
            humantime::format_duration(delay)
        );
        notify(&Notice::Status(format!(
            "{what}; {crash} crashes; replacement in {}",
            humantime::format_duration(delay)
        )));
        self.last_good = Some(spec);
        self.replace_at = Some(tokio::time::Instant::now() + delay);
    }

    fn replace_now(&mut self) {
        self.replace_at = None;
        if self.stopping.is_some() || self.starting.is_some() {
            return;
        }
        if let Some(spec) = self.last_good.clone() {
            self.start(spec, Purpose::Replace);
        }
    }

    /// A start ended: ready, or not.
    async fn started(
        &mut self,
        outcome: Option<(Channel, Result<Option<HandlerInfo>, UpgradeError>)>,
    ) {
        let Some(starting) = self.starting.take() else {
            return;
        };
        let pid = starting.pid;
        // Ready, and dead already: it never served.
        let ready_then_died = matches!((&outcome, &starting.exited), (Some((_, Ok(_))), Some(_)));
        let result = match (outcome, &starting.exited) {
            (Some((_, Ok(_))), Some(how)) => Err(UpgradeError::ChildExited {
                pid,
                status: how.clone(),
            }),
            (Some((channel, Ok(handler))), None) => Ok((channel, handler)),
            (Some((_, Err(err))), _) => Err(err),
            (None, _) => Err(UpgradeError::Task("it panicked".into())),
        };
        let reaped = starting.exited.is_some();
        match result {
            Ok(_) if self.stopping.is_some() => {
                kill(pid);
                if let Purpose::Upgrade(waiters) = starting.purpose {
                    for w in waiters {
                        let _ = w.send(Reply::error("the server is shutting down", self.pid));
                    }
                }
                self.workers
                    .insert(pid, Worker::dying(pid, starting.generation, starting.spec));
            }
            Ok((channel, handler)) => {
                self.took_over(starting, channel, handler).await;
            }
            Err(why) => {
                // Killed if still running (a reaped pid may be another process's now);
                // the reaper collects it and it stays listed until then.
                if !reaped {
                    kill(pid);
                    // Not reaped yet: keep it listed until it is.
                    self.workers.insert(
                        pid,
                        Worker::dying(pid, starting.generation, starting.spec.clone()),
                    );
                }
                let generation = starting.generation;
                let when = if ready_then_died {
                    "right after it reported ready"
                } else {
                    "before it was ready"
                };
                let what = match (&starting.purpose, why) {
                    (Purpose::Upgrade(_), UpgradeError::ChildExited { status, .. })
                        if ready_then_died =>
                    {
                        format!("new process {pid} died ({status}) {when}")
                    }
                    (Purpose::Upgrade(_), why) => why.to_string(),
                    (
                        Purpose::Replace | Purpose::First,
                        UpgradeError::ChildExited { status, .. },
                    ) => format!("worker {pid} (generation {generation}) died ({status}) {when}"),
                    (Purpose::First, UpgradeError::ChildFailed { reason, .. }) => reason.clone(),
                    (Purpose::Replace | Purpose::First, why) => format!(
                        "worker {pid} (generation {generation}) failed before it was ready: {why}"
                    ),
                };
                self.start_failed(starting.spec, starting.purpose, &what);
            }
        }
    }

    /// Worker `starting` is ready: it serves, and the one before stands by.
    async fn took_over(
        &mut self,
        starting: Starting,
        channel: Channel,
        handler: Option<HandlerInfo>,
    ) {
        let me = self.pid;
        let pid = starting.pid;
        let generation = starting.generation;
        let ms = millis(starting.began.elapsed());
        info!("[{me}] worker {pid} (generation {generation}) serves.");
        let old = self.serving().map(|w| w.pid);
        self.workers.insert(
            pid,
            Worker {
                pid,
                generation,
                state: State::Serving,
                serving_since: Some(Instant::now()),
                spec: starting.spec.clone(),
                channel: Some(channel),
                handler,
                totals: None,
                load: (0, 0),
            },
        );
        self.read_reports(pid);
        if old.is_some() {
            self.predecessor = old;
            self.carried = old
                .and_then(|o| self.workers.get(&o))
                .and_then(|w| w.totals.clone())
                .or(self.carried.take());
        }
        let crashes = self.crashes;
        let carried = self.carried.clone();
        let upgraded = matches!(starting.purpose, Purpose::Upgrade(_));
        if let Some(w) = self.workers.get_mut(&pid) {
            // Always, even empty: the worker's metrics wait for it.
            w.send(FromParent::Totals(carried.unwrap_or_default()))
                .await;
            w.send(FromParent::Crashes { count: crashes }).await;
            if upgraded {
                w.send(FromParent::Restarted {
                    result: "ok".into(),
                })
                .await;
            }
        }
        self.last_good = Some(starting.spec.clone());
        self.take_config(&starting.spec);
        // Something serves: a replacement still due is not needed any more.
        self.replace_at = None;
        self.end_probation().await;
        let probation = starting.spec.config.probation;
        if let Some(old) = old.and_then(|o| self.workers.get_mut(&o)) {
            if probation.is_zero() {
                old.state = State::Draining;
                old.send(FromParent::Retire).await;
            } else {
                old.state = State::Standby;
                old.send(FromParent::Standby).await;
            }
        }
        if !self.ready_told {
            self.ready_told = true;
            notify(&Notice::Ready { status: None });
        } else {
            notify(&Notice::Ready {
                status: Some(format!("worker {pid} (generation {generation}) serves")),
            });
        }
        match starting.purpose {
            Purpose::Upgrade(waiters) => {
                let reply = Reply::ok(ReplyBody::Upgraded(control::Upgraded {
                    from: old.unwrap_or(me),
                    to: pid,
                    generation,
                    ms: Some(ms),
                }));
                match old {
                    Some(old) if !probation.is_zero() => {
                        info!(
                            "[{me}] on probation for {}: worker {old} stands by and serves again if {pid} dies.",
                            humantime::format_duration(probation)
                        );
                        self.record("on probation", "", Some(pid));
                        self.probation = Some(Probation {
                            old,
                            new: pid,
                            since: Instant::now(),
                            until: tokio::time::Instant::now() + probation,
                            reply,
                            waiters,
                        });
                    }
                    _ => {
                        self.record("upgraded", "", Some(pid));
                        for w in waiters {
                            let _ = w.send(reply.clone());
                        }
                    }
                }
                self.run_follow_up();
            }
            Purpose::Replace | Purpose::First => self.run_follow_up(),
        }
    }

    /// Reads worker `pid`'s reports (its counters) on a second handle of its channel.
    fn read_reports(&self, pid: u32) {
        let Some(channel) = self.workers.get(&pid).and_then(|w| w.channel.as_ref()) else {
            return;
        };
        let Ok(mut reader) = crate::upgrade::second_handle(channel) else {
            return;
        };
        let reports = self.reports.clone();
        tokio::spawn(async move {
            loop {
                match reader.recv::<Msg<FromWorker>>().await {
                    Ok(Some(msg)) => {
                        if reports.send((pid, msg.body)).await.is_err() {
                            return;
                        }
                    }
                    Err(crate::wire::WireError::BadJson { .. }) => {}
                    _ => return,
                }
            }
        });
    }

    /// Worker `pid` reported its counters or its load.
    async fn reported(&mut self, pid: u32, report: FromWorker) {
        let totals = match report {
            FromWorker::Totals(totals) => totals,
            FromWorker::Load {
                in_flight,
                connections,
            } => {
                if let Some(w) = self.workers.get_mut(&pid) {
                    w.load = (in_flight, connections);
                }
                return;
            }
        };
        if let Some(w) = self.workers.get_mut(&pid) {
            w.totals = Some(totals.clone());
        }
        if self.predecessor == Some(pid) {
            self.carried = Some(totals.clone());
            if let Some(w) = self.serving_mut() {
                w.send(FromParent::Totals(totals)).await;
            }
        }
    }

    /// Tells the serving worker, which counts it in its metrics.
    async fn tell_serving(&mut self, msg: FromParent) {
        if let Some(w) = self.serving_mut() {
            w.send(msg).await;
        }
    }

    /// The probation passed (or gave way to a newer one): the old worker exits.
    async fn end_probation(&mut self) {
        let Some(p) = self.probation.take() else {
            return;
        };
        self.record("upgraded", "", Some(p.new));
        for w in p.waiters {
            let _ = w.send(p.reply.clone());
        }
        if let Some(old) = self.workers.get_mut(&p.old)
            && old.state == State::Standby
        {
            old.state = State::Draining;
            old.send(FromParent::Stop).await;
        }
    }

    async fn probation_over(&mut self) {
        if let Some(p) = &self.probation {
            info!(
                "[{}] probation over: worker {} has served for {}.",
                self.pid,
                p.new,
                seconds(p.since.elapsed())
            );
        }
        self.end_probation().await;
    }

    fn run_follow_up(&mut self) {
        if self.starting.is_some() || self.stopping.is_some() {
            return;
        }
        if let Some(waiters) = self.follow_up.take() {
            self.upgrade(waiters);
        }
    }

    /// A restart: reload the config, copy the plugin, start the next worker.
    fn upgrade(&mut self, waiters: Vec<oneshot::Sender<Reply>>) {
        let pid = self.pid;
        if self.starting.is_some() {
            book_follow_up(&mut self.follow_up, waiters, pid);
            return;
        }
        info!("[{pid}] Restarting...");
        notify(&Notice::Reloading);
        let spec = (self.loader)().map_err(Error::from).and_then(|config| {
            let current = self
                .serving()
                .map(|w| w.spec.clone())
                .or(self.last_good.clone());
            let current = current.as_ref().map_or(&[][..], |s| &s.listeners[..]);
            Spec::new(config, current)
        });
        match spec {
            Ok(spec) => {
                self.start(Arc::new(spec), Purpose::Upgrade(waiters));
            }
            Err(err) => {
                let why = err.to_string();
                self.start_failed(
                    Arc::new(Spec {
                        config: self.config.clone(),
                        json: String::new(),
                        plugin: match std::fs::File::open("/dev/null") {
                            Ok(f) => OwnedFd::from(f),
                            Err(_) => return,
                        },
                        listeners: Vec::new(),
                        sha256: None,
                        tls: Vec::new(),
                    }),
                    Purpose::Upgrade(waiters),
                    &why,
                );
            }
        }
    }

    /// Collects every child that exited.
    async fn reap(&mut self) {
        use rustix::process::{WaitOptions, wait};
        loop {
            match wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    let pid = pid.as_raw_nonzero().get().unsigned_abs();
                    let status = std::os::unix::process::ExitStatusExt::from_raw(status.as_raw());
                    self.exited(pid, status).await;
                }
                Ok(None) => return,
                // ECHILD: no child at all.
                Err(_) => return,
            }
        }
    }

    /// Child `pid` exited with `status`.
    async fn exited(&mut self, pid: u32, status: std::process::ExitStatus) {
        let me = self.pid;
        let how = describe_exit(status);
        if let Some(starting) = &mut self.starting
            && starting.pid == pid
        {
            if let Some(died) = starting.died.take() {
                let _ = died.send(how.clone());
            }
            starting.exited = Some(how);
            return;
        }
        let Some(worker) = self.workers.remove(&pid) else {
            debug!("[{me}] reaped process {pid} ({how})");
            return;
        };
        let generation = worker.generation;
        match worker.state {
            State::Serving if self.stopping.is_none() => {
                let served = worker
                    .serving_since
                    .map(|s| s.elapsed())
                    .unwrap_or_default();
                let standby = self
                    .probation
                    .as_ref()
                    .filter(|p| p.new == pid)
                    .map(|p| p.old);
                match standby {
                    Some(old) if self.workers.contains_key(&old) => {
                        self.roll_back(pid, old, &how, served).await;
                    }
                    _ => {
                        // The replacement counts on from the dead worker's last report.
                        self.carried = worker.totals.clone().or(self.carried.take());
                        self.predecessor = None;
                        let what = format!(
                            "worker {pid} (generation {generation}) died ({how}) after serving {}",
                            seconds(served)
                        );
                        self.crashed(worker.spec.clone(), &what, Some(served));
                    }
                }
            }
            state => {
                info!("[{me}] worker {pid} (generation {generation}) exited ({how}).");
                if state == State::Standby
                    && let Some(p) = &self.probation
                    && p.old == pid
                {
                    // Nothing to roll back to any more.
                    self.end_probation().await;
                }
            }
        }
    }

    /// The new worker died on probation: the old one serves again.
    async fn roll_back(&mut self, dead: u32, old: u32, how: &str, served: Duration) {
        let me = self.pid;
        let Some(p) = self.probation.take() else {
            return;
        };
        let why = format!(
            "rolled back: pid {dead} died ({how}) {} after taking over; pid {old} serves again",
            seconds(served)
        );
        error!("[{me}] {why}.");
        self.crashes += 1;
        // The resumed worker counts on from its own base; it is nobody's successor.
        self.predecessor = None;
        if let Some(w) = self.workers.get_mut(&old) {
            w.state = State::Serving;
            w.serving_since = Some(Instant::now());
            w.send(FromParent::Resume).await;
            w.send(FromParent::Restarted {
                result: "rolled_back".into(),
            })
            .await;
            let spec = w.spec.clone();
            self.last_good = Some(spec.clone());
            self.take_config(&spec);
        }
        self.tell_serving(FromParent::Crashes {
            count: self.crashes,
        })
        .await;
        self.record(
            "rolled back",
            why.trim_start_matches("rolled back: "),
            Some(dead),
        );
        notify(&Notice::Ready {
            status: Some(why.clone()),
        });
        for w in p.waiters {
            let _ = w.send(Reply::error(why.clone(), old));
        }
    }

    fn kill_stragglers(&mut self) {
        self.stopping = Some(tokio::time::Instant::now() + KILL_GRACE);
        for w in self.workers.values() {
            warn!(
                "[{}] worker {} did not exit in time; killing it.",
                self.pid, w.pid
            );
            kill(w.pid);
        }
        if let Some(s) = &self.starting {
            kill(s.pid);
        }
    }

    async fn shutdown(&mut self) {
        let me = self.pid;
        if self.stopping.is_some() {
            return;
        }
        notify(&Notice::Stopping);
        self.delay_until = Some(Instant::now() + self.config.shutdown_delay);
        self.stopping = Some(
            tokio::time::Instant::now()
                + self.config.shutdown_delay
                + self.config.wait_timeout
                + KILL_GRACE,
        );
        self.replace_at = None;
        if let Some(s) = &self.starting {
            s.cancel.cancel();
        }
        let follow_up = self.follow_up.take().unwrap_or_default();
        for w in follow_up {
            let _ = w.send(Reply::error("the server is shutting down", me));
        }
        self.end_probation().await;
        for w in self.workers.values_mut() {
            if w.state != State::Draining {
                info!("[{me}] stopping worker {}.", w.pid);
                w.state = State::Draining;
                w.send(FromParent::Stop).await;
            }
        }
    }

    async fn on_signal(&mut self, sig: Signal) {
        let me = self.pid;
        let desc = sig.description();
        if self.stopping.is_some() {
            if self.config.signals.action(sig) == Some(SignalAction::Shutdown) {
                info!(
                    "[{me}] received signal {desc:?} again: the workers skip the rest of their shutdown delay."
                );
                self.delay_until = None;
                for w in self.workers.values_mut() {
                    w.send(FromParent::Stop).await;
                }
            } else {
                info!("[{me}] received signal {desc:?} while shutting down; nothing more to do.");
            }
            return;
        }
        match self.config.signals.action(sig) {
            Some(SignalAction::Restart) => {
                info!("[{me}] received signal {desc:?}.");
                self.upgrade(Vec::new());
            }
            Some(SignalAction::Shutdown) => {
                info!("[{me}] received signal {desc:?}.");
                self.shutdown().await;
            }
            Some(SignalAction::Plugin) => match self.serving_mut() {
                Some(w) => {
                    info!(
                        "[{me}] received signal {desc:?}; passing it to worker {}.",
                        w.pid
                    );
                    w.send(FromParent::Hook {
                        signal: sig.number(),
                    })
                    .await;
                }
                None => warn!("[{me}] received signal {desc:?}, but no worker serves."),
            },
            Some(SignalAction::Reopen) => {
                info!("[{me}] received signal {desc:?}; workers reopen their access log.");
                for w in self.workers.values_mut() {
                    w.send(FromParent::Reopen).await;
                }
            }
            Some(SignalAction::Ignore) | None => info!("[{me}] ignored signal {desc:?}."),
        }
    }

    async fn on_call(&mut self, call: Call) {
        let me = self.pid;
        match call.cmd {
            Command::Status => {
                let _ = call
                    .reply
                    .send(Reply::ok(ReplyBody::Status(Box::new(self.status()))));
            }
            _ if self.stopping.is_some() => match call.cmd {
                Command::Stop => self.stop_waiters.push(call.reply),
                _ => {
                    let _ = call
                        .reply
                        .send(Reply::error("the server is shutting down", me));
                }
            },
            Command::Reload => {
                info!("[{me}] reload requested on the control socket.");
                self.upgrade(vec![call.reply]);
            }
            Command::WaitUpgrade { .. } => {
                let _ = call.reply.send(Reply::error(
                    "a supervisor runs every upgrade itself; there is none to wait for",
                    me,
                ));
            }
            Command::Stop => {
                info!("[{me}] stop requested on the control socket.");
                self.stop_waiters.push(call.reply);
                self.shutdown().await;
            }
            Command::Reexec => {
                let why = self.reexec();
                error!("[{me}] re-executing failed: {why}; this supervisor carries on.");
                let _ = call
                    .reply
                    .send(Reply::error(format!("re-executing failed: {why}"), me));
            }
        }
    }

    fn status(&self) -> Status {
        let serving = self.serving();
        let spec = serving.map(|w| &w.spec).or(self.last_good.as_ref());
        let mut plugin = serving
            .and_then(|w| w.handler.clone())
            .unwrap_or_else(|| HandlerInfo {
                name: "(no worker serves)".into(),
                version: String::new(),
                abi: None,
                sha256: None,
                path: None,
            });
        if let Some(spec) = spec {
            plugin.sha256.clone_from(&spec.sha256);
            plugin.path = Some(spec.config.handler.clone());
        }
        let now = tokio::time::Instant::now();
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .values()
            .map(|w| WorkerStatus {
                pid: w.pid,
                generation: w.generation,
                state: w.state.name().into(),
            })
            .collect();
        if let Some(s) = &self.starting {
            workers.push(WorkerStatus {
                pid: s.pid,
                generation: s.generation,
                state: State::Starting.name().into(),
            });
        }
        Status {
            pid: serving.map_or(self.pid, |w| w.pid),
            generation: serving.map_or(self.generation, |w| w.generation),
            uptime_ms: millis(
                serving
                    .and_then(|w| w.serving_since)
                    .unwrap_or(self.started)
                    .elapsed(),
            ),
            listen: spec.map(|s| s.local_addrs()).unwrap_or_default(),
            plugin,
            in_flight: serving.map_or(0, |w| w.load.0),
            connections: serving.map_or(0, |w| w.load.1),
            last_upgrade: self.last_upgrade.clone(),
            draining: self
                .workers
                .values()
                .filter(|w| matches!(w.state, State::Draining | State::Standby))
                .map(|w| control::Draining {
                    pid: w.pid,
                    connections: w.load.1,
                })
                .collect(),
            supervisor: Some(SupervisorStatus {
                pid: self.pid,
                crashes: self.crashes,
                next_start_ms: self
                    .replace_at
                    .map(|at| millis(at.saturating_duration_since(now))),
                execs: self.execs,
                workers,
            }),
            phase: Some(self.phase().into()),
            tls: spec
                .map(|s| crate::tls::refreshed(&s.tls))
                .unwrap_or_default(),
        }
    }

    /// Follows the settings of the worker that serves now (signals, timeouts,
    /// probation). The pid file and control socket stay where this supervisor put them.
    fn take_config(&mut self, spec: &Spec) {
        let pid_file = self.config.pid_file.take();
        let control_socket = self.config.control_socket.take();
        self.config = Config {
            pid_file,
            control_socket,
            ..spec.config.clone()
        };
    }

    /// The service's phase, for `gem status`.
    fn phase(&self) -> &'static str {
        let delaying = self.delay_until.is_some_and(|until| Instant::now() < until);
        match (&self.stopping, &self.starting) {
            (Some(_), _) if delaying => "shutdown_delay",
            (Some(_), _) => "draining",
            (
                None,
                Some(Starting {
                    purpose: Purpose::Upgrade(_),
                    ..
                }),
            ) => "upgrading",
            _ => "serving",
        }
    }

    fn record(&mut self, result: &str, reason: &str, pid: Option<u32>) {
        self.last_upgrade = Some(LastUpgrade {
            result: result.into(),
            at_unix_ms: unix_ms(),
            reason: reason.into(),
            pid,
        });
    }
}

/// A supervisor's state across a re-exec of its binary: the fds stay open (without
/// close-on-exec) at the numbers recorded here.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    /// The supervisor's own configuration.
    config: String,
    /// Every fd below, for the claim.
    fds: Vec<RawFd>,
    control: Option<RawFd>,
    specs: Vec<SavedSpec>,
    /// Index into `specs`.
    last_good: Option<usize>,
    workers: Vec<SavedWorker>,
    generation: u64,
    crashes: u64,
    streak: u32,
    execs: u64,
    last_upgrade: Option<LastUpgrade>,
    replace_in_ms: Option<u64>,
    /// What the serving worker counts on from, and whose reports update it.
    carried: Option<Totals>,
    predecessor: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedSpec {
    json: String,
    plugin: RawFd,
    listeners: Vec<(String, RawFd)>,
    sha256: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedWorker {
    pid: u32,
    generation: u64,
    state: String,
    served_ms: Option<u64>,
    spec: usize,
    channel: Option<RawFd>,
    handler: Option<HandlerInfo>,
}

impl Supervisor {
    /// Re-executes the gem binary at the path this supervisor was started from, in
    /// place. Returns only if that failed, with why; then everything is as it was.
    fn reexec(&mut self) -> String {
        if let Some(s) = &self.starting {
            return format!("worker {} is starting; try again once it is ready", s.pid);
        }
        if let Some(p) = &self.probation {
            return format!(
                "worker {} is on probation; try again once it is over",
                p.new
            );
        }
        let (saved, keep) = match self.save() {
            Ok(saved) => saved,
            Err(e) => return format!("saving the state: {e}"),
        };
        let json = match serde_json::to_string(&saved) {
            Ok(json) => json,
            Err(e) => return format!("saving the state: {e}"),
        };
        let set_cloexec = |on: bool| -> std::io::Result<()> {
            for fd in &keep {
                // SAFETY-free: `keep` borrows fds this supervisor owns for its whole run.
                let flags = if on {
                    rustix::io::FdFlags::CLOEXEC
                } else {
                    rustix::io::FdFlags::empty()
                };
                rustix::io::fcntl_setfd(fd, flags)?;
            }
            Ok(())
        };
        let mut env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os()
            .filter(|(k, _)| {
                !k.to_string_lossy()
                    .starts_with(crate::config::INTERNAL_ENV_PREFIX)
            })
            .collect();
        env.push((crate::handover::ENV_SUPERVISOR_STATE.into(), json.into()));
        // The TLS ticket keys survive the re-exec in a sealed memfd, as they reach workers.
        let tickets = match crate::tls::sealed_ticket_keys() {
            Ok(fd) => fd,
            Err(e) => return format!("keeping the TLS ticket keys: {e}"),
        };
        if let Err(e) = rustix::io::fcntl_setfd(&tickets, rustix::io::FdFlags::empty()) {
            return format!("keeping the TLS ticket keys: {e}");
        }
        env.push((
            crate::handover::ENV_TICKETS_FD.into(),
            tickets.as_raw_fd().to_string().into(),
        ));
        let exec = match crate::exec::Exec::new(&self.launch.exe, &self.launch.args, env) {
            Ok(exec) => exec,
            Err(e) => return e.to_string(),
        };
        if let Err(e) = set_cloexec(false) {
            let _ = set_cloexec(true);
            return format!("keeping the sockets open: {e}");
        }
        info!(
            "[{}] re-executing {} (pid {} stays).",
            self.pid,
            self.launch.exe.display(),
            self.pid
        );
        let err = exec.exec_here();
        let _ = set_cloexec(true);
        format!("could not execute {}: {err}", self.launch.exe.display())
    }

    /// The state to carry across the exec, and the fds it names.
    fn save(&self) -> std::io::Result<(Saved, Vec<BorrowedFd<'_>>)> {
        let mut keep: Vec<BorrowedFd<'_>> = Vec::new();
        let mut specs: Vec<Arc<Spec>> = Vec::new();
        let index = |spec: &Arc<Spec>, specs: &mut Vec<Arc<Spec>>| {
            specs
                .iter()
                .position(|s| Arc::ptr_eq(s, spec))
                .unwrap_or_else(|| {
                    specs.push(spec.clone());
                    specs.len() - 1
                })
        };
        let mut workers = Vec::new();
        for w in self.workers.values() {
            let spec = index(&w.spec, &mut specs);
            let channel = w.channel.as_ref().map(|c| c.get_ref().as_raw_fd());
            if let Some(c) = &w.channel {
                keep.push(c.get_ref().as_fd());
            }
            workers.push(SavedWorker {
                pid: w.pid,
                generation: w.generation,
                state: w.state.name().into(),
                served_ms: w.serving_since.map(|s| millis(s.elapsed())),
                spec,
                channel,
                handler: w.handler.clone(),
            });
        }
        let last_good = self.last_good.as_ref().map(|s| index(s, &mut specs));
        let mut saved_specs = Vec::new();
        for spec in &specs {
            saved_specs.push(SavedSpec {
                json: spec.json.clone(),
                plugin: spec.plugin.as_raw_fd(),
                listeners: spec
                    .listeners
                    .iter()
                    .map(|(l, fd)| (l.clone(), fd.as_raw_fd()))
                    .collect(),
                sha256: spec.sha256.clone(),
            });
        }
        // The borrows must outlive `specs` (a local): take them from `self` instead.
        for spec in self
            .workers
            .values()
            .map(|w| &w.spec)
            .chain(self.last_good.as_ref())
        {
            keep.push(spec.plugin.as_fd());
            keep.extend(spec.listeners.iter().map(|(_, fd)| fd.as_fd()));
        }
        if let Some(fd) = &self.control_fd {
            keep.push(fd.as_fd());
        }
        let mut fds: Vec<RawFd> = keep.iter().map(AsRawFd::as_raw_fd).collect();
        fds.sort_unstable();
        fds.dedup();
        keep.sort_by_key(AsRawFd::as_raw_fd);
        keep.dedup_by_key(|fd| fd.as_raw_fd());
        let config = self
            .config
            .to_json()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let saved = Saved {
            config,
            fds,
            control: self.control_fd.as_ref().map(AsRawFd::as_raw_fd),
            specs: saved_specs,
            last_good,
            workers,
            generation: self.generation,
            crashes: self.crashes,
            streak: self.streak,
            execs: self.execs,
            last_upgrade: self.last_upgrade.clone(),
            replace_in_ms: self
                .replace_at
                .map(|at| millis(at.saturating_duration_since(tokio::time::Instant::now()))),
            carried: self.carried.clone(),
            predecessor: self.predecessor,
        };
        Ok((saved, keep))
    }

    /// Takes up the state a previous image of this supervisor saved.
    fn adopt(&mut self, mut state: crate::handover::SavedState) -> Result<(), Error> {
        let bad = |why: String| {
            Error::Fds(crate::handover::FdError::BadEnv {
                var: crate::handover::ENV_SUPERVISOR_STATE,
                value: why,
            })
        };
        let saved: Saved = serde_json::from_str(&state.json).map_err(|e| bad(e.to_string()))?;
        let mut take = |fd: RawFd| {
            state
                .fds
                .remove(&fd)
                .ok_or_else(|| bad(format!("fd {fd} is not in the list")))
        };
        let mut specs = Vec::new();
        for s in saved.specs {
            let config = Config::from_json(&s.json)?;
            let mut listeners = Vec::new();
            for (label, fd) in s.listeners {
                listeners.push((label, take(fd)?));
            }
            specs.push(Arc::new(Spec {
                tls: crate::tls::check_listeners(&config.listen).unwrap_or_default(),
                config,
                json: s.json,
                plugin: take(s.plugin)?,
                listeners,
                sha256: s.sha256,
            }));
        }
        let spec = |i: usize| {
            specs
                .get(i)
                .cloned()
                .ok_or_else(|| bad(format!("no spec {i}")))
        };
        for w in saved.workers {
            let channel = match w.channel {
                Some(fd) => {
                    let stream = std::os::unix::net::UnixStream::from(take(fd)?);
                    Some(
                        crate::wire::Wire::from_std(stream, crate::upgrade::MAX_LINE)
                            .map_err(|e| bad(e.to_string()))?,
                    )
                }
                None => None,
            };
            let state = match w.state.as_str() {
                "serving" => State::Serving,
                "standby" => State::Standby,
                _ => State::Draining,
            };
            self.workers.insert(
                w.pid,
                Worker {
                    pid: w.pid,
                    generation: w.generation,
                    state,
                    serving_since: w
                        .served_ms
                        .and_then(|ms| Instant::now().checked_sub(Duration::from_millis(ms))),
                    spec: spec(w.spec)?,
                    channel,
                    handler: w.handler,
                    totals: None,
                    load: (0, 0),
                },
            );
        }
        self.last_good = saved.last_good.map(spec).transpose()?;
        self.control_fd = saved.control.map(&mut take).transpose()?;
        self.generation = saved.generation;
        self.crashes = saved.crashes;
        self.streak = saved.streak;
        self.execs = saved.execs + 1;
        self.carried = saved.carried;
        self.predecessor = saved.predecessor;
        self.last_upgrade = saved.last_upgrade;
        self.ready_told = true;
        self.replace_at = saved
            .replace_in_ms
            .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        let pids: Vec<u32> = self.workers.keys().copied().collect();
        for pid in pids {
            self.read_reports(pid);
        }
        info!(
            "[{}] supervisor re-executed; adopted {} workers.",
            self.pid,
            self.workers.len()
        );
        Ok(())
    }
}

/// The configuration a re-executed supervisor had before the exec, from its saved
/// state.
pub(crate) fn saved_config(state: &str) -> Result<Config, ConfigError> {
    #[derive(Deserialize)]
    struct Only {
        config: String,
    }
    let only: Only = serde_json::from_str(state)
        .map_err(|e| ConfigError::from(figment::Error::from(e.to_string())))?;
    Config::from_json(&only.config)
}

/// The delay before replacement number `streak + 1` of a crash streak.
fn backoff(streak: u32) -> Duration {
    match streak {
        0 => Duration::ZERO,
        n => FIRST_BACKOFF
            .saturating_mul(1u32 << (n - 1).min(16))
            .min(MAX_BACKOFF),
    }
}

fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// `1.2s`, `250ms`.
pub(crate) fn seconds(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_starts_at_once_doubles_and_is_capped() {
        let ms = |n| backoff(n).as_millis();
        assert_eq!(
            (0..8).map(ms).collect::<Vec<_>>(),
            [0, 500, 1000, 2000, 4000, 8000, 16000, 30000]
        );
        assert_eq!(backoff(100), MAX_BACKOFF);
    }
}
