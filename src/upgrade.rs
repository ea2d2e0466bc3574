//! Restart: start the recorded executable with the listening sockets inherited, wait
//! for its "ready" on a private channel, and roll back (kill and reap) on any failure.
//!
//! The channel is a Unix socket pair. The child writes one line: `ready <pid>` once it
//! serves, or `error <message>` if it cannot start. Afterwards the parent may write
//! `restart` to hand over a restart request that arrived during the upgrade.

use std::ffi::OsString;
use std::io::Write;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use command_fds::CommandFdExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::fds::ChildFds;

/// How this process was started, recorded at start-up so a restart runs the binary now
/// at that path (a rebuilt or reinstalled one), not the image of this process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Absolute path of the executable as it was invoked.
    pub exe: PathBuf,
    /// Arguments after the program name.
    pub args: Vec<OsString>,
    /// Working directory at start-up.
    pub cwd: PathBuf,
}

impl Launch {
    /// Records the current process's launch. `argv[0]` is made absolute (or looked up in
    /// `PATH`) without resolving symlinks, so repointing a symlink upgrades too.
    pub fn current() -> std::io::Result<Launch> {
        let cwd = std::env::current_dir()?;
        let mut args = std::env::args_os();
        let argv0 = args.next().map(PathBuf::from);
        let exe = match argv0 {
            Some(p) if p.components().count() > 1 => cwd.join(p),
            Some(p) => search_path(&p).map_or_else(std::env::current_exe, Ok)?,
            None => std::env::current_exe()?,
        };
        Ok(Launch {
            exe,
            args: args.collect(),
            cwd,
        })
    }
}

fn search_path(name: &Path) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Why an upgrade did not happen. The old process keeps serving in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The executable could not be started.
    #[error("could not start {}: {source}", exe.display())]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The child reported an error before it was ready.
    #[error("new process {pid} failed to start: {reason}")]
    ChildFailed {
        /// The child's pid.
        pid: u32,
        /// The child's own error message.
        reason: String,
    },
    /// The child exited (or closed the channel) without a word.
    #[error("new process {pid} exited before it was ready ({status})")]
    ChildExited {
        /// The child's pid.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// The child did not become ready in time.
    #[error("new process {pid} was not ready within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The child's pid.
        pid: u32,
        /// The timeout.
        after: Duration,
    },
    /// A shutdown arrived while the child was starting.
    #[error("new process {pid} was stopped: a shutdown arrived during the upgrade")]
    Cancelled {
        /// The child's pid.
        pid: u32,
    },
    /// Local I/O failure while setting up the handover.
    #[error("handover setup failed: {0}")]
    Io(#[from] std::io::Error),
}

impl UpgradeError {
    /// The child's pid, if one was started.
    pub fn pid(&self) -> Option<u32> {
        match self {
            UpgradeError::ChildFailed { pid, .. }
            | UpgradeError::ChildExited { pid, .. }
            | UpgradeError::Timeout { pid, .. }
            | UpgradeError::Cancelled { pid } => Some(*pid),
            UpgradeError::Spawn { .. } | UpgradeError::Io(_) => None,
        }
    }
}

/// A child that reported ready and now serves.
#[derive(Debug)]
pub struct Upgraded {
    /// Its pid.
    pub pid: u32,
    channel: UnixStream,
    // Held so the child is reaped if it exits while we still run; never killed on drop.
    _child: Child,
}

impl Upgraded {
    /// Sends the new process one message.
    pub async fn send(&mut self, msg: &FromParent) -> std::io::Result<()> {
        self.channel.write_all(msg.line().as_bytes()).await
    }
}

/// A prepared handover: the child's fds are duplicated, so this owns everything it
/// needs and can run on its own task.
#[derive(Debug)]
pub struct Handover {
    launch: Launch,
    fds: ChildFds,
    channel: UnixStream,
    timeout: Duration,
}

impl Handover {
    /// Prepares a handover of `listeners` (label and socket) and the control socket to
    /// a child of generation `generation`, which gets `timeout` to report ready.
    pub fn new(
        launch: Launch,
        listeners: &[(String, BorrowedFd<'_>)],
        control: Option<BorrowedFd<'_>>,
        generation: u64,
        timeout: Duration,
    ) -> std::io::Result<Handover> {
        let (ours, theirs) = StdUnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let channel = UnixStream::from_std(ours)?;
        let fds = ChildFds::new(listeners, control, OwnedFd::from(theirs), generation)?;
        Ok(Handover {
            launch,
            fds,
            channel,
            timeout,
        })
    }

    /// Starts the child and waits for it to be ready. On failure, or when `cancel`
    /// fires first, the child is killed and reaped before this returns. `on_spawn` is
    /// told the child's pid.
    pub async fn run(
        self,
        on_spawn: impl FnOnce(u32),
        cancel: CancellationToken,
    ) -> Result<Upgraded, UpgradeError> {
        let Handover {
            launch,
            fds,
            channel,
            timeout,
        } = self;
        let mut cmd = Command::new(&launch.exe);
        cmd.args(&launch.args)
            .current_dir(&launch.cwd)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .envs(fds.env.iter().map(|(k, v)| (k, v)));
        cmd.fd_mappings(fds.mappings)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut child = cmd.spawn().map_err(|source| UpgradeError::Spawn {
            exe: launch.exe.clone(),
            source,
        })?;
        // Our copies of the child's fds (its end of the channel above all) must close
        // now, or we would never see the channel close if the child dies.
        drop(cmd);
        let pid = child.id().unwrap_or_default();
        on_spawn(pid);
        let mut reader = BufReader::new(channel);
        let mut line = String::new();
        let deadline = tokio::time::Instant::now() + timeout;
        let outcome = tokio::select! {
            read = reader.read_line(&mut line) => match read {
                Ok(n) if n > 0 => parse_report(pid, line.trim_end()),
                // The channel closed: the child is exiting; say how it ended.
                _ => match tokio::time::timeout_at(deadline, child.wait()).await {
                    Ok(status) => Err(exited(pid, status)),
                    Err(_) => Err(UpgradeError::Timeout { pid, after: timeout }),
                },
            },
            () = tokio::time::sleep_until(deadline) => Err(UpgradeError::Timeout { pid, after: timeout }),
            () = cancel.cancelled() => Err(UpgradeError::Cancelled { pid }),
        };
        match outcome {
            Ok(()) => Ok(Upgraded {
                pid,
                channel: reader.into_inner(),
                _child: child,
            }),
            Err(err) => {
                // kill() also reaps; for a child that already exited it is a no-op.
                let _ = child.kill().await;
                Err(err)
            }
        }
    }
}

fn parse_report(pid: u32, line: &str) -> Result<(), UpgradeError> {
    match line.split_once(' ') {
        Some(("ready", _)) => Ok(()),
        Some(("error", reason)) => Err(UpgradeError::ChildFailed {
            pid,
            reason: reason.to_owned(),
        }),
        _ => Err(UpgradeError::ChildFailed {
            pid,
            reason: format!("unexpected report {line:?}"),
        }),
    }
}

fn exited(pid: u32, status: std::io::Result<ExitStatus>) -> UpgradeError {
    UpgradeError::ChildExited {
        pid,
        status: match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("status unknown: {e}"),
        },
    }
}

/// The child's side of the channel to the parent that is waiting for it.
#[derive(Debug)]
pub struct ReadyChannel(StdUnixStream);

impl ReadyChannel {
    /// Wraps the inherited channel.
    pub fn new(stream: StdUnixStream) -> Self {
        ReadyChannel(stream)
    }

    /// Tells the parent this process serves; returns the channel on which the parent
    /// sends what happens afterwards (a forwarded restart, its drain's progress).
    pub async fn ready(self) -> std::io::Result<Channel> {
        let mut stream = self.0;
        writeln!(stream, "ready {}", std::process::id())?;
        stream.set_nonblocking(true)?;
        Ok(Channel::new(UnixStream::from_std(stream)?))
    }

    /// Tells the parent why this process could not start.
    pub fn fail(mut self, reason: &str) {
        let one_line = reason.replace('\n', " ");
        // The parent may be gone already; nothing else to tell then.
        let _ = writeln!(self.0, "error {one_line}");
    }
}

/// A line the old process sends the new one after the handover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromParent {
    /// A restart request that arrived during the upgrade.
    Restart,
    /// An older generation is still draining with this many connections open.
    Draining {
        /// Its pid.
        pid: u32,
        /// Its open connections.
        connections: usize,
    },
    /// An older generation finished draining.
    Drained {
        /// Its pid.
        pid: u32,
    },
}

impl FromParent {
    /// The wire form, one line.
    pub fn line(&self) -> String {
        match self {
            FromParent::Restart => "restart\n".to_owned(),
            FromParent::Draining { pid, connections } => format!("draining {pid} {connections}\n"),
            FromParent::Drained { pid } => format!("drained {pid}\n"),
        }
    }

    fn parse(line: &str) -> Option<FromParent> {
        let mut words = line.split_whitespace();
        let msg = match (words.next()?, words.next(), words.next()) {
            ("restart", None, None) => FromParent::Restart,
            ("draining", Some(pid), Some(n)) => FromParent::Draining {
                pid: pid.parse().ok()?,
                connections: n.parse().ok()?,
            },
            ("drained", Some(pid), None) => FromParent::Drained {
                pid: pid.parse().ok()?,
            },
            _ => return None,
        };
        Some(msg)
    }
}

/// The channel between two generations after the handover, read as lines. Reading is
/// cancellation-safe (a partly read line waits in `pending`), so it can sit in a
/// `select!` with other events without losing a message.
#[derive(Debug)]
pub struct Channel {
    stream: BufReader<UnixStream>,
    pending: Vec<u8>,
}

impl Channel {
    /// Wraps one end of the handover channel.
    pub fn new(stream: UnixStream) -> Self {
        Channel {
            stream: BufReader::new(stream),
            pending: Vec::new(),
        }
    }

    /// The next message from the old process; `None` once it has gone. Unknown lines
    /// are skipped.
    pub async fn next(&mut self) -> Option<FromParent> {
        loop {
            match self.stream.read_until(b'\n', &mut self.pending).await {
                Ok(n) if n > 0 && self.pending.ends_with(b"\n") => {
                    let line = String::from_utf8_lossy(&self.pending).into_owned();
                    self.pending.clear();
                    if let Some(msg) = FromParent::parse(&line) {
                        return Some(msg);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Sends one message.
    pub async fn send(&mut self, msg: &FromParent) -> std::io::Result<()> {
        self.stream.get_mut().write_all(msg.line().as_bytes()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_messages_round_trip() {
        for msg in [
            FromParent::Restart,
            FromParent::Draining {
                pid: 12,
                connections: 3,
            },
            FromParent::Drained { pid: 12 },
        ] {
            assert_eq!(FromParent::parse(&msg.line()), Some(msg));
        }
        assert_eq!(FromParent::parse("draining x 1"), None);
    }

    #[test]
    fn child_reports_parse() {
        assert!(parse_report(5, "ready 5").is_ok());
        let err = parse_report(5, "error plugin /x.so was built for ABI 2").unwrap_err();
        assert_eq!(
            err.to_string(),
            "new process 5 failed to start: plugin /x.so was built for ABI 2"
        );
    }
}
