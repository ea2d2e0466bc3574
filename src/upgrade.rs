//! Restart: start the recorded executable with the listening sockets inherited, wait
//! for its "ready" on a private channel, and roll back (kill and reap) on any failure.
//!
//! The channel is a Unix socket pair speaking [`crate::wire`]'s JSON lines, each with a
//! version `v`. The child sends one [`Report`]: `{"v":1,"msg":"ready","pid":N}` once it
//! serves, or `{"v":1,"msg":"failed","reason":"..."}` if it cannot start. Afterwards the
//! parent sends [`FromParent`] messages: a restart that arrived during the upgrade, and
//! its drain's progress. The channel stays open while the old process drains.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use command_fds::CommandFdExt;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::exec::Exec;
use crate::handover::ChildFds;
use crate::wire::{Wire, WireError};

/// The version of the messages between generations.
pub(crate) const VERSION: u32 = 1;
/// Longest line on the channel between generations (a failure reason is the longest).
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// How this process was started, recorded at start-up so a restart runs the binary now
/// at that path (a rebuilt or reinstalled one), not the image of this process.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    /// Absolute path of the executable as it was invoked.
    pub(crate) exe: PathBuf,
    /// Arguments after the program name.
    pub(crate) args: Vec<OsString>,
    /// Working directory at start-up.
    pub(crate) cwd: PathBuf,
}

impl Launch {
    /// Records the current process's launch. `argv[0]` is made absolute (or looked up in
    /// `PATH`, once, now, as the shell that started us did) without resolving symlinks,
    /// so repointing a symlink upgrades too.
    pub(crate) fn current() -> std::io::Result<Launch> {
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
    /// The executable could not be started (`Exec format error`, not found, ...).
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
    /// The upgrade task itself failed (a bug); its child, if any, was killed.
    #[error("the upgrade task failed: {0}")]
    Task(String),
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
            UpgradeError::Spawn { .. } | UpgradeError::Task(_) | UpgradeError::Io(_) => None,
        }
    }
}

/// A message with its protocol version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Msg<T> {
    /// Protocol version.
    pub(crate) v: u32,
    /// The message.
    #[serde(flatten)]
    pub(crate) body: T,
}

impl<T> Msg<T> {
    pub(crate) fn new(body: T) -> Self {
        Msg { v: VERSION, body }
    }
}

/// What a starting child tells the process waiting for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum Report {
    /// It serves.
    Ready {
        /// Its pid.
        pid: u32,
    },
    /// It could not start, and why.
    Failed {
        /// Its own error message.
        reason: String,
    },
}

/// What the old process sends the new one after the handover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum FromParent {
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

/// The channel between two generations, read as [`crate::wire`] lines.
pub(crate) type Channel = Wire<UnixStream>;

/// The next message from the old process; `None` once it has gone. Messages of another
/// version or kind are skipped. Cancellation-safe.
pub(crate) async fn next_from_parent(channel: &mut Channel) -> Option<FromParent> {
    loop {
        match channel.recv::<Msg<FromParent>>().await {
            Ok(Some(msg)) if msg.v == VERSION => return Some(msg.body),
            Ok(Some(_)) | Err(WireError::BadJson { .. }) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

/// A child that reported ready and now serves.
#[derive(Debug)]
pub(crate) struct Upgraded {
    /// Its pid.
    pub(crate) pid: u32,
    channel: Channel,
    // Held so the child is reaped if it exits while we still run; never killed on drop.
    _child: Option<Child>,
}

impl Upgraded {
    /// A new generation that serves, reachable on `channel`.
    pub(crate) fn new(pid: u32, channel: Channel, child: Option<Child>) -> Self {
        Upgraded {
            pid,
            channel,
            _child: child,
        }
    }

    /// Sends the new process one message.
    pub(crate) async fn send(&mut self, msg: FromParent) -> Result<(), WireError> {
        self.channel.send(&Msg::new(msg)).await
    }
}

/// The child until it is known to serve: dropped armed (a failed or cancelled upgrade,
/// or a panic in the task that waits for it), it is killed, and tokio reaps it.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    /// Keeps the child running: the upgrade succeeded.
    fn disarm(mut self) -> Option<Child> {
        self.0.take()
    }

    /// Kills the child and waits for it to be reaped.
    async fn kill(mut self) {
        if let Some(mut child) = self.0.take() {
            // kill() also reaps; for a child that already exited it is a no-op.
            let _ = child.kill().await;
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.start_kill();
        }
    }
}

/// A prepared handover: the child's fds are duplicated, so this owns everything it
/// needs and can run on its own task.
#[derive(Debug)]
pub(crate) struct Handover {
    launch: Launch,
    fds: ChildFds,
    channel: UnixStream,
    timeout: Duration,
}

impl Handover {
    /// Prepares a handover of `listeners` (label and socket) and the control socket to
    /// a child of generation `generation`, which gets `timeout` to report ready.
    pub(crate) fn new(
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

    /// Starts the child and waits for it to be ready. On failure, when `cancel` fires
    /// first, or if this future is dropped or panics, the child is killed (and reaped).
    /// `on_spawn` is told the child's pid.
    pub(crate) async fn run(
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
        let spawn_err = |source| UpgradeError::Spawn {
            exe: launch.exe.clone(),
            source,
        };
        let exec = Exec::new(&launch.exe, &launch.args, fds.child_env()).map_err(spawn_err)?;
        let mut cmd = Command::new(&launch.exe);
        cmd.current_dir(&launch.cwd);
        cmd.fd_mappings(fds.mappings)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        exec.install(&mut cmd);
        let child = cmd.spawn().map_err(spawn_err)?;
        // Our copies of the child's fds (its end of the channel above all) must close
        // now, or we would never see the channel close if the child dies.
        drop(cmd);
        let pid = child.id().unwrap_or_default();
        let mut guard = ChildGuard(Some(child));
        on_spawn(pid);
        let mut channel = Wire::new(channel, MAX_LINE);
        let deadline = tokio::time::Instant::now() + timeout;
        let timed_out = || UpgradeError::Timeout {
            pid,
            after: timeout,
        };
        let outcome = tokio::select! {
            report = channel.recv::<Msg<Report>>() => match report {
                Ok(Some(msg)) => read_report(pid, msg),
                Err(WireError::BadJson { received, .. }) => Err(UpgradeError::ChildFailed {
                    pid,
                    reason: format!("unexpected report {received:?}"),
                }),
                // The channel closed: the child is exiting; say how it ended.
                _ => match guard.0.as_mut() {
                    Some(child) => match tokio::time::timeout_at(deadline, child.wait()).await {
                        Ok(status) => Err(exited(pid, status)),
                        Err(_) => Err(timed_out()),
                    },
                    None => Err(timed_out()),
                },
            },
            () = tokio::time::sleep_until(deadline) => Err(timed_out()),
            () = cancel.cancelled() => Err(UpgradeError::Cancelled { pid }),
        };
        match outcome {
            Ok(()) => Ok(Upgraded::new(pid, channel, guard.disarm())),
            Err(err) => {
                guard.kill().await;
                Err(err)
            }
        }
    }
}

fn read_report(pid: u32, msg: Msg<Report>) -> Result<(), UpgradeError> {
    match msg.body {
        Report::Ready { .. } => Ok(()),
        Report::Failed { reason } => Err(UpgradeError::ChildFailed { pid, reason }),
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
pub(crate) struct ReadyChannel(StdUnixStream);

impl ReadyChannel {
    /// Wraps the inherited channel.
    pub(crate) fn new(stream: StdUnixStream) -> Self {
        ReadyChannel(stream)
    }

    /// Tells the parent this process serves; returns the channel on which the parent
    /// sends what happens afterwards (a forwarded restart, its drain's progress).
    pub(crate) async fn ready(self) -> Result<Channel, WireError> {
        let mut channel = Wire::from_std(self.0, MAX_LINE)?;
        let pid = std::process::id();
        channel.send(&Msg::new(Report::Ready { pid })).await?;
        Ok(channel)
    }

    /// Tells the parent why this process could not start. Synchronous: it may run
    /// before any runtime exists (a broken config).
    pub(crate) fn fail(mut self, reason: &str) {
        let msg = Msg::new(Report::Failed {
            reason: reason.to_owned(),
        });
        if let Ok(mut line) = serde_json::to_string(&msg) {
            line.push('\n');
            // The parent may be gone already; nothing else to tell then.
            let _ = self.0.write_all(line.as_bytes());
        }
    }
}

#[cfg(test)]
#[path = "upgrade_tests.rs"]
mod tests;
