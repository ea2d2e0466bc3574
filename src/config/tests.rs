#![allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
#![allow(clippy::unwrap_used)]

use super::*;
use crate::handler::HandlerInfo;
use crate::signals::{Action, Signal};
use figment::Jail;
use serde_json::json;

fn load(flags: &impl Serialize) -> Result<Config, ConfigError> {
    Config::load(Some(Path::new("gem.toml")), flags)
}

fn no_plugin() -> HandlerInfo {
    HandlerInfo {
        name: "x".into(),
        version: "1".into(),
        abi: None,
        sha256: None,
        path: None,
    }
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
        let c = Config::load(None, &()).unwrap();
        assert_eq!(c.file, None);
        assert_eq!(c.listen[0].addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.wait_timeout, Duration::from_secs(15));
        assert_eq!(c.upgrade_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_grace, Duration::from_millis(500));
        assert_eq!(c.handler, PathBuf::from("handler.so"));
        assert_eq!(c.limits, Limits::default());
        assert_eq!(c.signals, SignalRegistry::default());
        assert_eq!(c.pid_file, Some(PathBuf::from("gem.pid")));
        assert_eq!(c.control_socket, Some(PathBuf::from("gem.sock")));
        Ok(())
    });
}

#[test]
fn env_overrides_file_and_flag_overrides_env() {
    Jail::expect_with(|jail| {
        jail.create_file("gem.toml", "wait_timeout = \"20s\"\nupgrade_timeout = 9")?;
        assert_eq!(load(&()).unwrap().wait_timeout, Duration::from_secs(20));
        jail.set_env("GEM_WAIT_TIMEOUT", "1m 30s");
        let c = load(&()).unwrap();
        assert_eq!(c.wait_timeout, Duration::from_secs(90));
        assert_eq!(c.upgrade_timeout, Duration::from_secs(9));
        let flags = json!({ "wait_timeout": "3s" });
        assert_eq!(load(&flags).unwrap().wait_timeout, Duration::from_secs(3));
        Ok(())
    });
}

#[test]
fn unknown_key_names_the_key_and_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("gem.toml", "wait_timout = \"1s\"")?;
        let err = load(&()).unwrap_err().to_string();
        assert!(err.contains("wait_timout"), "{err}");
        assert!(err.contains("gem.toml"), "{err}");
        assert!(err.contains("wait_timeout"), "lists the settings: {err}");
        Ok(())
    });
}

#[test]
fn bad_duration_names_the_key_and_the_value() {
    Jail::expect_with(|jail| {
        jail.create_file("gem.toml", "wait_timeout = \"fortnight\"")?;
        let err = load(&()).unwrap_err().to_string();
        assert!(err.contains("wait_timeout"), "{err}");
        assert!(err.contains("\"fortnight\""), "{err}");
        assert!(err.contains("gem.toml"), "{err}");
        Ok(())
    });
}

#[test]
fn errors_name_the_env_var_or_the_flags() {
    Jail::expect_with(|jail| {
        jail.set_env("GEM_MAX_HEADERS", "0");
        let err = Config::load(None, &()).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid `max_headers` from GEM_MAX_HEADERS: must be at least 1"
        );
        let err = Config::load(None, &json!({ "wait_timeout": "0s" })).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `wait_timeout` from command-line flags: must be greater than 0"
        );
        Ok(())
    });
}

#[test]
fn missing_config_file_is_an_error() {
    let err = Config::load(Some(Path::new("/nonexistent/gem.toml")), &()).unwrap_err();
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
        let c = Config::load(Some(Path::new("etc/gem.toml")), &()).unwrap();
        let dir = jail.directory().join("etc");
        assert_eq!(c.handler, dir.join("h.so"));
        assert_eq!(c.pid_file, Some(dir.join("run/g.pid")));
        assert_eq!(c.control_socket, Some(dir.join("run/g.sock")));
        // The defaults too; a flag is relative to the working directory.
        jail.create_file("etc/gem.toml", "")?;
        let c = Config::load(Some(Path::new("etc/gem.toml")), &json!({"pid_file": "p"})).unwrap();
        assert_eq!(c.handler, dir.join("handler.so"));
        assert_eq!(c.pid_file, Some(PathBuf::from("p")));
        Ok(())
    });
}

#[test]
fn signal_table_errors_name_the_key() {
    Jail::expect_with(|jail| {
        jail.create_file("gem.toml", "[signals]\nTERM = \"restart\"")?;
        let err = load(&()).unwrap_err().to_string();
        assert!(err.starts_with("invalid `signals.TERM` in "), "{err}");
        assert!(err.contains("SIGTERM is always \"shutdown\""), "{err}");
        jail.create_file("gem.toml", "[signals]\nKILL = \"ignore\"")?;
        let err = load(&()).unwrap_err().to_string();
        assert!(err.contains("`signals.KILL`"), "{err}");
        jail.create_file("gem.toml", "[signals]\nusr1 = \"plugin\"")?;
        let c = load(&()).unwrap();
        assert_eq!(c.signals.action(Signal::USR1), Some(Action::Plugin));
        assert_eq!(c.signals.action(Signal::HUP), Some(Action::Restart));
        jail.set_env("GEM_SIGNALS", "{USR2=\"restart\"}");
        let c = load(&()).unwrap();
        assert_eq!(c.signals.action(Signal::USR2), Some(Action::Restart));
        assert_eq!(c.signals.action(Signal::USR1), Some(Action::Plugin));
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
        let err = load(&()).unwrap_err().to_string();
        assert!(err.starts_with("invalid `listen` in "), "{err}");
        jail.create_file("gem.toml", "listen = []")?;
        let err = load(&()).unwrap_err().to_string();
        assert!(err.contains("needs at least one address"), "{err}");
        jail.set_env("GEM_LISTEN", "[\"0.0.0.0:80\"]");
        assert_eq!(load(&()).unwrap().listen[0].spec, "0.0.0.0:80");
        Ok(())
    });
}

#[test]
fn limits_parse_sizes() {
    Jail::expect_with(|jail| {
        jail.create_file("gem.toml", "max_body_size = \"2 MiB\"\nmax_headers = 10")?;
        let c = load(&()).unwrap();
        assert_eq!(c.limits.max_body_size, 2 * 1024 * 1024);
        assert_eq!(c.limits.max_headers, 10);
        jail.create_file("gem.toml", "max_header_size = \"4 KiB\"")?;
        let err = load(&()).unwrap_err().to_string();
        assert!(err.starts_with("invalid `max_header_size` in "), "{err}");
        jail.create_file("gem.toml", "max_body_size = \"lots\"")?;
        let err = load(&()).unwrap_err().to_string();
        assert!(err.starts_with("invalid `max_body_size` in "), "{err}");
        Ok(())
    });
}

/// The key list, `GEM_<KEY>` and `gem check` all follow from the struct: every key of
/// the serialized defaults is described, and read from its environment variable.
#[test]
fn keys_env_and_describe_follow_from_the_struct() {
    let keys = Config::keys();
    assert_eq!(keys.first().map(String::as_str), Some("listen"));
    assert!(keys.iter().any(|k| k == "max_headers"), "{keys:?}");
    Jail::expect_with(|jail| {
        let defaults = Config::load(None, &()).unwrap();
        let described = defaults.describe(&no_plugin());
        for (key, value) in format::ordered_entries(&defaults).unwrap() {
            assert!(
                described.contains(&format!("\n{key}:")),
                "{key}: {described}"
            );
            let var = format!("GEM_{}", key.to_ascii_uppercase());
            // A value of the wrong type for every key: the error proves it was read.
            jail.set_env(&var, "[1]");
            let err = Config::load(None, &()).unwrap_err().to_string();
            assert!(
                err.contains(&format!("`{key}")) && err.contains(&var),
                "{err}"
            );
            // The default, as serialized, reads back as the default.
            jail.set_env(&var, value.to_string());
            let again = Config::load(None, &()).unwrap();
            assert_eq!(
                format::ordered_entries(&again).unwrap(),
                format::ordered_entries(&defaults).unwrap()
            );
        }
        jail.set_env("GEM_WAIT_TIMOUT", "1s");
        jail.set_env("GEM_HANDOVER_FDS", "3");
        let unknown = Config::unknown_env_vars();
        assert!(
            unknown.contains(&"GEM_WAIT_TIMOUT".to_owned()),
            "{unknown:?}"
        );
        let ours = |var: &String| {
            var == "GEM_HANDOVER_FDS" || keys.iter().any(|k| var[4..].eq_ignore_ascii_case(k))
        };
        assert!(!unknown.iter().any(ours), "{unknown:?}");
        Ok(())
    });
}

#[test]
fn describe_humanises_durations_and_sizes() {
    let text = Config::default().describe(&no_plugin());
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap()
            .to_owned()
    };
    assert_eq!(line("wait_timeout:"), "wait_timeout:        15s");
    assert_eq!(line("idle_grace:"), "idle_grace:          500ms");
    assert_eq!(line("max_body_size:"), "max_body_size:       1 MiB");
    assert_eq!(line("listen:"), "listen:              127.0.0.1:8080");
    assert_eq!(line("pid_file:"), "pid_file:            -");
    assert_eq!(line("plugin:"), "plugin:              x 1 (ABI -) sha256=-");
    assert!(text.contains("  SIGHUP     restart"), "{text}");
}

#[test]
fn apply_sets_non_zero_fields_and_keeps_the_rest() {
    let mut c = Config {
        file: Some(PathBuf::from("/etc/gem.toml")),
        pid_file: Some(PathBuf::from("run/gem.pid")),
        ..Config::default()
    };
    c.signals.set(Signal::USR2, Action::Restart).unwrap();
    let before = c.clone();
    c.apply(&ServerConfig {
        idle_grace: Duration::from_millis(1234),
        max_body_size: 1000,
        ..ServerConfig::default()
    });
    assert_eq!(c.idle_grace, Duration::from_millis(1234));
    assert_eq!(c.limits.max_body_size, 1000);
    assert_eq!(c.wait_timeout, before.wait_timeout);
    assert_eq!(c.limits.max_headers, before.limits.max_headers);
    assert_eq!((&c.file, &c.pid_file), (&before.file, &before.pid_file));
    assert_eq!((&c.listen, &c.signals), (&before.listen, &before.signals));
    assert_eq!(c.control_socket, None);
}

#[test]
fn metrics_listen_needs_a_port_no_listen_address_takes() {
    Jail::expect_with(|jail| {
        let clash = |listen: &str, metrics: &str| {
            jail.create_file(
                "gem.toml",
                &format!("listen = [{listen:?}]\nmetrics_listen = {metrics:?}"),
            )
            .unwrap();
            load(&())
        };
        for (listen, metrics) in [
            ("127.0.0.1:9100", "127.0.0.1:9100"),
            ("0.0.0.0:9100", "127.0.0.1:9100"),
            ("127.0.0.1:9100", "0.0.0.0:9100"),
        ] {
            let err = clash(listen, metrics).unwrap_err().to_string();
            assert!(
                err.contains("`metrics_listen`") && err.contains("`listen`"),
                "{listen} / {metrics}: {err}"
            );
        }
        let ok = clash("127.0.0.1:0", "127.0.0.1:0").unwrap();
        assert!(ok.metrics_listen.is_some());
        assert!(clash("127.0.0.1:8080", "127.0.0.2:8080").is_ok());
        assert!(
            clash("127.0.0.1:8080", "off")
                .unwrap()
                .metrics_listen
                .is_none()
        );
        Ok(())
    });
}

#[test]
fn a_listen_table_is_a_tls_listener_with_paths_relative_to_the_file() {
    Jail::expect_with(|jail| {
        jail.create_dir("conf")?;
        jail.create_file(
            "conf/gem.toml",
            r#"listen = ["127.0.0.1:8080", { addr = ":8443", tls_cert = "c.pem", tls_key = "/k.pem" }]"#,
        )?;
        let c = Config::load(Some(Path::new("conf/gem.toml")), &()).unwrap();
        assert_eq!(c.listen[0].tls, None);
        let tls = c.listen[1].tls.clone().unwrap();
        assert_eq!(tls.cert, jail.directory().join("conf/c.pem"));
        assert_eq!(tls.key, PathBuf::from("/k.pem"));
        assert_eq!(c.listen[1].addr, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.listen[1].scheme(), "https");
        // A worker gets the same listeners through JSON.
        let again = Config::from_json(&c.to_json().unwrap()).unwrap();
        assert_eq!(again.listen, c.listen);
        // In the environment, paths are relative to the working directory.
        jail.set_env(
            "GEM_LISTEN",
            r#"[{ addr = "127.0.0.1:0", tls_cert = "c.pem", tls_key = "k.pem" }]"#,
        );
        let c = Config::load(Some(Path::new("conf/gem.toml")), &()).unwrap();
        assert_eq!(
            c.listen[0].tls.clone().unwrap().cert,
            PathBuf::from("c.pem")
        );
        Ok(())
    });
}

#[test]
fn a_listen_table_with_an_unknown_or_missing_key_is_an_error() {
    Jail::expect_with(|jail| {
        for (table, needle) in [
            (
                r#"{ addr = ":1", tls_cert = "c", tls_kee = "k" }"#,
                "unknown field: found `tls_kee`",
            ),
            (r#"{ addr = ":1", tls_cert = "c" }"#, "no `tls_key`"),
            (
                r#"{ tls_cert = "c", tls_key = "k" }"#,
                "missing field `addr`",
            ),
            (r#"{ addr = "nowhere" }"#, "is not an address"),
        ] {
            jail.create_file("gem.toml", &format!("listen = [{table}]"))?;
            let err = load(&()).unwrap_err().to_string();
            assert!(err.contains(needle), "{table}: {err}");
            assert!(
                err.contains("`listen`") && err.contains("gem.toml"),
                "{err}"
            );
        }
        Ok(())
    });
}
