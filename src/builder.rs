//! The library API, the Rust face of the Go original's `SetSignal`, `LoadConfig` and
//! `ServerConfig`: build a [`Server`] in code and run it.

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::Stream;

use crate::config::{Config, ListenAddr, ServerConfig, TlsFiles};
use crate::error::Error;
use crate::generation::{Exit, HandlerSource, start};
use crate::handler::{FnHandler, Request, Response};
use crate::handover::take_inherited;
use crate::lifecycle::Phase;
use crate::runner::ProcessSpawner;
use crate::signals::{Action, Signal, os_signals};
use crate::upgrade::Launch;

/// Builds a [`Server`]. See [`Server::builder`].
#[must_use]
pub struct Builder {
    listen: Vec<(String, Option<TlsFiles>)>,
    handler: Option<HandlerSource>,
    config: Config,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("listen", &self.listen)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Adds a listen address (`IP:PORT`, `[IPv6]:PORT` or `:PORT`). Without any, gem
    /// listens on 127.0.0.1:8080.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen.push((addr.into(), None));
        self
    }

    /// Adds a TLS listen address, with its certificate chain (PEM) and private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1). Every generation reads both files afresh, so a
    /// restart rotates them; a file that cannot be used fails the start, naming it.
    pub fn listen_tls(
        mut self,
        addr: impl Into<String>,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        let files = TlsFiles {
            cert: cert.into(),
            key: key.into(),
        };
        self.listen.push((addr.into(), Some(files)));
        self
    }

    /// Serves with an in-process handler function.
    pub fn handler<F>(mut self, f: F) -> Self
    where
        F: Fn(&Request<'_>) -> Response + Send + Sync + 'static,
    {
        let name = std::any::type_name::<F>().to_owned();
        self.handler = Some(HandlerSource::InProcess(Arc::new(FnHandler::new(name, f))));
        self
    }

    /// Serves with a handler plugin `.so`, loaded by every generation afresh.
    pub fn plugin(mut self, path: impl Into<PathBuf>) -> Self {
        self.handler = Some(HandlerSource::Plugin(path.into()));
        self
    }

    /// Maps `signal` to `action`, as `SetSignal` did. Refuses SIGTERM (always
    /// shutdown) and the signals that cannot be mapped.
    pub fn signal(mut self, signal: Signal, action: Action) -> Result<Self, Error> {
        self.config
            .signals
            .set(signal, action)
            .map_err(|source| Error::Signal { signal, source })?;
        Ok(self)
    }

    /// Applies the non-zero fields of `config`, as `LoadConfig` did.
    pub fn load_config(mut self, config: ServerConfig) -> Self {
        self.config.apply(&config);
        self
    }

    /// Writes the serving process's pid to `path` (atomically, on every generation).
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.pid_file = Some(path.into());
        self
    }

    /// Answers `gem status`, `gem reload` and `gem stop` on a unix socket at `path`
    /// (mode 0600; none unless set).
    pub fn control_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.control_socket = Some(path.into());
        self
    }

    /// Checks the settings.
    pub fn build(mut self) -> Result<Server, Error> {
        let handler = self.handler.ok_or(Error::NoHandler)?;
        if !self.listen.is_empty() {
            self.config.listen = self
                .listen
                .iter()
                .map(|(s, tls)| {
                    let addr = ListenAddr::parse(s)?;
                    Ok(match tls {
                        Some(files) => addr.with_tls(files.clone()),
                        None => addr,
                    })
                })
                .collect::<Result<_, _>>()
                .map_err(|message| {
                    Error::Config(crate::config::ConfigError::Invalid {
                        key: "listen".into(),
                        origin: String::new(),
                        message,
                    })
                })?;
        }
        Ok(Server::new(self.config, handler))
    }
}

/// A gem server: serves until shut down, upgrades itself on restart.
///
/// ```
/// use gem::{Action, Exit, Response, Server, ServerConfig, Signal};
/// use std::time::Duration;
///
/// # #[tokio::main] async fn main() -> Result<(), gem::Error> {
/// let server = Server::builder()
///     .listen("127.0.0.1:0")
///     .handler(|_req| Response::text(200, "Hello world."))
///     .signal(Signal::USR2, Action::Restart)?
///     .load_config(ServerConfig {
///         wait_timeout: Duration::from_secs(30),
///         ..Default::default()
///     })
///     .build()?;
/// // `server.run().await` reacts to real signals; here one SIGTERM is injected.
/// let exit = server
///     .run_with_signals(futures_util::stream::iter([Signal::TERM]))
///     .await?;
/// assert_eq!(exit, Exit::Shutdown { cut: 0 });
/// # Ok(())
/// # }
/// ```
pub struct Server {
    config: Config,
    handler: HandlerSource,
    phase: tokio::sync::watch::Sender<Phase>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Starts building a server with the defaults.
    pub fn builder() -> Builder {
        Builder {
            listen: Vec::new(),
            handler: None,
            config: Config::default(),
        }
    }

    fn new(config: Config, handler: HandlerSource) -> Server {
        Server {
            config,
            handler,
            phase: tokio::sync::watch::Sender::new(Phase::Starting),
        }
    }

    /// A server exactly as a loaded config file describes it, serving its plugin.
    pub fn from_config(config: Config) -> Server {
        Server::new(config.clone(), HandlerSource::Plugin(config.handler))
    }

    /// The server's phase as it runs: starting, serving, upgrading, draining, exited.
    /// Wait for one with [`tokio::sync::watch::Receiver::wait_for`].
    pub fn phases(&self) -> tokio::sync::watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// The effective configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serves, reacting to real Unix signals, until shut down or handed over.
    pub async fn run(self) -> Result<Exit, Error> {
        let signals =
            os_signals(&self.config.signals).map_err(Error::io("installing signal handlers"))?;
        self.run_with_signals(signals).await
    }

    /// Serves, taking signals from `signals` instead of the OS (for tests and embedding).
    pub async fn run_with_signals(
        self,
        signals: impl Stream<Item = Signal> + Unpin,
    ) -> Result<Exit, Error> {
        let phase = self.phase;
        let exit = serve(self.config, self.handler, signals, &phase).await;
        phase.send_replace(Phase::Exited);
        exit
    }
}

async fn serve(
    config: Config,
    handler: HandlerSource,
    signals: impl Stream<Item = Signal> + Unpin,
    phase: &tokio::sync::watch::Sender<Phase>,
) -> Result<Exit, Error> {
    let launch = Launch::current().map_err(Error::io("recording how gem was started"))?;
    let upgrade_timeout = config.upgrade_timeout;
    let (generation, ready) = match start(config, handler, take_inherited()?).await {
        Ok(started) => started,
        Err((err, ready)) => {
            if let Some(ready) = ready {
                ready.fail(&err.to_string());
            }
            return Err(err);
        }
    };
    let parent = generation.announce(ready).await;
    let fds = generation
        .handover
        .try_clone()
        .map_err(Error::io("duplicating the sockets"))?;
    let mut listeners = fds.listeners;
    listeners.extend(fds.metrics);
    let spawner = ProcessSpawner::new(launch, listeners, fds.control, upgrade_timeout);
    crate::runner::run(generation, spawner, signals, parent, phase.clone()).await
}

/// Everything `gem serve` would check before serving, without serving: loads the
/// plugin through the full handshake and checks the `plugin` signal action has a hook.
pub fn check(config: &Config) -> Result<crate::handler::HandlerInfo, Error> {
    crate::tls::check_listeners(&config.listen)?;
    let plugin = crate::plugin::LoadedPlugin::load(&config.handler)?;
    crate::generation::check_signal_hook(&config.signals, &plugin)?;
    Ok(crate::handler::HandlerInfo {
        sha256: plugin.wait_for_sha256(),
        ..crate::handler::Handler::info(&plugin)
    })
}

/// For a process started by an upgrade that fails before it can build a [`Server`]
/// (a broken config): tells the waiting parent why.
pub fn report_startup_failure(reason: &str) {
    if let Ok(inherited) = take_inherited()
        && let Some(ready) = inherited.ready
    {
        crate::upgrade::ReadyChannel::new(ready).fail(reason);
    }
}

/// How `gem serve` should run this process, from what it inherited (call
/// [`crate::claim_handover`] first).
#[derive(Debug)]
pub enum Role {
    /// A worker of a supervisor, with the configuration the supervisor handed it.
    Worker(Box<Config>),
    /// A supervisor that re-executed itself: supervise again, with the configuration
    /// it had (gem.toml is read again at the next restart, not now: a broken edit must
    /// not take the service down with the exec).
    Supervisor(Box<Config>),
    /// Nothing inherited from a supervisor: load the configuration and decide.
    Fresh,
}

/// What this process was started as. A worker's configuration is the one its
/// supervisor loaded (it reached ready before, or is the one being upgraded to), not
/// what is on disk now.
pub fn role() -> Result<Role, crate::config::ConfigError> {
    match crate::handover::claimed_role() {
        (Some(json), _) => {
            let mut config = Config::from_json(&json)?;
            // The supervisor's.
            config.pid_file = None;
            config.control_socket = None;
            Ok(Role::Worker(Box::new(config)))
        }
        (None, Some(state)) => Ok(Role::Supervisor(Box::new(crate::supervisor::saved_config(
            &state,
        )?))),
        (None, None) => Ok(Role::Fresh),
    }
}
