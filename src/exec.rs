//! Starting the next generation with an exact `execve` of the recorded path.
//!
//! `std::process::Command` runs a program with `execvp`, which searches `PATH` for a
//! name without a slash and, on `ENOEXEC`, runs the file with `/bin/sh`: random bytes
//! renamed over the gem binary would be "run" by the shell, and a text file of shell
//! commands at that path would be executed with gem's sockets. Here the last `pre_exec`
//! hook calls `execve` itself on the exact path: it either replaces the child or fails
//! with the errno (`Exec format error`, `No such file or directory`), which `spawn`
//! then returns to the parent.
//!
//! The same hook writes the child's own pid into `GEM_HANDOVER_PID`, so the handed-over
//! fds are tied to that one process, as systemd ties `LISTEN_FDS` to `LISTEN_PID`.
//! Everything the hook touches is prepared before the fork: between fork and exec, the
//! child of a multi-threaded process may not allocate.
#![allow(unsafe_code)]

use std::ffi::{CString, OsString, c_char};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::handover::ENV_PID;

/// Digits reserved for the pid in `GEM_HANDOVER_PID=`; Linux pids fit in 7.
const PID_DIGITS: usize = 10;

/// An `execve` prepared before the fork.
pub(crate) struct Exec {
    path: CString,
    argv: Vec<CString>,
    env: Vec<Vec<u8>>,
    /// Which `env` entry is `GEM_HANDOVER_PID=`, filled in by the child.
    pid_entry: usize,
    /// Pointer arrays with room reserved for every entry and the final null, filled in
    /// the child (pushing within capacity never allocates).
    argv_ptrs: Vec<*const c_char>,
    envp_ptrs: Vec<*const c_char>,
}

// SAFETY: the raw pointer vectors are empty until the child fills them, and only ever
// point into strings owned by the same `Exec`; nothing is shared between threads.
unsafe impl Send for Exec {}
// SAFETY: as above; `&Exec` gives no access to the pointers.
unsafe impl Sync for Exec {}

impl std::fmt::Debug for Exec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Exec {
    /// Prepares `execve(exe, [exe, args...], env + GEM_HANDOVER_PID=<child pid>)`.
    pub(crate) fn new(
        exe: &Path,
        args: &[OsString],
        env: Vec<(OsString, OsString)>,
    ) -> std::io::Result<Exec> {
        let c = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{bytes:?} contains a NUL byte"),
                )
            })
        };
        let path = c(exe.as_os_str().as_bytes())?;
        let mut argv = vec![path.clone()];
        for arg in args {
            argv.push(c(arg.as_bytes())?);
        }
        let mut entries = Vec::with_capacity(env.len() + 1);
        for (k, v) in env {
            let mut entry = Vec::with_capacity(k.len() + v.len() + 2);
            entry.extend_from_slice(k.as_bytes());
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            entries.push(c(&entry)?.into_bytes_with_nul());
        }
        let mut pid = format!("{ENV_PID}=").into_bytes();
        pid.extend_from_slice(&[b'0'; PID_DIGITS]);
        pid.push(0);
        entries.push(pid);
        Ok(Exec {
            path,
            argv_ptrs: Vec::with_capacity(argv.len() + 1),
            envp_ptrs: Vec::with_capacity(entries.len() + 1),
            pid_entry: entries.len() - 1,
            argv,
            env: entries,
        })
    }

    /// Makes `execve` the last step before exec in `cmd`'s child. Install it after every
    /// other `pre_exec` hook (the fd mappings): hooks run in order, and this one does
    /// not return on success.
    pub(crate) fn install(mut self, cmd: &mut std::process::Command) {
        let hook = move || -> std::io::Result<()> { self.exec_in_child() };
        // SAFETY: the hook runs in the forked child before exec. It does not allocate
        // (every buffer was sized before the fork), takes no lock, and calls only
        // async-signal-safe functions (getpid, execve).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(cmd, hook);
        }
    }

    /// Replaces this very process (a supervisor re-executing itself; its pid stays).
    /// Returns only on failure, with why.
    pub(crate) fn exec_here(mut self) -> std::io::Error {
        match self.exec_in_child() {
            Err(e) => e,
            Ok(()) => std::io::Error::other("execve returned"),
        }
    }

    /// In the child: record its pid, then replace it. Returns only on failure.
    fn exec_in_child(&mut self) -> std::io::Result<()> {
        let pid = rustix::process::getpid()
            .as_raw_nonzero()
            .get()
            .unsigned_abs();
        let entry = &mut self.env[self.pid_entry];
        let digits_end = entry.len() - 1; // before the NUL
        write_digits(&mut entry[digits_end - PID_DIGITS..digits_end], pid);
        self.argv_ptrs.clear();
        self.argv_ptrs.extend(self.argv.iter().map(|a| a.as_ptr()));
        self.argv_ptrs.push(std::ptr::null());
        self.envp_ptrs.clear();
        self.envp_ptrs
            .extend(self.env.iter().map(|e| e.as_ptr().cast::<c_char>()));
        self.envp_ptrs.push(std::ptr::null());
        // SAFETY: `path` is NUL-terminated; both arrays are null-terminated arrays of
        // pointers to NUL-terminated strings owned by `self`, alive during the call.
        unsafe {
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            )
        };
        Err(std::io::Error::last_os_error())
    }
}

/// Writes `n` zero-padded into `out`, without allocating.
fn write_digits(out: &mut [u8], mut n: u32) {
    for slot in out.iter_mut().rev() {
        // `n % 10` is below 10, so the cast cannot truncate.
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_zero_padded_and_parse_back() {
        let mut out = [b'x'; PID_DIGITS];
        write_digits(&mut out, 4242);
        assert_eq!(&out, b"0000004242");
        assert_eq!(std::str::from_utf8(&out).unwrap().parse::<u32>(), Ok(4242));
    }

    async fn run(exe: &Path) -> std::io::Result<std::process::Output> {
        let env = vec![("A".into(), "1".into())];
        let exec = Exec::new(
            exe,
            &["-c".into(), "echo $A $GEM_HANDOVER_PID $$".into()],
            env,
        )?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.stdout(std::process::Stdio::piped());
        exec.install(cmd.as_std_mut());
        cmd.output().await
    }

    #[tokio::test]
    async fn the_child_runs_the_exact_path_with_its_own_pid_and_only_our_env() {
        let out = run(Path::new("/bin/sh")).await.unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let words: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(words.len(), 3, "{text}");
        assert_eq!(words[0], "1");
        assert_eq!(
            words[1].parse::<u32>().unwrap(),
            words[2].parse::<u32>().unwrap()
        );
    }

    #[tokio::test]
    async fn no_shell_runs_a_file_that_is_not_an_executable() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("gem");
        let marker = dir.path().join("ran");
        std::fs::write(&script, format!("touch {}\n", marker.display())).unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let err = run(&script).await.unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOEXEC), "{err}");
        assert!(!marker.exists(), "the shell ran the file");
        let err = run(&dir.path().join("missing")).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}
