//! TLS listeners: HTTPS and HTTP/2 over TLS, certificate rotation by `gem reload`,
//! session resumption across a restart, the handshake timeout, and bad certificates
//! and keys refused with a message naming the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::supervise::{wait_serving_worker, workers};
use common::tls::{CertFiles, client_config, get, good_cert, https_addr, listen_entry, make_cert};
use common::{Gem, Signal, Spec, plugin, run_gem, signal_pid, wait_for};

const HELLO: &str = "Hello world.";

/// A gem serving the hello plugin on a cleartext and a TLS listener.
fn start_tls(cert: &CertFiles, extra: &str) -> Gem {
    let toml = format!(
        "listen = [\"127.0.0.1:0\", {}]\nhandler = {:?}\n{extra}\n",
        listen_entry(cert),
        plugin("hello")
    );
    Gem::start(Spec {
        toml,
        ..Spec::new("hello", "")
    })
}

/// Replaces a certificate and key in place, as an operator (or certbot) would.
fn install(from: &CertFiles, to: &CertFiles) {
    for (src, dst) in [(&from.cert, &to.cert), (&from.key, &to.key)] {
        let tmp = dst.with_extension("new");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
}

fn reload(gem: &Gem) -> (std::process::ExitStatus, String) {
    let (status, out, err) = run_gem(gem.dir.path(), &["reload"], &[]);
    (status, format!("{out}{err}"))
}

#[test]
fn https_and_h2_over_tls_serve_the_demo_plugin() {
    let certs = tempfile::tempdir().unwrap();
    let cert = good_cert(certs.path(), "site");
    let gem = start_tls(&cert, "");
    let addr = https_addr(&gem);

    let h1 = get(addr, &client_config(&[b"http/1.1"]), "/").unwrap();
    assert_eq!((h1.status, h1.text()), (200, HELLO.to_owned()));
    assert_eq!(h1.version, http::Version::HTTP_11);
    assert_eq!(h1.cert, cert.der);

    let h2 = get(addr, &client_config(&[b"h2", b"http/1.1"]), "/signals").unwrap();
    assert_eq!(h2.status, 200);
    assert_eq!(h2.version, http::Version::HTTP_2, "ALPN must pick h2");

    // The handler learns that the request came over TLS, and on which listener.
    let whoami = get(addr, &client_config(&[b"http/1.1"]), "/whoami").unwrap();
    let text = whoami.text();
    assert!(text.contains(&format!("\nlocal {addr}\n")), "{text}");
    assert!(
        text.ends_with("\nversion HTTP/1.1\nscheme https\n"),
        "{text}"
    );
    let whoami = get(addr, &client_config(&[b"h2"]), "/whoami").unwrap();
    assert!(whoami.text().ends_with("\nversion HTTP/2\nscheme https\n"));

    // Cleartext keeps working beside it.
    let plain = common::client::get(gem.addr, "/").unwrap();
    assert_eq!(plain.text(), HELLO);

    let status = gem.status();
    let tls = &status["tls"][0];
    assert_eq!(tls["subject"], "CN=site");
    assert_eq!(tls["dns_names"], serde_json::json!(["localhost"]));
    let days = tls["days_left"].as_i64().unwrap();
    assert!((88..=90).contains(&days), "days_left {days}");
    assert!(tls["not_after"].as_str().unwrap().ends_with('Z'));
    let (ok, text, _) = run_gem(gem.dir.path(), &["status"], &[]);
    assert!(ok.success());
    assert!(text.contains("subject CN=site (DNS localhost)"), "{text}");
}

#[test]
fn reload_rotates_the_certificate_without_a_failed_request() {
    let certs = tempfile::tempdir().unwrap();
    let site = good_cert(certs.path(), "site");
    let next = good_cert(certs.path(), "next");
    let gem = start_tls(&site, "");
    let addr = https_addr(&gem);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let alpn: &[&[u8]] = if i == 0 { &[b"http/1.1"] } else { &[b"h2"] };
            let config = client_config(alpn);
            std::thread::spawn(move || {
                let rt = common::tls::runtime();
                while !stop.load(Ordering::Relaxed) {
                    match rt.block_on(common::tls::get_async(addr, config.clone(), "/")) {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            eprintln!("failed: {other:?}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    wait_for("load to flow", || {
        (ok.load(Ordering::Relaxed) > 20).then_some(())
    });
    install(&next, &site);
    let (status, text) = reload(&gem);
    assert!(status.success(), "{text}");
    let before = ok.load(Ordering::Relaxed);
    wait_for("requests after the reload", || {
        (ok.load(Ordering::Relaxed) > before + 20).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request may fail");
    let seen = get(addr, &client_config(&[b"http/1.1"]), "/").unwrap();
    assert_eq!(seen.cert, next.der, "the new certificate is served");
    assert_eq!(gem.status()["tls"][0]["subject"], "CN=next");
}

#[test]
fn a_broken_key_at_reload_keeps_the_old_certificate() {
    broken_key_at_reload(false);
}

#[test]
fn a_broken_key_at_reload_keeps_the_old_certificate_when_supervised() {
    broken_key_at_reload(true);
}

fn broken_key_at_reload(supervise: bool) {
    let certs = tempfile::tempdir().unwrap();
    let site = good_cert(certs.path(), "site");
    let extra = if supervise { "supervise = true" } else { "" };
    let mut gem = start_tls(&site, extra);
    let addr = https_addr(&gem);
    let pid = gem.pid();
    let generation = gem.status()["generation"].as_u64().unwrap();
    // The key file now holds a certificate: a classic copy-paste slip.
    std::fs::copy(&site.cert, &site.key).unwrap();
    let (status, text) = reload(&gem);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(text.contains(&site.key.display().to_string()), "{text}");
    assert!(text.contains("not a private key"), "{text}");
    assert_eq!(gem.pid(), pid, "the old generation serves on");
    assert_eq!(gem.status()["generation"].as_u64().unwrap(), generation);
    let seen = get(addr, &client_config(&[b"http/1.1"]), "/").unwrap();
    assert_eq!(seen.cert, site.der);
    assert_eq!(seen.text(), HELLO);
}

#[test]
fn a_session_resumes_across_a_restart() {
    let certs = tempfile::tempdir().unwrap();
    let site = good_cert(certs.path(), "site");
    let mut gem = start_tls(&site, "");
    let addr = https_addr(&gem);
    let config = client_config(&[b"http/1.1"]);
    assert!(
        !get(addr, &config, "/").unwrap().resumed,
        "a first handshake is full"
    );
    let old = gem.pid();
    let (status, text) = reload(&gem);
    assert!(status.success(), "{text}");
    assert_ne!(gem.pid(), old);
    let after = get(addr, &config, "/").unwrap();
    assert!(
        after.resumed,
        "the session must resume in the new generation"
    );
    assert_eq!(after.text(), HELLO);
}

#[test]
fn sessions_resume_across_worker_upgrades_and_crashes_when_supervised() {
    let certs = tempfile::tempdir().unwrap();
    let site = good_cert(certs.path(), "site");
    let gem = Gem::start(
        Spec {
            toml: format!(
                "listen = [\"127.0.0.1:0\", {}]\nhandler = {:?}\nprobation = \"0s\"\n",
                listen_entry(&site),
                plugin("hello")
            ),
            ..Spec::new("hello", "")
        }
        .arg("--supervise"),
    );
    let addr = https_addr(&gem);
    let config = client_config(&[b"h2"]);
    let first = wait_serving_worker(&gem, "a worker", |_| true);
    assert!(!get(addr, &config, "/").unwrap().resumed);
    let (status, text) = reload(&gem);
    assert!(status.success(), "{text}");
    let second = wait_serving_worker(&gem, "a new worker", |w| w.pid != first.pid);
    assert!(get(addr, &config, "/").unwrap().resumed, "after an upgrade");
    // A crashed worker's replacement gets the keys from the supervisor.
    signal_pid(second.pid, Signal::KILL);
    wait_serving_worker(&gem, "a replacement worker", |w| w.pid != second.pid);
    assert!(workers(&gem.status()).iter().all(|w| w.pid != second.pid));
    assert!(get(addr, &config, "/").unwrap().resumed, "after a crash");
    // The supervisor re-executes itself and keeps the keys.
    let (status, out, err) = run_gem(gem.dir.path(), &["reload", "--binary"], &[]);
    assert!(status.success(), "{out}{err}");
    let (status, text) = reload(&gem);
    assert!(status.success(), "{text}");
    assert!(get(addr, &config, "/").unwrap().resumed, "after a re-exec");
}

#[test]
fn a_stalled_handshake_is_cut_at_header_read_timeout() {
    let certs = tempfile::tempdir().unwrap();
    let site = good_cert(certs.path(), "site");
    let gem = start_tls(&site, "header_read_timeout = \"1s\"");
    let addr = https_addr(&gem);
    let mut stalled = std::net::TcpStream::connect(addr).unwrap();
    // A TLS record header announcing a ClientHello that never comes.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01])
        .unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let began = Instant::now();
    let mut buf = [0u8; 64];
    let closed = match stalled.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "the server must close a stalled handshake");
    assert!(
        began.elapsed() >= Duration::from_millis(900),
        "not before header_read_timeout: {:?}",
        began.elapsed()
    );
    // The listener still serves.
    assert_eq!(
        get(addr, &client_config(&[b"http/1.1"]), "/")
            .unwrap()
            .text(),
        HELLO
    );
}

/// `gem check` on a config whose TLS listener uses `cert` and `key`: its exit code and
/// output.
fn check(dir: &Path, entry: &str) -> (Option<i32>, String) {
    let toml = format!("listen = [{entry}]\nhandler = {:?}\n", plugin("hello"));
    std::fs::write(dir.join("gem.toml"), toml).unwrap();
    let (status, out, err) = run_gem(dir, &["check"], &[]);
    (status.code(), format!("{out}{err}"))
}

fn entry(cert: &Path, key: &Path) -> String {
    format!("{{ addr = \"127.0.0.1:0\", tls_cert = {cert:?}, tls_key = {key:?} }}")
}

#[test]
fn bad_certificates_and_keys_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = good_cert(d, "a");
    let b = good_cert(d, "b");
    let truncated = d.join("truncated.crt");
    let pem = std::fs::read_to_string(&a.cert).unwrap();
    std::fs::write(&truncated, &pem[..pem.len() / 2]).unwrap();
    let empty = d.join("empty.key");
    std::fs::write(&empty, "").unwrap();
    let expired = make_cert(d, "expired", -30, -1);
    let missing = d.join("missing.key");

    let cases = [
        (entry(&a.cert, &b.key), &b.key, "does not match"),
        (entry(&a.cert, &a.cert), &a.cert, "not a private key"),
        (entry(&truncated, &a.key), &truncated, "is truncated"),
        (entry(&a.cert, &empty), &empty, "is empty"),
        (
            entry(&expired.cert, &expired.key),
            &expired.cert,
            "expired on",
        ),
        (entry(&a.cert, &missing), &missing, "No such file"),
    ];
    for (entry, file, reason) in cases {
        let (code, text) = check(d, &entry);
        assert_eq!(code, Some(1), "{entry}: {text}");
        assert!(
            text.contains(&file.display().to_string()),
            "{entry}: {text}"
        );
        assert!(text.contains(reason), "{entry}: {text}");
    }

    let (code, text) = check(d, &entry(&a.cert, &a.key));
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("subject CN=a (DNS localhost)"), "{text}");

    let typo = format!(
        "{{ addr = \"127.0.0.1:0\", tls_cert = {:?}, tls_keyfile = {:?} }}",
        a.cert, a.key
    );
    let (code, text) = check(d, &typo);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("tls_keyfile") && text.contains("listen"),
        "{text}"
    );
    assert!(text.contains("gem.toml"), "{text}");
}

#[test]
fn relative_paths_in_the_file_and_gem_listen_work() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    good_cert(&conf, "rel");
    // In the file: relative to the file's directory.
    std::fs::write(
        conf.join("gem.toml"),
        format!(
            "listen = [{{ addr = \"127.0.0.1:0\", tls_cert = \"rel.crt\", tls_key = \"rel.key\" }}]\nhandler = {:?}\n",
            plugin("hello")
        ),
    )
    .unwrap();
    let (status, out, err) = run_gem(dir.path(), &["check", "--config", "conf/gem.toml"], &[]);
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("subject CN=rel"), "{out}");
    // In GEM_LISTEN: relative to the working directory.
    let (status, out, err) = run_gem(
        &conf,
        &["check"],
        &[(
            "GEM_LISTEN",
            "[\"127.0.0.1:0\", { addr = \"127.0.0.1:0\", tls_cert = \"rel.crt\", tls_key = \"rel.key\" }]",
        )],
    );
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("subject CN=rel"), "{out}");
}

#[test]
fn a_certificate_close_to_expiry_is_warned_about() {
    let certs = tempfile::tempdir().unwrap();
    let soon = make_cert(certs.path(), "soon", -80, 5);
    let gem = start_tls(&soon, "");
    let line = gem.wait_log("expires in");
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains(&soon.cert.display().to_string()), "{line}");
    // Five days at most, less the seconds since it was made.
    assert!(
        line.contains("expires in 4 days") || line.contains("expires in 5 days"),
        "{line}"
    );
    let (status, out, _) = run_gem(gem.dir.path(), &["check"], &[]);
    assert!(status.success());
    assert!(out.contains("warning: the TLS certificate"), "{out}");
}

#[test]
fn a_drain_ends_idle_tls_connections_with_close_notify_and_h2_with_goaway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let certs = tempfile::tempdir().unwrap();
    let site = good_cert(certs.path(), "site");
    let gem = start_tls(&site, "idle_grace = \"200ms\"\nprobation = \"0s\"");
    let addr = https_addr(&gem);
    let rt = common::tls::runtime();
    let (mut h1, mut h2) = rt.block_on(async {
        let connect = |alpn: &'static [u8]| async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            tokio_rustls::TlsConnector::from(client_config(&[alpn]))
                .connect(name, tcp)
                .await
                .unwrap()
        };
        let mut h1 = connect(b"http/1.1").await;
        h1.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = h1.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with(HELLO));
        let h2 = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(connect(b"h2").await),
        )
        .await
        .unwrap();
        (h1, h2)
    });
    let h2_conn = rt.spawn(h2.1);
    let req = http::Request::builder()
        .uri("https://localhost/")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = rt.block_on(h2.0.send_request(req)).unwrap();
    assert_eq!(resp.status(), 200);

    let (status, text) = reload(&gem);
    assert!(status.success(), "{text}");
    rt.block_on(async {
        // A clean end: rustls reports a close without close_notify as an error.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), h1.read_to_end(&mut rest));
        assert_eq!(read.await.unwrap().unwrap(), 0, "close_notify, then EOF");
        // GOAWAY: the client connection finishes without an error.
        let ended = tokio::time::timeout(Duration::from_secs(10), h2_conn).await;
        ended.unwrap().unwrap().unwrap();
    });
    assert!(h2.0.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_builder_serves_tls() {
    use gem::control::{self, Command, ReplyBody};
    let dir = tempfile::tempdir().unwrap();
    let site = good_cert(dir.path(), "lib");
    let socket = dir.path().join("gem.sock");
    let server = gem::Server::builder()
        .listen_tls("127.0.0.1:0", &site.cert, &site.key)
        .handler(|_| gem::Response::text(200, "from the library"))
        .control_socket(&socket)
        .build()
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let signals = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let run = tokio::spawn(server.run_with_signals(signals));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(reply) = control::call(&socket, Command::Status, Duration::from_secs(1)).await
            && let ReplyBody::Status(status) = reply.body
        {
            break status;
        }
        assert!(Instant::now() < deadline, "no status");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status.tls[0].cert.subject, "CN=lib");
    let addr = status.listen[0].parse().unwrap();
    let resp = common::tls::get_async(addr, client_config(&[b"h2"]), "/")
        .await
        .unwrap();
    assert_eq!(resp.text(), "from the library");
    assert_eq!(resp.version, http::Version::HTTP_2);
    tx.send(gem::Signal::TERM).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), run).await;
    exit.unwrap().unwrap().unwrap();
}
