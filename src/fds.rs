//! File descriptors: the listening sockets and the ready channel a generation inherits
//! (from its parent or from systemd), and the ones it hands to its child.
#![allow(unsafe_code)]

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::{FdFlags, fcntl_getfd, fcntl_setfd};
use tracing::info;

use crate::config::ListenAddr;

/// `FD=LABEL` pairs, comma-separated: the TCP listeners handed over. The label is the
/// `listen` entry as written, so `127.0.0.1:0` finds its socket again after a restart.
pub const ENV_FDS: &str = "GEM_HANDOVER_FDS";
/// The fd of the control socket's listener, if one is handed over.
pub const ENV_CONTROL_FD: &str = "GEM_HANDOVER_CONTROL_FD";
/// The fd of the child's end of the ready channel.
pub const ENV_READY_FD: &str = "GEM_HANDOVER_READY_FD";
/// The generation number of the child.
pub const ENV_GENERATION: &str = "GEM_HANDOVER_GENERATION";

/// The first fd number used for mappings in the child (after stdin, stdout, stderr).
const FIRST_CHILD_FD: RawFd = 3;

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
    /// A named fd is not the expected kind of socket.
    #[error("inherited fd {fd} ({label}) is not a listening TCP socket: {source}")]
    NotAListener {
        /// The fd number.
        fd: RawFd,
        /// Its label.
        label: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What this process inherited.
#[derive(Debug, Default)]
pub struct Inherited {
    /// TCP listeners, each with its label.
    pub listeners: Vec<(String, TcpListener)>,
    /// The control socket's listener.
    pub control: Option<UnixListener>,
    /// Our end of the channel to the parent that is waiting for us to be ready.
    pub ready: Option<UnixStream>,
    /// Our generation: 1 for a fresh start.
    pub generation: u64,
}

static TAKEN: AtomicBool = AtomicBool::new(false);

impl Inherited {
    /// Claims the fds named by gem's handover variables, or by systemd socket activation
    /// (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`). Only the first call in a process
    /// gets them; later calls get nothing, so no fd is ever owned twice.
    pub fn take() -> Result<Inherited, FdError> {
        if TAKEN.swap(true, Ordering::SeqCst) {
            return Ok(Inherited {
                generation: 1,
                ..Inherited::default()
            });
        }
        let mut inherited = Inherited {
            generation: 1,
            ..Inherited::default()
        };
        if let Some(value) = env(ENV_FDS) {
            for (fd, label) in parse_pairs(ENV_FDS, &value)? {
                let owned = claim(fd, ENV_FDS)?;
                inherited
                    .listeners
                    .push((label.clone(), tcp_listener(fd, label, owned)?));
            }
            if let Some(fd) = env_fd(ENV_CONTROL_FD)? {
                inherited.control = Some(UnixListener::from(claim(fd, ENV_CONTROL_FD)?));
            }
            if let Some(fd) = env_fd(ENV_READY_FD)? {
                inherited.ready = Some(UnixStream::from(claim(fd, ENV_READY_FD)?));
            }
            inherited.generation = match env(ENV_GENERATION) {
                Some(g) => g.parse().map_err(|_| FdError::BadEnv {
                    var: ENV_GENERATION,
                    value: g,
                })?,
                None => 1,
            };
        } else {
            // Socket activation; sd-notify checks LISTEN_PID and sets close-on-exec.
            let activated = sd_notify::listen_fds_with_names().map_err(|e| FdError::BadEnv {
                var: "LISTEN_FDS",
                value: format!("{} ({e})", env("LISTEN_FDS").unwrap_or_default()),
            })?;
            for (fd, name) in activated {
                let label = format!("systemd:{name}");
                let owned = claim(fd, "LISTEN_FDS")?;
                inherited
                    .listeners
                    .push((label.clone(), tcp_listener(fd, label, owned)?));
            }
        }
        Ok(inherited)
    }
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
        .map(|pair| {
            let (fd, label) = pair.split_once('=').ok_or_else(bad)?;
            Ok((fd.parse().map_err(|_| bad())?, label.to_owned()))
        })
        .collect()
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
    // SAFETY: the fd stays open for this call; we only query its flags.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    fcntl_getfd(borrowed).map_err(|e| FdError::NotOpen {
        fd,
        var,
        source: e.into(),
    })?;
    // SAFETY: the fd is open (checked above), was handed to this process by its parent
    // for us alone, and `TAKEN` ensures it is claimed at most once in this process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fcntl_setfd(&owned, FdFlags::CLOEXEC).map_err(|e| FdError::NotOpen {
        fd,
        var,
        source: e.into(),
    })?;
    Ok(owned)
}

fn tcp_listener(fd: RawFd, label: String, owned: OwnedFd) -> Result<TcpListener, FdError> {
    let listener = TcpListener::from(owned);
    match listener.local_addr() {
        Ok(_) => Ok(listener),
        Err(source) => Err(FdError::NotAListener { fd, label, source }),
    }
}

/// Picks the socket for each configured address: an inherited one with the same label,
/// else one already bound to the same address, else a freshly bound one. Inherited
/// sockets that are no longer configured are closed.
pub fn open_listeners(
    wanted: &[ListenAddr],
    mut inherited: Vec<(String, TcpListener)>,
) -> Result<Vec<(ListenAddr, TcpListener)>, (ListenAddr, std::io::Error)> {
    let mut out = Vec::with_capacity(wanted.len());
    for addr in wanted {
        let by_label = inherited.iter().position(|(label, _)| *label == addr.spec);
        let by_addr = || {
            inherited
                .iter()
                .position(|(_, l)| l.local_addr().ok() == Some(addr.addr))
        };
        let listener = match by_label.or_else(by_addr) {
            Some(i) => {
                let (label, listener) = inherited.swap_remove(i);
                if label != addr.spec {
                    info!(
                        "[{}] serving {} on the inherited socket {label}",
                        std::process::id(),
                        addr.spec
                    );
                }
                listener
            }
            None => bind(addr.addr).map_err(|e| (addr.clone(), e))?,
        };
        out.push((addr.clone(), listener));
    }
    for (label, _) in inherited {
        info!(
            "[{}] closing inherited listener {label}: no longer configured",
            std::process::id()
        );
    }
    Ok(out)
}

/// Binds a listener with a deep backlog, so bursts queue instead of being refused.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Fds for a child: each is duplicated into the child at 3, 4, ... by command-fds.
#[derive(Debug, Default)]
pub struct ChildFds {
    /// The fd mappings for `CommandFdExt::fd_mappings`.
    pub mappings: Vec<command_fds::FdMapping>,
    /// Environment variables describing them.
    pub env: Vec<(&'static str, String)>,
}

impl ChildFds {
    /// Describes `listeners` (label and socket), the control socket and the ready channel.
    pub fn new(
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
        fds.env.push((ENV_GENERATION, generation.to_string()));
        Ok(fds)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_reject_garbage() {
        assert_eq!(
            parse_pairs(ENV_FDS, "3=127.0.0.1:0,4=[::1]:80").unwrap(),
            vec![(3, "127.0.0.1:0".to_owned()), (4, "[::1]:80".to_owned())]
        );
        assert!(parse_pairs(ENV_FDS, "x=1").is_err());
        assert!(parse_pairs(ENV_FDS, "3").is_err());
    }

    #[test]
    fn listeners_are_matched_by_label_then_address_and_extras_closed() {
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let extra = TcpListener::bind("127.0.0.1:0").unwrap();
        let b_addr = b.local_addr().unwrap();
        let a_addr = a.local_addr().unwrap();
        let wanted = vec![
            ListenAddr::parse("127.0.0.1:0").unwrap(),
            ListenAddr::parse(&b_addr.to_string()).unwrap(),
            ListenAddr::parse("127.0.0.1:0").unwrap(),
        ];
        let inherited = vec![
            ("127.0.0.1:0".to_owned(), a),
            ("whatever".to_owned(), b),
            ("gone".to_owned(), extra),
        ];
        let open = open_listeners(&wanted, inherited).unwrap();
        assert_eq!(open[0].1.local_addr().unwrap(), a_addr, "matched by label");
        assert_eq!(
            open[1].1.local_addr().unwrap(),
            b_addr,
            "matched by address"
        );
        assert_ne!(open[2].1.local_addr().unwrap(), a_addr, "freshly bound");
    }

    #[test]
    fn a_taken_address_names_itself() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = ListenAddr::parse(&taken.local_addr().unwrap().to_string()).unwrap();
        let (failed, err) = open_listeners(std::slice::from_ref(&addr), Vec::new()).unwrap_err();
        assert_eq!(failed, addr);
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }
}
