//! Configuration: built-in defaults < `gem.toml` < `GEM_*` environment < command-line
//! flags, merged with figment and validated into a typed [`Config`] in one place.
//!
//! # Adding a setting
//!
//! 1. Add a documented field to [`Config`] (or to [`Limits`] for a per-request limit),
//!    with `#[serde(with = "format::duration")]` / `"format::size"` if it is one.
//! 2. Give it its default in that struct's `Default` impl.
//!
//! The key list, `GEM_<KEY>`, unknown-key errors and `gem check` follow from the struct;
//! add a rule to `problem()` if some values are invalid, a flag to `gem serve` if it
//! deserves one, and a line to `gem.toml` and the README.

mod format;
mod layers;
mod server_config;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use serde::{Deserialize, Serialize};

pub use format::parse_duration;
pub use layers::ENV_PREFIX;
pub use server_config::ServerConfig;

use crate::signals::SignalRegistry;

/// How the metrics listener's label starts, in a handover.
pub const METRICS_LABEL: &str = "metrics:";

/// The config file read when `--config` is not given (a missing one is fine).
pub const DEFAULT_CONFIG_FILE: &str = "gem.toml";

/// Environment variables gem sets for its own children during an upgrade; not config.
pub const INTERNAL_ENV_PREFIX: &str = "GEM_HANDOVER_";

/// hyper's own HTTP/1 header-count limit, and so gem's default `max_headers`: hyper
/// parses up to this many headers without allocating.
pub(crate) const HYPER_MAX_HEADERS: usize = 100;

/// hyper's own HTTP/1 buffer bound (its default `max_buf_size`): what it buffers of a
/// request head as it reads one, and what it queues of a response before writing.
pub(crate) const HYPER_MAX_BUF: usize = 8192 + 4096 * 100;

/// The smallest `max_header_size` accepted: a request line and a few headers.
const MIN_HEADER_SIZE: usize = 8 * 1024;

/// A configuration problem, naming the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that does not exist.
    #[error("config file {} does not exist", .0.display())]
    MissingFile(PathBuf),
    /// A value of the wrong type or form, or a file that is not TOML; each error names
    /// its key and source.
    #[error("{}", layers::figment_message(.0))]
    Parse(Box<figment::Error>),
    /// A key that is not a setting.
    #[error("unknown key `{key}`{origin}; the settings are {valid}")]
    UnknownKey {
        /// The key as written.
        key: String,
        /// ` in /path/gem.toml` or similar.
        origin: String,
        /// Every setting, comma-separated.
        valid: String,
    },
    /// A value that parsed but breaks a rule.
    #[error("invalid `{key}`{origin}: {message}")]
    Invalid {
        /// The offending key, e.g. `listen` or `signals.TERM`.
        key: String,
        /// ` in /path/gem.toml` or similar; empty for built-in defaults.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

impl From<figment::Error> for ConfigError {
    fn from(err: figment::Error) -> Self {
        ConfigError::Parse(Box::new(err))
    }
}

/// The fully validated configuration. Its serialization is the defaults layer and the
/// list of keys; each field is a key of `gem.toml` (the [`Limits`] fields too).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The config file that was read, if any.
    #[serde(skip)]
    pub file: Option<PathBuf>,
    /// Addresses to serve on.
    pub listen: Vec<ListenAddr>,
    /// The handler plugin `.so`.
    #[serde(deserialize_with = "format::relative_path")]
    pub handler: PathBuf,
    /// How long a drain may take before remaining connections are cut.
    #[serde(with = "format::duration")]
    pub wait_timeout: Duration,
    /// How long a new process has to report ready during a restart.
    #[serde(with = "format::duration")]
    pub upgrade_timeout: Duration,
    /// During a drain, how long an idle keep-alive connection may stay open in case a
    /// request is already on its way.
    #[serde(with = "format::duration")]
    pub idle_grace: Duration,
    /// Where the serving process writes its pid (always set when loaded).
    #[serde(deserialize_with = "format::relative_path_opt")]
    pub pid_file: Option<PathBuf>,
    /// The control socket path (always set when loaded: by default the pid file's path
    /// with the extension `.sock`).
    #[serde(deserialize_with = "format::relative_path_opt")]
    pub control_socket: Option<PathBuf>,
    /// Per-request limits: top-level keys too. Read by a second extraction (see
    /// `Config::extract`), so that their errors keep their key.
    #[serde(flatten, skip_deserializing)]
    pub limits: Limits,
    /// Whether a supervisor process keeps the sockets and runs each generation as a
    /// worker: `true`, `false` or `"auto"` (on when gem is PID 1).
    pub supervise: Supervise,
    /// How long an old generation stays loaded after a new one takes over, ready to
    /// resume serving if the new one dies; zero turns it off.
    #[serde(with = "format::duration")]
    pub probation: Duration,
    /// Where gem serves `/metrics`, `/healthz` and `/readyz` (not the plugin); written
    /// `"off"` (the default) for none.
    #[serde(with = "format::optional_listen")]
    pub metrics_listen: Option<ListenAddr>,
    /// On a shutdown, how long `/readyz` answers 503 while gem still accepts and serves,
    /// so that load balancers stop sending before the drain begins.
    #[serde(with = "format::duration")]
    pub shutdown_delay: Duration,
    /// Where each request is logged: `"off"`, `"stderr"` or a file path.
    pub access_log: AccessLog,
    /// How: `"combined"` (Apache/nginx) or `"json"` (one object per line).
    pub access_log_format: AccessLogFormat,
    /// What each signal does.
    #[serde(with = "format::signal_table")]
    pub signals: SignalRegistry,
}

/// The `access_log` setting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLog {
    /// No access log (`"off"`).
    #[default]
    Off,
    /// To standard error (`"stderr"`).
    Stderr,
    /// Appended to this file (relative paths are relative to the config file).
    File(PathBuf),
}

/// The `access_log_format` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// The combined log format of Apache and nginx, with the duration in
    /// microseconds, the protocol's generation and gem's generation appended.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

/// The `supervise` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Supervise {
    /// Always run a supervisor (`true`).
    On,
    /// Never (`false`).
    Off,
    /// When gem is PID 1 (a container's init), whose exit would end every process of
    /// its namespace (`"auto"`).
    #[default]
    Auto,
}

impl Supervise {
    /// Whether this process should supervise.
    pub fn enabled(self) -> bool {
        match self {
            Supervise::On => true,
            Supervise::Off => false,
            Supervise::Auto => std::process::id() == 1,
        }
    }
}

impl Default for Config {
    /// The built-in defaults, without a pid file or control socket (library use).
    fn default() -> Self {
        Config {
            file: None,
            listen: ListenAddr::parse("127.0.0.1:8080").into_iter().collect(),
            handler: PathBuf::from("handler.so"),
            // As in the Go original.
            wait_timeout: Duration::from_secs(15),
            upgrade_timeout: Duration::from_secs(30),
            idle_grace: Duration::from_millis(500),
            pid_file: None,
            control_socket: None,
            limits: Limits::default(),
            supervise: Supervise::Auto,
            probation: Duration::from_secs(3),
            metrics_listen: None,
            shutdown_delay: Duration::ZERO,
            access_log: AccessLog::Off,
            access_log_format: AccessLogFormat::Combined,
            signals: SignalRegistry::default(),
        }
    }
}

/// Limits that protect the server from slow or oversized requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// A client must send each request head within this time, from the connection's
    /// start or its last response; a connection that does not is closed.
    #[serde(with = "format::duration")]
    pub header_read_timeout: Duration,
    /// Largest accepted request body; larger ones get 413.
    #[serde(with = "format::size")]
    pub max_body_size: u64,
    /// Largest accepted request head (request line + headers), in bytes.
    #[serde(with = "format::size")]
    pub max_header_size: usize,
    /// Most headers accepted in one request.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_body_size: 1024 * 1024,
            max_header_size: 64 * 1024,
            max_headers: HYPER_MAX_HEADERS,
        }
    }
}

impl Limits {
    /// The first rule broken, as (key, what is wrong).
    fn problem(&self) -> Option<(&'static str, &'static str)> {
        [
            (
                "header_read_timeout",
                self.header_read_timeout.is_zero(),
                POSITIVE,
            ),
            (
                "max_header_size",
                self.max_header_size < MIN_HEADER_SIZE,
                "must be at least 8 KiB",
            ),
            ("max_headers", self.max_headers == 0, "must be at least 1"),
        ]
        .into_iter()
        .find_map(|(key, broken, message)| broken.then_some((key, message)))
    }
}

const POSITIVE: &str = "must be greater than 0";

/// One listen address: what the user wrote and the socket address it means. Written
/// in the config as its `spec`, or as a table `{ addr = SPEC, tls_cert = FILE,
/// tls_key = FILE }` for a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    /// As written, e.g. `127.0.0.1:0` or `:8080`. Also the name an inherited socket is
    /// matched by, so port 0 survives a restart.
    pub spec: String,
    /// The address to bind.
    pub addr: SocketAddr,
    /// For a TLS listener: its certificate and key files, read afresh by every
    /// generation (so a restart rotates them).
    pub tls: Option<TlsFiles>,
}

/// The files of a TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM, leaf first (`tls_cert`).
    pub cert: PathBuf,
    /// The private key, PEM: PKCS#8, PKCS#1 or SEC1 (`tls_key`).
    pub key: PathBuf,
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

impl ListenAddr {
    /// Parses `IP:PORT`, `[IPv6]:PORT` or `:PORT` (all IPv4 interfaces).
    pub fn parse(spec: &str) -> Result<ListenAddr, String> {
        let text = spec.trim();
        let full = match text.strip_prefix(':') {
            Some(port) => format!("0.0.0.0:{port}"),
            None => text.to_owned(),
        };
        let addr = full.parse::<SocketAddr>().map_err(|_| {
            format!("{spec:?} is not an address like 127.0.0.1:8080, [::1]:8080 or :8080")
        })?;
        Ok(ListenAddr {
            spec: text.to_owned(),
            addr,
            tls: None,
        })
    }

    /// The same address served over TLS with `tls`.
    pub fn with_tls(self, tls: TlsFiles) -> ListenAddr {
        ListenAddr {
            tls: Some(tls),
            ..self
        }
    }

    /// `https` for a TLS listener, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }
}

impl Config {
    /// Loads `file` (or `gem.toml` if it exists when `file` is `None`), the `GEM_*`
    /// environment and `flags` (the settings given on the command line; fields that
    /// serialize to nothing leave the lower layers alone; `&()` for none), and
    /// validates the result.
    pub fn load(file: Option<&Path>, flags: &impl Serialize) -> Result<Config, ConfigError> {
        let file = locate(file)?;
        let figment = layers::figment(file.as_deref(), flags);
        layers::check_keys(&figment, &Config::keys())?;
        let mut config = Config::extract(&figment)?;
        if let Some((key, message)) = config.problem() {
            return Err(layers::invalid(&figment, key, message));
        }
        if config.control_socket.is_none() {
            config.control_socket = config.pid_file.as_ref().map(|p| p.with_extension("sock"));
        }
        config.file = file;
        Ok(config)
    }

    /// A configuration written by [`Config::to_json`]: the one a supervisor hands its
    /// worker, or keeps across a re-exec of itself.
    pub fn from_json(json: &str) -> Result<Config, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| ConfigError::from(figment::Error::from(e.to_string())))?;
        let figment = Figment::from(figment::providers::Serialized::defaults(value));
        Config::extract(&figment)
    }

    /// This configuration as JSON, for a worker.
    pub fn to_json(&self) -> Result<String, ConfigError> {
        serde_json::to_string(self)
            .map_err(|e| ConfigError::from(figment::Error::from(e.to_string())))
    }

    /// Every socket to open: the `listen` addresses, then the metrics listener's, whose
    /// label starts with [`METRICS_LABEL`] (so a handover tells them apart).
    pub fn sockets(&self) -> Vec<ListenAddr> {
        let mut all = self.listen.clone();
        all.extend(self.metrics_listen.as_ref().map(|m| ListenAddr {
            spec: format!("{METRICS_LABEL}{}", m.spec),
            addr: m.addr,
            tls: None,
        }));
        all
    }

    /// The defaults of `gem serve`: [`Config::default`] with a pid file.
    fn serving_defaults() -> Config {
        Config {
            pid_file: Some(PathBuf::from("gem.pid")),
            ..Config::default()
        }
    }

    /// Every key gem understands, as written in `gem.toml` and (upper-cased,
    /// `GEM_`-prefixed) in the environment: the keys of the serialized defaults.
    pub fn keys() -> Vec<String> {
        let entries = format::ordered_entries(&Config::default()).unwrap_or_default();
        entries.into_iter().map(|(key, _)| key).collect()
    }

    /// Deserializes the merged layers, without validating.
    fn extract(figment: &Figment) -> Result<Config, ConfigError> {
        let mut config: Config = figment.extract()?;
        config.limits = figment.extract()?;
        Ok(config)
    }

    /// The first rule broken, as (key, what is wrong).
    fn problem(&self) -> Option<(&'static str, &'static str)> {
        let metrics_taken = self
            .metrics_listen
            .as_ref()
            // Port 0 is a fresh port for each; a wildcard address takes its port on
            // every address.
            .is_some_and(|m| {
                m.addr.port() != 0
                    && self.listen.iter().any(|l| {
                        l.addr.port() == m.addr.port()
                            && (l.addr.ip() == m.addr.ip()
                                || l.addr.ip().is_unspecified()
                                || m.addr.ip().is_unspecified())
                    })
            });
        [
            (
                "listen",
                self.listen.is_empty(),
                "needs at least one address",
            ),
            (
                "metrics_listen",
                metrics_taken,
                "is also an address of `listen`; metrics need an address of their own",
            ),
            ("wait_timeout", self.wait_timeout.is_zero(), POSITIVE),
            ("upgrade_timeout", self.upgrade_timeout.is_zero(), POSITIVE),
        ]
        .into_iter()
        .find_map(|(key, broken, message)| broken.then_some((key, message)))
        .or_else(|| self.limits.problem())
    }

    /// The effective settings as `gem check` prints them: every key in declaration
    /// order, the plugin after the handler, then the signal table.
    pub fn describe(&self, handler: &crate::handler::HandlerInfo) -> String {
        use std::fmt::Write as _;
        let line = |out: &mut String, key: &str, value: &str| {
            let _ = writeln!(out, "{:<20} {value}", format!("{key}:"));
        };
        let mut out = String::new();
        let file = self.file.as_deref().map(Path::display);
        let file = file.map_or("(none: built-in defaults)".into(), |f| f.to_string());
        line(&mut out, "config file", &file);
        match format::ordered_entries(self) {
            Ok(entries) => {
                for (key, value) in entries.iter().filter(|(key, _)| key != "signals") {
                    line(&mut out, key, &format::show(value));
                    if key == "handler" {
                        line(&mut out, "plugin", &plugin_line(handler));
                    }
                }
            }
            Err(err) => line(&mut out, "settings", &format!("cannot be listed: {err}")),
        }
        let _ = writeln!(out, "signals:");
        for (sig, action) in self.signals.iter() {
            let _ = writeln!(out, "  {:<10} {action}", sig.name());
        }
        let _ = writeln!(out, "  (any other signal keeps its OS default action)");
        out
    }

    /// `GEM_*` variables that are neither config keys nor gem's own, for a warning.
    pub fn unknown_env_vars() -> Vec<String> {
        let keys = Config::keys();
        std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with(ENV_PREFIX) && !k.starts_with(INTERNAL_ENV_PREFIX))
            .filter(|k| {
                !keys
                    .iter()
                    .any(|key| k[ENV_PREFIX.len()..].eq_ignore_ascii_case(key))
            })
            .collect()
    }
}

/// The config file to read: `file`, which must exist, or `gem.toml` if there is one.
fn locate(file: Option<&Path>) -> Result<Option<PathBuf>, ConfigError> {
    let file = match file {
        Some(path) if !path.is_file() => return Err(ConfigError::MissingFile(path.to_owned())),
        Some(path) => Some(path.to_owned()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
    };
    Ok(file.map(|p| std::path::absolute(&p).unwrap_or(p)))
}

fn plugin_line(handler: &crate::handler::HandlerInfo) -> String {
    format!(
        "{} {} (ABI {}) sha256={}",
        handler.name,
        handler.version,
        handler.abi.map_or("-".into(), |a| a.to_string()),
        handler.sha256.as_deref().unwrap_or("-"),
    )
}
