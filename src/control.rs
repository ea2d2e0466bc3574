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

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::handler::HandlerInfo;

/// The protocol version spoken here.
pub const VERSION: u32 = 1;

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
/// Each connection is answered on its own task, tracked by `answers`.
pub async fn serve(
    listener: UnixListener,
    calls: mpsc::Sender<Call>,
    stop: CancellationToken,
    answers: TaskTracker,
) {
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    debug!(cause = %err, "control socket accept failed");
                    continue;
                }
            },
        };
        answers.spawn(answer(stream, calls.clone()));
    }
}

async fn answer(stream: UnixStream, calls: mpsc::Sender<Call>) {
    let pid = std::process::id();
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    if stream.read_line(&mut line).await.is_err() {
        return;
    }
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) if req.v != VERSION => Reply::error(
            format!(
                "protocol version {} is not supported; this gem speaks {VERSION}",
                req.v
            ),
            pid,
        ),
        Ok(req) => {
            let (tx, rx) = oneshot::channel();
            let call = Call {
                cmd: req.cmd,
                reply: tx,
            };
            match calls.send(call).await {
                Ok(()) => rx
                    .await
                    .unwrap_or_else(|_| Reply::error("the server is shutting down", pid)),
                Err(_) => Reply::error("the server is shutting down", pid),
            }
        }
        Err(err) => Reply::error(format!("bad request: {err}"), pid),
    };
    let Ok(mut text) = serde_json::to_string(&reply) else {
        return;
    };
    text.push('\n');
    let _ = stream.get_mut().write_all(text.as_bytes()).await;
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
        let mut stream =
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
        let mut line =
            serde_json::to_string(&Request { v: VERSION, cmd }).map_err(|e| bad(e.to_string()))?;
        line.push('\n');
        stream
            .write_all(line.as_bytes())
            .await
            .map_err(|e| bad(e.to_string()))?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .await
            .map_err(|e| bad(e.to_string()))?;
        if answer.is_empty() {
            return Err(bad("the connection closed without an answer".into()));
        }
        serde_json::from_str(&answer).map_err(|e| bad(format!("{e}: {answer:?}")))
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
