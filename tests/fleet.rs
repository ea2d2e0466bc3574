//! Operating gem in a fleet: the metrics listener (`/metrics`, `/healthz`, `/readyz`)
//! through restarts and shutdowns, `shutdown_delay`, and the access log with its
//! `reopen` signal action, against the real binary with real signals.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::client::get;
use common::fleet::{
    free_port, lines_of, listen_addr, listening, metrics_addr, metrics_spec, request,
    requests_total, restarts_ok, sample_sum, scrape, start_with_metrics, wait_line,
};
use common::load::Load;
use common::{Gem, Signal, Spec, alive, plugin, run_gem, wait_for};

const HELLO: &str = "Hello world.";

/// A thread that polls until told to stop, every `every`; the closure returns an
/// error text to record.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Poller {
    fn start(every: Duration, mut poll: impl FnMut() + Send + 'static) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            while !flag.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(120) {
                poll();
                std::thread::sleep(every);
            }
        });
        Poller { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
    }
}

#[test]
fn metrics_count_on_through_ten_restarts_on_the_same_port() {
    let (mut gem, metrics) = start_with_metrics(metrics_spec("probation = \"0s\""));
    let load = Load::start(gem.addr, 2, 1, 0);
    // (requests_total, restarts ok) at each scrape, and what went wrong.
    let seen: Arc<Mutex<Vec<(f64, f64)>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let (s, e) = (seen.clone(), errors.clone());
    let scraper = Poller::start(Duration::from_millis(100), move || match scrape(metrics) {
        Ok(text) => s
            .lock()
            .unwrap()
            .push((requests_total(&text), restarts_ok(&text))),
        Err(why) => e.lock().unwrap().push(why),
    });
    wait_for("a scrape that counts requests", || {
        let s = seen.lock().unwrap();
        s.last().is_some_and(|(r, _)| *r > 0.0).then_some(())
    });
    for i in 1..=10 {
        let pid = gem.restart(Signal::HUP);
        assert!(
            listening(pid).contains(&metrics),
            "restart {i}: process {pid} does not listen on {metrics} (it listens on {:?})",
            listening(pid)
        );
        assert!(listening(pid).contains(&gem.addr));
        // Two scrapes of each generation (restarts with probation "0s" take
        // milliseconds; the scrapes come every 100 ms).
        let scraped = seen.lock().unwrap().len();
        wait_for("two more scrapes", || {
            (seen.lock().unwrap().len() >= scraped + 2).then_some(())
        });
    }
    // The tenth restart's result is counted once it is over (probation "0s").
    let text = wait_for("gem_restarts_total{result=\"ok\"} to reach 10", || {
        let text = scrape(metrics).ok()?;
        (restarts_ok(&text) >= 10.0).then_some(text)
    });
    let report = load.stop();
    scraper.stop();
    assert_eq!(restarts_ok(&text), 10.0, "{text}");
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
    let seen = seen.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "failed scrapes: {errors:?}");
    assert!(seen.len() >= 20, "only {} scrapes", seen.len());
    for pair in seen.windows(2) {
        let ((r0, k0), (r1, k1)) = (pair[0], pair[1]);
        assert!(
            r1 >= r0,
            "gem_requests_total went down from {r0} to {r1}: {seen:?}"
        );
        assert!(
            k1 >= k0,
            "gem_restarts_total{{result=\"ok\"}} went down from {k0} to {k1}: {seen:?}"
        );
    }
    // Every answered request is counted, by one generation or another.
    let ok = report.ok as f64;
    let total = wait_for("gem_requests_total to count every answered request", || {
        let total = requests_total(&scrape(metrics).ok()?);
        (total >= ok).then_some(total)
    });
    assert!(total >= ok, "{total} counted, {ok} answered");
    assert_eq!(metrics_addr(gem.pid(), gem.addr), metrics);
}

#[test]
fn the_metrics_listener_serves_health_and_404s_the_rest() {
    let (gem, metrics) = start_with_metrics(metrics_spec(""));
    let healthz = get(metrics, "/healthz").unwrap();
    assert_eq!((healthz.status, healthz.text().trim()), (200, "ok"));
    let readyz = get(metrics, "/readyz").unwrap();
    assert_eq!((readyz.status, readyz.text().trim()), (200, "ready"));
    for path in ["/", "/nope", "/metrics/extra", "/healthz/x"] {
        assert_eq!(get(metrics, path).unwrap().status, 404, "{path}");
    }
    // The plugin's paths are not served there, and /metrics is not served by gem's
    // main listener (the plugin answers it).
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
    assert_eq!(get(gem.addr, "/metrics").unwrap().status, 404);
    assert_eq!(get(metrics, "/").unwrap().status, 404);
    let text = scrape(metrics).unwrap();
    assert!(
        sample_sum(&text, "gem_requests_total", &[("class", "2xx")]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    for name in [
        "gem_build_info",
        "gem_plugin_info",
        "gem_generation",
        "gem_requests_in_flight",
        "gem_connections_open",
    ] {
        assert!(
            sample_sum(&text, name, &[]).is_some(),
            "no {name} in {text}"
        );
    }
    assert_eq!(
        sample_sum(&text, "gem_generation", &[]),
        Some(1.0),
        "{text}"
    );
    assert!(
        sample_sum(&text, "gem_plugin_info", &[("name", "hello")]).is_some(),
        "{text}"
    );
}

#[test]
fn readyz_turns_503_at_sigterm_while_requests_are_still_served_for_the_delay() {
    let (mut gem, metrics) = start_with_metrics(metrics_spec("shutdown_delay = \"2s\""));
    let pid = gem.pid();
    assert_eq!(get(metrics, "/readyz").unwrap().status, 200);
    let signalled = Instant::now();
    gem.signal(Signal::TERM);
    wait_for("/readyz to answer 503", || {
        let r = get(metrics, "/readyz").ok()?;
        (r.status == 503).then_some(())
    });
    let flipped = signalled.elapsed();
    assert!(
        flipped < Duration::from_secs(1),
        "flipped after {flipped:?}"
    );
    gem.wait_log(&format!(
        "[{pid}] shutting down in 2s: /readyz answers 503 meanwhile."
    ));
    assert_eq!(gem.status()["phase"], "shutdown_delay");
    // Until shortly before the delay ends: new connections are served as usual, and the
    // health check says the process lives.
    let mut served = 0;
    while signalled.elapsed() < Duration::from_millis(1500) {
        let resp = get(gem.addr, "/").unwrap();
        assert_eq!((resp.status, resp.text().as_str()), (200, HELLO));
        assert_eq!(get(metrics, "/healthz").unwrap().status, 200);
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served >= 5, "{served} requests in the delay");
    let (status, _) = gem.wait_exit();
    assert!(status.success(), "{status:?}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM with shutdown_delay = 2s"
    );
    assert!(!alive(pid));
}

#[test]
fn a_second_sigterm_skips_the_rest_of_the_delay() {
    let (mut gem, metrics) = start_with_metrics(metrics_spec("shutdown_delay = \"30s\""));
    let pid = gem.pid();
    let signalled = Instant::now();
    gem.signal(Signal::TERM);
    gem.wait_log(&format!("[{pid}] shutting down in 30s"));
    wait_for("/readyz to answer 503", || {
        (get(metrics, "/readyz").ok()?.status == 503).then_some(())
    });
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
    common::signal_pid(pid, Signal::TERM);
    gem.wait_log(&format!(
        "[{pid}] received signal \"terminated\" again: skipping the rest of the shutdown delay."
    ));
    let (status, _) = gem.wait_exit();
    assert!(status.success(), "{status:?}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after the first SIGTERM (delay 30s)"
    );
}

#[test]
fn a_restart_never_makes_readyz_answer_503() {
    let (mut gem, metrics) =
        start_with_metrics(metrics_spec("probation = \"0s\"\nshutdown_delay = \"5s\""));
    // Every answer that is not 200 "ready", and how many polls there were.
    let bad: Arc<Mutex<Vec<String>>> = Arc::default();
    let polls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Three pollers back to back, each on a new connection every time, as a load
    // balancer's checks would be: some connections are accepted by a generation just
    // as it hands over.
    let pollers: Vec<Poller> = (0..3)
        .map(|_| {
            let (b, p) = (bad.clone(), polls.clone());
            Poller::start(Duration::ZERO, move || {
                p.fetch_add(1, Ordering::Relaxed);
                match get(metrics, "/readyz") {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => b
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", r.status, r.text().trim())),
                    Err(e) => b.lock().unwrap().push(e.to_string()),
                }
            })
        })
        .collect();
    let mut old = Vec::new();
    for _ in 0..10 {
        old.push(gem.pid());
        gem.restart(Signal::HUP);
        let before = polls.load(Ordering::Relaxed);
        wait_for("more polls", || {
            (polls.load(Ordering::Relaxed) >= before + 10).then_some(())
        });
    }
    // Until every old generation has drained and exited.
    for pid in old {
        wait_for(&format!("old generation {pid} to exit"), || {
            (!alive(pid)).then_some(())
        });
    }
    for poller in pollers {
        poller.stop();
    }
    let bad = bad.lock().unwrap().clone();
    assert!(bad.is_empty(), "/readyz during restarts: {bad:?}");
    assert!(polls.load(Ordering::Relaxed) >= 100);
    assert_eq!(
        gem.count_log("shutting down in"),
        0,
        "a restart logged a shutdown delay: {:?}",
        gem.logs()
    );
}

#[test]
fn metrics_listen_on_a_listen_address_is_refused_naming_both_keys() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gem.toml"),
        format!(
            "listen = [\"127.0.0.1:{port}\"]\nhandler = {:?}\nmetrics_listen = \"127.0.0.1:{port}\"\n",
            plugin("hello")
        ),
    )
    .unwrap();
    for cmd in ["check", "serve"] {
        let (status, out, err) = run_gem(dir.path(), &[cmd], &[]);
        assert!(!status.success(), "gem {cmd} accepted it: {out}{err}");
        assert!(
            err.contains("metrics_listen") && err.contains("`listen`"),
            "gem {cmd}: {err}"
        );
        assert!(!err.contains("Server started"), "gem {cmd}: {err}");
    }
    // The same through the environment.
    let (status, _, err) = run_gem(
        dir.path(),
        &["check"],
        &[("GEM_METRICS_LISTEN", &format!("127.0.0.1:{port}"))],
    );
    assert!(!status.success());
    assert!(err.contains("metrics_listen"), "{err}");
}

const UA: &str = "fleet-test/1.0";
const REFERER: &str = "http://example.test/page";

#[test]
fn port_0_for_both_listen_and_metrics_listen_is_two_addresses() {
    // Two sockets the OS gives each its own port: not "the same address".
    let extra = "metrics_listen = \"127.0.0.1:0\"\nprobation = \"0s\"";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gem.toml"), Spec::new("hello", extra).toml).unwrap();
    let (status, _, err) = run_gem(dir.path(), &["check"], &[]);
    assert!(status.success(), "gem check refused it: {err}");
    let (mut gem, metrics) = start_with_metrics(Spec::new("hello", extra));
    assert_ne!(metrics.port(), gem.addr.port());
    assert_eq!(get(metrics, "/healthz").unwrap().status, 200);
    // Handed over like the other listeners: port 0 means the port first chosen.
    let pid = gem.restart(Signal::HUP);
    assert_eq!(metrics_addr(pid, gem.addr), metrics);
    assert_eq!(get(metrics, "/readyz").unwrap().status, 200);
}

/// Sends three requests on new connections, in origin form: `GET /` with a user agent
/// and a referer (200), `GET /missing?q=1` (404 from the plugin), and a POST with a
/// 3-byte body; returns their targets.
fn three_requests(addr: SocketAddr) -> [&'static str; 3] {
    let ua = format!("User-Agent: {UA}");
    let referer = format!("Referer: {REFERER}");
    assert_eq!(
        request(addr, "GET", "/", &[&ua, &referer], b""),
        (200, HELLO.into())
    );
    assert_eq!(request(addr, "GET", "/missing?q=1", &[], b"").0, 404);
    assert_eq!(
        request(addr, "POST", "/echo", &[], b"abc"),
        (200, "abc".into())
    );
    ["/", "/missing?q=1", "/echo"]
}

#[test]
fn the_combined_access_log_has_one_line_per_request() {
    let mut gem = Gem::start(Spec::new(
        "hello",
        "access_log = \"access.log\"\naccess_log_format = \"combined\"",
    ));
    let path = gem.dir.path().join("access.log");
    three_requests(gem.addr);
    wait_for("three lines in the access log", || {
        (lines_of(&path).len() >= 3).then_some(())
    });
    let lines = lines_of(&path);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for (line, (request, status, bytes)) in lines.iter().zip([
        ("\"GET / HTTP/1.1\"", 200, HELLO.len()),
        ("\"GET /missing?q=1 HTTP/1.1\"", 404, "not found\n".len()),
        ("\"POST /echo HTTP/1.1\"", 200, 3),
    ]) {
        // 127.0.0.1 - - [27/Nov/2026:12:00:00 +0000] "GET / HTTP/1.1" 200 12 "-" "-" 153 HTTP/1.1 1
        assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
        let after = line
            .split_once(&format!("{request} "))
            .unwrap_or_else(|| panic!("no {request} in {line}"))
            .1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        assert_eq!(fields[0], status.to_string(), "{line}");
        assert_eq!(fields[1], bytes.to_string(), "{line}");
        let (referer, ua) = match request {
            "\"GET / HTTP/1.1\"" => (format!("\"{REFERER}\""), format!("\"{UA}\"")),
            _ => ("\"-\"".into(), "\"-\"".into()),
        };
        assert_eq!((fields[2], fields[3]), (&*referer, &*ua), "{line}");
        assert!(fields[4].parse::<u64>().is_ok(), "duration µs in {line}");
        assert_eq!(&fields[5..], ["HTTP/1.1", "1"], "{line}");
    }
    // A restart's new generation appends to the same file, with its number. (A
    // connection may still reach the old generation for a moment after the pid file
    // names the new one: a request per poll, each with its own target.)
    gem.restart(Signal::HUP);
    let mut n = 0;
    let line = wait_for("a line from generation 2", || {
        n += 1;
        let target = format!("/after-{n}");
        assert_eq!(request(gem.addr, "GET", &target, &[], b"").0, 404);
        lines_of(&path)
            .into_iter()
            .find(|l| l.contains("\"GET /after-") && l.ends_with(" HTTP/1.1 2"))
    });
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    wait_for("a line for every request", || {
        (lines_of(&path).len() == 3 + n).then_some(())
    });
}

#[test]
fn the_json_access_log_has_one_object_per_request() {
    // An absolute path, in a directory of its own.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    let mut gem = Gem::start(Spec::new(
        "hello",
        &format!(
            "access_log = {:?}\naccess_log_format = \"json\"",
            dir.path().join("logs/access.json")
        ),
    ));
    let path = dir.path().join("logs/access.json");
    let targets = three_requests(gem.addr);
    wait_for("three lines in the access log", || {
        (lines_of(&path).len() >= 3).then_some(())
    });
    let lines = lines_of(&path);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for ((line, target), (method, status, bytes)) in lines.iter().zip(targets).zip([
        ("GET", 200, HELLO.len()),
        ("GET", 404, "not found\n".len()),
        ("POST", 200, 3),
    ]) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["method"], method, "{line}");
        assert_eq!(v["target"], target, "{line}");
        assert_eq!(v["status"], status, "{line}");
        assert_eq!(v["bytes"], bytes, "{line}");
        assert_eq!(v["protocol"], "HTTP/1.1", "{line}");
        assert_eq!(v["generation"], 1, "{line}");
        assert!(v["duration_us"].is_u64(), "{line}");
        assert!(v["time"].is_string() || v["time"].is_number(), "{line}");
        if target == "/" {
            assert_eq!(
                (&v["referer"], &v["user_agent"]),
                (&REFERER.into(), &UA.into())
            );
        } else {
            assert!(
                v["referer"].is_null() && v["user_agent"].is_null(),
                "{line}"
            );
        }
        let peer: SocketAddr = v["peer"].as_str().unwrap().parse().unwrap();
        assert!(peer.ip().is_loopback(), "{line}");
    }
    assert!(alive(gem.pid()));
}

#[test]
fn reopen_after_a_rename_writes_at_the_path_again() {
    let mut gem = Gem::start(Spec::new(
        "hello",
        "access_log = \"access.log\"\n[signals]\nUSR1 = \"reopen\"",
    ));
    let path = gem.dir.path().join("access.log");
    let rotated = gem.dir.path().join("access.log.1");
    assert_eq!(request(gem.addr, "GET", "/before", &[], b"").0, 404);
    wait_line(&path, "/before ");
    // What logrotate does without copytruncate: rename, then the signal.
    std::fs::rename(&path, &rotated).unwrap();
    let pid = gem.pid();
    gem.signal(Signal::USR1);
    gem.wait_log(&format!(
        "[{pid}] received signal \"user defined signal 1\""
    ));
    // A request per poll, each with its own target, until one reaches the path.
    let mut n = 0;
    let line = wait_for("a line at the access log's path after the reopen", || {
        n += 1;
        let target = format!("/after-{n}");
        assert_eq!(request(gem.addr, "GET", &target, &[], b"").0, 404);
        lines_of(&path).into_iter().find(|l| l.contains("/after-"))
    });
    assert!(line.contains("\"GET /after-"), "{line}");
    assert!(alive(pid));
    // Nothing was lost or doubled: the request before the rename is in the rotated
    // file, and every request is in one of the two files, once.
    let both = || -> Vec<String> {
        lines_of(&rotated)
            .into_iter()
            .chain(lines_of(&path))
            .collect()
    };
    wait_for("every request in one of the two files", || {
        (both().len() > n).then_some(())
    });
    let all = both();
    assert_eq!(all.len(), n + 1, "{all:?}");
    assert_eq!(
        lines_of(&rotated)
            .iter()
            .filter(|l| l.contains("/before "))
            .count(),
        1
    );
    for i in 1..=n {
        let target = format!("/after-{i} ");
        assert_eq!(
            all.iter().filter(|l| l.contains(&target)).count(),
            1,
            "{all:?}"
        );
    }
}

#[test]
fn an_access_log_in_a_missing_directory_fails_the_start_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("gem.toml"),
        format!(
            "listen = [\"127.0.0.1:0\"]\nhandler = {:?}\naccess_log = \"no-such-dir/access.log\"\n",
            plugin("hello")
        ),
    )
    .unwrap();
    let (status, _, err) = run_gem(dir.path(), &["serve"], &[]);
    assert!(!status.success());
    assert!(err.contains("no-such-dir/access.log"), "{err}");
    assert!(!err.contains("Server started"), "{err}");
    assert!(!dir.path().join("gem.pid").exists());
}

#[test]
fn an_access_log_in_a_missing_directory_fails_the_upgrade_and_the_old_one_serves_on() {
    let mut gem = Gem::start(Spec::new("hello", ""));
    gem.addr = listen_addr(&gem);
    let pid = gem.pid();
    let toml = gem.dir.path().join("gem.toml");
    let edited = std::fs::read_to_string(&toml).unwrap() + "access_log = \"gone/access.log\"\n";
    std::fs::write(&toml, edited).unwrap();
    let load = Load::start(gem.addr, 2, 1, 0);
    gem.signal(Signal::HUP);
    let line = gem.wait_log("upgrade failed:");
    assert!(line.contains(&format!("{pid} keeps serving")), "{line}");
    assert!(
        gem.logs().iter().any(|l| l.contains("gone/access.log")),
        "no log line names the path: {:?}",
        gem.logs()
    );
    assert_eq!(gem.pid(), pid);
    assert!(alive(pid));
    assert_eq!(get(gem.addr, "/").unwrap().text(), HELLO);
    let report = load.stop();
    assert_eq!(report.failed, 0, "failures: {:?}", report.failures);
}
