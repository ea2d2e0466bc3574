//! The handover's edges: the next generation is started with an exact `execve` (no
//! shell, no PATH search), and inherited fds are adopted only by the process they were
//! meant for, each once, and only if they are what their variable says.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::client::get;
use common::{Gem, Spec, gem_bin, run_gem};

/// Starts gem from a copy of its binary, so the test can replace what is at that path.
fn gem_from_copy() -> (Gem, tempfile::TempDir, std::path::PathBuf) {
    let bin_dir = tempfile::tempdir().unwrap();
    let bin = bin_dir.path().join("gem");
    std::fs::copy(gem_bin(), &bin).unwrap();
    let gem = Gem::start(Spec::new("hello", "").program(&bin));
    (gem, bin_dir, bin)
}

fn replace(bin: &Path, contents: &[u8]) {
    let tmp = bin.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, bin).unwrap();
}

/// `gem reload` must fail with the exec error naming the path, and the old process
/// must go on serving.
fn reload_fails_with_exec_format_error(gem: &mut Gem, bin: &Path) {
    let old = gem.pid();
    let (status, out, err) = run_gem(gem.dir.path(), &["reload"], &[]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    let expected = format!(
        "upgrade failed: could not start {}: Exec format error (os error 8); pid {old} still serving",
        bin.display()
    );
    assert_eq!(out.trim_end(), expected);
    gem.wait_log(&format!(
        "upgrade failed: could not start {}: Exec format error",
        bin.display()
    ));
    assert_eq!(gem.pid(), old);
    assert_eq!(get(gem.addr, "/").unwrap().text(), "Hello world.");
}

#[test]
fn random_bytes_at_the_binary_path_are_an_exec_format_error_not_a_shell_script() {
    let (mut gem, _bin_dir, bin) = gem_from_copy();
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    replace(&bin, &noise);
    reload_fails_with_exec_format_error(&mut gem, &bin);
    assert_eq!(gem.count_log("Syntax error"), 0, "no shell ran it");
    assert_eq!(gem.count_log("not found"), 0, "no shell ran it");
}

#[test]
fn a_text_file_of_shell_commands_at_the_binary_path_is_not_run() {
    let (mut gem, bin_dir, bin) = gem_from_copy();
    let marker = bin_dir.path().join("the-shell-ran-it");
    replace(&bin, format!("touch {}\n", marker.display()).as_bytes());
    reload_fails_with_exec_format_error(&mut gem, &bin);
    assert!(!marker.exists(), "the file was run by a shell");
}

/// Runs `gem serve` through `sh`, which sets `GEM_HANDOVER_PID` to its own pid and
/// opens fd 3 before it execs gem (exec keeps the pid), with `env` added.
fn serve_with_handover_env(env: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "listen = [\"127.0.0.1:0\"]\nhandler = {:?}\n",
        common::plugin("hello")
    );
    std::fs::write(dir.path().join("gem.toml"), toml).unwrap();
    let script = format!("exec 3</dev/null; GEM_HANDOVER_PID=$$ {env} exec \"$0\" serve");
    let output = Command::new("sh")
        .args(["-c", &script])
        .arg(gem_bin())
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn an_fd_named_twice_is_refused_before_it_is_owned_twice() {
    let (code, err) = serve_with_handover_env("GEM_HANDOVER_FDS=3=a,3=b");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("inherited fd 3 is named twice (in GEM_HANDOVER_FDS and in GEM_HANDOVER_FDS)"),
        "{err}"
    );
    let (code, err) = serve_with_handover_env(
        "GEM_HANDOVER_FDS=4=a GEM_HANDOVER_READY_FD=4 GEM_HANDOVER_CONTROL_FD=5",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("inherited fd 4 is named twice"), "{err}");
}

/// A bound TCP socket that does not listen has an address, so only `SO_ACCEPTCONN`
/// tells it apart; adopted, every accept on it would fail, forever.
#[test]
fn an_inherited_socket_that_is_bound_but_not_listening_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "listen = [\"127.0.0.1:0\"]\nhandler = {:?}\n",
        common::plugin("hello")
    );
    std::fs::write(dir.path().join("gem.toml"), toml).unwrap();
    // Python binds without listening, puts the socket at fd 3 and execs gem (same pid).
    let script = r#"
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(GEM_HANDOVER_PID=str(os.getpid()), GEM_HANDOVER_FDS="3=127.0.0.1:0")
os.execv(sys.argv[1], [sys.argv[1], "serve"])
"#;
    let output = Command::new("python3")
        .args(["-c", script])
        .arg(gem_bin())
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "inherited fd 3 (127.0.0.1:0) is not a listening TCP socket: it is not listening"
        ),
        "{err}"
    );
}

#[test]
fn handover_variables_meant_for_another_process_are_ignored() {
    let mut gem = Gem::start(
        Spec::new("hello", "")
            .env("GEM_HANDOVER_PID", "1")
            .env("GEM_HANDOVER_FDS", "3=127.0.0.1:0")
            .env("GEM_HANDOVER_GENERATION", "7"),
    );
    gem.wait_log("ignoring GEM_HANDOVER_FDS: it is meant for pid 1, not this process");
    assert_eq!(get(gem.addr, "/").unwrap().text(), "Hello world.");
    assert_eq!(gem.status()["generation"], 1, "a fresh start");
    let first = gem.pid();
    assert_eq!(first, gem.first_pid());
}
