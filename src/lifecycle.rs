//! The lifecycle of one server process: start serving, turn each signal into its
//! `Action`, hand over to a new process on restart, drain on shutdown or after a
//! handover, then return.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ListenAddr};
use crate::drain::{DrainOutcome, DrainSignal};
use crate::error::Error;
use crate::fds::{Inherited, open_listeners};
use crate::handler::Handler;
use crate::plugin::LoadedPlugin;
use crate::server::{ServeContext, accept_loop};
use crate::signals::{Action, Signal, SignalRegistry};
use crate::upgrade::{
    Handover, Launch, ReadyChannel, UpgradeError, Upgraded, next_forwarded_restart,
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
    /// Shut down on a signal; `cut` connections were still open at `wait_timeout`.
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

/// The serving state of this process.
pub(crate) struct Generation {
    pid: u32,
    number: u64,
    config: Config,
    handler: Arc<dyn Handler>,
    listening: Vec<Listening>,
    drain: DrainSignal,
}

/// Loads the handler, opens the listeners and starts accepting.
pub(crate) async fn start(
    config: Config,
    source: HandlerSource,
    inherited: Inherited,
) -> Result<(Generation, Option<ReadyChannel>), (Error, Option<ReadyChannel>)> {
    let ready = inherited.ready.map(ReadyChannel::new);
    match start_serving(config, source, inherited.listeners, inherited.generation).await {
        Ok(generation) => Ok((generation, ready)),
        Err(err) => Err((err, ready)),
    }
}

async fn start_serving(
    config: Config,
    source: HandlerSource,
    inherited: Vec<(String, std::net::TcpListener)>,
    number: u64,
) -> Result<Generation, Error> {
    let pid = std::process::id();
    let handler = load_handler(source).await?;
    check_signal_hook(&config.signals, handler.as_ref())?;
    let sockets = open_listeners(&config.listen, inherited).map_err(|(addr, source)| {
        Error::Listen {
            addr: addr.spec,
            source,
        }
    })?;
    let drain = DrainSignal::new(config.idle_grace);
    let ctx = ServeContext::new(handler.clone(), config.limits, drain.clone());
    let mut listening = Vec::with_capacity(sockets.len());
    for (addr, socket) in sockets {
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
        info!("[{pid}] listening on http://{local} (listen = {:?})", addr.spec);
        listening.push(Listening {
            addr,
            local,
            fd,
            tracker,
        });
    }
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
    Ok(Generation {
        pid,
        number,
        config,
        handler,
        listening,
        drain,
    })
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

pub(crate) fn check_signal_hook(signals: &SignalRegistry, handler: &dyn Handler) -> Result<(), Error> {
    match signals.iter().find(|(_, a)| *a == Action::Plugin) {
        Some((signal, _)) if !handler.has_signal_hook() => Err(Error::NoSignalHook {
            signal,
            handler: handler.info().name,
        }),
        _ => Ok(()),
    }
}

/// What the loop does next.
enum Next {
    Continue,
    Shutdown,
    HandedOver(Upgraded),
}

type UpgradeTask = (JoinHandle<Result<Upgraded, UpgradeError>>, CancellationToken);

/// The event loop of a serving generation.
struct Lifecycle {
    generation: Generation,
    launch: Launch,
    upgrade: Option<UpgradeTask>,
    /// A restart asked for while an upgrade ran: at most one follow-up.
    pending_restart: bool,
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
            None => Ok(None),
        }
    }

    /// Runs the loop until shutdown or handover, then drains.
    pub(crate) async fn run(
        self,
        launch: Launch,
        mut signals: impl Stream<Item = Signal> + Unpin,
        mut parent: Option<BufReader<UnixStream>>,
    ) -> Result<Exit, Error> {
        let mut life = Lifecycle {
            generation: self,
            launch,
            upgrade: None,
            pending_restart: false,
        };
        let mut signals_open = true;
        let next = loop {
            let next = tokio::select! {
                sig = signals.next(), if signals_open => match sig {
                    Some(sig) => life.on_signal(sig),
                    None => { signals_open = false; Next::Continue }
                },
                joined = async { (&mut life.upgrade.as_mut()?.0).await.ok() },
                    if life.upgrade.is_some() => life.on_upgrade_done(joined).await,
                forwarded = async { next_forwarded_restart(parent.as_mut()?).await.then_some(()) },
                    if parent.is_some() => {
                    match forwarded {
                        Some(()) => life.request_restart(),
                        None => parent = None,
                    }
                    Next::Continue
                }
            };
            match next {
                Next::Continue => continue,
                other => break other,
            }
        };
        life.finish(next).await
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
                self.request_restart();
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

    /// Starts an upgrade, or books one follow-up if one is running.
    fn request_restart(&mut self) {
        let pid = self.pid();
        if self.upgrade.is_some() {
            if !self.pending_restart {
                info!("[{pid}] an upgrade is already running; one more will follow it.");
            }
            self.pending_restart = true;
            return;
        }
        info!("[{pid}] Restarting...");
        let g = &self.generation;
        let listeners: Vec<_> = g
            .listening
            .iter()
            .map(|l| (l.addr.spec.clone(), l.fd.as_fd()))
            .collect();
        let handover = match Handover::new(
            self.launch.clone(),
            &listeners,
            None,
            g.number + 1,
            g.config.upgrade_timeout,
        ) {
            Ok(h) => h,
            Err(err) => {
                error!("[{pid}] upgrade failed: {err}; process {pid} keeps serving.");
                return;
            }
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(handover.run(
            move |child| info!("[{pid}] Fork-exec to {child}."),
            cancel.clone(),
        ));
        self.upgrade = Some((task, cancel));
    }

    async fn on_upgrade_done(
        &mut self,
        joined: Option<Result<Upgraded, UpgradeError>>,
    ) -> Next {
        self.upgrade = None;
        let pid = self.pid();
        let result = joined.unwrap_or_else(|| {
            Err(UpgradeError::Io(std::io::Error::other(
                "the upgrade task panicked",
            )))
        });
        match result {
            Ok(mut upgraded) => {
                info!(
                    "[{pid}] process {} is ready (generation {}); handing over.",
                    upgraded.pid,
                    self.generation.number + 1
                );
                if std::mem::take(&mut self.pending_restart) {
                    match upgraded.forward_restart().await {
                        Ok(()) => info!("[{pid}] passed the pending restart to {}.", upgraded.pid),
                        Err(e) => warn!("[{pid}] could not pass the pending restart on: {e}"),
                    }
                }
                Next::HandedOver(upgraded)
            }
            Err(err) => {
                error!("[{pid}] upgrade failed: {err}; process {pid} keeps serving.");
                // The child may have written the pid file before it failed.
                if let Some(path) = &self.generation.config.pid_file {
                    if let Err(e) = write_pid_file(path, pid) {
                        warn!("[{pid}] {e}");
                    }
                }
                if std::mem::take(&mut self.pending_restart) {
                    self.request_restart();
                }
                Next::Continue
            }
        }
    }

    /// Stops a running upgrade (its child is killed and reaped), drains, cleans up.
    async fn finish(mut self, next: Next) -> Result<Exit, Error> {
        if let Some((task, cancel)) = self.upgrade.take() {
            cancel.cancel();
            if let Ok(Err(err)) = task.await {
                warn!("[{}] {err}", self.pid());
            }
        }
        let cut = self.generation.drain_all().await;
        match next {
            Next::HandedOver(upgraded) => Ok(Exit::HandedOver {
                to: upgraded.pid,
                cut,
            }),
            _ => {
                if let Some(path) = &self.generation.config.pid_file {
                    remove_pid_file(path, self.pid());
                }
                Ok(Exit::Shutdown { cut })
            }
        }
    }
}

impl Generation {
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
    let signals =
        signal_hook_tokio::Signals::new(numbers).map_err(Error::io("installing signal handlers"))?;
    Ok(signals.filter_map(|n| std::future::ready(Signal::from_number(n))))
}
