//! The one way integration tests start gem: the real binary, in its own temporary
//! directory, on 127.0.0.1 with an OS-chosen port, its stderr collected line by line.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod client;
pub mod fleet;
pub mod load;
pub mod supervise;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

/// How long any single wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The gem binary under test.
pub fn gem_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_gem"))
}

/// A plugin built by the workspace, e.g. `plugin("hello")` -> `.../libhello.so`.
/// `cargo test` builds no cdylib artifact, so the first call builds the plugins.
pub fn plugin(name: &str) -> PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "-p",
                "hello",
                "-p",
                "upgraded",
                "-p",
                "abi-v1",
                "-p",
                "slow-init",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for the plugins");
        assert!(status.success(), "building the plugins failed");
    });
    let path = gem_bin()
        .parent()
        .unwrap()
        .join(format!("lib{}.so", name.replace('-', "_")));
    assert!(
        path.exists(),
        "{} is missing after building the plugins",
        path.display()
    );
    path
}

/// Polls `f` until it returns `Some`, failing the test at `DEADLINE`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running gem (and whatever generations it hands over to).
pub struct Gem {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
    /// Every pid that served, so Drop can stop them all.
    seen_pids: Vec<u32>,
}

/// What to start.
pub struct Spec {
    /// The binary to run; the workspace's `gem` when `None`.
    pub program: Option<PathBuf>,
    pub toml: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A command gem runs under, which must exec it (e.g. `prlimit --nofile=64:64`),
    /// so the pid is still gem's.
    pub under: Vec<String>,
}

impl Spec {
    /// A config serving `plugin` on 127.0.0.1:0, plus `extra` TOML lines.
    pub fn new(plugin_name: &str, extra: &str) -> Spec {
        Spec {
            toml: format!(
                "listen = [\"127.0.0.1:0\"]\nhandler = {:?}\n{extra}\n",
                plugin(plugin_name)
            ),
            args: Vec::new(),
            env: Vec::new(),
            program: None,
            under: Vec::new(),
        }
    }

    /// A config serving the `.so` at `so`, plus `extra` TOML lines.
    pub fn with_so(so: &Path, extra: &str) -> Spec {
        Spec {
            toml: format!("listen = [\"127.0.0.1:0\"]\nhandler = {so:?}\n{extra}\n"),
            args: Vec::new(),
            env: Vec::new(),
            program: None,
            under: Vec::new(),
        }
    }

    pub fn program(mut self, p: &Path) -> Spec {
        self.program = Some(p.to_owned());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Spec {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn arg(mut self, a: &str) -> Spec {
        self.args.push(a.into());
        self
    }

    /// Runs gem as `wrapper... gem serve ...`; the wrapper must exec gem.
    pub fn under(mut self, wrapper: &[&str]) -> Spec {
        self.under = wrapper.iter().map(|w| (*w).to_owned()).collect();
        self
    }
}

/// Runs `gem` to completion with `args` in `dir`, returning (status, stdout, stderr).
/// A gem that does not finish within `DEADLINE` is killed and the test fails.
pub fn run_gem(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut child = Command::new(gem_bin())
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gem {args:?} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, out.join().unwrap(), err.join().unwrap())
}

/// Kills every process working in a directory when dropped, so a failing test leaves
/// nothing running.
pub struct KillAllIn(pub PathBuf);

impl Drop for KillAllIn {
    fn drop(&mut self) {
        for pid in processes_in(&self.0) {
            let _ = rustix::process::Pid::from_raw(pid as i32)
                .map(|p| rustix::process::kill_process(p, Signal::KILL));
        }
    }
}

impl Gem {
    /// Starts `gem serve` and waits until it serves.
    pub fn start(spec: Spec) -> Gem {
        let gem = Gem::spawn(spec);
        gem.wait_log("Server started at process");
        gem
    }

    /// Starts `gem serve` without waiting for anything.
    pub fn spawn(spec: Spec) -> Gem {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gem.toml"), &spec.toml).unwrap();
        let program = spec.program.clone().unwrap_or_else(gem_bin);
        let mut command = match spec.under.split_first() {
            Some((wrapper, args)) => {
                let mut c = Command::new(wrapper);
                c.args(args).arg(program);
                c
            }
            None => Command::new(program),
        };
        command
            .arg("serve")
            .args(&spec.args)
            .current_dir(dir.path())
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_copied(&mut command);
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("gem| {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let mut gem = Gem {
            dir,
            addr: "127.0.0.1:1".parse().unwrap(),
            seen_pids: vec![child.id()],
            child: Some(child),
            logs,
        };
        if let Some(addr) = gem.try_wait_log("listening on http://") {
            gem.addr = addr_of(&addr);
        }
        gem
    }

    /// The first process's pid.
    pub fn first_pid(&self) -> u32 {
        self.seen_pids[0]
    }

    /// The pid in the pid file (the serving generation).
    pub fn pid(&mut self) -> u32 {
        let path = self.dir.path().join("gem.pid");
        let pid = wait_for("the pid file", || {
            std::fs::read_to_string(&path)
                .ok()?
                .trim()
                .parse::<u32>()
                .ok()
        });
        if !self.seen_pids.contains(&pid) {
            self.seen_pids.push(pid);
        }
        pid
    }

    /// Sends `sig` to the serving generation.
    pub fn signal(&mut self, sig: Signal) {
        let pid = self.pid();
        signal_pid(pid, sig);
    }

    /// `gem status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let (status, out, err) = run_gem(self.dir.path(), &["status", "--json"], &[]);
        // 1: a supervisor answered, but no worker serves right now.
        assert!(
            status.success() || status.code() == Some(1),
            "gem status failed: {err}"
        );
        serde_json::from_str(&out).unwrap()
    }

    /// Requests in flight in the serving generation.
    pub fn in_flight(&self) -> u64 {
        self.status()["in_flight"].as_u64().unwrap()
    }

    /// All stderr lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// Number of stderr lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.logs().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_n(needle, 1)
    }

    /// Waits until `n` stderr lines contain `needle`; returns the n-th.
    pub fn wait_log_n(&self, needle: &str, n: usize) -> String {
        wait_for(&format!("log line #{n} containing {needle:?}"), || {
            self.logs()
                .into_iter()
                .filter(|l| l.contains(needle))
                .nth(n - 1)
        })
    }

    fn try_wait_log(&self, needle: &str) -> Option<String> {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if let Some(l) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return Some(l);
            }
            if self.logs().iter().any(|l| l.contains("ERROR")) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Waits for the first process to exit and returns its status and how long it took.
    pub fn wait_exit(&mut self) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let child = self.child.as_mut().expect("already reaped");
        let status = wait_for("gem to exit", || child.try_wait().unwrap());
        (status, start.elapsed())
    }

    /// Sends `sig` to the serving generation and waits for it to report ready with a
    /// new pid; returns that pid.
    pub fn restart(&mut self, sig: Signal) -> u32 {
        let old = self.pid();
        let n = self.count_log("Server started at process") + 1;
        signal_pid(old, sig);
        self.wait_log_n("Server started at process", n);
        let new = wait_for("the pid file to change", || {
            let pid = self.pid();
            (pid != old).then_some(pid)
        });
        self.seen_pids.push(new);
        new
    }
}

impl Drop for Gem {
    /// Stops every generation by pid: the ones seen, the one in the pid file, and any
    /// other process working in this test's directory (every generation does).
    fn drop(&mut self) {
        let mut pids = self.seen_pids.clone();
        if let Ok(text) = std::fs::read_to_string(self.dir.path().join("gem.pid")) {
            pids.extend(text.trim().parse::<u32>());
        }
        pids.extend(processes_in(self.dir.path()));
        for pid in pids.into_iter().filter(|p| alive(*p)) {
            let _ = rustix::process::Pid::from_raw(pid as i32)
                .map(|p| rustix::process::kill_process(p, Signal::KILL));
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Processes whose working directory is `dir`.
pub fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == dir))
        .collect()
}

/// Sends `sig` to `pid`.
pub fn signal_pid(pid: u32, sig: Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on every Linux the tests run on.
    Duration::from_millis(ticks * 10)
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn addr_of(line: &str) -> SocketAddr {
    let start = line.find("http://").unwrap() + "http://".len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    rest[..end].parse().unwrap()
}

/// Spawns `command`. A binary a test has just copied may still be open for writing in
/// another test's child between its fork and its exec (the fd is close-on-exec), and
/// exec then fails with "Text file busy" for that moment: try again until a deadline.
pub fn spawn_copied(command: &mut Command) -> std::process::Child {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match command.spawn() {
            Err(e)
                if e.kind() == std::io::ErrorKind::ExecutableFileBusy
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other.unwrap(),
        }
    }
}
