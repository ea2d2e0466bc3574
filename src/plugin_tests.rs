//! Unit tests of `plugin.rs`.
use super::*;
use std::sync::Once;

/// The workspace's debug plugins, built once for these tests.
fn built(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let status = std::process::Command::new(env!("CARGO"))
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
            .expect("cargo build");
        assert!(status.success());
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("debug").join(format!("lib{name}.so"))
}

/// Status, headers and body bytes of an answer (a stream's body is not read).
type Answer = (u16, http::HeaderMap, Bytes);

fn facts() -> ConnFacts {
    ConnFacts {
        peer: "127.0.0.1:4000".parse().unwrap(),
        local: "127.0.0.1:80".parse().unwrap(),
        scheme: Scheme::Http,
    }
}

/// Calls `handler` on one request, as `respond` does.
fn call(
    handler: &dyn Handler,
    method: &str,
    target: &str,
    body: &'static [u8],
) -> Result<(Answer, Option<Stream>), HandlerError> {
    let (parts, ()) = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "x")
        .body(())
        .unwrap()
        .into_parts();
    let mut resp = http::Response::new(crate::respond::Body::empty());
    let body = BodyIn::Whole(Bytes::from_static(body));
    let mut exchange = Exchange::new(Head::of_parts(&parts), facts(), 1, body, &mut resp);
    handler.handle(&mut exchange);
    let stream = exchange.finish()?;
    let (head, mut body) = resp.into_parts();
    let bytes = body.whole().unwrap_or_default();
    Ok(((head.status.as_u16(), head.headers, bytes), stream))
}

fn get(handler: &dyn Handler, target: &str) -> Result<Answer, HandlerError> {
    call(handler, "GET", target, b"").map(|(answer, _)| answer)
}

#[test]
fn hello_answers_and_survives_its_own_panic() {
    let plugin = LoadedPlugin::load(&built("hello")).unwrap();
    let info = plugin.info();
    assert_eq!((info.name.as_str(), info.abi), ("hello", Some(ABI_VERSION)));
    assert_eq!(plugin.wait_for_sha256().map(|s| s.len()), Some(64));
    assert_eq!(plugin.info().sha256, plugin.wait_for_sha256());
    assert!(plugin.has_signal_hook());
    assert_eq!(get(&plugin, "/").unwrap().2, "Hello world.");
    let err = get(&plugin, "/panic").unwrap_err();
    assert!(
        matches!(&err, HandlerError::Panicked(m) if m.contains("on purpose")),
        "{err}"
    );
    assert_eq!(get(&plugin, "/").unwrap().0, 200);
    let (echo, _) = call(&plugin, "POST", "/echo", b"ping").unwrap();
    assert_eq!(echo.2, "ping");
    let whoami = String::from_utf8(get(&plugin, "/whoami").unwrap().2.to_vec()).unwrap();
    assert_eq!(
        whoami,
        "peer 127.0.0.1:4000\nlocal 127.0.0.1:80\nversion HTTP/1.1\nscheme http\n"
    );
    let (stream, producer) = call(&plugin, "GET", "/stream?writer=1", b"").unwrap();
    assert_eq!(stream.0, 200);
    assert!(
        matches!(producer, Some(Stream::Push(_))),
        "a stream hands the host its producer"
    );
    // Dropped unrun: the plugin frees it.
    drop(producer);
    let (stream, reader) = call(&plugin, "GET", "/stream?mb=1", b"").unwrap();
    assert_eq!(stream.0, 200);
    let Some(Stream::Pull(mut reader)) = reader else {
        panic!("a reader body hands the host its reader");
    };
    // The host's buffer bounds each read; the pattern runs on across reads.
    let mut buf = vec![0u8; 100];
    assert_eq!(reader.read(&mut buf), Ok(100));
    assert_eq!(&buf[..20], b"0123456789abcdef0123");
    assert_eq!(reader.read(&mut buf[..7]), Ok(7));
    assert_eq!(&buf[..7], b"456789a");
    let mut left = (1 << 20) - 107;
    let mut big = vec![0u8; 64 * 1024];
    while left > 0 {
        let n = reader.read(&mut big).unwrap();
        assert!(n > 0 && n <= left, "{n} of {left}");
        left -= n;
    }
    assert_eq!(reader.read(&mut big), Ok(0), "the end");
    // Read part way and dropped: the plugin frees it.
    let (_, reader) = call(&plugin, "GET", "/stream?mb=1&panic=1", b"").unwrap();
    let Some(Stream::Pull(mut reader)) = reader else {
        panic!("a reader body");
    };
    assert_eq!(reader.read(&mut big), Ok(big.len()));
    drop(reader);
}

#[test]
fn invalid_handler_output_is_refused() {
    let bad = |f: fn(&Request<'_>) -> Response| {
        let handler = crate::handler::FnHandler::new("t", f);
        match get(&handler, "/") {
            Err(HandlerError::Invalid(why)) => why,
            other => panic!("{:?}", other.map(|a| a.0)),
        }
    };
    assert!(bad(|_| Response::new(1000)).contains("1000"));
    assert!(bad(|_| Response::new(200).with_header("bad name", "x")).contains("bad name"));
    assert!(bad(|_| Response::new(200).with_header("x-a", "line\nbreak")).contains("x-a"));
    let ok = crate::handler::FnHandler::new("t", |_: &Request<'_>| {
        Response::text(201, "hi").with_header("x-a", String::from("1"))
    });
    let (status, headers, body) = get(&ok, "/").unwrap();
    assert_eq!((status, body.as_ref()), (201, &b"hi"[..]));
    assert_eq!(headers["x-a"], "1");
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    let panics = crate::handler::FnHandler::new("t", |_: &Request<'_>| -> Response {
        panic!("in-process panic")
    });
    assert!(matches!(get(&panics, "/"), Err(HandlerError::Panicked(m)) if m == "in-process panic"));
}

#[test]
fn headers_checked_once_are_still_answered_exactly_and_bad_ones_still_refused() {
    // The same pairs again and again (kept per thread after the first check), a name
    // in capitals, owned values equal to kept ones, then pairs that must not pass
    // because a similar pair was kept: each answer carries exactly what was sent.
    let handler = crate::handler::FnHandler::new("t", |req: &Request<'_>| {
        let n: usize = req
            .query_param("n")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut resp = Response::text(200, "x")
            .with_header("X-Case", "Up")
            .with_header("x-n", n.to_string())
            .with_header("x-fixed", String::from("same"));
        if req.query_param("bad") == Some("value") {
            resp = resp.with_header("x-fixed", "same\r\nx-evil: 1");
        }
        if req.query_param("bad") == Some("name") {
            resp = resp.with_header("x-n ", "1");
        }
        resp
    });
    for n in 0..3 * KNOWN_HEADERS {
        let (status, headers, _) = get(&handler, &format!("/?n={}", n % 3)).unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
        assert_eq!(headers["x-case"], "Up");
        assert_eq!(headers["x-n"], (n % 3).to_string());
        assert_eq!(headers["x-fixed"], "same");
        assert_eq!(headers.len(), 4, "{headers:?}");
    }
    for bad in ["value", "name"] {
        match get(&handler, &format!("/?bad={bad}")) {
            Err(HandlerError::Invalid(why)) => assert!(why.contains("x-"), "{why}"),
            other => panic!("{bad}: {:?}", other.map(|a| a.0)),
        }
    }
}

#[test]
fn a_request_s_header_map_is_reused_for_a_response_and_starts_empty() {
    let mut request = http::HeaderMap::new();
    request.insert("x-request", HeaderValue::from_static("1"));
    request.insert("host", HeaderValue::from_static("x"));
    let room = request.capacity();
    recycle_headers(request);
    let handler = crate::handler::FnHandler::new("t", |_: &Request<'_>| {
        Response::new(204).with_header("x-response", "2")
    });
    let (status, headers, _) = get(&handler, "/").unwrap();
    assert_eq!(status, 204);
    // Nothing of the request's is left, and the room it had was kept.
    assert_eq!(headers.len(), 1, "{headers:?}");
    assert_eq!(headers["x-response"], "2");
    assert_eq!(headers.capacity(), room);
    // Too much room is not kept.
    let big = http::HeaderMap::with_capacity(4 * SPARE_CAPACITY);
    recycle_headers(big);
    let (_, headers, _) = get(&handler, "/").unwrap();
    assert!(
        headers.capacity() <= SPARE_CAPACITY,
        "{}",
        headers.capacity()
    );
}

#[test]
fn overwriting_the_file_in_place_does_not_touch_the_loaded_copy() {
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join("handler.so");
    std::fs::copy(built("hello"), &so).unwrap();
    let plugin = LoadedPlugin::load(&so).unwrap();
    std::fs::write(&so, b"garbage over the same inode").unwrap();
    assert_eq!(get(&plugin, "/").unwrap().2, "Hello world.");
}

#[test]
fn bad_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"not an ELF file").unwrap();
    let err = LoadedPlugin::load(&garbage).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("cannot load plugin {}", garbage.display())),
        "{err}"
    );

    let missing = dir.path().join("missing.so");
    let err = LoadedPlugin::load(&missing).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("cannot read plugin {}", missing.display())),
        "{err}"
    );

    let v2 = built("abi_v1");
    let err = LoadedPlugin::load(&v2).unwrap_err().to_string();
    assert!(err.contains(&v2.display().to_string()), "{err}");
    assert!(err.contains("ABI 1, but this gem speaks ABI 2"), "{err}");
}

unsafe extern "C" fn no_init() -> RawStr {
    unreachable!("a refused descriptor is never initialised")
}
unsafe extern "C" fn no_handle(_: *const RawRequest) {}
unsafe extern "C" fn no_streams(_: *const RawRequest) -> bool {
    false
}

/// A descriptor as `export_plugin!` would make it, with the given panic strategy.
const fn descriptor(panic_strategy: u32) -> PluginDescriptor {
    PluginDescriptor {
        abi_version: ABI_VERSION,
        struct_size: size_of::<PluginDescriptor>() as u32,
        name: RawStr::from_bytes(b"fake"),
        version: RawStr::from_bytes(b"0.0.0"),
        init: no_init,
        handle: no_handle,
        streams_body: no_streams,
        on_signal: None,
        panic_strategy,
    }
}

#[test]
fn a_plugin_whose_panics_abort_is_refused_by_name() {
    static UNWIND: PluginDescriptor = descriptor(PANIC_UNWIND);
    static ABORT: PluginDescriptor = descriptor(PANIC_ABORT);
    static UNKNOWN: PluginDescriptor = descriptor(7);
    let path = Path::new("/x/handler.so");
    // SAFETY: pointers to statics of the full layout.
    let check = |d: &'static PluginDescriptor| unsafe { check_descriptor(path, d) };

    assert!(check(&UNWIND).is_ok());
    let err = check(&ABORT).unwrap_err();
    assert!(matches!(err, PluginError::PanicAbort { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "plugin /x/handler.so was built with panic = \"abort\": a panic in it would kill \
         the server, because gem can only catch panics that unwind; build it with \
         panic = \"unwind\" (the default)"
    );
    let err = check(&UNKNOWN).unwrap_err().to_string();
    assert_eq!(
        err,
        "plugin /x/handler.so has a bad descriptor: its panic strategy 7 is unknown"
    );
}

#[test]
fn a_plugin_built_against_the_old_sdk_is_told_to_rebuild() {
    /// A descriptor of the same ABI without `panic_strategy` (as the SDK had one).
    #[repr(C)]
    struct OldDescriptor {
        abi_version: u32,
        struct_size: u32,
        name: RawStr,
        version: RawStr,
        init: unsafe extern "C" fn() -> RawStr,
        handle: unsafe extern "C" fn(*const RawRequest),
        streams_body: unsafe extern "C" fn(*const RawRequest) -> bool,
        on_signal: Option<unsafe extern "C" fn(i32)>,
    }
    // SAFETY: only read through its two leading u32 fields, as the layout says.
    unsafe impl Sync for OldDescriptor {}
    static OLD: OldDescriptor = OldDescriptor {
        abi_version: ABI_VERSION,
        struct_size: size_of::<OldDescriptor>() as u32,
        name: RawStr::EMPTY,
        version: RawStr::EMPTY,
        init: no_init,
        handle: no_handle,
        streams_body: no_streams,
        on_signal: None,
    };
    let path = Path::new("/x/old.so");
    // SAFETY: a static whose leading fields and `struct_size` tell the truth.
    let err = unsafe { check_descriptor(path, (&raw const OLD).cast()) }.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "plugin /x/old.so was built against another version of the gem-plugin SDK: \
             its descriptor is {} bytes, this gem expects {}; rebuild it against this \
             gem's gem-plugin",
            size_of::<OldDescriptor>(),
            size_of::<PluginDescriptor>()
        )
    );
}
