//! The servers under test, started as real processes on 127.0.0.1: gem (hello plugin),
//! the plain hyper example, and nginx.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub const HELLO: &str = "Hello world.";
pub const UPGRADED: &str = "Congratulation! Server has been upgraded.";

/// Where the release build put things.
#[derive(Debug, Clone)]
pub struct Build {
    pub gem: PathBuf,
    pub hyper: PathBuf,
    pub hello_so: PathBuf,
    pub upgraded_so: PathBuf,
    /// `plugins/testing/crash`, whose `handle` aborts; `None` when it was not built.
    pub crash_so: Option<PathBuf>,
}

impl Build {
    pub fn at(root: &Path) -> Result<Build> {
        let release = root.join("target/release");
        let build = Build {
            gem: release.join("gem"),
            hyper: release.join("examples/hyper_hello"),
            hello_so: release.join("libhello.so"),
            upgraded_so: release.join("libupgraded.so"),
            crash_so: Some(release.join("libcrash.so")).filter(|p| p.exists()),
        };
        for p in [
            &build.gem,
            &build.hyper,
            &build.hello_so,
            &build.upgraded_so,
        ] {
            if !p.exists() {
                bail!("{} is missing: run the release build first", p.display());
            }
        }
        Ok(build)
    }
}

/// A port the OS says is free right now.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `addr` answers `GET /` with `body`.
pub fn wait_serving(addr: SocketAddr, body: &str) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if get(addr).ok().as_deref() == Some(body) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("{addr} did not answer {body:?} within 20s")
}

/// Waits until something accepts connections on `addr`.
pub fn wait_port(addr: SocketAddr) -> Result<()> {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `GET /` on a new connection; the body.
pub fn get(addr: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if !out.starts_with("HTTP/1.1 200") {
        bail!("not a 200: {out:?}");
    }
    Ok(out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

/// Resident memory of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Open fds of `pid`.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Live (not zombie) processes whose command name is `name`.
pub fn count_processes(name: &str) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let comm_ok = stat.contains(&format!("({name})"));
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
            comm_ok && !zombie
        })
        .count()
}

pub fn signal(pid: u32, sig: &str) -> Result<()> {
    use rustix::process::{Pid, Signal, kill_process};
    let signo = match sig {
        "HUP" => Signal::HUP,
        "TERM" => Signal::TERM,
        "QUIT" => Signal::QUIT,
        "KILL" => Signal::KILL,
        other => bail!("no such signal here: {other}"),
    };
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .with_context(|| format!("bad pid {pid}"))?;
    kill_process(target, signo).with_context(|| format!("kill -{sig} {pid}"))?;
    Ok(())
}

/// A server that can be restarted and stopped.
pub trait Peer {
    fn name(&self) -> &'static str;
    fn addr(&self) -> SocketAddr;
    /// Prepares the next restart to make `/` answer `body` (files only, no signal).
    fn stage(&mut self, body: &str) -> Result<()>;
    /// Starts the staged restart; returns at once.
    fn signal_restart(&mut self) -> Result<()>;
    /// Starts a restart that makes `/` answer `body`; returns at once.
    fn restart_to(&mut self, body: &str) -> Result<()> {
        self.stage(body)?;
        self.signal_restart()
    }
    /// Waits until the last restart is complete enough for the next one.
    fn settle(&mut self) -> Result<()> {
        Ok(())
    }
    fn stop(&mut self) -> Result<()>;
}

/// How gem runs: supervised or not, and its probation (gem's default when `None`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// `gem serve --supervise`: the started process keeps the sockets, workers serve.
    pub supervise: bool,
    /// `probation = "..."` in gem.toml.
    pub probation: Option<&'static str>,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        if self.supervise {
            "supervised"
        } else {
            "plain"
        }
    }
}

/// One worker of a supervised gem, from `gem status --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: u32,
    pub generation: u64,
    pub state: String,
}

pub struct Gem {
    pub child: Child,
    pub dir: tempfile::TempDir,
    addr: SocketAddr,
    so: PathBuf,
    build: Build,
    mode: Mode,
    /// The pid the last restart was sent to.
    restarted: Option<u32>,
    /// Supervised: the serving generation when the last restart was staged.
    staged_generation: Option<u64>,
    stopped: bool,
}

impl Gem {
    pub fn start(build: &Build) -> Result<Gem> {
        Gem::start_with(build, Mode::default())
    }

    /// Starts gem in `mode`; with a mode set, its log (`RUST_LOG=info`) goes to `gem.log`
    /// in its directory.
    pub fn start_with(build: &Build, mode: Mode) -> Result<Gem> {
        let port = free_port()?;
        let mut gem = Gem::spawn(build, mode, port, &format!("\"127.0.0.1:{port}\""))?;
        if let Err(e) = wait_serving(gem.addr, HELLO) {
            let _ = gem.stop();
            return Err(e.context(format!("gem ({}) did not start", mode.name())));
        }
        Ok(gem)
    }

    /// Starts gem (not supervised) with one TLS listener on `cert` and `key`; `addr` is
    /// that listener.
    pub fn start_tls(build: &Build, cert: &Path, key: &Path) -> Result<Gem> {
        let port = free_port()?;
        let listen =
            format!("{{ addr = \"127.0.0.1:{port}\", tls_cert = {cert:?}, tls_key = {key:?} }}");
        let mut gem = Gem::spawn(build, Mode::default(), port, &listen)?;
        if let Err(e) = wait_port(gem.addr) {
            let _ = gem.stop();
            return Err(e.context("gem (TLS) did not start"));
        }
        Ok(gem)
    }

    /// Starts gem in `mode` listening on `listen` (a `listen` entry for 127.0.0.1:`port`),
    /// without waiting for it.
    fn spawn(build: &Build, mode: Mode, port: u16, listen: &str) -> Result<Gem> {
        let dir = tempfile::tempdir()?;
        let so = dir.path().join("handler.so");
        std::fs::copy(&build.hello_so, &so)?;
        let mut toml = format!("listen = [{listen}]\nhandler = {so:?}\n");
        if let Some(p) = mode.probation {
            toml.push_str(&format!("probation = {p:?}\n"));
        }
        std::fs::write(dir.path().join("gem.toml"), toml)?;
        let mut cmd = Command::new(&build.gem);
        cmd.arg("serve")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if mode.supervise {
            cmd.arg("--supervise");
        }
        if mode.supervise || mode.probation.is_some() {
            let log = std::fs::File::create(dir.path().join("gem.log"))?;
            cmd.env("RUST_LOG", "info").stderr(log);
        } else {
            cmd.env("RUST_LOG", "warn").stderr(Stdio::null());
        }
        let child = cmd.spawn().context("starting gem")?;
        Ok(Gem {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            so,
            build: build.clone(),
            mode,
            restarted: None,
            staged_generation: None,
            stopped: false,
        })
    }

    /// The pid in the pid file: the serving generation's, or the supervisor's.
    pub fn pid(&self) -> Result<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("gem.pid"))?;
        Ok(text.trim().parse()?)
    }

    /// `gem status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = Command::new(&self.build.gem)
            .args(["status", "--json"])
            .current_dir(self.dir.path())
            .output()?;
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "reading gem status --json: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// The serving generation number, from `gem status --json`.
    pub fn generation(&self) -> Result<u64> {
        self.status()?["generation"]
            .as_u64()
            .context("no generation in gem status")
    }

    /// A supervised gem's workers, from `gem status --json`.
    pub fn workers(&self) -> Result<Vec<Worker>> {
        let status = self.status()?;
        let list = status["supervisor"]["workers"]
            .as_array()
            .context("no supervisor.workers in gem status (not supervised?)")?;
        list.iter()
            .map(|w| {
                Ok(Worker {
                    pid: w["pid"]
                        .as_u64()
                        .and_then(|p| u32::try_from(p).ok())
                        .context("worker without pid")?,
                    generation: w["generation"].as_u64().unwrap_or(0),
                    state: w["state"].as_str().unwrap_or_default().to_owned(),
                })
            })
            .collect()
    }

    /// A supervised gem's serving worker.
    pub fn serving_worker(&self) -> Result<u32> {
        self.workers()?
            .into_iter()
            .find(|w| w.state == "serving")
            .map(|w| w.pid)
            .context("no serving worker in gem status")
    }

    /// Copies `from` over the configured handler path (a rename, as a deploy would).
    pub fn stage_so(&self, from: &Path) -> Result<()> {
        let tmp = self.so.with_extension("new");
        std::fs::copy(from, &tmp)?;
        std::fs::rename(&tmp, &self.so)?;
        Ok(())
    }

    /// Lines of the log (modes other than the default only) that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("gem.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Peer for Gem {
    fn name(&self) -> &'static str {
        "gem"
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn stage(&mut self, body: &str) -> Result<()> {
        let from = if body == HELLO {
            &self.build.hello_so
        } else {
            &self.build.upgraded_so
        };
        self.stage_so(from)?;
        if self.mode.supervise {
            self.staged_generation = Some(self.generation()?);
        }
        Ok(())
    }

    fn signal_restart(&mut self) -> Result<()> {
        let pid = self.pid()?;
        self.restarted = Some(pid);
        signal(pid, "HUP")
    }

    /// The pid file must name the new generation before the next signal; supervised
    /// (the pid file keeps the supervisor's pid), the status must.
    fn settle(&mut self) -> Result<()> {
        let start = Instant::now();
        if self.mode.supervise {
            let Some(old) = self.staged_generation.take() else {
                return Ok(());
            };
            while self.generation().ok().is_none_or(|g| g == old) {
                if start.elapsed() > Duration::from_secs(30) {
                    bail!("supervised gem did not serve a new generation within 30s");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            return Ok(());
        }
        let Some(old) = self.restarted else {
            return Ok(());
        };
        while self.pid().ok() == Some(old) || self.pid().is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                bail!("gem did not hand over within 30s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        self.stopped = true;
        // Supervised, the workers are the supervisor's to stop; noted to check after.
        let workers: Vec<u32> = if self.mode.supervise {
            self.workers()
                .map(|ws| ws.into_iter().map(|w| w.pid).collect())
                .unwrap_or_default()
        } else {
            vec![]
        };
        // The pid file may name a generation that is gone (a rolled-back one): then the
        // first process, our child, is the one still serving.
        match self.pid().ok().filter(|&pid| alive(pid)) {
            Some(pid) => {
                let _ = signal(pid, "TERM");
            }
            None => {
                if let Ok(None) = self.child.try_wait() {
                    let _ = signal(self.child.id(), "TERM");
                }
            }
        }
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Later generations are not our children: wait for the pid file to go.
        let start = Instant::now();
        while self.dir.path().join("gem.pid").exists() && start.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        for pid in workers {
            let start = Instant::now();
            while alive(pid) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if alive(pid) {
                eprintln!("gem worker {pid} outlived its supervisor: SIGKILL");
                let _ = signal(pid, "KILL");
            }
        }
        Ok(())
    }
}

/// A scenario that fails half-way still stops its gem.
impl Drop for Gem {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
    }
}

/// Whether `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// The children of `pid`: each of its threads' `/proc/PID/task/TID/children` (a thread
/// lists only the children it forked itself).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return vec![];
    };
    tasks
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

pub struct Hyper {
    child: Child,
    addr: SocketAddr,
}

impl Hyper {
    pub fn start(build: &Build) -> Result<Hyper> {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(&build.hyper)
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait_serving(addr, HELLO)?;
        Ok(Hyper { child, addr })
    }
}

impl Peer for Hyper {
    fn name(&self) -> &'static str {
        "hyper"
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn stage(&mut self, _body: &str) -> Result<()> {
        bail!("the hyper ceiling has no restart")
    }

    fn signal_restart(&mut self) -> Result<()> {
        bail!("the hyper ceiling has no restart")
    }

    fn stop(&mut self) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    workers: usize,
    /// Serve HTTP/2 with prior knowledge instead of HTTP/1.
    h2: bool,
}

impl Nginx {
    pub fn start(workers: usize) -> Result<Nginx> {
        Nginx::start_with(workers, false)
    }

    /// An nginx that speaks HTTP/2 with prior knowledge (for h2load).
    pub fn start_h2(workers: usize) -> Result<Nginx> {
        Nginx::start_with(workers, true)
    }

    fn start_with(workers: usize, h2: bool) -> Result<Nginx> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let mut nginx = Nginx {
            child: Command::new("true").spawn()?,
            dir,
            addr,
            workers,
            h2,
        };
        nginx.write_conf(HELLO)?;
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
            .context("starting nginx (apt-get install nginx-light)")?;
        if h2 {
            wait_port(addr)?;
        } else {
            wait_serving(addr, HELLO)?;
        }
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
                 server {{\n    listen {addr} backlog=4096{h2};\n    keepalive_requests 1000000;\n\
                 location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
                w = self.workers,
                addr = self.addr,
                h2 = if self.h2 { " http2" } else { "" },
            ),
        )?;
        Ok(())
    }

    pub fn master_pid(&self) -> u32 {
        self.child.id()
    }
}

impl Peer for Nginx {
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
        // What `nginx -s reload` does, without the extra process start.
        signal(self.master_pid(), "HUP")
    }

    fn stop(&mut self) -> Result<()> {
        let _ = signal(self.master_pid(), "QUIT");
        let _ = self.child.wait();
        Ok(())
    }
}
