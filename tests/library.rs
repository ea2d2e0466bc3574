//! The library API with an injected signal source: the lifecycle is driven without any
//! real signal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use gem::control::{self, Command, ReplyBody};
use gem::{Action, Builder, Exit, Response, Server, ServerConfig, Signal};
use tokio::sync::mpsc;

#[test]
fn set_signal_refuses_what_the_rules_forbid() {
    let builder = || Server::builder().handler(|_| Response::text(200, "x"));
    let err = builder().signal(Signal::TERM, Action::Restart).unwrap_err();
    assert!(
        err.to_string().contains("SIGTERM is always \"shutdown\""),
        "{err}"
    );
    let err = builder().signal(Signal::KILL, Action::Ignore).unwrap_err();
    assert!(
        err.to_string().contains("SIGKILL cannot be mapped"),
        "{err}"
    );
    assert!(builder().signal(Signal::USR2, Action::Restart).is_ok());
    let err = Server::builder().build().unwrap_err();
    assert!(err.to_string().contains("no handler"), "{err}");
}

#[test]
fn load_config_keeps_current_values_for_zero_fields() {
    let server = Server::builder()
        .handler(|_| Response::text(200, "x"))
        .load_config(ServerConfig {
            wait_timeout: Duration::from_secs(30),
            ..Default::default()
        })
        .load_config(ServerConfig {
            max_body_size: 10,
            ..Default::default()
        })
        .build()
        .unwrap();
    let config = server.config();
    assert_eq!(config.wait_timeout, Duration::from_secs(30));
    assert_eq!(config.limits.max_body_size, 10);
    assert_eq!(
        config.upgrade_timeout,
        Duration::from_secs(30),
        "default kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_signals_drive_the_lifecycle() {
    let server = Server::builder()
        .handler(|_| Response::text(200, "Hello world."))
        .signal(Signal::USR2, Action::Shutdown)
        .unwrap();
    let running = Running::start(server).await;

    // Ignored signals leave it running and serving. The channel holds one signal, so
    // the third send returns only once the lifecycle has taken the second.
    for _ in 0..3 {
        running.tx.send(Signal::USR1).await.unwrap();
    }
    let answer = running.get().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("Hello world."), "{answer}");
    assert!(!running.run.is_finished());

    let socket = running.socket.clone();
    assert_eq!(running.exit(Signal::USR2).await, Exit::Shutdown { cut: 0 });
    assert!(!socket.exists(), "a final stop removes the control socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_handlers_may_use_the_runtime() {
    // Run on a worker thread, this would panic (and answer 500): in-process handlers
    // are not run inline unless they say so.
    let server = Server::builder().handler(|_| {
        let n = tokio::runtime::Handle::current()
            .block_on(async { tokio::spawn(async { 21 * 2 }).await.unwrap() });
        Response::text(200, format!("{n}"))
    });
    let running = Running::start(server).await;
    let answer = running.get().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("42"), "{answer}");
    assert_eq!(running.exit(Signal::TERM).await, Exit::Shutdown { cut: 0 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_process_handler_s_reader_is_read_off_the_workers() {
    /// Three reads of `abc`, each asking the runtime for its bytes: on a worker
    /// thread, `block_on` would panic and cut the stream.
    struct Runtime(u8);
    impl std::io::Read for Runtime {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.0 == 3 {
                return Ok(0);
            }
            self.0 += 1;
            let piece = tokio::runtime::Handle::current()
                .block_on(async { tokio::spawn(async { *b"abc" }).await.unwrap() });
            buf[..3].copy_from_slice(&piece);
            Ok(3)
        }
    }
    let server = Server::builder().handler(|_| Response::reader(200, Runtime(0)));
    let running = Running::start(server).await;
    let answer = running.get().await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("\r\n\r\n3\r\nabc\r\n3\r\nabc\r\n3\r\nabc\r\n0\r\n\r\n"),
        "{answer}"
    );
    assert_eq!(running.exit(Signal::TERM).await, Exit::Shutdown { cut: 0 });
}

/// A library server on 127.0.0.1, driven by signals the test sends, with a control
/// socket to find its address.
struct Running {
    tx: mpsc::Sender<Signal>,
    run: tokio::task::JoinHandle<Result<Exit, gem::Error>>,
    addr: String,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(builder: Builder) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("gem.sock");
        let server = builder
            .listen("127.0.0.1:0")
            .control_socket(&socket)
            .build()
            .unwrap();
        // Room for one signal: a send returns once the lifecycle took the one before.
        let (tx, mut rx) = mpsc::channel(1);
        let signals = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let run = tokio::spawn(server.run_with_signals(signals));
        let addr = serving_address(&socket).await;
        Running {
            tx,
            run,
            addr,
            socket,
            _dir: dir,
        }
    }

    /// `GET /` on a fresh connection; the whole answer.
    async fn get(&self) -> String {
        let addr = self.addr.clone();
        tokio::task::spawn_blocking(move || hello(&addr))
            .await
            .unwrap()
    }

    /// Sends `signal` and waits (10 s at most) for the server to return.
    async fn exit(self, signal: Signal) -> Exit {
        self.tx.send(signal).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.run)
            .await
            .expect("shutdown in time")
            .unwrap()
            .unwrap()
    }
}

/// Waits (10 s at most) for the control socket to answer `status`; returns the first
/// listening address.
async fn serving_address(socket: &std::path::Path) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(reply) = control::call(socket, Command::Status, Duration::from_secs(1)).await
            && let ReplyBody::Status(status) = reply.body
        {
            return status.listen[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no status on {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `GET /` over a fresh connection; the whole answer.
fn hello(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}
