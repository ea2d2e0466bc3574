//! A plugin built with `panic = "abort"` is refused by name: its first panic would kill
//! the server, since the SDK's `catch_unwind` only catches panics that unwind.
//! `gem check`, `gem serve` and an upgrade all refuse it; the old process keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use common::client::get;
use common::{Gem, Spec, plugin, run_gem, wait_for};

/// `plugins/testing/panic-abort` built with `-C panic=abort` for the final crate only
/// (its dependency gem-plugin, and std, stay unwind), as `cargo rustc` does it.
///
/// It is built into a target directory of its own under `CARGO_TARGET_TMPDIR`, which
/// only this function writes to: a `cargo build`/`cargo test --workspace` running at the
/// same time writes its (unwind) build of the crate to `target/debug`, never over this
/// one.
fn abort_build() -> PathBuf {
    static BUILD: Once = Once::new();
    let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("panic-abort");
    BUILD.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args(["rustc", "-p", "panic-abort", "--lib", "--target-dir"])
            .arg(&target_dir)
            .args(["--", "-C", "panic=abort"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo rustc for panic-abort");
        assert!(
            status.success(),
            "building panic-abort with panic=abort failed"
        );
    });
    let so = target_dir.join("debug").join("libpanic_abort.so");
    assert!(so.exists(), "{} is missing after the build", so.display());
    so
}

/// The same crate built normally (unwind), into the workspace's own target directory.
fn unwind_build() -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "panic-abort"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build for panic-abort");
        assert!(status.success(), "building panic-abort failed");
    });
    // The workspace's plugins sit beside the gem binary.
    let so = plugin("hello").with_file_name("libpanic_abort.so");
    assert!(so.exists(), "{} is missing after the build", so.display());
    so
}

/// Asserts that `text` is the refusal of the plugin at `so`.
fn assert_refused(text: &str, so: &Path) {
    assert!(
        text.contains(&format!(
            "plugin {} was built with panic = \"abort\": a panic in it would kill the server",
            so.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("build it with panic = \"unwind\" (the default)"),
        "{text}"
    );
}

fn write_config(dir: &Path, so: &Path) {
    std::fs::write(
        dir.join("gem.toml"),
        format!("listen = [\"127.0.0.1:0\"]\nhandler = {so:?}\n"),
    )
    .unwrap();
}

#[test]
fn check_and_serve_refuse_an_abort_plugin_by_name() {
    let dir = tempfile::tempdir().unwrap();

    // The same crate built with unwind passes: the refusal below is the strategy's.
    write_config(dir.path(), &unwind_build());
    let (status, out, err) = run_gem(dir.path(), &["check"], &[]);
    assert!(status.success(), "{err}");
    assert!(out.contains("panic-abort 0.1.0 (ABI 2)"), "{out}");

    let so = abort_build();
    write_config(dir.path(), &so);
    let (status, _, err) = run_gem(dir.path(), &["check"], &[]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert_refused(&err, &so);

    let (status, _, err) = run_gem(dir.path(), &["serve"], &[]);
    assert!(!status.success(), "gem served with {}: {err}", so.display());
    assert!(!err.contains("Server started"), "{err}");
    assert_refused(&err, &so);
}

#[test]
fn an_upgrade_to_an_abort_plugin_is_refused_and_the_old_one_keeps_serving() {
    let so_dir = tempfile::tempdir().unwrap();
    let so = so_dir.path().join("handler.so");
    std::fs::copy(plugin("hello"), &so).unwrap();
    let mut gem = Gem::start(Spec::with_so(&so, ""));
    let old = gem.pid();

    // Installed as an operator would: a new file renamed over the old name.
    let tmp = so.with_extension("new");
    std::fs::copy(abort_build(), &tmp).unwrap();
    std::fs::rename(&tmp, &so).unwrap();

    let (status, out, err) = run_gem(gem.dir.path(), &["reload"], &[]);
    assert_eq!(status.code(), Some(1), "{out}{err}");
    assert!(out.starts_with("upgrade failed: "), "{out}");
    assert_refused(&out, &so);
    assert!(
        out.trim_end()
            .ends_with(&format!("; pid {old} still serving")),
        "{out}"
    );

    assert_eq!(gem.pid(), old);
    assert_eq!(get(gem.addr, "/").unwrap().text(), "Hello world.");
    let status = wait_for("gem status after the failed upgrade", || {
        let s = gem.status();
        (s["last_upgrade"]["result"] == "failed").then_some(s)
    });
    assert_eq!(status["pid"], old);
    assert_eq!(status["plugin"]["name"], "hello");
}
