//! One generation of the server: load the handler, open (or adopt) the sockets, serve,
//! announce readiness, and drain with the reference's log lines.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::config::{Config, ListenAddr, METRICS_LABEL};
use crate::control::{self, Call};
use crate::drain::{DrainOutcome, DrainSignal};
use crate::error::Error;
use crate::handler::Handler;
use crate::handover::Inherited;
use crate::lifecycle::{Identity, Role};
use crate::listeners::open_listeners;
use crate::metrics::{Endpoint, Live, Metrics};
use crate::plugin::LoadedPlugin;
use crate::server::{Observers, ServeContext, spawn_accept_loop};
use crate::service::{Notice, notify, write_pid_file};
use crate::signals::{Action, SignalRegistry};
use crate::tls::TlsSetup;
use crate::upgrade::{Channel, ReadyChannel};

/// Where requests go.
#[derive(Clone)]
pub(crate) enum HandlerSource {
    /// A handler in this binary.
    InProcess(Arc<dyn Handler>),
    /// A plugin `.so`, loaded afresh by every generation.
    Plugin(PathBuf),
    /// The plugin `path`, from a sealed copy of it that a supervisor handed over.
    Copy {
        /// The plugin's path, for messages.
        path: PathBuf,
        /// The copy.
        copy: Arc<OwnedFd>,
    },
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
pub(crate) struct Listening {
    pub(crate) addr: ListenAddr,
    pub(crate) local: SocketAddr,
    pub(crate) tracker: TaskTracker,
    /// For a TLS listener: its rustls setup, read by this generation.
    pub(crate) tls: Option<TlsSetup>,
}

/// Duplicates of the sockets, kept for handing over to the next generation and for
/// resuming after a probation (the accept loops own the originals).
#[derive(Debug, Default)]
pub(crate) struct HandoverFds {
    /// Each listener's label (its `listen` entry as written) and socket.
    pub(crate) listeners: Vec<(String, OwnedFd)>,
    /// The metrics listener's label and socket.
    pub(crate) metrics: Option<(String, OwnedFd)>,
    pub(crate) control: Option<OwnedFd>,
}

impl HandoverFds {
    /// Duplicates of every fd.
    pub(crate) fn try_clone(&self) -> std::io::Result<HandoverFds> {
        Ok(HandoverFds {
            listeners: self
                .listeners
                .iter()
                .map(|(label, fd)| Ok((label.clone(), fd.try_clone()?)))
                .collect::<std::io::Result<_>>()?,
            metrics: match &self.metrics {
                Some((label, fd)) => Some((label.clone(), fd.try_clone()?)),
                None => None,
            },
            control: self.control.as_ref().map(OwnedFd::try_clone).transpose()?,
        })
    }
}

/// A drain of what one generation served, owned so that it can run on while the
/// generation serves again (a resume after a failed probation).
pub(crate) struct DrainJob {
    pid: u32,
    metrics: Metrics,
    drain: DrainSignal,
    listeners: Vec<(SocketAddr, TaskTracker)>,
    wait_timeout: Duration,
}

/// The control socket being served.
pub(crate) struct ControlSocket {
    pub(crate) path: PathBuf,
    /// Taken by the lifecycle loop.
    pub(crate) calls: Option<mpsc::Receiver<Call>>,
    pub(crate) stop: CancellationToken,
    /// Connections being answered, so a final reply is written before exit.
    pub(crate) answers: TaskTracker,
}

/// The serving state of this process.
pub(crate) struct Generation {
    pub(crate) pid: u32,
    pub(crate) number: u64,
    pub(crate) config: Config,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) listening: Vec<Listening>,
    pub(crate) control: Option<ControlSocket>,
    /// Taken by the runner for its spawner.
    pub(crate) handover: HandoverFds,
    pub(crate) drain: DrainSignal,
    pub(crate) started: Instant,
    /// The process that handed over to this one, for generations after the first.
    pub(crate) parent_pid: Option<u32>,
    pub(crate) role: Role,
    pub(crate) access_log: Option<AccessLog>,
    pub(crate) metrics: Metrics,
    /// What each request is reported to.
    pub(crate) observers: Observers,
    /// `true` while this generation takes traffic (`/readyz`); `false` from the moment
    /// a shutdown begins.
    pub(crate) ready: watch::Sender<bool>,
    /// The drain signal of what serves now, for the metrics' live counts.
    pub(crate) live_drain: watch::Sender<DrainSignal>,
    pub(crate) endpoint: Arc<Endpoint>,
    /// Stops the metrics listener: when another generation takes over (a shutdown
    /// keeps answering `/healthz` and `/readyz` until the exit).
    pub(crate) metrics_stop: CancellationToken,
    /// `true` once the predecessors' counters are in (at once for a first generation).
    pub(crate) based: watch::Sender<bool>,
    /// The metrics listener's task, which ends once its connections have.
    pub(crate) metrics_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Loads the handler, opens the listeners and the control socket, starts accepting.
/// On failure, the error comes back with the parent's ready channel, to report on.
pub(crate) async fn start(
    config: Config,
    source: HandlerSource,
    inherited: Inherited,
) -> Result<(Generation, Option<ReadyChannel>), (Error, Option<ReadyChannel>)> {
    let ready = inherited.ready.map(ReadyChannel::new);
    let (role, source) = match (inherited.worker, source) {
        (Some(worker), HandlerSource::Plugin(path)) => (
            Role::Worker {
                supervisor: worker.supervisor,
            },
            HandlerSource::Copy {
                path,
                copy: Arc::new(worker.plugin),
            },
        ),
        (Some(worker), source) => (
            Role::Worker {
                supervisor: worker.supervisor,
            },
            source,
        ),
        (None, source) => (
            Role::Alone {
                probation: config.probation,
            },
            source,
        ),
    };
    let started = start_serving(
        config,
        source,
        inherited.listeners,
        inherited.control,
        (inherited.generation, role),
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
    (number, role): (u64, Role),
) -> Result<Generation, Error> {
    let pid = std::process::id();
    let handler = load_handler(source).await?;
    check_signal_hook(&config.signals, handler.as_ref())?;
    let (sockets, metrics_socket): (Vec<_>, Vec<_>) = open_listeners(&config.sockets(), inherited)
        .map_err(|(addr, source)| Error::listen(addr.spec, source))?
        .into_iter()
        .partition(|(addr, _)| !addr.spec.starts_with(METRICS_LABEL));
    let access_log =
        AccessLog::open(&config.access_log, config.access_log_format).map_err(|e| match e {
            Error::File { path, source } => Error::AccessLog { path, source },
            other => other,
        })?;
    let metrics = Metrics::new(number, &handler.info());
    let drain = DrainSignal::new(config.idle_grace);
    let observers = Observers {
        metrics: config.metrics_listen.is_some().then(|| metrics.clone()),
        access_log: access_log.clone(),
        generation: number,
    };
    let ctx = ServeContext::new(
        handler.clone(),
        config.limits,
        drain.clone(),
        observers.clone(),
    );
    // Everything that can fail happens before the first accept: a process that fails
    // to start must not have taken a connection off a shared socket.
    let mut handover = HandoverFds::default();
    let mut prepared = Vec::with_capacity(sockets.len());
    for (addr, socket) in sockets {
        let (mut listening, listener, fd) = prepare_listener(addr, socket)?;
        listening.tls = load_tls(pid, &listening.addr)?;
        handover.listeners.push((listening.addr.spec.clone(), fd));
        prepared.push((listening, listener));
    }
    let mut metrics_listener = None;
    for (addr, socket) in metrics_socket {
        let fd = socket
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::io("duplicating a listener"))?;
        let listener = to_tokio(socket)?;
        handover.metrics = Some((addr.spec, fd));
        metrics_listener = Some(listener);
    }
    let control = match &config.control_socket {
        Some(path) => {
            let (control, fd) = open_control(path, inherited_control)?;
            handover.control = Some(fd);
            Some(control)
        }
        None => None,
    };
    if let Some(path) = &config.pid_file {
        write_pid_file(path, pid)?;
    }
    let mut listening = Vec::with_capacity(prepared.len());
    for (l, listener) in prepared {
        let tls = l.tls.as_ref().map(|t| t.acceptor.clone());
        spawn_accept_loop(listener, tls, ctx.clone(), &l.tracker);
        info!(
            "[{pid}] listening on {}://{} (listen = {:?})",
            l.addr.scheme(),
            l.local,
            l.addr.spec
        );
        listening.push(l);
    }
    if handler.info().sha256.is_none() && handler.info().abi.is_some() {
        // The plugin is hashed on a side thread: label the metrics once it is done.
        let (handler, metrics) = (handler.clone(), metrics.clone());
        tokio::spawn(async move {
            for _ in 0..600 {
                if let Some(sha256) = handler.info().sha256 {
                    metrics.set_sha256(sha256);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let metrics_stop = CancellationToken::new();
    let mut metrics_task = None;
    // A generation with predecessors counts on from theirs: until their totals are in
    // (or a second passed), its metrics would look like a reset, so the metrics
    // listener waits (connections queue, and the old generation still answers).
    let has_predecessor = number > 1 || matches!(role, Role::Worker { .. });
    let (based, _) = watch::channel(!has_predecessor);
    let (ready, _) = watch::channel(true);
    let (live_drain, _) = watch::channel(drain.clone());
    let endpoint = Arc::new(Endpoint {
        metrics: metrics.clone(),
        live: live(&live_drain, access_log.as_ref()),
        ready: ready.subscribe(),
    });
    if let Some(listener) = metrics_listener {
        info!(
            "[{pid}] metrics on http://{}/metrics (metrics_listen)",
            listener
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string())
        );
        let (endpoint, stop) = (endpoint.clone(), metrics_stop.clone());
        let mut based = based.subscribe();
        metrics_task = Some(tokio::spawn(async move {
            let _ = tokio::time::timeout(crate::runner::BASE_WAIT, based.wait_for(|b| *b)).await;
            crate::metrics::serve(listener, endpoint, stop).await;
        }));
    }
    log_handler(pid, handler.as_ref());
    Ok(Generation {
        pid,
        number,
        config,
        handler,
        listening,
        control,
        handover,
        drain,
        started: Instant::now(),
        parent_pid: (number > 1 && matches!(role, Role::Alone { .. }))
            .then(std::os::unix::process::parent_id),
        role,
        access_log,
        metrics,
        observers,
        ready,
        live_drain,
        endpoint,
        metrics_stop,
        based,
        metrics_task: std::sync::Mutex::new(metrics_task),
    })
}

/// What a scrape reads live: the current drain signal's counts (it is replaced when a
/// generation resumes) and the access log's dropped lines.
fn live(
    drain: &watch::Sender<DrainSignal>,
    log: Option<&AccessLog>,
) -> Arc<dyn Fn() -> Live + Send + Sync> {
    let drain = drain.subscribe();
    let log = log.cloned();
    Arc::new(move || {
        let d = drain.borrow();
        Live {
            in_flight: d.in_flight(),
            connections: d.connections(),
            dropped_log_lines: log.as_ref().map_or(0, AccessLog::dropped),
        }
    })
}

fn to_tokio(socket: std::net::TcpListener) -> Result<tokio::net::TcpListener, Error> {
    socket
        .set_nonblocking(true)
        .map_err(Error::io("configuring a listener"))?;
    tokio::net::TcpListener::from_std(socket).map_err(Error::io("registering a listener"))
}

fn prepare_listener(
    addr: ListenAddr,
    socket: std::net::TcpListener,
) -> Result<(Listening, tokio::net::TcpListener, OwnedFd), Error> {
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
    let serving = Listening {
        addr,
        local,
        tracker: TaskTracker::new(),
        tls: None,
    };
    Ok((serving, listener, fd))
}

/// Reads and checks a TLS listener's certificate and key (afresh in every generation,
/// so a restart rotates them), warning when the certificate expires soon.
fn load_tls(pid: u32, addr: &ListenAddr) -> Result<Option<TlsSetup>, Error> {
    let Some(files) = &addr.tls else {
        return Ok(None);
    };
    let setup = crate::tls::load(files).map_err(|source| Error::Tls {
        addr: addr.spec.clone(),
        source,
    })?;
    let info = &setup.info;
    if info.days_left < crate::tls::EXPIRY_WARNING_DAYS {
        warn!(
            "[{pid}] the TLS certificate {} of {} expires in {} days ({})",
            info.cert.display(),
            addr.spec,
            info.days_left,
            info.not_after
        );
    }
    info!("[{pid}] TLS on {}: {}", addr.spec, info.line());
    Ok(Some(setup))
}

/// Adopts the inherited control socket (a new generation never re-binds the live
/// path) or binds a fresh one, and starts answering on it.
fn open_control(
    path: &Path,
    inherited: Option<StdUnixListener>,
) -> Result<(ControlSocket, OwnedFd), Error> {
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
    let control = ControlSocket {
        path: path.to_owned(),
        calls: Some(calls),
        stop,
        answers,
    };
    Ok((control, fd))
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
        HandlerSource::Plugin(path) => load_plugin(path, None).await,
        HandlerSource::Copy { path, copy } => load_plugin(path, Some(copy)).await,
    }
}

async fn load_plugin(path: PathBuf, copy: Option<Arc<OwnedFd>>) -> Result<Arc<dyn Handler>, Error> {
    {
        {
            // A plugin's init may block; keep it off the I/O threads.
            let loaded = tokio::task::spawn_blocking(move || match copy {
                // A path of its own, so reading it does not move the shared offset.
                Some(fd) => LoadedPlugin::load_from(
                    &path,
                    Path::new(&format!("/proc/self/fd/{}", fd.as_raw_fd())),
                ),
                None => LoadedPlugin::load(&path),
            })
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

impl Generation {
    /// Who this generation is, for the lifecycle.
    pub(crate) fn identity(&self) -> Identity {
        Identity {
            pid: self.pid,
            generation: self.number,
            parent_pid: self.parent_pid,
            started: self.started,
            listen: self.listening.iter().map(|l| l.local.to_string()).collect(),
            tls: self
                .listening
                .iter()
                .filter_map(|l| {
                    l.tls.as_ref().map(|t| crate::control::ListenerTls {
                        listen: l.addr.spec.clone(),
                        cert: t.info.clone(),
                    })
                })
                .collect(),
            handler: self.handler.clone(),
            role: self.role,
        }
    }

    /// Reopens the access log (logrotate moved the file).
    pub(crate) fn reopen_log(&self) {
        if let Some(log) = &self.access_log {
            log.reopen();
        }
    }

    /// The handler, as a worker reports it to its supervisor.
    fn report_handler(&self) -> Option<crate::handler::HandlerInfo> {
        matches!(self.role, Role::Worker { .. }).then(|| self.handler.info())
    }

    /// The drain of what this generation serves now, to run on its own.
    pub(crate) fn drain_job(&self) -> DrainJob {
        DrainJob {
            pid: self.pid,
            metrics: self.metrics.clone(),
            drain: self.drain.clone(),
            listeners: self
                .listening
                .iter()
                .map(|l| (l.local, l.tracker.clone()))
                .collect(),
            wait_timeout: self.config.wait_timeout,
        }
    }

    /// Serves again on the same sockets after a drain began (a probation that failed,
    /// or a supervisor's resume): fresh accept loops, and the control socket answered
    /// again. The connections of the earlier drain finish on their own. Returns the
    /// new drain signal and the control socket's calls.
    pub(crate) fn resume(&mut self) -> Result<(DrainSignal, Option<mpsc::Receiver<Call>>), Error> {
        let drain = DrainSignal::new(self.config.idle_grace);
        let ctx = ServeContext::new(
            self.handler.clone(),
            self.config.limits,
            drain.clone(),
            self.observers.clone(),
        );
        if let Some((_, fd)) = &self.handover.metrics {
            let fd = fd
                .try_clone()
                .map_err(Error::io("duplicating a listener"))?;
            let listener = to_tokio(std::net::TcpListener::from(fd))?;
            self.metrics_stop = CancellationToken::new();
            let task = tokio::spawn(crate::metrics::serve(
                listener,
                self.endpoint.clone(),
                self.metrics_stop.clone(),
            ));
            if let Ok(mut slot) = self.metrics_task.lock() {
                *slot = Some(task);
            }
        }
        self.live_drain.send_replace(drain.clone());
        self.ready.send_replace(true);
        for (l, (_, fd)) in self.listening.iter_mut().zip(&self.handover.listeners) {
            let fd = fd
                .try_clone()
                .map_err(Error::io("duplicating a listener"))?;
            let listener = std::net::TcpListener::from(fd);
            listener
                .set_nonblocking(true)
                .map_err(Error::io("configuring a listener"))?;
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(Error::io("registering a listener"))?;
            l.tracker = TaskTracker::new();
            let tls = l.tls.as_ref().map(|t| t.acceptor.clone());
            spawn_accept_loop(listener, tls, ctx.clone(), &l.tracker);
        }
        self.drain = drain.clone();
        let mut calls = None;
        if let (Some(control), Some(fd)) = (&mut self.control, &self.handover.control) {
            let file_err = |source| Error::File {
                path: control.path.clone(),
                source,
            };
            let listener = StdUnixListener::from(fd.try_clone().map_err(file_err)?);
            listener.set_nonblocking(true).map_err(file_err)?;
            let listener = tokio::net::UnixListener::from_std(listener).map_err(file_err)?;
            let (tx, rx) = mpsc::channel(16);
            control.stop = CancellationToken::new();
            control.answers = TaskTracker::new();
            tokio::spawn(control::serve(
                listener,
                tx,
                control.stop.clone(),
                control.answers.clone(),
            ));
            calls = Some(rx);
        }
        Ok((drain, calls))
    }

    /// Announces that this generation serves: the log line, then `ready` to the old
    /// process (whose channel comes back) or `READY=1` to systemd.
    pub(crate) async fn announce(&self, ready: Option<ReadyChannel>) -> Option<Channel> {
        info!("Server started at process {}", self.pid);
        match ready {
            Some(channel) => match channel.ready(self.report_handler()).await {
                Ok(stream) => Some(stream),
                Err(err) => {
                    // The old process is gone: this one is all there is, so it serves on.
                    warn!(
                        "[{}] could not tell the old process we are ready: {err}",
                        self.pid
                    );
                    None
                }
            },
            None => {
                notify(&Notice::Ready { status: None });
                None
            }
        }
    }

    /// Lets control replies already decided reach their clients before the exit.
    pub(crate) async fn flush_answers(&self) {
        if let Some(control) = &self.control {
            control.answers.close();
            let _ = tokio::time::timeout(Duration::from_secs(1), control.answers.wait()).await;
        }
    }
}

impl DrainJob {
    /// The drain, with the reference's log lines. Returns how many connections were cut.
    pub(crate) async fn run(self) -> usize {
        let pid = self.pid;
        let began = Instant::now();
        for (local, _) in &self.listeners {
            info!("[{pid}] shutting down the server({local})...");
        }
        self.drain.begin();
        let deadline = tokio::time::Instant::now() + self.wait_timeout;
        let trackers: Vec<_> = self.listeners.iter().map(|(_, t)| t.clone()).collect();
        let outcomes = self.drain.finish(&trackers, deadline).await;
        let mut total = 0;
        for ((local, _), outcome) in self.listeners.iter().zip(outcomes) {
            match outcome {
                DrainOutcome::Clean => info!("[{pid}] server({local}) shutdown successfully."),
                DrainOutcome::TimedOut { cut } => {
                    total += cut;
                    warn!(
                        "[{pid}] server({local}) has been shutdown, but some existing connections reach error: timeout. ({cut} cut after {})",
                        humantime::format_duration(self.wait_timeout)
                    );
                }
            }
        }
        info!("[{pid}] all of old servers have been shutdown successfully.");
        self.metrics.drained(began.elapsed(), total);
        total
    }
}
