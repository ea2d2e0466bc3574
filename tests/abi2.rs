//! Plugin ABI 2 end to end, through the demo routes of the `hello` plugin: the
//! connection's facts, streamed responses (backpressure, drain, the cut at
//! `wait_timeout`, a panicking producer) and request bodies read in chunks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::client::{self, get, get_h2, post};
use common::{DEADLINE, Gem, Signal, Spec, cpu_time, rss_kib, wait_for};

/// A raw HTTP/1.1 exchange: the request is written, the head read; the body is read
/// by the caller, chunk by chunk.
struct Raw {
    reader: BufReader<TcpStream>,
    head: String,
}

impl Raw {
    fn send(addr: SocketAddr, method: &str, path: &str) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        Raw::send_on(stream, method, path)
    }

    fn send_on(mut stream: TcpStream, method: &str, path: &str) -> Raw {
        write!(stream, "{method} {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        Raw { reader, head }
    }

    /// The next chunk of a chunked body: `Some(empty)` at its proper end, `None` when
    /// the connection ended (or failed) without it.
    fn chunk(&mut self) -> Option<Vec<u8>> {
        let mut size = String::new();
        if self.reader.read_line(&mut size).ok()? == 0 {
            return None;
        }
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        let mut chunk = vec![0; size + 2];
        self.reader.read_exact(&mut chunk).ok()?;
        chunk.truncate(size);
        Some(chunk)
    }

    /// Reads the rest of a chunked body: the bytes, and whether it ended properly.
    fn rest(&mut self) -> (Vec<u8>, bool) {
        let mut body = Vec::new();
        loop {
            match self.chunk() {
                Some(c) if c.is_empty() => return (body, true),
                Some(c) => body.extend_from_slice(&c),
                None => return (body, false),
            }
        }
    }
}

#[test]
fn whoami_tells_the_peer_address_the_version_and_the_scheme() {
    let gem = Gem::start(Spec::new("hello", ""));
    let stream = TcpStream::connect(gem.addr).unwrap();
    let me = stream.local_addr().unwrap();
    let mut raw = Raw::send_on(stream, "GET", "/whoami");
    assert!(raw.head.starts_with("HTTP/1.1 200"), "{}", raw.head);
    let mut body = String::new();
    let len: usize = raw
        .head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (&mut raw.reader)
        .take(len as u64)
        .read_to_string(&mut body)
        .unwrap();
    assert_eq!(
        body,
        format!(
            "peer {me}\nlocal {}\nversion HTTP/1.1\nscheme http\n",
            gem.addr
        )
    );
    let h2 = get_h2(gem.addr, "/whoami").unwrap().text();
    assert!(h2.contains("\nversion HTTP/2\n"), "{h2}");
    assert!(h2.starts_with("peer 127.0.0.1:"), "{h2}");
}

#[test]
fn stream_sends_the_generated_mebibytes() {
    let gem = Gem::start(Spec::new("hello", ""));
    // Read by gem from the handler's reader, and written by a producer on a thread.
    for target in ["/stream?mb=3", "/stream?mb=3&writer=1"] {
        let resp = get(gem.addr, target).unwrap();
        assert_eq!(resp.status, 200, "{target}");
        assert_eq!(resp.body.len(), 3 << 20, "{target}");
        assert!(
            resp.body
                .iter()
                .enumerate()
                .all(|(i, b)| *b == b"0123456789abcdef"[i % 16]),
            "{target}"
        );
    }
    // Over HTTP/2 too.
    for target in ["/stream?mb=2", "/stream?mb=2&writer=1"] {
        assert_eq!(get_h2(gem.addr, target).unwrap().body.len(), 2 << 20);
    }
}

#[test]
fn head_answers_carry_no_body_on_either_protocol() {
    let gem = Gem::start(Spec::new("hello", ""));
    for h2 in [false, true] {
        // A whole body's length is told, the body is not sent.
        let resp = client::send(gem.addr, h2, "HEAD", "/").unwrap();
        assert_eq!(resp.status, 200, "h2: {h2}");
        assert!(resp.body.is_empty(), "h2: {h2}: {:?}", resp.body);
        let len = resp.headers.get("content-length").map(|v| v.as_bytes());
        assert_eq!(len, Some(&b"12"[..]), "h2: {h2}");
        // A stream, reader or producer, is not run into the connection.
        for target in ["/stream?mb=64", "/stream?mb=64&writer=1"] {
            let resp = client::send(gem.addr, h2, "HEAD", target).unwrap();
            assert_eq!(resp.status, 200, "h2: {h2}, {target}");
            assert!(resp.body.is_empty(), "h2: {h2}, {target}");
        }
    }
    wait_for("no request in flight", || {
        (gem.in_flight() == 0).then_some(())
    });
}

#[test]
fn count_reads_a_body_far_larger_than_max_body_size_in_chunks() {
    let gem = Gem::start(Spec::new("hello", "max_body_size = \"1 KiB\""));
    let big = vec![7u8; 5 << 20];
    let resp = post(gem.addr, "/count", big).unwrap();
    assert_eq!((resp.status, resp.text()), (200, "5242880\n".to_owned()));
    // A handler that takes its body whole still gets the limit.
    assert_eq!(post(gem.addr, "/echo", vec![1; 2048]).unwrap().status, 413);
    assert_eq!(
        post(gem.addr, "/echo", b"ping".to_vec()).unwrap().text(),
        "ping"
    );
    assert_eq!(post(gem.addr, "/count", Vec::new()).unwrap().text(), "0\n");
}

#[test]
fn a_body_read_in_chunks_that_stalls_fails_the_read_at_header_read_timeout() {
    let gem = Gem::start(Spec::new("hello", "header_read_timeout = \"1s\""));
    let mut stream = TcpStream::connect(gem.addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = Instant::now();
    write!(
        stream,
        "POST /count HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n0123456789"
    )
    .unwrap();
    // The rest of the body never comes: the handler's read fails instead of holding a
    // thread until the client goes away.
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("reading the body failed"), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < DEADLINE,
        "answered after {took:?}"
    );
    // The server serves on.
    assert_eq!(get(gem.addr, "/").unwrap().status, 200);
}

#[test]
fn events_say_bye_when_a_drain_begins_and_end_cleanly() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    let mut raw = Raw::send(gem.addr, "GET", "/events?n=100000&ms=20");
    assert!(
        raw.head.contains("content-type: text/event-stream"),
        "{}",
        raw.head
    );
    assert_eq!(raw.chunk().unwrap(), b"data: 0\n\n");
    assert_eq!(raw.chunk().unwrap(), b"data: 1\n\n");
    let started = Instant::now();
    gem.signal(Signal::TERM);
    let (rest, clean) = raw.rest();
    let rest = String::from_utf8(rest).unwrap();
    assert!(clean, "the stream ended without its proper end: {rest}");
    assert!(rest.ends_with("event: bye\ndata: draining\n\n"), "{rest}");
    // Woken by the drain, not by its next tick or the timeout.
    assert!(started.elapsed() < Duration::from_secs(5));
    let (status, _) = gem.wait_exit();
    assert!(status.success());
    assert_eq!(gem.count_log("reach error: timeout"), 0);
}

#[test]
fn a_slow_reader_holds_the_producer_back_instead_of_growing_memory() {
    let gem = Gem::start(Spec::new("hello", ""));
    let pid = gem.first_pid();
    // A body gem reads from the handler's reader, and one a producer writes.
    for via in ["", "&writer=1"] {
        // Warm up: the stream thread, the runtime's buffers.
        let warm = format!("/stream?mb=2{via}");
        assert_eq!(get(gem.addr, &warm).unwrap().body.len(), 2 << 20);
        let before = rss_kib(pid);
        let mut raw = Raw::send(gem.addr, "GET", &format!("/stream?mb=256{via}"));
        assert_eq!(raw.chunk().unwrap().len(), 64 * 1024, "{via}");
        // Stop reading. Without backpressure the reader or producer would run through
        // its 256 MiB into memory; with it, it stalls once the socket buffers and
        // gem's few chunks are full: the process stops using CPU.
        let mut last = cpu_time(pid);
        wait_for("the stream to stall", || {
            std::thread::sleep(Duration::from_millis(300));
            let now = cpu_time(pid);
            let idle = now.saturating_sub(last) < Duration::from_millis(5);
            last = now;
            idle.then_some(())
        });
        let grown = rss_kib(pid).saturating_sub(before);
        assert!(
            grown < 16 * 1024,
            "gem grew by {grown} KiB behind a slow reader ({via})"
        );
        // Reading on, the whole stream comes through.
        let (rest, clean) = raw.rest();
        assert!(clean, "{via}");
        assert_eq!(rest.len() + 64 * 1024, 256 << 20, "{via}");
    }
}

#[test]
fn a_client_that_leaves_mid_stream_ends_it() {
    let gem = Gem::start(Spec::new("hello", ""));
    for via in ["", "&writer=1"] {
        let mut raw = Raw::send(gem.addr, "GET", &format!("/stream?mb=1024{via}"));
        assert_eq!(raw.chunk().unwrap().len(), 64 * 1024, "{via}");
        wait_for("the stream to count as in flight", || {
            (gem.in_flight() == 1).then_some(())
        });
        // Gone, a GiB short: the reader is dropped (the producer stopped), and the
        // stream no longer counts.
        drop(raw);
        wait_for("no request in flight", || {
            (gem.in_flight() == 0).then_some(())
        });
    }
    assert_eq!(get(gem.addr, "/").unwrap().text(), "Hello world.");
}

#[test]
fn a_stream_still_running_at_wait_timeout_is_cut_and_counted() {
    let mut gem = Gem::start(Spec::new("hello", "wait_timeout = \"1s\""));
    // A client that never reads: the producer blocks on backpressure for ever.
    let mut raw = Raw::send(gem.addr, "GET", "/stream?mb=1024");
    assert!(raw.head.starts_with("HTTP/1.1 200"), "{}", raw.head);
    wait_for("the stream to count as in flight", || {
        (gem.in_flight() == 1).then_some(())
    });
    gem.signal(Signal::TERM);
    let (status, took) = gem.wait_exit();
    assert!(status.success());
    assert!(took < Duration::from_secs(5), "{took:?}");
    gem.wait_log("some existing connections reach error: timeout. (1 cut after 1s)");
    let (_, clean) = raw.rest();
    assert!(!clean, "a cut stream must not look complete");
}

#[test]
fn a_panicking_producer_cuts_its_stream_and_the_server_serves_on() {
    let gem = Gem::start(Spec::new("hello", ""));
    // A reader that panics, then a producer.
    for (i, via) in ["", "&writer=1"].into_iter().enumerate() {
        let mut raw = Raw::send(gem.addr, "GET", &format!("/stream?mb=8&panic=1{via}"));
        let (body, clean) = raw.rest();
        assert!(!clean, "the client must see the cut ({via})");
        // The panic comes after the first MiB; what hyper had queued of it when the
        // stream was cut is not sent.
        assert!(
            body.len() >= 64 << 10 && body.len() < 8 << 20,
            "{} ({via})",
            body.len()
        );
        let logged = "GET /stream?mb=8&panic=1";
        gem.wait_log(&format!(
            "{logged}{via}: the stream panicked: the /stream producer panics on purpose"
        ));
        assert_eq!(
            gem.count_log("the stream panicked: the /stream producer panics"),
            i + 1
        );
        assert_eq!(get(gem.addr, "/").unwrap().text(), "Hello world.");
        let started = Instant::now();
        // Its in-flight count ended with it.
        wait_for("no request in flight", || {
            (gem.in_flight() == 0).then_some(())
        });
        assert!(started.elapsed() < DEADLINE);
    }
}
