//! Unit tests of `handover.rs`.
use super::*;

#[test]
fn pairs_parse_and_reject_garbage() {
    assert_eq!(
        parse_pairs(ENV_FDS, "3=127.0.0.1:0,4=[::1]:80").unwrap(),
        vec![(3, "127.0.0.1:0".to_owned()), (4, "[::1]:80".to_owned())]
    );
    assert!(parse_pairs(ENV_FDS, "x=1").is_err());
    assert_eq!(parse_pairs(ENV_FDS, "").unwrap(), Vec::new());
    assert!(parse_pairs(ENV_FDS, "3").is_err());
}

#[test]
fn an_fd_named_twice_is_refused_before_any_is_owned() {
    let err = check_distinct(&[(3, ENV_FDS), (3, ENV_FDS)]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "inherited fd 3 is named twice (in GEM_HANDOVER_FDS and in GEM_HANDOVER_FDS)"
    );
    let err = check_distinct(&[(3, ENV_FDS), (4, ENV_CONTROL_FD), (4, ENV_READY_FD)]).unwrap_err();
    assert!(
        matches!(
            err,
            FdError::Duplicate {
                fd: 4,
                first: ENV_CONTROL_FD,
                second: ENV_READY_FD
            }
        ),
        "{err}"
    );
    assert!(check_distinct(&[(3, ENV_FDS), (4, ENV_CONTROL_FD), (5, ENV_READY_FD)]).is_ok());
}

#[test]
fn a_bound_socket_that_does_not_listen_is_refused() {
    let bound = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    bound
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    let owned = OwnedFd::from(bound);
    let err = tcp_listener(7, "127.0.0.1:0".into(), owned).unwrap_err();
    assert_eq!(
        err.to_string(),
        "inherited fd 7 (127.0.0.1:0) is not a listening TCP socket: it is not listening"
    );
    let listening = OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap());
    assert!(tcp_listener(7, "x".into(), listening).is_ok());
    let (a, _b) = UnixStream::pair().unwrap();
    let err = tcp_listener(7, "x".into(), OwnedFd::from(a)).unwrap_err();
    assert!(
        err.to_string().contains("is not a listening TCP socket"),
        "{err}"
    );
}

#[test]
fn a_child_never_inherits_this_process_handover_variables() {
    let (ours, _theirs) = UnixStream::pair().unwrap();
    let fds = ChildFds::new(&[], None, OwnedFd::from(ours), 7).unwrap();
    let env = fds.child_env();
    let count = |k: &str| env.iter().filter(|(n, _)| n == k).count();
    assert_eq!(count(ENV_READY_FD), 1);
    assert_eq!(count(ENV_GENERATION), 1);
    assert_eq!(count(ENV_PID), 0, "the child writes its own");
    assert_eq!(count("LISTEN_FDS"), 0);
}
