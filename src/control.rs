//! The control socket: `reload`, `stop` and `status`, each answered with the outcome.
//!
//! Protocol (version 1): the client connects to the Unix socket, writes one JSON object
//! on one line, and reads one JSON line back; the server then closes.
//!
//! ```text
//! -> {"v":1,"cmd":"status"}
//! <- {"v":1,"ok":true,"status":{...}}
//! -> {"v":1,"cmd":"reload"}
//! <- {"v":1,"ok":true,"upgraded":{"from":A,"to":B,"generation":N,"ms":X}}
//! <- {"v":1,"ok":false,"failed":{"reason":"...","pid":A}}
//! -> {"v":1,"cmd":"stop"}
//! <- {"v":1,"ok":true,"stopped":{"pid":A,"cut":0}}
//! ```
//!
//! A `reload` that arrives while an upgrade runs is answered with the outcome of the
//! one follow-up upgrade it was coalesced into. If that follow-up runs in the new
//! process, the answer is `{"ok":true,"forwarded":{"to":B,"generation":N}}`, and the
//! client asks the new process with `{"v":1,"cmd":"wait_upgrade","generation":N}`, which
//! is answered like `reload` once the first upgrade started by generation N is over.
//!
//! A command that reaches a process just after it handed over is answered with
//! `{"ok":true,"handed_over":{"to":B}}`: send it again, and the new process answers.
//!
//! # Bounds
//!
//! Lines travel as `wire` messages (JSON, one per line). A request line longer than
//! [`MAX_REQUEST`] is answered with an error naming the limit, and the connection
//! closes; so does one that sends no full line within [`REQUEST_TIMEOUT`] (a command
//! already read waits for its outcome as long as it takes). At most
//! [`MAX_CONNECTIONS`] are served at once; when full, a new connection displaces the
//! oldest one still waiting for its request, so a crowd of silent clients cannot lock
//! out `gem status`, which talks at once. Only when every place holds a command being
//! answered is the newcomer refused (`too many control connections`). The socket is
//! mode 0600, so such a crowd can only come from the owner's own processes.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{Admission, Backoff, Slot};
use crate::handler::HandlerInfo;
use crate::wire::{Wire, WireError};

/// The protocol version spoken here.
pub const VERSION: u32 = 1;

/// The longest request line read: a request is a few dozen bytes, and a client that
/// sends more (or no newline at all) must not make the server buffer it.
pub const MAX_REQUEST: usize = 4096;

/// How long a connection may take to send its request line. Waiting for the outcome
/// of a `reload` or `stop` that was read is not limited by it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How many control connections are served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// The longest reply line a client reads (a status names every listener).
const MAX_REPLY: usize = 1 << 20;

/// The answer when every place is taken by a connection with a command in hand.
const TOO_MANY: &str = "too many control connections";

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version.
    pub v: u32,
    /// The command.
    #[serde(flatten)]
    pub cmd: Command,
}

/// What the client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Report the state of the serving process.
    Status,
    /// Upgrade and report the outcome.
    Reload,
    /// Report the outcome of the first upgrade started by `generation`.
    WaitUpgrade {
        /// The generation whose first upgrade is awaited.
        generation: u64,
    },
    /// Drain and exit; report how it went.
    Stop,
    /// Supervisor only: re-execute the gem binary in place, keeping the pid, the
    /// sockets and the workers. No reply on success (the connection closes with the
    /// exec); `status` then shows `execs` one higher.
    Reexec,
}

/// A reply line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Protocol version.
    pub v: u32,
    /// Whether the command succeeded.
    pub ok: bool,
    /// The payload.
    #[serde(flatten)]
    pub body: ReplyBody,
}

/// What a reply carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyBody {
    /// For `status`.
    Status(Box<Status>),
    /// A successful upgrade.
    Upgraded(Upgraded),
    /// The upgrade was passed on to the new process, which runs it.
    Forwarded {
        /// The new process.
        to: u32,
        /// Its generation: ask it with `wait_upgrade`.
        generation: u64,
    },
    /// This process has handed over to `to` and is draining: ask again, and the new
    /// process answers.
    HandedOver {
        /// The new process.
        to: u32,
    },
    /// The process drained and is exiting.
    Stopped {
        /// Its pid.
        pid: u32,
        /// Connections cut at `wait_timeout`.
        cut: usize,
    },
    /// Something failed; `reason` says what. `pid` still serves (for reload).
    Failed {
        /// The failure.
        reason: String,
        /// The process that answered.
        pid: u32,
    },
}

/// A completed upgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upgraded {
    /// The old process.
    pub from: u32,
    /// The new process.
    pub to: u32,
    /// The new generation.
    pub generation: u64,
    /// From the restart request to ready, in milliseconds (when known).
    pub ms: Option<u64>,
}

/// The result of the last upgrade, kept for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUpgrade {
    /// `upgraded` or `failed`.
    pub result: String,
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// Why it failed; empty on success.
    pub reason: String,
    /// The new process's pid, if one was started.
    pub pid: Option<u32>,
}

/// An older generation that is still draining.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Draining {
    /// Its pid.
    pub pid: u32,
    /// Its open connections.
    pub connections: usize,
}

/// What `gem status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The serving process.
    pub pid: u32,
    /// Its generation: 1 for a fresh start, +1 per upgrade.
    pub generation: u64,
    /// Milliseconds since this generation started serving.
    pub uptime_ms: u64,
    /// Listening addresses.
    pub listen: Vec<String>,
    /// The handler.
    pub plugin: HandlerInfo,
    /// Requests being handled right now.
    pub in_flight: usize,
    /// Open client connections.
    pub connections: usize,
    /// The last upgrade started by this process, if any.
    pub last_upgrade: Option<LastUpgrade>,
    /// Older generations still draining.
    pub draining: Vec<Draining>,
    /// In supervised mode: the supervisor and its workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor: Option<SupervisorStatus>,
    /// `serving`, `upgrading`, `shutdown_delay` or `draining`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Each TLS listener's certificate, as the serving generation read it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<ListenerTls>,
}

/// A TLS listener and its certificate, for `gem status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerTls {
    /// The `listen` entry's address, as written.
    pub listen: String,
    /// What its certificate says.
    #[serde(flatten)]
    pub cert: crate::tls::CertInfo,
}

/// The supervisor, for `gem status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    /// Its pid, which stays for the life of the service.
    pub pid: u32,
    /// Workers that died without being asked to, since the supervisor started.
    pub crashes: u64,
    /// Milliseconds until the next replacement worker starts, while one is due.
    pub next_start_ms: Option<u64>,
    /// How many times the supervisor re-executed its binary in place.
    pub execs: u64,
    /// Its workers.
    pub workers: Vec<WorkerStatus>,
}

/// One worker, for `gem status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Its pid.
    pub pid: u32,
    /// Its generation.
    pub generation: u64,
    /// `starting`, `serving`, `standby` (on probation, ready to resume) or `draining`.
    pub state: String,
}

/// A command for the lifecycle loop, with where to send the reply.
#[derive(Debug)]
pub struct Call {
    /// The command.
    pub cmd: Command,
    /// Where the lifecycle sends the reply.
    pub reply: oneshot::Sender<Reply>,
}

impl Reply {
    /// A failure reply from process `pid`.
    pub fn error(reason: impl Into<String>, pid: u32) -> Reply {
        Reply {
            v: VERSION,
            ok: false,
            body: ReplyBody::Failed {
                reason: reason.into(),
                pid,
            },
        }
    }

    /// A success reply.
    pub fn ok(body: ReplyBody) -> Reply {
        Reply {
            v: VERSION,
            ok: true,
            body,
        }
    }
}

/// Binds the control socket at `path` with mode 0600. A socket file left by a killed
/// process is replaced; one that a live gem answers on is an error.
pub fn bind(path: &Path) -> std::io::Result<StdUnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "control socket {} is in use by a running gem",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let listener = StdUnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts control connections until `stop`, passing each command to the lifecycle.
/// Each connection is answered on its own task, tracked by `answers`; at most
/// [`MAX_CONNECTIONS`] are served at once (see the module doc for who gives way).
pub async fn serve(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    stop: CancellationToken,
    answers: TaskTracker,
) {
    let addr = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        .unwrap_or_else(|| "the control socket".into());
    let mut backoff = Backoff::new(addr);
    let admission = Admission::new(MAX_CONNECTIONS);
    while let Some((stream, _)) = backoff.accept(&stop, || listener.accept()).await {
        match admission.admit() {
            Some(slot) => {
                answers.spawn(answer(stream, slot, calls.clone()));
            }
            None => refuse(&stream),
        }
    }
}

/// Answers a connection beyond the limit without waiting for it: the line fits in an
/// empty socket buffer, and a client that cannot take it learns from the close.
fn refuse(stream: &UnixStream) {
    let reply = Reply::error(TOO_MANY, std::process::id());
    if let Ok(mut line) = serde_json::to_vec(&reply) {
        line.push(b'\n');
        let _ = stream.try_write(&line);
    }
}

async fn answer(stream: UnixStream, mut slot: Slot, calls: mpsc::Sender<Call>) {
    let pid = std::process::id();
    let mut wire = Wire::new(stream, MAX_REQUEST);
    let reply = match read_request(&mut wire, &slot).await {
        Ok(None) => return,
        Ok(Some(req)) if slot.start_work() => run(req.cmd, &calls, pid).await,
        Ok(Some(_)) => Reply::error(TOO_MANY, pid),
        Err(reason) => Reply::error(reason, pid),
    };
    // A client that reads nothing must not keep its place for ever either.
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, wire.send(&reply)).await;
}

/// Reads the request line within [`REQUEST_TIMEOUT`], unless a newer connection takes
/// this one's place first. `None` if the client closed without asking anything.
async fn read_request(wire: &mut Wire<UnixStream>, slot: &Slot) -> Result<Option<Request>, String> {
    let read = tokio::select! {
        () = slot.evicted() => return Err(TOO_MANY.into()),
        read = tokio::time::timeout(REQUEST_TIMEOUT, wire.recv::<Request>()) => read,
    };
    match read {
        Err(_) => Err(format!(
            "no request line within {}",
            humantime::format_duration(REQUEST_TIMEOUT)
        )),
        Ok(Ok(Some(req))) if req.v != VERSION => Err(format!(
            "protocol version {} is not supported; this gem speaks {VERSION}",
            req.v
        )),
        Ok(Ok(req)) => Ok(req),
        Ok(Err(WireError::TooLong { max })) => {
            Err(format!("the request line is longer than {max} bytes"))
        }
        Ok(Err(err)) => Err(format!("bad request: {err}")),
    }
}

/// Hands `cmd` to the lifecycle and waits for its outcome, however long it takes.
async fn run(cmd: Command, calls: &mpsc::Sender<Call>, pid: u32) -> Reply {
    let (tx, rx) = oneshot::channel();
    if calls.send(Call { cmd, reply: tx }).await.is_err() {
        return Reply::error("the server is shutting down", pid);
    }
    rx.await
        .unwrap_or_else(|_| Reply::error("the server is shutting down", pid))
}

/// Why a control client got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("no gem is answering on {}: {source}", path.display())]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The server closed or sent garbage.
    #[error("bad answer from {}: {reason}", path.display())]
    BadAnswer {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// No answer in time.
    #[error("no answer from {} within {}", path.display(), humantime::format_duration(*timeout))]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
}

/// Sends `cmd` to the gem at `path` and waits up to `timeout` for the reply.
pub async fn call(path: &Path, cmd: Command, timeout: Duration) -> Result<Reply, ClientError> {
    let exchange = async {
        let stream =
            UnixStream::connect(path)
                .await
                .map_err(|source| ClientError::Unreachable {
                    path: path.to_owned(),
                    source,
                })?;
        let bad = |reason: String| ClientError::BadAnswer {
            path: path.to_owned(),
            reason,
        };
        let mut wire = Wire::new(stream, MAX_REPLY);
        // A refused connection may be closed before the request is written: its
        // answer, if any, says why.
        let sent = wire.send(&Request { v: VERSION, cmd }).await;
        match wire.recv::<Reply>().await {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => Err(bad(match sent {
                Ok(()) => "the connection closed without an answer".into(),
                Err(err) => err.to_string(),
            })),
            Err(err) => Err(bad(err.to_string())),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                path: path.to_owned(),
                timeout,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_is_stable() {
        let req = Request {
            v: 1,
            cmd: Command::WaitUpgrade { generation: 3 },
        };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"v":1,"cmd":"wait_upgrade","generation":3}"#
        );
        let reply = Reply::ok(ReplyBody::Upgraded(Upgraded {
            from: 1,
            to: 2,
            generation: 2,
            ms: Some(5),
        }));
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"v":1,"ok":true,"upgraded":{"from":1,"to":2,"generation":2,"ms":5}}"#
        );
        let err = Reply::error("nope", 7);
        let text = serde_json::to_string(&err).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"ok":false,"failed":{"reason":"nope","pid":7}}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&text).unwrap(), err);
    }

    #[tokio::test]
    async fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gem.sock");
        let first = bind(&path).unwrap();
        let err = bind(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        drop(first); // the file stays behind, as after kill -9
        assert!(path.exists());
        let _second = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
