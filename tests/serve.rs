//! Serving from a plugin: protocols, the handler's failure modes, request limits, bad
//! plugins and bad config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::client::{self, get, get_h2, post};
use common::{Gem, Spec, plugin, run_gem};

#[test]
fn hello_over_http1_and_http2() {
    let gem = Gem::start(Spec::new("hello", ""));
    let r = get(gem.addr, "/").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "Hello world."));
    assert_eq!(r.version, http::Version::HTTP_11);
    let r = get_h2(gem.addr, "/").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "Hello world."));
    assert_eq!(r.version, http::Version::HTTP_2);
    assert!(gem.count_log("handler hello 0.1.0 (plugin ABI 2)") == 1);
}

#[test]
fn a_panicking_handler_is_a_500_and_the_next_request_is_fine() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let pid = gem.pid();
    let r = get(gem.addr, "/panic").unwrap();
    assert_eq!(r.status, 500);
    gem.wait_log("handler panicked");
    let r = get(gem.addr, "/").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "Hello world."));
    assert_eq!(gem.pid(), pid);
    assert!(common::alive(pid));
}

#[test]
fn invalid_handler_output_is_a_500_with_a_log_line() {
    let gem = Gem::start(Spec::new("hello", ""));
    assert_eq!(get(gem.addr, "/bad-status").unwrap().status, 500);
    gem.wait_log("status 1000 is not valid");
    assert_eq!(get(gem.addr, "/bad-header").unwrap().status, 500);
    gem.wait_log("is not valid");
    assert_eq!(get(gem.addr, "/").unwrap().status, 200);
}

#[test]
fn bodies_over_the_limit_get_413_and_smaller_ones_echo_intact() {
    let gem = Gem::start(Spec::new("hello", ""));
    let big = vec![b'x'; 2 * 1024 * 1024];
    assert_eq!(post(gem.addr, "/echo", big).unwrap().status, 413);
    let body: Vec<u8> = (0..100 * 1024).map(|i| (i % 251) as u8).collect();
    let r = post(gem.addr, "/echo", body.clone()).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.as_ref(), body.as_slice());
}

#[test]
fn a_slow_handler_does_not_stall_other_requests() {
    // One sleeper runs on a runtime worker thread (the fast path for handlers); eight
    // are more than the runtime has workers.
    for n in [1, 8] {
        let gem = Gem::start(Spec::new("hello", ""));
        let sleepers: Vec<_> = (0..n)
            .map(|_| client::spawn_get(gem.addr, "/sleep?ms=4000"))
            .collect();
        common::wait_for("the sleepers to be in flight", || {
            (gem.in_flight() >= n).then_some(())
        });
        for _ in 0..5 {
            let r = get(gem.addr, "/").unwrap();
            assert_eq!(r.status, 200);
        }
        assert!(
            sleepers.iter().all(|s| !s.is_finished()),
            "fast requests were answered while the slow ones still ran"
        );
        for s in sleepers {
            assert_eq!(s.join().unwrap().unwrap().status, 200);
        }
    }
}

#[test]
fn malformed_and_oversized_requests_are_refused_and_serving_goes_on() {
    let gem = Gem::start(Spec::new("hello", "max_header_size = \"8KiB\""));
    // One write on `raw`, then all it answers, to the close. One write: the server
    // answers 431 and closes once it has read its limit, and a second write racing
    // that close would fail with EPIPE.
    let answer = |raw: &mut TcpStream, head: &[u8]| {
        raw.write_all(head).unwrap();
        let mut answer = String::new();
        let _ = raw.read_to_string(&mut answer);
        answer
    };
    let fresh = || TcpStream::connect(gem.addr).unwrap();
    let refused = answer(&mut fresh(), b"NOT HTTP AT ALL\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused:?}");

    let huge = "a".repeat(16 * 1024);
    let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\n\r\n");
    let refused = answer(&mut fresh(), head.as_bytes());
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused:?}");

    // Just under the limit, a head is served, on a connection that stays open.
    let mut raw = fresh();
    let fits = |len: usize| {
        let line = "GET / HTTP/1.1\r\nhost: x\r\nx-big: \r\n\r\n";
        let big = "a".repeat(len - line.len());
        format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n")
    };
    raw.write_all(fits(8 * 1024).as_bytes()).unwrap();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = raw.read(&mut buf).unwrap();
    let served = String::from_utf8_lossy(&buf[..n]);
    assert!(served.starts_with("HTTP/1.1 200"), "{served:?}");
    // One byte over, it is refused, and the connection closed (the read ends).
    let refused = answer(&mut raw, fits(8 * 1024 + 1).as_bytes());
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused:?}");

    // Padding counts: a head is measured as it came, not as it was parsed.
    let pad = " ".repeat(10 * 1024);
    let padded = format!("GET / HTTP/1.1\r\nhost: x\r\nx-pad:{pad}a\r\n\r\n");
    let refused = answer(&mut fresh(), padded.as_bytes());
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused:?}");
    assert_eq!(get(gem.addr, "/").unwrap().status, 200);
}

#[test]
fn overwriting_the_loaded_so_in_place_does_not_disturb_serving() {
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("handler.so");
    std::fs::copy(plugin("hello"), &so).unwrap();
    let gem = Gem::start(Spec::with_so(&so, ""));
    assert_eq!(get(gem.addr, "/").unwrap().text(), "Hello world.");
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&so).unwrap());
    // std::fs::copy truncates and rewrites the same file: the `cp` case.
    std::fs::copy(plugin("upgraded"), &so).unwrap();
    let inode_after = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&so).unwrap());
    assert_eq!(inode, inode_after, "the test must overwrite in place");
    for _ in 0..20 {
        let r = get(gem.addr, "/").unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "Hello world."));
    }
}

fn serve_fails_with(handler: &std::path::Path) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gem.toml"),
        format!("listen = [\"127.0.0.1:0\"]\nhandler = {handler:?}\n"),
    )
    .unwrap();
    let (status, _, stderr) = run_gem(dir.path(), &["serve"], &[]);
    assert!(!status.success(), "gem served with {}", handler.display());
    assert!(!stderr.contains("Server started"), "{stderr}");
    stderr
}

#[test]
fn bad_plugins_refuse_to_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"this is not an ELF file").unwrap();
    let err = serve_fails_with(&garbage);
    assert!(err.contains(&garbage.display().to_string()), "{err}");

    let missing = dir.path().join("missing.so");
    let err = serve_fails_with(&missing);
    assert!(err.contains(&missing.display().to_string()), "{err}");

    let wrong_abi = plugin("abi-v1");
    let err = serve_fails_with(&wrong_abi);
    assert!(err.contains(&wrong_abi.display().to_string()), "{err}");
    assert!(err.contains("ABI 2") && err.contains("ABI 1"), "{err}");
}

#[test]
fn config_errors_name_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("gem.toml");

    std::fs::write(&toml, "listen = [\"127.0.0.1:0\"]\nwait_timout = \"1s\"\n").unwrap();
    let (status, _, err) = run_gem(dir.path(), &["serve"], &[]);
    assert!(!status.success());
    assert!(
        err.contains("wait_timout") && err.contains("gem.toml"),
        "{err}"
    );

    std::fs::write(&toml, "wait_timeout = \"a while\"\n").unwrap();
    let (status, _, err) = run_gem(dir.path(), &["serve"], &[]);
    assert!(!status.success());
    assert!(
        err.contains("wait_timeout") && err.contains("\"a while\""),
        "{err}"
    );

    let (status, _, err) = run_gem(dir.path(), &["serve", "--config", "nope.toml"], &[]);
    assert!(!status.success());
    assert!(
        err.contains("config file nope.toml does not exist"),
        "{err}"
    );
}

#[test]
fn env_overrides_the_file_and_the_flag_overrides_the_env() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gem.toml"),
        format!("wait_timeout = \"20s\"\nhandler = {:?}\n", plugin("hello")),
    )
    .unwrap();
    let line = |args: &[&str], env: &[(&str, &str)]| {
        let (status, out, err) = run_gem(dir.path(), args, env);
        assert!(status.success(), "{err}");
        out.lines()
            .find(|l| l.starts_with("wait_timeout:"))
            .unwrap()
            .to_owned()
    };
    assert!(line(&["check"], &[]).ends_with(" 20s"));
    let env = [("GEM_WAIT_TIMEOUT", "7s")];
    assert!(line(&["check"], &env).ends_with(" 7s"));
    assert!(line(&["check", "--wait-timeout", "3s"], &env).ends_with(" 3s"));
}

#[test]
fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let gem = Gem::start(Spec::new("hello", "header_read_timeout = \"1s\""));
    let mut slow = TcpStream::connect(gem.addr).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ")
        .unwrap();
    slow.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let start = std::time::Instant::now();
    let mut rest = Vec::new();
    // The server closes the connection once the head has taken too long.
    let _ = slow.read_to_end(&mut rest);
    let took = start.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(900) && took < common::DEADLINE,
        "cut after {took:?}"
    );
    assert!(!String::from_utf8_lossy(&rest).contains("Hello world."));
    assert_eq!(get(gem.addr, "/").unwrap().status, 200);
}

/// Reads from `stream` until the server closes it; how long that took.
fn time_to_close(stream: &mut TcpStream) -> (std::time::Duration, Vec<u8>) {
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    let _ = stream.read_to_end(&mut got);
    (start.elapsed(), got)
}

#[test]
fn header_read_timeout_closes_silent_and_idle_connections_but_not_slow_answers() {
    let gem = Gem::start(Spec::new("hello", "header_read_timeout = \"1s\""));
    let second = std::time::Duration::from_secs(1);

    // A client that connects and sends nothing at all.
    let mut silent = TcpStream::connect(gem.addr).unwrap();
    let (took, got) = time_to_close(&mut silent);
    assert!(
        took >= second * 9 / 10 && took < common::DEADLINE,
        "silent: closed after {took:?}"
    );
    assert!(got.is_empty());

    // A keep-alive client that goes quiet after its answer: the next head is due
    // within the limit from the answer on.
    let mut idle = TcpStream::connect(gem.addr).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    let mut first = [0u8; 17];
    idle.set_read_timeout(Some(common::DEADLINE)).unwrap();
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200 OK\r\n");
    let (took, _) = time_to_close(&mut idle);
    assert!(
        took >= second * 8 / 10 && took < common::DEADLINE,
        "idle: closed after {took:?}"
    );

    // Answers that take longer than the limit are not cut: a slow handler's, and a
    // stream's, on one keep-alive connection, each followed by another request.
    let mut slow = TcpStream::connect(gem.addr).unwrap();
    slow.set_read_timeout(Some(common::DEADLINE)).unwrap();
    for target in ["/sleep?ms=1500", "/events?n=3&ms=600"] {
        let head =
            format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n");
        slow.write_all(head.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let answered = |got: &[u8]| {
            let text = String::from_utf8_lossy(got);
            text.matches("HTTP/1.1 200 OK").count() == 2 && text.ends_with("Hello world.")
        };
        while !answered(&got) {
            let n = slow.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "{target}: closed early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    }
}

#[test]
fn header_read_timeout_does_not_cut_a_large_answer_a_slow_client_is_still_reading() {
    let gem = Gem::start(Spec::new(
        "hello",
        "header_read_timeout = \"1s\"\nmax_body_size = \"16MiB\"",
    ));
    // A small receive buffer, read a little at a time: the 8 MiB answer takes seconds
    // to go out after hyper has taken the whole body from gem.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    socket.connect(&gem.addr.into()).unwrap();
    let mut slow: TcpStream = socket.into();
    slow.set_read_timeout(Some(common::DEADLINE)).unwrap();
    let body = vec![b'x'; 8 << 20];
    let head = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&body).unwrap();
    let start = std::time::Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 128 * 1024];
    while got.len() < body.len() + 40 {
        let n = slow.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed after {} bytes, {:?}",
            got.len(),
            start.elapsed()
        );
        got.extend_from_slice(&buf[..n]);
        // Paces the slow client: about 2.5 MiB a second.
        std::thread::sleep(std::time::Duration::from_millis(50));
        if String::from_utf8_lossy(&got).contains("\r\n\r\n") {
            let header_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            if got.len() - header_end == body.len() {
                break;
            }
        }
    }
    assert!(
        start.elapsed() > std::time::Duration::from_secs(1),
        "not slow enough to test"
    );
    assert!(got.ends_with(b"xxxx"));
}

/// Sends `head` as raw bytes and returns the response's status line and body.
fn raw(addr: std::net::SocketAddr, head: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(common::DEADLINE)).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[test]
fn http1_1_without_host_is_a_400_and_http1_0_without_host_is_served() {
    let gem = Gem::start(Spec::new("hello", ""));
    let (status, body) = raw(gem.addr, "GET / HTTP/1.1\r\nconnection: close\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    assert!(body.contains("Host"), "{body}");
    let (status, body) = raw(
        gem.addr,
        "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "Hello world.");
    let (status, body) = raw(gem.addr, "GET / HTTP/1.0\r\n\r\n");
    assert_eq!(status, "HTTP/1.0 200 OK");
    assert_eq!(body, "Hello world.");
    assert_eq!(get_h2(gem.addr, "/").unwrap().status, 200);
}
