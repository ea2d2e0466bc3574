//! How settings are written: durations, sizes, paths, listen addresses and the signal
//! table, as serde `with` modules, so the settings struct derives its (de)serialization.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use figment::value::magic::RelativePathBuf;
use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ListenAddr;
use crate::signals::{Action, Signal, SignalRegistry};

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

/// A duration: read as [`parse_duration`] does, written as humantime (`"1m 30s"`).
pub(super) mod duration {
    use super::*;

    pub(in crate::config) fn serialize<S: Serializer>(
        d: &Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Duration, D::Error> {
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
        parsed.map_err(de::Error::custom)
    }
}

impl Serialize for super::Supervise {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            super::Supervise::On => s.serialize_bool(true),
            super::Supervise::Off => s.serialize_bool(false),
            super::Supervise::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for super::Supervise {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Bool(bool),
            Text(String),
        }
        match Value::deserialize(d)? {
            Value::Bool(true) => Ok(super::Supervise::On),
            Value::Bool(false) => Ok(super::Supervise::Off),
            Value::Text(t) => match t.trim().to_ascii_lowercase().as_str() {
                "auto" => Ok(super::Supervise::Auto),
                "true" => Ok(super::Supervise::On),
                "false" => Ok(super::Supervise::Off),
                _ => Err(de::Error::custom(format!(
                    "{t:?} is not true, false or \"auto\""
                ))),
            },
        }
    }
}

impl Serialize for super::AccessLog {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            super::AccessLog::Off => s.serialize_str("off"),
            super::AccessLog::Stderr => s.serialize_str("stderr"),
            super::AccessLog::File(path) => path.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for super::AccessLog {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A path is relative to the file it was written in, as the other paths.
        let path = RelativePathBuf::deserialize(d)?;
        Ok(match path.original().to_str() {
            Some("off") | Some("") => super::AccessLog::Off,
            Some("stderr") => super::AccessLog::Stderr,
            _ => super::AccessLog::File(path.relative()),
        })
    }
}

/// An optional listen address, written `"off"` when there is none.
pub(super) mod optional_listen {
    use super::*;

    pub(in crate::config) fn serialize<S: Serializer>(
        addr: &Option<ListenAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => addr.serialize(s),
            None => s.serialize_str("off"),
        }
    }

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<ListenAddr>, D::Error> {
        match Option::<String>::deserialize(d)?.as_deref().map(str::trim) {
            None | Some("off" | "") => Ok(None),
            Some(spec) => ListenAddr::parse(spec).map(Some).map_err(de::Error::custom),
        }
    }
}

/// A size in bytes: read as `"1 MiB"`, `"64KiB"` or a number; written exactly, in the
/// largest binary unit that divides it (`"64 KiB"`, `"1000 B"`).
pub(super) mod size {
    use super::*;

    pub(in crate::config) fn serialize<S, T>(n: &T, s: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Copy + TryInto<u64>,
    {
        let n: u64 = (*n).try_into().unwrap_or(u64::MAX);
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        match UNITS
            .iter()
            .find(|(unit, _)| n >= *unit && n.is_multiple_of(*unit))
        {
            Some((unit, name)) => s.collect_str(&format_args!("{} {name}", n / unit)),
            None => s.collect_str(&format_args!("{n} B")),
        }
    }

    pub(in crate::config) fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Bytes(u64),
            Text(String),
        }
        let bytes = match Value::deserialize(d)? {
            Value::Bytes(bytes) => bytes,
            Value::Text(text) => text.trim().parse::<ByteSize>().map_err(|_| {
                de::Error::custom(format!(
                    "{text:?} is not a size; write e.g. \"1 MiB\", \"64 KiB\" or a number of bytes"
                ))
            })?.0,
        };
        T::try_from(bytes).map_err(|_| de::Error::custom(format!("{bytes} bytes is too large")))
    }
}

/// A path written in the config file is relative to the file's directory (figment's
/// [`RelativePathBuf`]); one from the environment or a flag, to the working directory.
pub(super) fn relative_path<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    RelativePathBuf::deserialize(d).map(|p| p.relative())
}

/// [`relative_path`] for a setting that may be absent.
pub(super) fn relative_path_opt<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<PathBuf>, D::Error> {
    Option::<RelativePathBuf>::deserialize(d).map(|p| p.map(|p| p.relative()))
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match &self.tls {
            None => s.serialize_str(&self.spec),
            Some(tls) => {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry(LISTEN_ADDR, &self.spec)?;
                map.serialize_entry(LISTEN_CERT, &tls.cert)?;
                map.serialize_entry(LISTEN_KEY, &tls.key)?;
                map.end()
            }
        }
    }
}

/// The keys of a `listen` table.
const LISTEN_ADDR: &str = "addr";
const LISTEN_CERT: &str = "tls_cert";
const LISTEN_KEY: &str = "tls_key";
const LISTEN_KEYS: &[&str] = &[LISTEN_ADDR, LISTEN_CERT, LISTEN_KEY];

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ListenVisitor)
    }
}

/// A `listen` entry: a string, or a table with `addr` and (for TLS) `tls_cert` and
/// `tls_key`. The paths are read as [`RelativePathBuf`] straight from figment's own
/// deserializer, so they are relative to the file they were written in.
struct ListenVisitor;

impl<'de> Visitor<'de> for ListenVisitor {
    type Value = ListenAddr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an address like \"127.0.0.1:8080\" or a table { addr = \"0.0.0.0:8443\", tls_cert = \"cert.pem\", tls_key = \"key.pem\" }")
    }

    fn visit_str<E: de::Error>(self, spec: &str) -> Result<ListenAddr, E> {
        ListenAddr::parse(spec).map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ListenAddr, A::Error> {
        let (mut addr, mut cert, mut key) = (None, None, None);
        while let Some(name) = map.next_key::<String>()? {
            match name.as_str() {
                LISTEN_ADDR => addr = Some(map.next_value::<String>()?),
                LISTEN_CERT => cert = Some(map.next_value::<RelativePathBuf>()?.relative()),
                LISTEN_KEY => key = Some(map.next_value::<RelativePathBuf>()?.relative()),
                other => return Err(de::Error::unknown_field(other, LISTEN_KEYS)),
            }
        }
        let addr = addr.ok_or_else(|| de::Error::missing_field(LISTEN_ADDR))?;
        let addr = ListenAddr::parse(&addr).map_err(de::Error::custom)?;
        match (cert, key) {
            (None, None) => Ok(addr),
            (Some(cert), Some(key)) => Ok(addr.with_tls(super::TlsFiles { cert, key })),
            (Some(_), None) => Err(de::Error::custom(format!(
                "{:?} has `tls_cert` but no `tls_key`",
                addr.spec
            ))),
            (None, Some(_)) => Err(de::Error::custom(format!(
                "{:?} has `tls_key` but no `tls_cert`",
                addr.spec
            ))),
        }
    }
}

/// The `[signals]` table: entries overlaid on [`SignalRegistry::default`], so it is
/// written as the entries that differ from the defaults. A broken rule is an error at
/// the entry's own key, so the message names `signals.<KEY>`.
pub(super) mod signal_table {
    use super::*;

    pub(in crate::config) fn serialize<S: Serializer>(
        registry: &SignalRegistry,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let defaults = SignalRegistry::default();
        s.collect_map(
            registry
                .iter()
                .filter(|&(sig, action)| defaults.action(sig) != Some(action))
                .map(|(sig, action)| (sig.short_name(), action)),
        )
    }

    pub(in crate::config) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<SignalRegistry, D::Error> {
        d.deserialize_map(Table)
    }

    struct Table;

    impl<'de> Visitor<'de> for Table {
        type Value = SignalRegistry;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of signal = action")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SignalRegistry, A::Error> {
            let mut registry = SignalRegistry::default();
            let mut seen = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value_seed(Entry {
                    key: &key,
                    registry: &mut registry,
                    seen: &mut seen,
                })?;
            }
            Ok(registry)
        }
    }

    /// One `signal = action` entry, checked while its value is read.
    struct Entry<'a> {
        key: &'a str,
        registry: &'a mut SignalRegistry,
        seen: &'a mut Vec<Signal>,
    }

    impl<'de> DeserializeSeed<'de> for Entry<'_> {
        type Value = ();

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            let action = String::deserialize(d)?;
            let sig: Signal = self.key.parse().map_err(de::Error::custom)?;
            let action: Action = action.parse().map_err(de::Error::custom)?;
            if self.seen.contains(&sig) {
                let dup = crate::signals::SignalError::Duplicate(sig);
                return Err(de::Error::custom(dup));
            }
            self.seen.push(sig);
            self.registry.set(sig, action).map_err(de::Error::custom)
        }
    }
}

/// A value's top-level entries in the order its `Serialize` writes them (declaration
/// order), which a `BTreeMap`-backed value would lose.
pub(super) fn ordered_entries(
    value: &impl Serialize,
) -> Result<Vec<(String, serde_json::Value)>, serde_json::Error> {
    struct Ordered(Vec<(String, serde_json::Value)>);

    impl<'de> Deserialize<'de> for Ordered {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(OrderedVisitor)
        }
    }

    struct OrderedVisitor;

    impl<'de> Visitor<'de> for OrderedVisitor {
        type Value = Ordered;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(Ordered(entries))
        }
    }

    let text = serde_json::to_string(value)?;
    serde_json::from_str::<Ordered>(&text).map(|o| o.0)
}

/// A serialized setting as `gem check` shows it: strings bare, lists comma-separated,
/// an unset value as `-`.
pub(super) fn show(value: &serde_json::Value) -> String {
    use serde_json::Value;
    match value {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(show).collect::<Vec<_>>().join(", "),
        // A TLS listener.
        Value::Object(map) if map.contains_key(LISTEN_ADDR) => {
            let field = |k: &str| map.get(k).map(show).unwrap_or_default();
            format!(
                "{} (tls_cert {}, tls_key {})",
                field(LISTEN_ADDR),
                field(LISTEN_CERT),
                field(LISTEN_KEY)
            )
        }
        other => other.to_string(),
    }
}
