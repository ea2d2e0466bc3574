//! [`ServerConfig`], the Go original's `LoadConfig` struct, and [`Config::apply`].

use std::time::Duration;

use figment::Figment;
use figment::providers::Serialized;
use figment::value::{Dict, Value};
use serde::Serialize;

use super::{Config, ConfigError, format};

/// Tunables, as the Go original's `ServerConfig`: a zero field keeps the current value.
/// Each field is the [`Config`] key of the same name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ServerConfig {
    /// How long a drain may take before open connections are cut (default 15 s).
    #[serde(with = "format::duration")]
    pub wait_timeout: Duration,
    /// How long a new process has to report ready during a restart (default 30 s).
    #[serde(with = "format::duration")]
    pub upgrade_timeout: Duration,
    /// How long an idle keep-alive connection may linger once draining (default 500 ms).
    #[serde(with = "format::duration")]
    pub idle_grace: Duration,
    /// How long a client may take to send each request head, from the connection's start
    /// or its last response (default 10 s); a connection that takes longer is closed.
    #[serde(with = "format::duration")]
    pub header_read_timeout: Duration,
    /// Largest request body in bytes; larger ones get 413 (default 1 MiB).
    pub max_body_size: u64,
    /// Largest request head in bytes (default 64 KiB).
    pub max_header_size: usize,
    /// Most headers in one request (default 100).
    pub max_headers: usize,
}

impl ServerConfig {
    /// The fields that are not zero, serialized as config keys.
    fn non_zero(&self) -> Result<Dict, ConfigError> {
        let dict = |sc: &ServerConfig| -> Result<Dict, ConfigError> {
            Value::serialize(sc)?.into_dict().ok_or_else(|| {
                ConfigError::from(figment::Error::from(
                    "ServerConfig is not a table".to_owned(),
                ))
            })
        };
        let zero = dict(&ServerConfig::default())?;
        let mut fields = dict(self)?;
        fields.retain(|key, value| zero.get(key) != Some(value));
        Ok(fields)
    }
}

impl Config {
    /// Applies the non-zero fields of `sc`, as `LoadConfig` did: they are merged over
    /// this config's own serialization. (Not validated, as `LoadConfig` did not.)
    pub fn apply(&mut self, sc: &ServerConfig) {
        match self.applied(sc) {
            Ok(config) => *self = config,
            // Only a setting that cannot be serialized (a path that is not UTF-8) gets
            // here; the config is left as it was.
            Err(err) => tracing::warn!(cause = %err, "ServerConfig not applied"),
        }
    }

    fn applied(&self, sc: &ServerConfig) -> Result<Config, ConfigError> {
        let figment =
            Figment::from(Serialized::defaults(self)).merge(Serialized::defaults(sc.non_zero()?));
        Ok(Config {
            file: self.file.clone(),
            ..Config::extract(&figment)?
        })
    }
}
