//! What the service manager and the operator's scripts see of the serving process: the
//! pid file and systemd's notification socket.

use std::path::Path;

use tracing::debug;

use crate::error::Error;

/// A lifecycle step worth telling systemd about (when `NOTIFY_SOCKET` is set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Notice {
    /// This process serves (a fresh start, or a failed upgrade rolled back: `status`).
    Ready {
        /// `STATUS=` text, if any.
        status: Option<String>,
    },
    /// An upgrade started.
    Reloading,
    /// Process `pid` took over and serves.
    HandedOver {
        /// The new main pid.
        pid: u32,
    },
    /// A final drain began.
    Stopping,
    /// Just a `STATUS=` line.
    Status(String),
}

/// Sends `notice` to systemd; a no-op without `NOTIFY_SOCKET`.
pub(crate) fn notify(notice: &Notice) {
    use sd_notify::NotifyState as S;
    let result = match notice {
        Notice::Ready { status: None } => sd_notify::notify(&[S::Ready]),
        Notice::Ready {
            status: Some(status),
        } => sd_notify::notify(&[S::Ready, S::Status(status)]),
        Notice::Reloading => match S::monotonic_usec_now() {
            Ok(now) => sd_notify::notify(&[S::Reloading, now]),
            Err(_) => sd_notify::notify(&[S::Reloading]),
        },
        Notice::HandedOver { pid } => sd_notify::notify(&[S::MainPid(*pid), S::Ready]),
        Notice::Stopping => sd_notify::notify(&[S::Stopping]),
        Notice::Status(status) => sd_notify::notify(&[S::Status(status)]),
    };
    if let Err(err) = result {
        debug!(cause = %err, "sd_notify failed");
    }
}

/// Writes `pid` to `path` atomically: a temporary file in the same directory, renamed.
pub(crate) fn write_pid_file(path: &Path, pid: u32) -> Result<(), Error> {
    let file_err = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp.{pid}"));
    std::fs::write(&tmp, format!("{pid}\n")).map_err(file_err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        file_err(e)
    })
}

/// Removes the pid file on a final stop, unless another process has taken it over.
pub(crate) fn remove_pid_file(path: &Path, pid: u32) {
    let ours = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        == Some(pid);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_file_is_replaced_whole_and_removed_only_by_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gem.pid");
        write_pid_file(&path, 41).unwrap();
        write_pid_file(&path, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "42\n");
        remove_pid_file(&path, 41);
        assert!(path.exists(), "another process's pid file stays");
        remove_pid_file(&path, 42);
        assert!(!path.exists());
        let err = write_pid_file(&dir.path().join("no/such/dir/gem.pid"), 1).unwrap_err();
        assert!(err.to_string().contains("no/such/dir/gem.pid"), "{err}");
    }
}
