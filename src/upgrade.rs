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
use crate::handler::HandlerInfo;
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
        /// Its handler (from a supervisor's worker, which loads what the supervisor
        /// does not).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        handler: Option<crate::handler::HandlerInfo>,
    },
    /// It could not start, and why.
    Failed {
        /// Its own error message.
        reason: String,
    },
}

/// What the old process sends the new one after the handover.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// The counters of the generations before, for the new one to carry forward (the
    /// latest replaces any earlier).
    Totals(crate::metrics::Totals),
    /// From a supervisor: stop accepting and drain, but stay loaded (probation).
    Standby,
    /// From a supervisor: accept again (the generation that took over died).
    Resume,
    /// From a supervisor: drain and exit (a shutdown of the service: after the
    /// shutdown delay).
    Stop,
    /// From a supervisor: another worker took over; drain and exit at once.
    Retire,
    /// From a supervisor: reopen the access log.
    Reopen,
    /// From a supervisor: count an upgrade's outcome (`ok`, `failed`, `rolled_back`).
    Restarted {
        /// The outcome.
        result: String,
    },
    /// From a supervisor: the workers that crashed so far.
    Crashes {
        /// How many.
        count: u64,
    },
    /// From a supervisor: call the handler's `on_signal` hook with this signal.
    Hook {
        /// The signal number.
        signal: i32,
    },
}

/// What a supervisor's worker reports after its ready.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub(crate) enum FromWorker {
    /// Its counters (its predecessors' included), every so often.
    Totals(crate::metrics::Totals),
    /// Its load right now, every so often, for `gem status`.
    Load {
        /// Requests in flight.
        in_flight: usize,
        /// Open client connections.
        connections: usize,
    },
}

/// The channel between two generations, read as [`crate::wire`] lines.
pub(crate) type Channel = Wire<UnixStream>;

/// A second handle on `channel`'s socket, for a task that only writes (or only reads)
/// while another owns the first.
pub(crate) fn second_handle(channel: &Channel) -> std::io::Result<Channel> {
    use std::os::fd::AsFd as _;
    let fd = channel.get_ref().as_fd().try_clone_to_owned()?;
    Wire::from_std(StdUnixStream::from(fd), MAX_LINE)
        .map_err(|e| std::io::Error::other(e.to_string()))
}

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
    child: Option<Child>,
}

impl Upgraded {
    /// A new generation that serves, reachable on `channel`.
    pub(crate) fn new(pid: u32, channel: Channel, child: Option<Child>) -> Self {
        Upgraded {
            pid,
            channel,
            child,
        }
    }

    /// Sends the new process one message.
    pub(crate) async fn send(&mut self, msg: FromParent) -> Result<(), WireError> {
        self.channel.send(&Msg::new(msg)).await
    }

    /// Resolves when the new process has exited, with how; never for a process that is
    /// not our child.
    pub(crate) async fn exited(&mut self) -> ExitStatus {
        match &mut self.child {
            Some(child) => match child.wait().await {
                Ok(status) => status,
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
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
    worker: bool,
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
            worker: false,
        })
    }

    /// Makes the child a worker of this process: it loads `config` (JSON) and the
    /// plugin copy `plugin`, runs in a process group of its own (a terminal's Ctrl-C
    /// reaches the supervisor only) and does not talk to systemd.
    pub(crate) fn worker(&mut self, config: String, plugin: BorrowedFd<'_>) -> std::io::Result<()> {
        self.fds.worker(config, plugin)?;
        self.worker = true;
        Ok(())
    }

    /// The command that starts the child, ready to spawn: an exact `execve` with the
    /// fds mapped.
    fn command(&mut self) -> Result<std::process::Command, UpgradeError> {
        let spawn_err = |source| UpgradeError::Spawn {
            exe: self.launch.exe.clone(),
            source,
        };
        let mut env = self.fds.child_env();
        if self.worker {
            env.retain(|(k, _)| k != "NOTIFY_SOCKET");
        }
        let exec = Exec::new(&self.launch.exe, &self.launch.args, env).map_err(spawn_err)?;
        let mut cmd = std::process::Command::new(&self.launch.exe);
        cmd.current_dir(&self.launch.cwd);
        if self.worker {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        cmd.fd_mappings(std::mem::take(&mut self.fds.mappings))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        exec.install(&mut cmd);
        Ok(cmd)
    }

    /// Starts the child without waiting for it: its pid and the channel to it. Nothing
    /// reaps it but the caller (a supervisor's reaper).
    pub(crate) fn spawn_unreaped(mut self) -> Result<(u32, Channel), UpgradeError> {
        let mut cmd = self.command()?;
        let child = cmd.spawn().map_err(|source| UpgradeError::Spawn {
            exe: self.launch.exe.clone(),
            source,
        })?;
        // Our copies of the child's fds (its end of the channel above all) must close
        // now, or we would never see the channel close if the child dies.
        drop(cmd);
        Ok((child.id(), Wire::new(self.channel, MAX_LINE)))
    }

    /// Starts the child and waits for it to be ready. On failure, when `cancel` fires
    /// first, or if this future is dropped or panics, the child is killed (and reaped).
    /// `on_spawn` is told the child's pid.
    pub(crate) async fn run(
        mut self,
        on_spawn: impl FnOnce(u32),
        cancel: CancellationToken,
    ) -> Result<Upgraded, UpgradeError> {
        let mut cmd = Command::from(self.command()?);
        let child = cmd.spawn().map_err(|source| UpgradeError::Spawn {
            exe: self.launch.exe.clone(),
            source,
        })?;
        // As in `spawn_unreaped`.
        drop(cmd);
        let pid = child.id().unwrap_or_default();
        let mut guard = ChildGuard(Some(child));
        on_spawn(pid);
        let mut channel = Wire::new(self.channel, MAX_LINE);
        let died = async {
            match guard.0.as_mut() {
                Some(child) => describe(&child.wait().await),
                None => std::future::pending().await,
            }
        };
        let outcome = await_ready(&mut channel, pid, self.timeout, &cancel, died).await;
        match outcome {
            Ok(_) => Ok(Upgraded::new(pid, channel, guard.disarm())),
            Err(err) => {
                guard.kill().await;
                Err(err)
            }
        }
    }
}

/// Waits for child `pid` to report ready on `channel`, for at most `timeout`. `died`
/// resolves, with how, if the child exits.
pub(crate) async fn await_ready(
    channel: &mut Channel,
    pid: u32,
    timeout: Duration,
    cancel: &CancellationToken,
    died: impl std::future::Future<Output = String>,
) -> Result<Option<HandlerInfo>, UpgradeError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || UpgradeError::Timeout {
        pid,
        after: timeout,
    };
    tokio::pin!(died);
    tokio::select! {
        // A report that arrived is read first: a child that said why it failed and
        // exited has both ready at once.
        biased;
        report = channel.recv::<Msg<Report>>() => match report {
            Ok(Some(msg)) => read_report(pid, msg),
            Err(WireError::BadJson { received, .. }) => Err(UpgradeError::ChildFailed {
                pid,
                reason: format!("unexpected report {received:?}"),
            }),
            // The channel closed: the child is exiting; say how it ended.
            _ => match tokio::time::timeout_at(deadline, &mut died).await {
                Ok(status) => Err(UpgradeError::ChildExited { pid, status }),
                Err(_) => Err(timed_out()),
            },
        },
        status = &mut died => {
            // Its last words may still be on their way through the socket.
            match tokio::time::timeout(LAST_WORDS, channel.recv::<Msg<Report>>()).await {
                Ok(Ok(Some(msg))) => read_report(pid, msg),
                _ => Err(UpgradeError::ChildExited { pid, status }),
            }
        }
        () = tokio::time::sleep_until(deadline) => Err(timed_out()),
        () = cancel.cancelled() => Err(UpgradeError::Cancelled { pid }),
    }
}

/// How long a child that died may still have a report in flight on its channel.
const LAST_WORDS: Duration = Duration::from_millis(50);

/// How a process ended, for the log: `exit code 3`, `signal 6 SIGABRT`.
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match crate::signals::Signal::from_number(sig) {
            Some(s) => format!("signal {sig} {}", s.name()),
            None => format!("signal {sig}"),
        },
        _ => status.to_string(),
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => describe_exit(*s),
        Err(e) => format!("status unknown: {e}"),
    }
}

fn read_report(pid: u32, msg: Msg<Report>) -> Result<Option<HandlerInfo>, UpgradeError> {
    match msg.body {
        Report::Ready { handler, .. } => Ok(handler),
        Report::Failed { reason } => Err(UpgradeError::ChildFailed { pid, reason }),
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
    pub(crate) async fn ready(
        self,
        handler: Option<crate::handler::HandlerInfo>,
    ) -> Result<Channel, WireError> {
        let mut channel = Wire::from_std(self.0, MAX_LINE)?;
        let pid = std::process::id();
        channel
            .send(&Msg::new(Report::Ready { pid, handler }))
            .await?;
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
