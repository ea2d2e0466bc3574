//! Configuration: built-in defaults < `gem.toml` < `GEM_*` environment < command-line
//! flags, merged with figment and validated into a typed [`Config`] in one place.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::magic::RelativePathBuf;
use figment::{Figment, Metadata};
use serde::{Deserialize, Deserializer, Serialize};

use crate::signals::{SignalError, SignalRegistry};

/// The config file read when `--config` is not given (a missing one is fine).
pub const DEFAULT_CONFIG_FILE: &str = "gem.toml";

/// Every key gem understands, as written in `gem.toml` and (upper-cased, `GEM_`-prefixed)
/// in the environment.
pub const KEYS: &[&str] = &[
    "listen",
    "handler",
    "wait_timeout",
    "upgrade_timeout",
    "idle_grace",
    "pid_file",
    "control_socket",
    "header_read_timeout",
    "max_body_size",
    "max_header_size",
    "max_headers",
    "signals",
];

/// Environment variables gem sets for its own children during an upgrade; not config.
pub const INTERNAL_ENV_PREFIX: &str = "GEM_HANDOVER_";

/// A configuration problem, naming the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that does not exist.
    #[error("config file {} does not exist", .0.display())]
    MissingFile(PathBuf),
    /// Parsing or type errors, unknown keys: figment names the key and the source.
    #[error("{}", figment_message(.0))]
    Parse(Box<figment::Error>),
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

fn figment_message(err: &figment::Error) -> String {
    err.clone()
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file that was read, if any.
    pub file: Option<PathBuf>,
    /// Addresses to serve on.
    pub listen: Vec<ListenAddr>,
    /// The handler plugin `.so`.
    pub handler: PathBuf,
    /// How long a drain may take before remaining connections are cut.
    pub wait_timeout: Duration,
    /// How long a new process has to report ready during a restart.
    pub upgrade_timeout: Duration,
    /// During a drain, how long an idle keep-alive connection may stay open in case a
    /// request is already on its way.
    pub idle_grace: Duration,
    /// Where the serving process writes its pid (always set when loaded from a file).
    pub pid_file: Option<PathBuf>,
    /// The control socket path (always set when loaded from a file).
    pub control_socket: Option<PathBuf>,
    /// Per-request limits.
    pub limits: Limits,
    /// What each signal does.
    pub signals: SignalRegistry,
}

/// Limits that protect the server from slow or oversized requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted request body; larger ones get 413.
    pub max_body_size: u64,
    /// Largest accepted request head (request line + headers), in bytes.
    pub max_header_size: usize,
    /// Most headers accepted in one request.
    pub max_headers: usize,
    /// A client must finish sending its request head within this time.
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_size: 1024 * 1024,
            max_header_size: 64 * 1024,
            max_headers: crate::server::HYPER_MAX_HEADERS,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// One listen address: what the user wrote and the socket address it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    /// As written, e.g. `127.0.0.1:0` or `:8080`. Also the name an inherited socket is
    /// matched by, so port 0 survives a restart.
    pub spec: String,
    /// The address to bind.
    pub addr: SocketAddr,
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
        })
    }
}

/// Values given on the command line; `None` leaves the lower layers alone.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    /// `--listen`, repeatable.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listen: Vec<String>,
    /// `--handler`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<PathBuf>,
    /// `--wait-timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_timeout: Option<String>,
    /// `--upgrade-timeout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upgrade_timeout: Option<String>,
    /// `--pid-file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// `--control-socket`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
}

/// The shape of the merged layers before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default = "default_listen")]
    listen: Vec<String>,
    handler: Option<RelativePathBuf>,
    #[serde(default, deserialize_with = "de_duration")]
    wait_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    upgrade_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de_duration")]
    idle_grace: Option<Duration>,
    pid_file: Option<RelativePathBuf>,
    control_socket: Option<RelativePathBuf>,
    #[serde(default, deserialize_with = "de_duration")]
    header_read_timeout: Option<Duration>,
    max_body_size: Option<ByteSize>,
    max_header_size: Option<ByteSize>,
    max_headers: Option<usize>,
    #[serde(default)]
    signals: BTreeMap<String, String>,
}

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:8080".to_owned()]
}

/// Default drain timeout, as in the Go original.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(15);
/// Default time a new process gets to report ready.
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default idle grace during a drain.
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_millis(500);

impl Default for Config {
    /// The built-in defaults, without a pid file or control socket (library use).
    fn default() -> Self {
        Config {
            file: None,
            listen: default_listen()
                .iter()
                .filter_map(|s| ListenAddr::parse(s).ok())
                .collect(),
            handler: PathBuf::from("handler.so"),
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            upgrade_timeout: DEFAULT_UPGRADE_TIMEOUT,
            idle_grace: DEFAULT_IDLE_GRACE,
            pid_file: None,
            control_socket: None,
            limits: Limits::default(),
            signals: SignalRegistry::default(),
        }
    }
}

impl Config {
    /// Loads `file` (or `gem.toml` if it exists when `file` is `None`), the `GEM_*`
    /// environment and `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (figment, file) = Self::figment(file, overrides)?;
        let raw: Raw = figment
            .extract()
            .map_err(|e| ConfigError::Parse(Box::new(e)))?;
        Self::validate(raw, &figment, file)
    }

    fn figment(
        file: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<(Figment, Option<PathBuf>), ConfigError> {
        let file = match file {
            Some(path) if !path.is_file() => {
                return Err(ConfigError::MissingFile(path.to_owned()));
            }
            Some(path) => Some(path.to_owned()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_FILE)).filter(|p| p.is_file()),
        };
        let file = file.map(|p| std::path::absolute(&p).unwrap_or(p));
        let mut figment = Figment::new();
        if let Some(path) = &file {
            figment = figment.merge(Toml::file_exact(path));
        }
        let figment = figment
            .merge(Env::prefixed("GEM_").only(KEYS))
            .merge(Serialized::defaults(overrides));
        Ok((figment, file))
    }

    fn validate(raw: Raw, figment: &Figment, file: Option<PathBuf>) -> Result<Config, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.to_owned(),
            origin: origin(figment.find_metadata(key)),
            message,
        };
        if raw.listen.is_empty() {
            return Err(invalid("listen", "needs at least one address".into()));
        }
        let listen = raw
            .listen
            .iter()
            .map(|s| ListenAddr::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| invalid("listen", m))?;
        let base = file
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_owned)
            .unwrap_or_default();
        let path_or = |value: Option<RelativePathBuf>, default: &str| match value {
            Some(p) => p.relative(),
            None => base.join(default),
        };
        let pid_file = path_or(raw.pid_file, "gem.pid");
        let control_socket = match raw.control_socket {
            Some(p) => p.relative(),
            None => pid_file.with_extension("sock"),
        };
        let positive = |key: &str, value: Option<Duration>, default: Duration| match value {
            Some(d) if d.is_zero() => Err(invalid(key, "must be greater than 0".into())),
            Some(d) => Ok(d),
            None => Ok(default),
        };
        let defaults = Limits::default();
        let limits = Limits {
            max_body_size: raw.max_body_size.map_or(defaults.max_body_size, |b| b.0),
            max_header_size: match raw.max_header_size {
                Some(b) if b.0 < 8192 => {
                    return Err(invalid("max_header_size", "must be at least 8 KiB".into()));
                }
                Some(b) => usize::try_from(b.0).unwrap_or(usize::MAX),
                None => defaults.max_header_size,
            },
            max_headers: match raw.max_headers {
                Some(0) => return Err(invalid("max_headers", "must be at least 1".into())),
                Some(n) => n,
                None => defaults.max_headers,
            },
            header_read_timeout: positive(
                "header_read_timeout",
                raw.header_read_timeout,
                defaults.header_read_timeout,
            )?,
        };
        let signals =
            SignalRegistry::from_table(raw.signals.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .map_err(|(key, err): (String, SignalError)| {
                let key = format!("signals.{key}");
                let origin = origin(figment.find_metadata("signals"));
                ConfigError::Invalid {
                    key,
                    origin,
                    message: err.to_string(),
                }
            })?;
        Ok(Config {
            listen,
            handler: path_or(raw.handler, "handler.so"),
            wait_timeout: positive("wait_timeout", raw.wait_timeout, DEFAULT_WAIT_TIMEOUT)?,
            upgrade_timeout: positive(
                "upgrade_timeout",
                raw.upgrade_timeout,
                DEFAULT_UPGRADE_TIMEOUT,
            )?,
            idle_grace: raw.idle_grace.unwrap_or(DEFAULT_IDLE_GRACE),
            pid_file: Some(pid_file),
            control_socket: Some(control_socket),
            limits,
            signals,
            file,
        })
    }

    /// The effective settings as `gem check` prints them.
    pub fn describe(&self, handler: &crate::handler::HandlerInfo) -> String {
        use std::fmt::Write as _;
        let d = |d: Duration| humantime::format_duration(d).to_string();
        let path =
            |p: &Option<PathBuf>| p.as_deref().map_or("-".into(), |p| p.display().to_string());
        let mut out = String::new();
        let file = self
            .file
            .as_deref()
            .map_or("(none: built-in defaults)".into(), |p| {
                p.display().to_string()
            });
        let _ = writeln!(out, "config file:         {file}");
        let listen: Vec<_> = self.listen.iter().map(|l| l.spec.as_str()).collect();
        let _ = writeln!(out, "listen:              {}", listen.join(", "));
        let _ = writeln!(out, "handler:             {}", self.handler.display());
        let _ = writeln!(
            out,
            "plugin:              {} {} (ABI {}) sha256={}",
            handler.name,
            handler.version,
            handler.abi.map_or("-".into(), |a| a.to_string()),
            handler.sha256.as_deref().unwrap_or("-"),
        );
        let _ = writeln!(out, "wait_timeout:        {}", d(self.wait_timeout));
        let _ = writeln!(out, "upgrade_timeout:     {}", d(self.upgrade_timeout));
        let _ = writeln!(out, "idle_grace:          {}", d(self.idle_grace));
        let _ = writeln!(
            out,
            "header_read_timeout: {}",
            d(self.limits.header_read_timeout)
        );
        let _ = writeln!(
            out,
            "max_body_size:       {}",
            ByteSize(self.limits.max_body_size)
        );
        let _ = writeln!(
            out,
            "max_header_size:     {}",
            ByteSize(self.limits.max_header_size as u64)
        );
        let _ = writeln!(out, "max_headers:         {}", self.limits.max_headers);
        let _ = writeln!(out, "pid_file:            {}", path(&self.pid_file));
        let _ = writeln!(out, "control_socket:      {}", path(&self.control_socket));
        let _ = writeln!(out, "signals:");
        for (sig, action) in self.signals.iter() {
            let _ = writeln!(out, "  {:<10} {action}", sig.name());
        }
        let _ = writeln!(out, "  (any other signal keeps its OS default action)");
        out
    }

    /// `GEM_*` variables that are neither config keys nor gem's own, for a warning.
    pub fn unknown_env_vars() -> Vec<String> {
        std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with("GEM_") && !k.starts_with(INTERNAL_ENV_PREFIX))
            .filter(|k| !KEYS.iter().any(|key| k[4..].eq_ignore_ascii_case(key)))
            .collect()
    }
}

/// ` in <file>` / ` from env var GEM_X` / `` for a key's metadata.
fn origin(meta: Option<&Metadata>) -> String {
    match meta {
        Some(m) => match &m.source {
            Some(figment::Source::File(path)) => format!(" in {}", path.display()),
            _ => format!(" from {}", m.name),
        },
        None => String::new(),
    }
}

/// Parses a duration: `"15s"`, `"1m 30s"`, `"250ms"`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{text:?} is not a valid number of seconds"));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{text:?} is not a duration ({e}); write e.g. \"15s\", \"1m 30s\" or 15")
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Value {
        Int(u64),
        Float(f64),
        Text(String),
    }
    let parsed = match Value::deserialize(d)? {
        Value::Int(secs) => Ok(Duration::from_secs(secs)),
        Value::Float(secs) => parse_duration(&secs.to_string()),
        Value::Text(text) => parse_duration(&text),
    };
    parsed.map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::*;
    use crate::signals::{Action, Signal};
    use figment::Jail;

    fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        Config::load(Some(Path::new("gem.toml")), overrides)
    }

    #[test]
    fn durations_accept_all_three_forms() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("soon").unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn defaults_apply_without_a_file() {
        Jail::expect_with(|_| {
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.file, None);
            assert_eq!(c.listen[0].addr, "127.0.0.1:8080".parse().unwrap());
            assert_eq!(c.wait_timeout, Duration::from_secs(15));
            assert_eq!(c.upgrade_timeout, Duration::from_secs(30));
            assert_eq!(c.limits, Limits::default());
            assert_eq!(c.signals, SignalRegistry::default());
            assert_eq!(c.control_socket, Some(PathBuf::from("gem.sock")));
            Ok(())
        });
    }

    #[test]
    fn env_overrides_file_and_flag_overrides_env() {
        Jail::expect_with(|jail| {
            jail.create_file("gem.toml", "wait_timeout = \"20s\"\nupgrade_timeout = 9")?;
            assert_eq!(
                load(&Overrides::default()).unwrap().wait_timeout,
                Duration::from_secs(20)
            );
            jail.set_env("GEM_WAIT_TIMEOUT", "1m 30s");
            let c = load(&Overrides::default()).unwrap();
            assert_eq!(c.wait_timeout, Duration::from_secs(90));
            assert_eq!(c.upgrade_timeout, Duration::from_secs(9));
            let flags = Overrides {
                wait_timeout: Some("3s".into()),
                ..Overrides::default()
            };
            assert_eq!(load(&flags).unwrap().wait_timeout, Duration::from_secs(3));
            Ok(())
        });
    }

    #[test]
    fn unknown_key_names_the_key_and_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("gem.toml", "wait_timout = \"1s\"")?;
            let err = load(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("wait_timout"), "{err}");
            assert!(err.contains("gem.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn bad_duration_names_the_key_and_the_value() {
        Jail::expect_with(|jail| {
            jail.create_file("gem.toml", "wait_timeout = \"fortnight\"")?;
            let err = load(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("wait_timeout"), "{err}");
            assert!(err.contains("\"fortnight\""), "{err}");
            assert!(err.contains("gem.toml"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/gem.toml")),
            &Overrides::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file /nonexistent/gem.toml does not exist"
        );
    }

    #[test]
    fn paths_in_the_file_are_relative_to_the_file() {
        Jail::expect_with(|jail| {
            jail.create_dir("etc")?;
            jail.create_file(
                "etc/gem.toml",
                "handler = \"h.so\"\npid_file = \"run/g.pid\"",
            )?;
            let c = Config::load(Some(Path::new("etc/gem.toml")), &Overrides::default()).unwrap();
            let dir = jail.directory().join("etc");
            assert_eq!(c.handler, dir.join("h.so"));
            assert_eq!(c.pid_file, Some(dir.join("run/g.pid")));
            assert_eq!(c.control_socket, Some(dir.join("run/g.sock")));
            Ok(())
        });
    }

    #[test]
    fn signal_table_errors_name_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("gem.toml", "[signals]\nTERM = \"restart\"")?;
            let err = load(&Overrides::default()).unwrap_err().to_string();
            assert!(err.starts_with("invalid `signals.TERM` in "), "{err}");
            jail.create_file("gem.toml", "[signals]\nKILL = \"ignore\"")?;
            let err = load(&Overrides::default()).unwrap_err().to_string();
            assert!(err.contains("`signals.KILL`"), "{err}");
            jail.create_file("gem.toml", "[signals]\nusr1 = \"plugin\"")?;
            let c = load(&Overrides::default()).unwrap();
            assert_eq!(c.signals.action(Signal::USR1), Some(Action::Plugin));
            assert_eq!(c.signals.action(Signal::HUP), Some(Action::Restart));
            Ok(())
        });
    }

    #[test]
    fn listen_addresses_are_validated() {
        assert_eq!(
            ListenAddr::parse(":8080").unwrap().addr,
            "0.0.0.0:8080".parse().unwrap()
        );
        assert!(ListenAddr::parse("[::1]:0").is_ok());
        Jail::expect_with(|jail| {
            jail.create_file("gem.toml", "listen = [\"localhost\"]")?;
            let err = load(&Overrides::default()).unwrap_err().to_string();
            assert!(err.starts_with("invalid `listen` in "), "{err}");
            Ok(())
        });
    }

    #[test]
    fn limits_parse_sizes() {
        Jail::expect_with(|jail| {
            jail.create_file("gem.toml", "max_body_size = \"2 MiB\"\nmax_headers = 10")?;
            let c = load(&Overrides::default()).unwrap();
            assert_eq!(c.limits.max_body_size, 2 * 1024 * 1024);
            assert_eq!(c.limits.max_headers, 10);
            Ok(())
        });
    }
}
