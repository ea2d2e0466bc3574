//! The file descriptors one generation hands the next: what this process inherited
//! (from the gem that started it, or from systemd socket activation) and claims exactly
//! once, and what it passes to a child of its own.
//!
//! The parent names the fds in `GEM_HANDOVER_*` variables and ties them to the child's
//! own pid (`GEM_HANDOVER_PID`, written by the child itself between fork and exec, see
//! `exec.rs`), as systemd ties `LISTEN_FDS` to `LISTEN_PID`: a program that the
//! plugin starts inherits the environment but not the fds, and ignores the variables.
//! They are also removed from the environment once read, when that is sound (this
//! process has one thread, as in `gem serve`, which claims them first thing).
#![allow(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Mutex, PoisonError};

use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
use tracing::{debug, warn};

/// `FD=LABEL` pairs, comma-separated: the TCP listeners handed over. The label is the
/// `listen` entry as written, so `127.0.0.1:0` finds its socket again after a restart.
pub(crate) const ENV_FDS: &str = "GEM_HANDOVER_FDS";
/// The fd of the control socket's listener, if one is handed over.
pub(crate) const ENV_CONTROL_FD: &str = "GEM_HANDOVER_CONTROL_FD";
/// The fd of the child's end of the ready channel.
pub(crate) const ENV_READY_FD: &str = "GEM_HANDOVER_READY_FD";
/// The generation number of the child.
pub(crate) const ENV_GENERATION: &str = "GEM_HANDOVER_GENERATION";
/// The pid of the process the fds are meant for.
pub(crate) const ENV_PID: &str = "GEM_HANDOVER_PID";
/// Set for a worker of a supervisor: the supervisor's pid.
pub(crate) const ENV_SUPERVISOR: &str = "GEM_HANDOVER_SUPERVISOR";
/// A worker's effective configuration, as JSON: the one its supervisor loaded.
pub(crate) const ENV_CONFIG: &str = "GEM_HANDOVER_CONFIG";
/// The fd of a sealed copy of the plugin a worker is to load.
pub(crate) const ENV_PLUGIN_FD: &str = "GEM_HANDOVER_PLUGIN_FD";
/// A re-executed supervisor's state, as JSON (see `supervisor::Saved`).
pub(crate) const ENV_SUPERVISOR_STATE: &str = "GEM_HANDOVER_SUPERVISOR_STATE";
/// The fd of a sealed memfd holding the TLS session-ticket key ring (see `tls.rs`):
/// the keys pass from process to process in memory only, never on disk or in the
/// environment.
pub(crate) const ENV_TICKETS_FD: &str = "GEM_HANDOVER_TICKETS_FD";
/// Every variable above: what a child must not inherit from this process's own
/// environment, and what is removed once read.
const ALL_VARS: &[&str] = &[
    ENV_FDS,
    ENV_CONTROL_FD,
    ENV_READY_FD,
    ENV_GENERATION,
    ENV_PID,
    ENV_SUPERVISOR,
    ENV_CONFIG,
    ENV_PLUGIN_FD,
    ENV_SUPERVISOR_STATE,
    ENV_TICKETS_FD,
];
/// systemd's socket-activation variables.
const SYSTEMD_VARS: &[&str] = &["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// The first fd number a child gets mappings at (after stdin, stdout, stderr).
pub(crate) const FIRST_CHILD_FD: RawFd = 3;

/// A problem with inherited file descriptors.
#[derive(Debug, thiserror::Error)]
pub enum FdError {
    /// An environment variable that names fds is malformed.
    #[error("environment variable {var}={value:?} is malformed")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The same fd is named twice: owning it twice would close it twice.
    #[error("inherited fd {fd} is named twice (in {first} and in {second})")]
    Duplicate {
        /// The fd number.
        fd: RawFd,
        /// The variable that named it first.
        first: &'static str,
        /// The variable that named it again.
        second: &'static str,
    },
    /// A named fd is not open.
    #[error("inherited fd {fd} named in {var} is not open: {source}")]
    NotOpen {
        /// The fd number.
        fd: RawFd,
        /// The variable that named it.
        var: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A named fd is not the kind of socket its variable says.
    #[error("inherited fd {fd} ({label}) is not {expected}: {reason}")]
    WrongKind {
        /// The fd number.
        fd: RawFd,
        /// Its label or variable.
        label: String,
        /// What it should be.
        expected: &'static str,
        /// What it is, or why it could not be told.
        reason: String,
    },
}

/// What this process inherited.
#[derive(Debug)]
pub(crate) struct Inherited {
    /// TCP listeners, each with its label.
    pub(crate) listeners: Vec<(String, TcpListener)>,
    /// The control socket's listener.
    pub(crate) control: Option<UnixListener>,
    /// Our end of the channel to the parent that is waiting for us to be ready.
    pub(crate) ready: Option<UnixStream>,
    /// Our generation: 1 for a fresh start.
    pub(crate) generation: u64,
    /// For a worker: its supervisor's pid, config (JSON) and plugin copy.
    pub(crate) worker: Option<WorkerFds>,
    /// For a supervisor that re-executed itself: its saved state.
    pub(crate) supervisor_state: Option<SavedState>,
}

/// A re-executed supervisor's saved state (JSON, see `supervisor::Saved`) and the fds
/// its `fds` list names, claimed.
#[derive(Debug)]
pub(crate) struct SavedState {
    /// The state.
    pub(crate) json: String,
    /// The fds it names, by number.
    pub(crate) fds: HashMap<RawFd, OwnedFd>,
}

/// What a supervisor hands its worker besides the sockets.
#[derive(Debug)]
pub(crate) struct WorkerFds {
    /// The supervisor's pid.
    pub(crate) supervisor: u32,
    /// The effective configuration, as JSON.
    pub(crate) config: String,
    /// A sealed copy of the plugin.
    pub(crate) plugin: OwnedFd,
}

impl Inherited {
    /// Nothing inherited: a fresh start.
    pub(crate) fn fresh() -> Inherited {
        Inherited {
            listeners: Vec::new(),
            control: None,
            ready: None,
            generation: 1,
            worker: None,
            supervisor_state: None,
        }
    }
}

/// The claim, made at most once per process; taken by the first generation to start.
static CLAIM: Mutex<Option<Claim>> = Mutex::new(None);

enum Claim {
    Held(Result<Inherited, FdError>),
    Taken,
}

/// Claims the file descriptors handed over by a parent gem or by systemd, and removes
/// their variables from the environment. Call it first in `main`, before any thread
/// starts; [`crate::Server::run`] claims them itself otherwise (and then leaves the
/// variables, which are tied to this pid, in the environment if other threads run).
///
/// Only the first call in a process claims anything; later calls do nothing.
pub fn claim_handover() {
    let mut claim = CLAIM.lock().unwrap_or_else(PoisonError::into_inner);
    if claim.is_none() {
        *claim = Some(Claim::Held(claim_now()));
    }
}

/// What the claim says about this process's role: the config a supervisor handed this
/// worker (JSON), or the state of a supervisor that re-executed itself (JSON).
pub(crate) fn claimed_role() -> (Option<String>, Option<String>) {
    claim_handover();
    let claim = CLAIM.lock().unwrap_or_else(PoisonError::into_inner);
    match &*claim {
        Some(Claim::Held(Ok(inherited))) => (
            inherited.worker.as_ref().map(|w| w.config.clone()),
            inherited.supervisor_state.as_ref().map(|s| s.json.clone()),
        ),
        _ => (None, None),
    }
}

/// What this process inherited, once; later calls get a fresh start.
pub(crate) fn take_inherited() -> Result<Inherited, FdError> {
    claim_handover();
    let mut claim = CLAIM.lock().unwrap_or_else(PoisonError::into_inner);
    match claim.replace(Claim::Taken) {
        Some(Claim::Held(inherited)) => inherited,
        _ => Ok(Inherited::fresh()),
    }
}

fn claim_now() -> Result<Inherited, FdError> {
    // A handover of no listener still names the ready channel and the pid.
    let gem_handover = env(ENV_FDS).is_some() || env(ENV_PID).is_some();
    let result = match gem_handover.then(|| env(ENV_FDS).unwrap_or_default()) {
        Some(fds) => match env(ENV_PID) {
            Some(pid) if pid.parse::<u32>().ok() == Some(std::process::id()) => claim_gem(&fds),
            other => {
                warn!(
                    "[{}] ignoring {ENV_FDS}: it is meant for pid {}, not this process",
                    std::process::id(),
                    other.as_deref().unwrap_or("(unset)")
                );
                Ok(Inherited::fresh())
            }
        },
        None => claim_systemd(),
    };
    remove_vars();
    result
}

/// gem's own handover: listeners, the control socket, the ready channel.
fn claim_gem(fds_value: &str) -> Result<Inherited, FdError> {
    let pairs = parse_pairs(ENV_FDS, fds_value)?;
    let control = env_fd(ENV_CONTROL_FD)?;
    let ready = env_fd(ENV_READY_FD)?;
    let plugin = env_fd(ENV_PLUGIN_FD)?;
    let tickets = env_fd(ENV_TICKETS_FD)?;
    let mut named: Vec<(RawFd, &'static str)> =
        pairs.iter().map(|(fd, _)| (*fd, ENV_FDS)).collect();
    named.extend(control.map(|fd| (fd, ENV_CONTROL_FD)));
    named.extend(ready.map(|fd| (fd, ENV_READY_FD)));
    named.extend(plugin.map(|fd| (fd, ENV_PLUGIN_FD)));
    named.extend(tickets.map(|fd| (fd, ENV_TICKETS_FD)));
    let saved = env(ENV_SUPERVISOR_STATE);
    let saved_fds = match &saved {
        Some(json) => {
            #[derive(serde::Deserialize)]
            struct Fds {
                fds: Vec<RawFd>,
            }
            serde_json::from_str::<Fds>(json)
                .map_err(|e| FdError::BadEnv {
                    var: ENV_SUPERVISOR_STATE,
                    value: e.to_string(),
                })?
                .fds
        }
        None => Vec::new(),
    };
    named.extend(saved_fds.iter().map(|fd| (*fd, ENV_SUPERVISOR_STATE)));
    check_distinct(&named)?;
    let mut inherited = Inherited::fresh();
    for (fd, label) in pairs {
        let owned = claim(fd, ENV_FDS)?;
        inherited
            .listeners
            .push((label.clone(), tcp_listener(fd, label, owned)?));
    }
    if let Some(fd) = control {
        let owned = claim(fd, ENV_CONTROL_FD)?;
        check_listening(fd, ENV_CONTROL_FD, &owned, "a listening Unix socket")?;
        inherited.control = Some(UnixListener::from(owned));
    }
    if let Some(fd) = ready {
        let owned = claim(fd, ENV_READY_FD)?;
        check_stream(fd, &owned)?;
        inherited.ready = Some(UnixStream::from(owned));
    }
    if let Some(fd) = tickets {
        adopt_tickets(claim(fd, ENV_TICKETS_FD)?);
    }
    if let Some(json) = saved {
        let mut fds = HashMap::new();
        for fd in saved_fds {
            fds.insert(fd, claim(fd, ENV_SUPERVISOR_STATE)?);
        }
        inherited.supervisor_state = Some(SavedState { json, fds });
    }
    if let (Some(supervisor), Some(config), Some(fd)) =
        (env(ENV_SUPERVISOR), env(ENV_CONFIG), plugin)
    {
        let supervisor = supervisor.parse().map_err(|_| FdError::BadEnv {
            var: ENV_SUPERVISOR,
            value: supervisor,
        })?;
        inherited.worker = Some(WorkerFds {
            supervisor,
            config,
            plugin: claim(fd, ENV_PLUGIN_FD)?,
        });
    }
    inherited.generation = match env(ENV_GENERATION) {
        Some(g) => g.parse().map_err(|_| FdError::BadEnv {
            var: ENV_GENERATION,
            value: g,
        })?,
        None => 1,
    };
    Ok(inherited)
}

/// Adopts the TLS ticket key ring in the sealed memfd `fd`; one that cannot be read
/// costs the resumption of earlier sessions, not the start.
fn adopt_tickets(fd: OwnedFd) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd);
    let mut buf = [0u8; 128];
    // At offset 0: the writer's offset, shared with this description, is at the end.
    let read = file.read_at(&mut buf, 0);
    let adopted = read.is_ok_and(|n| crate::tls::adopt_ticket_keys(&buf[..n]));
    if !adopted {
        warn!(
            "[{}] the TLS ticket keys handed over are unusable: sessions from before this restart will not resume",
            std::process::id()
        );
    }
}

/// systemd socket activation; sd-notify checks `LISTEN_PID` and sets close-on-exec.
fn claim_systemd() -> Result<Inherited, FdError> {
    let activated = sd_notify::listen_fds_with_names().map_err(|e| FdError::BadEnv {
        var: "LISTEN_FDS",
        value: format!("{} ({e})", env("LISTEN_FDS").unwrap_or_default()),
    })?;
    let mut inherited = Inherited::fresh();
    for (fd, name) in activated {
        let label = format!("systemd:{name}");
        let owned = claim(fd, "LISTEN_FDS")?;
        inherited
            .listeners
            .push((label.clone(), tcp_listener(fd, label, owned)?));
    }
    Ok(inherited)
}

/// Removes the handover variables, if this process has a single thread: with others,
/// `remove_var` could race a read of the environment. They are tied to this pid then.
fn remove_vars() {
    if !single_threaded() {
        debug!("other threads run: the handover variables stay (they name this pid)");
        return;
    }
    for var in ALL_VARS.iter().chain(SYSTEMD_VARS) {
        // SAFETY: this process has exactly one thread (checked just above, and only this
        // thread could start another), so nothing reads the environment meanwhile.
        unsafe { std::env::remove_var(var) };
    }
}

fn single_threaded() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|tasks| tasks.count() == 1)
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

fn env_fd(var: &'static str) -> Result<Option<RawFd>, FdError> {
    env(var)
        .map(|v| v.parse().map_err(|_| FdError::BadEnv { var, value: v }))
        .transpose()
}

fn parse_pairs(var: &'static str, value: &str) -> Result<Vec<(RawFd, String)>, FdError> {
    let bad = || FdError::BadEnv {
        var,
        value: value.to_owned(),
    };
    value
        .split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (fd, label) = pair.split_once('=').ok_or_else(bad)?;
            Ok((fd.parse().map_err(|_| bad())?, label.to_owned()))
        })
        .collect()
}

/// Every fd may be named once: two `OwnedFd`s for one fd would close it twice.
fn check_distinct(named: &[(RawFd, &'static str)]) -> Result<(), FdError> {
    let mut seen: HashSet<RawFd> = HashSet::new();
    for (i, &(fd, var)) in named.iter().enumerate() {
        if !seen.insert(fd) {
            let first = named[..i]
                .iter()
                .find(|(f, _)| *f == fd)
                .map_or(var, |n| n.1);
            return Err(FdError::Duplicate {
                fd,
                first,
                second: var,
            });
        }
    }
    Ok(())
}

/// Takes ownership of inherited fd `fd` and marks it close-on-exec, so it never leaks
/// into a later child under its old number.
fn claim(fd: RawFd, var: &'static str) -> Result<OwnedFd, FdError> {
    if fd < FIRST_CHILD_FD {
        return Err(FdError::BadEnv {
            var,
            value: fd.to_string(),
        });
    }
    // SAFETY: the fd is only borrowed for this one query, which fails cleanly if it is
    // not open.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl_getfd(borrowed).map_err(|e| FdError::NotOpen {
        fd,
        var,
        source: e.into(),
    })?;
    // SAFETY: the fd is open (checked above) and was named for this very process (its
    // pid, or systemd's LISTEN_PID, matched). Nothing else in this process owns it: the
    // variables are read once per process (`CLAIM`), every fd in them is distinct
    // (`check_distinct`), and none is below 3, so none is a standard stream.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl_setfd(&owned, FdFlags::CLOEXEC).map_err(|e| FdError::NotOpen {
        fd,
        var,
        source: e.into(),
    })?;
    Ok(owned)
}

fn tcp_listener(fd: RawFd, label: String, owned: OwnedFd) -> Result<TcpListener, FdError> {
    check_listening(fd, &label, &owned, "a listening TCP socket")?;
    let listener = TcpListener::from(owned);
    match listener.local_addr() {
        Ok(_) => Ok(listener),
        Err(err) => Err(FdError::WrongKind {
            fd,
            label,
            expected: "a listening TCP socket",
            reason: err.to_string(),
        }),
    }
}

/// A socket that is bound but not listening passes `local_addr`, and then every accept
/// on it fails: `SO_ACCEPTCONN` tells them apart.
fn check_listening(
    fd: RawFd,
    label: &str,
    owned: &OwnedFd,
    expected: &'static str,
) -> Result<(), FdError> {
    let wrong = |reason: String| FdError::WrongKind {
        fd,
        label: label.to_owned(),
        expected,
        reason,
    };
    match rustix::net::sockopt::socket_acceptconn(owned.as_fd()) {
        Ok(true) => Ok(()),
        Ok(false) => Err(wrong("it is not listening".into())),
        Err(err) => Err(wrong(std::io::Error::from(err).to_string())),
    }
}

fn check_stream(fd: RawFd, owned: &OwnedFd) -> Result<(), FdError> {
    let wrong = |reason: String| FdError::WrongKind {
        fd,
        label: ENV_READY_FD.to_owned(),
        expected: "a connected Unix stream socket",
        reason,
    };
    match rustix::net::sockopt::socket_type(owned.as_fd()) {
        Ok(rustix::net::SocketType::STREAM) => Ok(()),
        Ok(other) => Err(wrong(format!("its socket type is {other:?}"))),
        Err(err) => Err(wrong(std::io::Error::from(err).to_string())),
    }
}

/// Fds for a child: each is duplicated into the child at 3, 4, ... by command-fds, and
/// named in the child's `GEM_HANDOVER_*` variables.
#[derive(Debug, Default)]
pub(crate) struct ChildFds {
    /// The fd mappings for `CommandFdExt::fd_mappings`.
    pub(crate) mappings: Vec<command_fds::FdMapping>,
    /// The variables naming them (without `GEM_HANDOVER_PID`, which the child writes).
    pub(crate) env: Vec<(&'static str, String)>,
}

impl ChildFds {
    /// Describes `listeners` (label and socket), the control socket and the ready channel.
    pub(crate) fn new(
        listeners: &[(String, BorrowedFd<'_>)],
        control: Option<BorrowedFd<'_>>,
        ready: OwnedFd,
        generation: u64,
    ) -> std::io::Result<ChildFds> {
        let mut fds = ChildFds::default();
        let mut pairs = Vec::new();
        for (label, fd) in listeners {
            let n = fds.push(fd.try_clone_to_owned()?);
            pairs.push(format!("{n}={label}"));
        }
        fds.env.push((ENV_FDS, pairs.join(",")));
        if let Some(fd) = control {
            let n = fds.push(fd.try_clone_to_owned()?);
            fds.env.push((ENV_CONTROL_FD, n.to_string()));
        }
        let n = fds.push(ready);
        fds.env.push((ENV_READY_FD, n.to_string()));
        // Without the keys the child makes its own: earlier TLS sessions do not resume,
        // which is no reason to fail the upgrade.
        match crate::tls::sealed_ticket_keys() {
            Ok(tickets) => {
                let n = fds.push(tickets);
                fds.env.push((ENV_TICKETS_FD, n.to_string()));
            }
            Err(err) => warn!(
                "[{}] cannot hand the TLS ticket keys over ({err}): sessions will not resume after this restart",
                std::process::id()
            ),
        }
        fds.env.push((ENV_GENERATION, generation.to_string()));
        Ok(fds)
    }

    /// Makes the child a worker of this process (its supervisor), loading `config`
    /// (JSON) and the plugin copy `plugin`.
    pub(crate) fn worker(&mut self, config: String, plugin: BorrowedFd<'_>) -> std::io::Result<()> {
        let n = self.push(plugin.try_clone_to_owned()?);
        self.env.push((ENV_PLUGIN_FD, n.to_string()));
        self.env.push((ENV_CONFIG, config));
        self.env
            .push((ENV_SUPERVISOR, std::process::id().to_string()));
        Ok(())
    }

    fn push(&mut self, fd: OwnedFd) -> RawFd {
        let child_fd = FIRST_CHILD_FD
            + RawFd::try_from(self.mappings.len()).unwrap_or(RawFd::MAX - FIRST_CHILD_FD);
        self.mappings.push(command_fds::FdMapping {
            parent_fd: fd,
            child_fd,
        });
        child_fd
    }

    /// This process's environment as the child should see it: without any handover or
    /// socket-activation variable of this process's own, with the child's.
    pub(crate) fn child_env(&self) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let ours = |k: &std::ffi::OsStr| {
            ALL_VARS
                .iter()
                .chain(SYSTEMD_VARS)
                .any(|v| k == std::ffi::OsStr::new(v))
        };
        std::env::vars_os()
            .filter(|(k, _)| !ours(k))
            .chain(self.env.iter().map(|(k, v)| ((*k).into(), v.into())))
            .collect()
    }
}

#[cfg(test)]
#[path = "handover_tests.rs"]
mod tests;
