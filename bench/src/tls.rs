//! Scenario 14, TLS: gem's TLS listener side by side with nginx on the same certificate
//! and key (ECDSA P-256, made with `openssl req`): restarts every 0.5 s under wrk over
//! HTTPS (keep-alive and `Connection: close`), HTTP/2 over TLS with h2load through
//! restarts, handshakes per second (`Connection: close`), keep-alive throughput, and sessions resumed
//! across a restart (`openssl s_client -sess_out` / `-sess_in`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::peers::{Build, Gem, HELLO, Peer, free_port, signal, wait_port};
use crate::tools::{H2load, Wrk};
use crate::{Plan, verdict, with_restarts};

/// A certificate and key both servers use.
struct Cert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
}

fn make_cert() -> Result<Cert> {
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "30"])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("running openssl req")?;
    if !out.status.success() {
        bail!("openssl req: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(Cert {
        _dir: dir,
        cert,
        key,
    })
}

/// nginx with `listen ... ssl http2` (the form nginx 1.22 takes) on the same certificate.
struct TlsNginx {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    workers: usize,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsNginx {
    fn start(workers: usize, cert: &Cert) -> Result<TlsNginx> {
        let dir = tempfile::tempdir()?;
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let nginx = TlsNginx {
            child: Command::new("true").spawn()?,
            dir,
            addr,
            workers,
            cert: cert.cert.clone(),
            key: cert.key.clone(),
        };
        nginx.write_conf(HELLO)?;
        let mut nginx = nginx;
        let _ = nginx.child.wait();
        nginx.child = Command::new("nginx")
            .arg("-p")
            .arg(nginx.dir.path())
            .arg("-c")
            .arg(nginx.dir.path().join("nginx.conf"))
            .arg("-e")
            .arg(nginx.dir.path().join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (with the ssl module: apt-get install nginx)")?;
        wait_port(addr)?;
        Ok(nginx)
    }

    fn write_conf(&self, body: &str) -> Result<()> {
        let d = self.dir.path().display();
        std::fs::write(
            self.dir.path().join("nginx.conf"),
            format!(
                "worker_processes {w};\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
                 server {{\n    listen {addr} ssl http2 backlog=4096;\n    keepalive_requests 1000000;\n\
                 ssl_protocols TLSv1.2 TLSv1.3;\n    ssl_certificate {cert:?};\n    ssl_certificate_key {key:?};\n\
                 location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
                w = self.workers,
                addr = self.addr,
                cert = self.cert,
                key = self.key,
            ),
        )?;
        Ok(())
    }
}

impl Peer for TlsNginx {
    fn name(&self) -> &'static str {
        "nginx"
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn stage(&mut self, body: &str) -> Result<()> {
        self.write_conf(body)
    }

    fn signal_restart(&mut self) -> Result<()> {
        signal(self.child.id(), "HUP")
    }

    fn stop(&mut self) -> Result<()> {
        let _ = signal(self.child.id(), "QUIT");
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for TlsNginx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.stop();
        }
    }
}

/// `wrk -t2 -c64` over HTTPS.
fn wrk_https(addr: SocketAddr, duration: Duration, close: bool) -> Result<Wrk> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c64", "--latency", "--timeout", "5s"])
        .arg(format!("-d{}s", duration.as_secs().max(1)));
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("https://{addr}/"));
    let out = cmd.output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    crate::tools::parse_wrk(&text)
}

/// `h2load -c16 -m8 -t2` over TLS (ALPN h2).
fn h2load_https(addr: SocketAddr, duration: Duration) -> Result<H2load> {
    let out = Command::new("h2load")
        .args(["-c16", "-m8", "-t2"])
        .arg(format!("-D{}", duration.as_secs().max(1)))
        .arg(format!("https://{addr}/"))
        .output()
        .context("running h2load")?;
    crate::tools::parse_h2load(&String::from_utf8_lossy(&out.stdout))
}

/// Saves `n` sessions, restarts `peer`, and counts how many of them resume.
fn resumption(peer: &mut dyn Peer, dir: &Path, n: usize) -> Result<usize> {
    let addr = peer.addr().to_string();
    let s_client = |extra: &[&str]| -> Result<String> {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-tls1_3", "-ign_eof"])
            .args(extra)
            .stdin(Stdio::piped())
            .stderr(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(
                        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                    )?;
                }
                child.wait_with_output()
            })
            .context("running openssl s_client")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    for i in 0..n {
        let sess = dir.join(format!("s{i}.pem"));
        s_client(&["-sess_out", &sess.display().to_string()])?;
    }
    peer.restart_to(HELLO)?;
    peer.settle()?;
    // The old generation may still be draining: new connections go to the new one.
    let mut resumed = 0;
    for i in 0..n {
        let sess = dir.join(format!("s{i}.pem"));
        let text = s_client(&["-sess_in", &sess.display().to_string()])?;
        if text.contains("Reused, TLSv1.3") {
            resumed += 1;
        }
    }
    Ok(resumed)
}

pub fn scenario(build: &Build, plan: &Plan, workers: usize) -> Result<String> {
    let cert = make_cert()?;
    let mut out = String::from(
        "Both servers on the same ECDSA P-256 certificate and key, both offering TLS 1.3 \
         and 1.2 (nginx 1.22 stops at TLS 1.2 unless told `ssl_protocols TLSv1.2 TLSv1.3`, \
         its default since 1.23.4), so every client here negotiates TLS 1.3; wrk and h2load \
         connect to `https://127.0.0.1:PORT/`. wrk keeps a connection's TLS session when \
         it reconnects, so under `Connection: close` it resumes with the server's last \
         ticket: each handshake is a TLS 1.3 resumption with a fresh X25519 exchange (no \
         certificate, no signature).\n\n\
         **Restarts every 0.5 s under wrk over HTTPS** (64 connections):\n\n\
         | server | load | requests | req/s | connect | read | write | timeout | non-2xx | restarts |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut gem_errors = 0;
    for close in [false, true] {
        let load = if close {
            "Connection: close"
        } else {
            "keep-alive"
        };
        let mut gem = Gem::start_tls(build, &cert.cert, &cert.key)?;
        let (g, sent) = with_restarts(&mut gem, plan.load, move |a, d| wrk_https(a, d, close))?;
        gem.stop()?;
        gem_errors += g.errors();
        let mut nginx = TlsNginx::start(workers, &cert)?;
        let (n, nsent) = with_restarts(&mut nginx, plan.load, move |a, d| wrk_https(a, d, close))?;
        nginx.stop()?;
        for (name, w, s) in [("gem", g, sent), ("nginx", n, nsent)] {
            let _ = writeln!(
                out,
                "| {name} | {load} | {} | {:.0} | {} | {} | {} | {} | {} | {s} |",
                w.requests, w.rps, w.connect, w.read, w.write, w.timeout, w.non_2xx
            );
        }
    }
    let _ = writeln!(
        out,
        "\nTarget: 0 errors for gem: {}.\n",
        verdict(gem_errors == 0, || format!("{gem_errors} errors"))
    );

    let mut gem = Gem::start_tls(build, &cert.cert, &cert.key)?;
    let (g, sent) = with_restarts(&mut gem, plan.h2, h2load_https)?;
    gem.stop()?;
    let mut nginx = TlsNginx::start(workers, &cert)?;
    let (n, nsent) = with_restarts(&mut nginx, plan.h2, h2load_https)?;
    nginx.stop()?;
    let _ = writeln!(
        out,
        "**HTTP/2 over TLS through restarts** (h2load, 16 connections × 8 streams, {} s, a \
         restart every 0.5 s):\n\n\
         | server | requests | succeeded | failed | errored | timeout | restarts |\n\
         |---|---|---|---|---|---|---|",
        plan.h2.as_secs()
    );
    for (name, h, s) in [("gem", &g, sent), ("nginx", &n, nsent)] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {s} |",
            h.total, h.succeeded, h.failed, h.errored, h.timeout
        );
    }
    let _ = writeln!(
        out,
        "\nTarget: 0 failed streams for gem: {}. (h2load stops a client at its first \
         GOAWAY and counts what it had queued as failed; see \"Reading the misses\".)\n",
        verdict(g.failed == 0, || format!("{} streams", g.failed))
    );

    let _ = writeln!(
        out,
        "**Without restarts** ({} s each, 64 connections):\n\n\
         | load | gem req/s | nginx req/s | gem / nginx | target |\n|---|---|---|---|---|",
        plan.throughput.as_secs()
    );
    for (close, target) in [(true, 1.0), (false, 0.95)] {
        let gem = Gem::start_tls(build, &cert.cert, &cert.key)?;
        let g = wrk_https(gem.addr(), plan.throughput, close)?;
        drop(gem);
        let nginx = TlsNginx::start(workers, &cert)?;
        let n = wrk_https(nginx.addr, plan.throughput, close)?;
        drop(nginx);
        let ratio = g.rps / n.rps;
        let what = if close {
            "handshakes (Connection: close)"
        } else {
            "keep-alive"
        };
        let _ = writeln!(
            out,
            "| {what} | {:.0} | {:.0} | {ratio:.2} | ≥ {target:.2}: {} |",
            g.rps,
            n.rps,
            verdict(ratio >= target, || format!("{ratio:.2}"))
        );
    }

    let sessions = if plan.quick { 20 } else { 100 };
    let dir = tempfile::tempdir()?;
    let mut gem = Gem::start_tls(build, &cert.cert, &cert.key)?;
    let g = resumption(&mut gem, dir.path(), sessions)?;
    gem.stop()?;
    let mut nginx = TlsNginx::start(workers, &cert)?;
    let n = resumption(&mut nginx, dir.path(), sessions)?;
    nginx.stop()?;
    let need = sessions - sessions / 100;
    let _ = writeln!(
        out,
        "\n**Sessions resumed across a restart** (`openssl s_client -tls1_3 -sess_out`, \
         restart, `-sess_in`): gem {g} of {sessions}, nginx {n} of {sessions} (nginx \
         makes new ticket keys at a reload unless `ssl_session_ticket_key` files are on \
         disk). Target: at least {need} for gem: {}.",
        verdict(g >= need, || format!("{g}"))
    );
    Ok(out)
}
