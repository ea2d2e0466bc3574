//! gem under hostile or unlucky conditions: out of file descriptors, and clients of the
//! control socket that send too much or nothing at all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{DEADLINE, Gem, Spec, cpu_time, rss_kib, run_gem, wait_for};

const STATUS: &[u8] = b"{\"v\":1,\"cmd\":\"status\"}\n";

fn control(gem: &Gem) -> UnixStream {
    let stream = UnixStream::connect(gem.dir.path().join("gem.sock")).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// The first line the server sends on `stream`, or "" if it closes without one.
fn reply(stream: &UnixStream) -> String {
    let mut line = String::new();
    let _ = BufReader::new(stream).read_line(&mut line);
    line
}

/// Whether the server has closed `stream` (it reads EOF or an error), waiting at most
/// `DEADLINE`.
fn closed_by_server(stream: &mut UnixStream) -> bool {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

fn gem_status_works(gem: &Gem) -> bool {
    let (status, out, _) = run_gem(gem.dir.path(), &["status"], &[]);
    status.success() && out.starts_with("pid:")
}

#[test]
fn accept_loops_back_off_when_out_of_fds_and_say_so_once_each_way() {
    let gem = Gem::start(
        Spec::new("hello", "header_read_timeout = \"60s\"").under(&["prlimit", "--nofile=64:64"]),
    );
    let pid = gem.first_pid();
    let http = format!("cannot accept on {}", gem.addr);
    // The plugin is hashed on a side thread that holds an fd until it is done: wait for
    // it, so that no fd comes free while the listeners are starved on purpose.
    wait_for("the plugin to be hashed", || {
        gem.status()["plugin"]["sha256"].as_str().map(|_| ())
    });
    // More idle connections than the process may have fds: the rest wait in the backlog.
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(gem.addr).unwrap())
        .collect();
    gem.wait_log(&http);
    let mut asking = control(&gem);
    asking.write_all(STATUS).unwrap();
    gem.wait_log("gem.sock: Too many open files (os error 24); backing off");

    let before = cpu_time(pid);
    let window = Instant::now();
    std::thread::sleep(Duration::from_secs(1)); // the measurement window
    let used = cpu_time(pid) - before;
    let share = used.as_secs_f64() / window.elapsed().as_secs_f64();
    assert!(
        share < 0.2,
        "gem used {used:?} of CPU in {:?}",
        window.elapsed()
    );
    assert_eq!(gem.count_log(&http), 1, "one line for the HTTP listener");
    assert_eq!(
        gem.count_log("cannot accept on"),
        2,
        "and one for the control socket"
    );
    assert_eq!(gem.count_log("failed to accept"), 0);

    drop(idle);
    let answer = reply(&asking);
    assert!(answer.contains("\"status\""), "{answer:?}");
    let again = gem.wait_log(&format!("accepting on {} again after ", gem.addr));
    assert!(again.contains(&format!("[{pid}]")), "{again}");
    assert!(again.contains(" failed attempts over "), "{again}");
    gem.wait_log("gem.sock again after ");
    assert!(gem_status_works(&gem));
}

#[test]
fn an_endless_control_line_is_refused_and_costs_no_memory() {
    let gem = Gem::start(Spec::new("hello", ""));
    let pid = gem.first_pid();
    let before = rss_kib(pid);
    let mut stream = control(&gem);
    let writer = stream.try_clone().unwrap();
    // 10 MiB without a newline; the server closes before it has all of it.
    let flood = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        let mut writer = writer;
        for _ in 0..160 {
            if writer.write_all(&chunk).is_err() {
                return false;
            }
        }
        true
    });
    let answer = reply(&stream);
    assert!(answer.contains("\"ok\":false"), "{answer:?}");
    assert!(answer.contains("longer than 4096 bytes"), "{answer:?}");
    assert!(closed_by_server(&mut stream));
    assert!(
        !flood.join().unwrap(),
        "the server must not read all 10 MiB"
    );
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 4096, "gem grew by {grown} KiB");
    assert!(gem_status_works(&gem));
}

#[test]
fn silent_control_connections_are_closed_and_do_not_lock_out_status() {
    let gem = Gem::start(Spec::new("hello", ""));
    let start = Instant::now();
    let mut silent: Vec<UnixStream> = (0..200).map(|_| control(&gem)).collect();
    // The newest 32 hold the places; a client that talks still gets its answer.
    assert!(
        gem_status_works(&gem),
        "status while 200 connections sit silent"
    );
    let mut timed_out = 0;
    for stream in &mut silent {
        let answer = reply(stream);
        assert!(
            answer.contains("too many control connections")
                || answer.contains("no request line within 5s"),
            "{answer:?}"
        );
        timed_out += usize::from(answer.contains("within 5s"));
        assert!(closed_by_server(stream));
    }
    assert!(start.elapsed() < DEADLINE);
    assert!(timed_out <= 32, "{timed_out} connections held a place");
    assert!(
        timed_out > 0,
        "the newest connections wait for their request"
    );
    wait_for("status after the silent connections", || {
        gem_status_works(&gem).then_some(())
    });
}
