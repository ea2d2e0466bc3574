//! The figment layers (defaults < file < `GEM_*` env < flags) and the errors that name
//! a key and where its value came from.

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::Serialize;

use super::{Config, ConfigError};

/// The prefix of gem's environment variables.
pub const ENV_PREFIX: &str = "GEM_";

/// The name of the built-in defaults layer.
const DEFAULTS: &str = "built-in defaults";

/// A layer made of a serializable value, with a name errors can cite.
struct Layer<T> {
    name: &'static str,
    /// Relative paths in this layer resolve against this file's directory.
    relative_to: Option<PathBuf>,
    value: T,
}

impl<T: Serialize> Provider for Layer<T> {
    fn metadata(&self) -> Metadata {
        let meta = Metadata::named(self.name);
        match &self.relative_to {
            Some(file) => meta.source(Source::File(file.clone())),
            None => meta,
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let dict = match Value::serialize(&self.value)? {
            Value::Empty(..) => Dict::new(),
            value => value.into_dict().ok_or_else(|| {
                figment::Error::from(format!("{} must serialize to a table", self.name))
            })?,
        };
        Ok(Profile::Default.collect(dict))
    }
}

/// The `GEM_*` variables that name a setting (so not `GEM_HANDOVER_*`).
fn env(keys: &[String]) -> Env {
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    Env::prefixed(ENV_PREFIX).only(&keys)
}

/// All layers. The defaults are read as if written in `file`, so their relative paths
/// (`handler.so`, `gem.pid`) resolve against its directory, as the file's own do.
pub(super) fn figment(file: Option<&Path>, flags: &impl Serialize) -> Figment {
    let defaults = Layer {
        name: DEFAULTS,
        relative_to: file.map(Path::to_owned),
        value: Config::serving_defaults(),
    };
    let mut figment = Figment::from(defaults);
    if let Some(path) = file {
        figment = figment.merge(Toml::file_exact(path));
    }
    figment.merge(env(&Config::keys())).merge(Layer {
        name: "command-line flags",
        relative_to: None,
        value: flags,
    })
}

/// Errors for top-level keys that are not settings (only a file can hold them: the
/// environment is filtered and flags are settings).
pub(super) fn check_keys(figment: &Figment, keys: &[String]) -> Result<(), ConfigError> {
    let merged: Dict = figment.extract().map_err(ConfigError::from)?;
    match merged.keys().find(|k| !keys.contains(k)) {
        Some(key) => Err(ConfigError::UnknownKey {
            key: key.clone(),
            origin: origin(figment.find_metadata(key), key),
            valid: keys.join(", "),
        }),
        None => Ok(()),
    }
}

/// The `Invalid` error for `key`, citing the layer its value came from.
pub(super) fn invalid(figment: &Figment, key: &str, message: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        origin: origin(figment.find_metadata(key), key),
        message: message.to_owned(),
    }
}

/// ` in <file>`, ` from GEM_<KEY>`, ` from command-line flags`, or `` for a default.
fn origin(meta: Option<&Metadata>, key: &str) -> String {
    let Some(meta) = meta.filter(|m| m.name != DEFAULTS) else {
        return String::new();
    };
    match &meta.source {
        Some(Source::File(path)) => format!(" in {}", path.display()),
        _ if meta.name == env(&[]).metadata().name => {
            let top = key.split('.').next().unwrap_or(key);
            format!(" from {ENV_PREFIX}{}", top.to_ascii_uppercase())
        }
        _ => format!(" from {}", meta.name),
    }
}

/// Every error figment collected, each as ``invalid `key` in <file>: what is wrong``.
pub(super) fn figment_message(err: &figment::Error) -> String {
    err.clone()
        .into_iter()
        .map(|e| {
            // Array indices are left out: the message quotes the offending value.
            let key: Vec<&str> = e
                .path
                .iter()
                .map(String::as_str)
                .filter(|p| p.parse::<usize>().is_err())
                .collect();
            if key.is_empty() {
                return e.to_string();
            }
            let key = key.join(".");
            format!(
                "invalid `{key}`{}: {}",
                origin(e.metadata.as_ref(), &key),
                e.kind
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}
