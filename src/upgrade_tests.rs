//! Unit tests of `upgrade.rs`.
use super::*;

#[test]
fn the_wire_format_is_versioned_json() {
    let ready = serde_json::to_string(&Msg::new(Report::Ready {
        pid: 5,
        handler: None,
    }))
    .unwrap();
    assert_eq!(ready, r#"{"v":1,"msg":"ready","pid":5}"#);
    let msg = Msg::new(FromParent::Draining {
        pid: 12,
        connections: 3,
    });
    let text = serde_json::to_string(&msg).unwrap();
    assert_eq!(text, r#"{"v":1,"msg":"draining","pid":12,"connections":3}"#);
    assert_eq!(serde_json::from_str::<Msg<FromParent>>(&text).unwrap(), msg);
}

#[tokio::test]
async fn unknown_messages_are_skipped_and_a_closed_channel_ends() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut parent = Wire::new(a, MAX_LINE);
    let mut child: Channel = Wire::new(b, MAX_LINE);
    parent
        .send(&serde_json::json!({"v": 1, "msg": "from_the_future"}))
        .await
        .unwrap();
    parent
        .send(&serde_json::json!({"v": 2, "msg": "restart"}))
        .await
        .unwrap();
    parent.send(&Msg::new(FromParent::Restart)).await.unwrap();
    drop(parent);
    assert_eq!(
        next_from_parent(&mut child).await,
        Some(FromParent::Restart)
    );
    assert_eq!(next_from_parent(&mut child).await, None);
}

#[tokio::test]
async fn a_panic_in_the_upgrade_task_kills_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let launch = Launch {
        exe: PathBuf::from("/bin/sleep"),
        args: vec!["60".into()],
        cwd: dir.path().to_owned(),
    };
    let handover = Handover::new(launch, &[], None, 2, Duration::from_secs(60)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(handover.run(
        move |pid| {
            tx.send(pid).unwrap();
            panic!("a bug in the upgrade task");
        },
        CancellationToken::new(),
    ));
    assert!(task.await.unwrap_err().is_panic());
    let pid = rx.recv().unwrap();
    let start = std::time::Instant::now();
    while alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_file_that_is_not_an_executable_fails_with_its_errno_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("gem");
    std::fs::write(&exe, [0x13, 0x37, 0xde, 0xad, 0xbe, 0xef]).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let launch = Launch {
        exe: exe.clone(),
        args: Vec::new(),
        cwd: dir.path().to_owned(),
    };
    let handover = Handover::new(launch, &[], None, 2, Duration::from_secs(5)).unwrap();
    let err = handover
        .run(|_| {}, CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "could not start {}: Exec format error (os error 8)",
            exe.display()
        )
    );
}

/// Exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}
