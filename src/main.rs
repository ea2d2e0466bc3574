//! The `gem` command: parse the CLI, call the library, map errors to exit codes.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod client;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use gem::config::Config;
use gem::{Exit, Server};
use serde::Serialize;
use tracing::{error, info, warn};

/// An HTTP server that is upgraded and stopped without failing a request.
///
/// Its request handler is a plugin (.so); `gem.toml` says what each Unix signal does.
/// Configuration is layered: built-in defaults < gem.toml < GEM_* environment
/// variables (e.g. GEM_WAIT_TIMEOUT=30s) < command-line flags.
#[derive(Debug, Parser)]
#[command(name = "gem", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve HTTP until a shutdown signal; SIGHUP (by default) upgrades in place.
    Serve(ServeArgs),
    /// Validate the config and load the plugin, print the effective settings, serve nothing.
    Check(ServeArgs),
    /// Upgrade the running server and wait for the outcome, after the probation (exit 0
    /// upgraded, 1 failed or rolled back, 2 no server answered).
    Reload(ReloadArgs),
    /// Drain the running server and wait for it to exit.
    Stop(ClientArgs),
    /// Show the running server's pid, generation, plugin, load and last upgrade (exit 0
    /// serving, 1 a supervisor answers but no worker serves, 2 no server answered).
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct ClientArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// How long to wait for the outcome [default: 10s more than upgrade_timeout plus
    /// probation (reload) or shutdown_delay plus wait_timeout (stop)].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    timeout: Option<Duration>,
}

#[derive(Debug, Args)]
struct ReloadArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Instead of starting a new generation, make the supervisor re-execute the gem
    /// binary at the path it was started from, in place: same pid, sockets and workers
    /// (supervised mode only).
    #[arg(long)]
    binary: bool,
}

#[derive(Debug, Args)]
struct StatusArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    gem::config::parse_duration(text)
}

// The config file, and the one setting every subcommand takes as a flag. (Plain
// comments: a doc comment here would become clap help text.)
#[derive(Debug, Args, Serialize)]
struct ConfigArgs {
    /// Config file [default: ./gem.toml if it exists]. A named file must exist.
    #[arg(long, short = 'c', value_name = "FILE")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// The control socket that gem reload / stop / status talk to [default: from the config].
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    control_socket: Option<PathBuf>,
}

// The settings `gem serve` and `gem check` take as flags. Serialized, it is the top
// config layer: a field's name is its config key, and an absent flag is left out.
#[derive(Debug, Args, Serialize)]
struct ServeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    config: ConfigArgs,
    /// Address to serve on (IP:PORT, [IPv6]:PORT or :PORT); repeat for several. A TLS
    /// listener is a table in gem.toml or GEM_LISTEN: { addr = "0.0.0.0:8443",
    /// tls_cert = "cert.pem", tls_key = "key.pem" }.
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    listen: Vec<String>,
    /// The handler plugin .so.
    #[arg(long, value_name = "PATH")]
    #[serde(skip_serializing_if = "Option::is_none")]
    handler: Option<PathBuf>,
    /// Longest a drain may take before open connections are cut, e.g. 15s or "1m 30s".
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    wait_timeout: Option<String>,
    /// Longest a new process may take to become ready during a restart.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    upgrade_timeout: Option<String>,
    /// Where the serving process (the supervisor, when supervised) writes its pid.
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pid_file: Option<PathBuf>,
    /// Run a supervisor that keeps its pid and the sockets, and serves through worker
    /// processes it restarts if they crash (the `supervise` setting; "auto", the
    /// default, turns it on when gem is PID 1).
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    supervise: bool,
    /// How long the old generation stays loaded after an upgrade, ready to serve again
    /// if the new one dies; 0s turns it off.
    #[arg(long, value_name = "DURATION")]
    #[serde(skip_serializing_if = "Option::is_none")]
    probation: Option<String>,
}

impl ServeArgs {
    fn load(&self) -> Result<Config, gem::config::ConfigError> {
        Config::load(self.config.config.as_deref(), self)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result: anyhow::Result<ExitCode> = (|| match cli.command {
        Command::Serve(args) => serve(&args),
        Command::Check(args) => check(&args),
        Command::Reload(args) if args.binary => {
            client::reexec(&args.client.config.load()?, args.client.timeout)
        }
        Command::Reload(args) => client::reload(&args.client.config.load()?, args.client.timeout),
        Command::Stop(args) => client::stop(&args.config.load()?, args.timeout),
        Command::Status(args) => client::status(&args.config.load()?, args.json),
    })();
    match result {
        Ok(code) => code,
        Err(err) => {
            error!("{}", chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes in one line. gem's own errors already name their cause in
/// their message; a cause is added only where it says something new.
fn chain(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(self.config.as_deref(), self)?)
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn serve(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    // While this process has one thread, so the handover variables can be removed.
    gem::claim_handover();
    let role = gem::role();
    let loaded = match &role {
        Ok(gem::Role::Worker(config) | gem::Role::Supervisor(config)) => Ok((**config).clone()),
        Err(err) => Err(gem::config::ConfigError::Invalid {
            key: "(the configuration handed over by the supervisor)".into(),
            origin: String::new(),
            message: err.to_string(),
        }),
        Ok(gem::Role::Fresh) => args.load(),
    };
    let config = match loaded {
        Ok(config) => config,
        Err(err) => {
            gem::report_startup_failure(&err.to_string());
            return Err(err.into());
        }
    };
    for var in Config::unknown_env_vars() {
        warn!("ignoring environment variable {var}: not a gem setting");
    }
    let runtime = gem::runtime().context("starting the async runtime")?;
    let supervise = match role {
        Ok(gem::Role::Supervisor(_)) => true,
        Ok(gem::Role::Fresh) => config.supervise.enabled(),
        _ => false,
    };
    if supervise {
        let loader = {
            let file = args.config.config.clone();
            let flags = serde_json::to_value(args)?;
            Box::new(move || Config::load(file.as_deref(), &flags))
        };
        runtime.block_on(gem::supervise(config, loader))?;
        runtime.shutdown_timeout(std::time::Duration::from_millis(100));
        return Ok(ExitCode::SUCCESS);
    }
    let exit = runtime.block_on(Server::from_config(config).run());
    // A handler still blocked after the drain (cut at wait_timeout) must not hold the
    // exit; its connection is already gone.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match exit? {
        Exit::Shutdown { cut } | Exit::HandedOver { cut, .. } if cut > 0 => {
            info!(
                "[{}] exiting; {cut} connections were cut.",
                std::process::id()
            );
        }
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn check(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.load()?;
    let handler = gem::check(&config)?;
    print!("{}", config.describe(&handler));
    for listen in &config.listen {
        if let Some(files) = &listen.tls {
            // Checked by gem::check above; read again to print what it says.
            let cert = gem::tls::check(files)?;
            println!("tls {}: {}", listen.spec, cert.line());
            if cert.days_left < gem::tls::EXPIRY_WARNING_DAYS {
                println!(
                    "warning: the TLS certificate {} expires in {} days",
                    files.cert.display(),
                    cert.days_left
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
