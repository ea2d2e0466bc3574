//! What [`export_plugin!`](crate::export_plugin) expands to: the safe glue between the
//! C ABI and a [`Plugin`](crate::Plugin). Not part of the public API.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Once, OnceLock};

use crate::abi::{
    FLAG_STATIC, HostApi, IO_ERROR, RawProducer, RawReader, RawRequest, RawSink, RawStr,
};
use crate::http::{Body, BodyWriter, Producer, Sink};
use crate::{Plugin, Request, Response};

thread_local! {
    /// Where the last panic on this thread happened, recorded by the plugin's hook.
    static PANIC_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the plugin's default panic output (a multi-line report, with a backtrace
/// under `RUST_BACKTRACE`) by a note of where it happened: the host logs one line
/// with the message and that place instead.
fn quiet_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            PANIC_AT.with(|p| *p.borrow_mut() = at);
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let message = if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    };
    match PANIC_AT.with(|p| p.borrow_mut().take()) {
        Some(at) => format!("{message} (at {at})"),
        None => message,
    }
}

/// `init`: builds the plugin once. Errors and panics become a message that lives forever
/// (the plugin is never unloaded, and init runs once).
pub fn init<T: Plugin>(cell: &'static OnceLock<T>) -> RawStr {
    quiet_panics();
    let message = match catch_unwind(T::init) {
        Ok(Ok(plugin)) => {
            let _ = cell.set(plugin);
            return RawStr::EMPTY;
        }
        Ok(Err(message)) => message,
        Err(payload) => format!("init panicked: {}", panic_message(payload.as_ref())),
    };
    let leaked: &'static str = Box::leak(message.into_boxed_str());
    RawStr::from_bytes(leaked.as_bytes())
}

/// `handle`: runs the plugin on one request and writes its response to the host.
///
/// # Safety
///
/// `req` must point to a valid `RawRequest` whose pointers (and host callbacks) are
/// valid for the call.
#[allow(unsafe_code)]
pub unsafe fn handle<T: Plugin>(cell: &'static OnceLock<T>, req: *const RawRequest) {
    match cell.get() {
        // SAFETY: the caller's contract.
        Some(plugin) => unsafe { serve(req, |r| plugin.handle(r)) },
        // SAFETY: as above; the host copies the message before it returns.
        None => unsafe {
            let raw = &*req;
            ((*raw.host).fail)(
                raw.ctx,
                RawStr::from_bytes(b"handle was called before a successful init"),
            )
        },
    }
}

/// `streams_body`: asks the plugin whether it reads this request's body in chunks.
/// A panic, or a call before `init`, answers `false`.
///
/// # Safety
///
/// As for [`handle`].
#[allow(unsafe_code)]
pub unsafe fn streams_body<T: Plugin>(cell: &'static OnceLock<T>, req: *const RawRequest) -> bool {
    catch_unwind(AssertUnwindSafe(|| {
        let plugin = cell.get()?;
        let reader_taken = std::cell::Cell::new(false);
        // SAFETY: the caller's contract.
        let req = unsafe { Request::from_raw(&*req, &reader_taken) }?;
        Some(plugin.streams_body(&req))
    }))
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Runs `f` on the request at `req` and writes what it answers through the host's
/// callbacks: the one way a response crosses the ABI, for plugins and for gem's
/// in-process handlers alike. A panic is reported with the host's `fail`.
///
/// # Safety
///
/// As for [`handle`].
#[allow(unsafe_code)]
pub unsafe fn serve(req: *const RawRequest, f: impl FnOnce(&Request<'_>) -> Response) {
    // SAFETY: the caller guarantees `req` and what it points to is valid now.
    let raw = unsafe { &*req };
    // Kept a pointer: a host built against an older gem-plugin has a shorter table
    // (see `set_body_reader`), so no reference to a whole `HostApi` is made.
    let host = raw.host;
    let reader_taken = std::cell::Cell::new(false);
    // The response is written from inside: it is never moved out of this frame.
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as above.
        let mut response = match unsafe { Request::from_raw(raw, &reader_taken) } {
            Some(req) => f(&req),
            None => Response::text(400, "request method or target is not UTF-8\n"),
        };
        // SAFETY: the callbacks are valid during the call, with this `ctx`.
        unsafe { write_response(host, raw.ctx, &mut response) };
    }));
    let message = match outcome {
        Ok(()) => return,
        Err(payload) => panic_message(payload.as_ref()),
    };
    // SAFETY: as above; the host copies the message before it returns.
    unsafe { ((*host).fail)(raw.ctx, RawStr::from_bytes(message.as_bytes())) };
}

/// Writes `response` through the host's callbacks (its body is taken).
///
/// # Safety
///
/// `host` and `ctx` are a request's, valid now.
#[allow(unsafe_code)]
unsafe fn write_response(host: *const HostApi, ctx: *mut c_void, response: &mut Response) {
    let (status, headers, body) = response.parts();
    // SAFETY (every call below): the caller's contract; the host copies what it keeps
    // before it returns, except static data, which lives as long as the library. Each
    // callback is read through the pointer on its own, from the part of the table
    // every host since gem-plugin 0.2 has.
    unsafe { ((*host).set_status)(ctx, status) };
    for (name, value) in headers {
        let flags = match value {
            Cow::Borrowed(_) => FLAG_STATIC,
            Cow::Owned(_) => 0,
        };
        let (name, value) = (name.as_bytes(), value.as_bytes());
        // SAFETY: as above.
        unsafe {
            ((*host).add_header)(
                ctx,
                RawStr::from_bytes(name),
                RawStr::from_bytes(value),
                flags,
            )
        };
    }
    match body {
        Body::Empty => {}
        // SAFETY: as above.
        Body::Static(bytes) => unsafe {
            ((*host).set_body)(ctx, RawStr::from_bytes(bytes), FLAG_STATIC)
        },
        // SAFETY: as above.
        Body::Bytes(bytes) => unsafe { ((*host).set_body)(ctx, RawStr::from_bytes(&bytes), 0) },
        // SAFETY: as above; the host owns the producer from now on.
        Body::Stream(produce) => unsafe { ((*host).set_body_stream)(ctx, into_raw(produce)) },
        // SAFETY: as above.
        Body::Reader(mut reader) => match unsafe { set_body_reader(host) } {
            // SAFETY: as above; the host owns the reader from now on.
            Some(set) => unsafe { set(ctx, reader_into_raw(reader)) },
            // A host from before readers: the reader is copied into a stream instead.
            None => {
                let produce: Producer = Box::new(move |w| std::io::copy(&mut reader, w).map(drop));
                // SAFETY: as above.
                unsafe { ((*host).set_body_stream)(ctx, into_raw(produce)) }
            }
        },
    }
}

/// The host's [`HostApi::set_body_reader`], if its table has one (gem-plugin 0.3 on).
///
/// # Safety
///
/// `host` points to a host's table, valid now, as long as its `struct_size` says.
#[allow(unsafe_code)]
unsafe fn set_body_reader(
    host: *const HostApi,
) -> Option<unsafe extern "C" fn(*mut c_void, RawReader)> {
    let at = std::mem::offset_of!(HostApi, set_body_reader);
    // SAFETY: `struct_size` is the first field of every version of the table.
    let size = unsafe { host.cast::<u32>().read() } as usize;
    if size < at + size_of::<usize>() {
        return None;
    }
    // SAFETY: the table is long enough to hold the field, which is a function pointer
    // of this type in every version that has it.
    Some(unsafe {
        host.byte_add(at)
            .cast::<unsafe extern "C" fn(*mut c_void, RawReader)>()
            .read()
    })
}

/// A [`Response::reader`](crate::Response::reader)'s reader, and the message of its
/// last failure (lent to the host until the next call).
struct ReaderState {
    reader: Box<dyn std::io::Read + Send>,
    error: String,
}

fn reader_into_raw(reader: Box<dyn std::io::Read + Send>) -> RawReader {
    let state = ReaderState {
        reader,
        error: String::new(),
    };
    RawReader {
        state: Box::into_raw(Box::new(state)).cast::<c_void>(),
        read: read_reader,
        drop: drop_reader,
    }
}

/// `RawReader::read`: one read into the host's buffer, retried when interrupted. A
/// panic or an error becomes [`IO_ERROR`] with its message.
///
/// # Safety
///
/// `state` comes from [`reader_into_raw`] and is not freed yet, with no other call on
/// it at the same time; `buf` points to `cap` initialised, writable bytes, and `error`
/// is writable; both for the call.
#[allow(unsafe_code)]
unsafe extern "C" fn read_reader(
    state: *mut c_void,
    buf: *mut u8,
    cap: usize,
    error: *mut RawStr,
) -> i64 {
    // SAFETY: the caller's contract: made by `reader_into_raw`, used by one call at a
    // time.
    let state = unsafe { &mut *state.cast::<ReaderState>() };
    let buf: &mut [u8] = match cap {
        0 => &mut [],
        // SAFETY: the caller's contract.
        _ => unsafe { std::slice::from_raw_parts_mut(buf, cap) },
    };
    let reader = &mut state.reader;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        loop {
            match reader.read(buf) {
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }));
    state.error = match outcome {
        Ok(Ok(n)) if n <= cap => return i64::try_from(n).unwrap_or(i64::MAX),
        Ok(Ok(n)) => format!("the stream failed: its reader said it read {n} bytes into {cap}"),
        Ok(Err(err)) => format!("the stream failed: {err}"),
        Err(payload) => format!("the stream panicked: {}", panic_message(payload.as_ref())),
    };
    // SAFETY: the caller's contract; the message lives in `state` until the next call.
    unsafe { error.write(RawStr::from_bytes(state.error.as_bytes())) };
    i64::from(IO_ERROR)
}

/// `RawReader::drop`: frees a reader.
///
/// # Safety
///
/// As for [`read_reader`]; `state` is not used again.
#[allow(unsafe_code)]
unsafe extern "C" fn drop_reader(state: *mut c_void) {
    // SAFETY: the caller's contract.
    let state = unsafe { Box::from_raw(state.cast::<ReaderState>()) };
    // The reader may panic as it drops; no panic may cross the ABI.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
}

fn into_raw(produce: Producer) -> RawProducer {
    RawProducer {
        state: Box::into_raw(Box::new(produce)).cast::<c_void>(),
        run: run_producer,
        drop: drop_producer,
    }
}

/// `RawProducer::run`: runs the producer into the host's sink, reporting a panic or an
/// error (other than the client going away) with `fail`.
///
/// # Safety
///
/// `state` comes from [`into_raw`] and is used once; `sink` is valid for the call.
#[allow(unsafe_code)]
unsafe extern "C" fn run_producer(state: *mut c_void, sink: *const RawSink) {
    // SAFETY: the caller's contract: made by `into_raw`, taken once.
    let produce = unsafe { Box::from_raw(state.cast::<Producer>()) };
    // SAFETY: valid for the call.
    let sink = unsafe { &*sink };
    let outcome = catch_unwind(AssertUnwindSafe(move || {
        let mut w = BodyWriter::new(Sink::Raw(sink));
        let result = (*produce)(&mut w).and_then(|()| std::io::Write::flush(&mut w));
        (result, w.is_gone())
    }));
    let message = match outcome {
        Ok((Ok(()), _)) | Ok((Err(_), true)) => return,
        Ok((Err(err), false)) => format!("the stream failed: {err}"),
        Err(payload) => format!("the stream panicked: {}", panic_message(payload.as_ref())),
    };
    // SAFETY: valid for the call; the host copies the message.
    unsafe { (sink.fail)(sink.ctx, RawStr::from_bytes(message.as_bytes())) };
}

/// `RawProducer::drop`: frees a producer that never ran.
///
/// # Safety
///
/// As for [`run_producer`].
#[allow(unsafe_code)]
unsafe extern "C" fn drop_producer(state: *mut c_void) {
    // SAFETY: the caller's contract.
    let producer = unsafe { Box::from_raw(state.cast::<Producer>()) };
    // What the closure captured may panic as it drops; no panic may cross the ABI.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(producer)));
}

/// `on_signal`: forwards a signal to the plugin, swallowing a panic.
pub fn on_signal<T: Plugin>(cell: &'static OnceLock<T>, signo: i32) {
    if let Some(plugin) = cell.get() {
        let _ = catch_unwind(AssertUnwindSafe(|| plugin.on_signal(signo)));
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`](crate::Plugin)) as a gem handler:
/// the `gem_plugin_abi_version` and `gem_plugin_entry_v2` symbols and the descriptor
/// behind them. Call it once per cdylib, in the cdylib crate itself: the descriptor
/// records the panic strategy of the crate the macro expands in, and gem refuses a
/// plugin built with `panic = "abort"` (see [`abi`](crate::abi#panics)).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!($plugin, abi_version = $crate::abi::ABI_VERSION);
    };
    // Undocumented: lets a test plugin claim another ABI (e.g. 1), to exercise the
    // host's refusal.
    ($plugin:ty, abi_version = $abi:expr) => {
        const _: () = {
            use $crate::abi::{PluginDescriptor, RawRequest, RawStr};

            static PLUGIN: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();

            #[allow(unsafe_code)]
            unsafe extern "C" fn init() -> RawStr {
                $crate::__export::init::<$plugin>(&PLUGIN)
            }

            #[allow(unsafe_code)]
            unsafe extern "C" fn handle(req: *const RawRequest) {
                // SAFETY: the host upholds `handle`'s contract (see the ABI docs).
                unsafe { $crate::__export::handle::<$plugin>(&PLUGIN, req) }
            }

            #[allow(unsafe_code)]
            unsafe extern "C" fn streams_body(req: *const RawRequest) -> bool {
                // SAFETY: as for `handle`.
                unsafe { $crate::__export::streams_body::<$plugin>(&PLUGIN, req) }
            }

            #[allow(unsafe_code)]
            unsafe extern "C" fn on_signal(signo: i32) {
                $crate::__export::on_signal::<$plugin>(&PLUGIN, signo)
            }

            static DESCRIPTOR: PluginDescriptor = PluginDescriptor {
                abi_version: $abi,
                struct_size: ::std::mem::size_of::<PluginDescriptor>() as u32,
                name: RawStr::from_bytes(::std::env!("CARGO_PKG_NAME").as_bytes()),
                version: RawStr::from_bytes(::std::env!("CARGO_PKG_VERSION").as_bytes()),
                init,
                handle,
                streams_body,
                on_signal: if <$plugin as $crate::Plugin>::HAS_SIGNAL_HOOK {
                    Some(on_signal)
                } else {
                    None
                },
                // Expanded, hence evaluated, in the crate that calls the macro: the
                // plugin's own strategy, not the SDK's.
                panic_strategy: if ::std::cfg!(panic = "unwind") {
                    $crate::abi::PANIC_UNWIND
                } else {
                    $crate::abi::PANIC_ABORT
                },
            };

            #[allow(unsafe_code)]
            #[unsafe(no_mangle)]
            extern "C" fn gem_plugin_abi_version() -> u32 {
                $abi
            }

            #[allow(unsafe_code)]
            #[unsafe(no_mangle)]
            extern "C" fn gem_plugin_entry_v2() -> *const PluginDescriptor {
                &DESCRIPTOR
            }
        };
    };
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use crate::abi::{ABI_VERSION, PANIC_UNWIND, PluginDescriptor, RawAddr, RawHeader};
    use crate::http::Wait;

    struct Probe;

    /// Reads "first", then panics.
    struct PanicsOnSecondRead(bool);

    impl std::io::Read for PanicsOnSecondRead {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            assert!(!std::mem::replace(&mut self.0, true), "reader panics");
            buf[..5].copy_from_slice(b"first");
            Ok(5)
        }
    }

    impl Plugin for Probe {
        const HAS_SIGNAL_HOOK: bool = true;

        fn init() -> Result<Self, String> {
            Ok(Probe)
        }

        fn handle(&self, req: &Request<'_>) -> Response {
            match req.path() {
                "/panic" => panic!("probe panics"),
                "/stream" => Response::stream(200, |w| {
                    w.send(b"one")?;
                    assert_eq!(w.wait(std::time::Duration::ZERO), Wait::Elapsed);
                    w.send(b"two")
                }),
                "/reader" => Response::reader(200, std::io::Cursor::new(b"read by gem".to_vec())),
                "/reader-panic" => Response::reader(200, PanicsOnSecondRead(false)),
                "/stream-panic" => Response::stream(200, |w| {
                    w.send(b"one")?;
                    panic!("producer panics")
                }),
                "/count" => {
                    let mut n = 0;
                    let mut body = req.body_reader();
                    while let Some(chunk) = body.next_chunk().unwrap() {
                        n += chunk.len();
                    }
                    Response::text(200, format!("{n} {:?}", req.peer_addr()))
                }
                "/two-readers" => {
                    use std::io::BufRead as _;
                    let mut first = req.body_reader();
                    let lent = first.fill_buf().unwrap().to_vec();
                    // A second reader, even of a clone, may not read on from gem: the
                    // chunk the first holds would be freed under it.
                    let second = req.clone().body_reader().fill_buf().map(<[u8]>::len);
                    // The first reader's chunk is still the one it was lent.
                    let again = first.fill_buf().unwrap().to_vec();
                    Response::text(200, format!("{lent:?} {again:?} {second:?}"))
                }
                _ => Response::text(200, req.target().to_owned())
                    .with_header("x-method", req.method().to_owned()),
            }
        }

        fn streams_body(&self, req: &Request<'_>) -> bool {
            matches!(req.path(), "/count" | "/two-readers")
        }
    }

    // Expanded inside this crate, so the workspace lints and clippy check the expansion.
    crate::export_plugin!(Probe);

    unsafe extern "C" {
        // The symbol the macro above exports.
        fn gem_plugin_entry_v2() -> *const PluginDescriptor;
    }

    fn descriptor() -> &'static PluginDescriptor {
        // SAFETY: the entry point returns a pointer to a static descriptor.
        unsafe { &*gem_plugin_entry_v2() }
    }

    /// What a fake host saw of one call.
    #[derive(Default, Debug)]
    struct Seen {
        status: u16,
        headers: Vec<(String, String, u32)>,
        body: Vec<u8>,
        body_flags: u32,
        failed: Option<String>,
        producer: Option<RawProducer>,
        reader: Option<RawReader>,
        chunks: Vec<&'static [u8]>,
        written: Vec<Vec<u8>>,
    }

    fn text(s: RawStr) -> String {
        // SAFETY: valid during the callback that passed it.
        String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned()
    }

    unsafe extern "C" fn set_status(ctx: *mut c_void, status: u16) {
        // SAFETY: `ctx` is the test's `Seen`.
        unsafe { (*ctx.cast::<Seen>()).status = status };
    }
    unsafe extern "C" fn add_header(ctx: *mut c_void, name: RawStr, value: RawStr, flags: u32) {
        // SAFETY: as above.
        unsafe {
            (*ctx.cast::<Seen>())
                .headers
                .push((text(name), text(value), flags))
        };
    }
    unsafe extern "C" fn set_body(ctx: *mut c_void, body: RawStr, flags: u32) {
        // SAFETY: as above; the body is valid during the call.
        let seen = unsafe { &mut *ctx.cast::<Seen>() };
        seen.body = unsafe { body.as_bytes() }.to_vec();
        seen.body_flags = flags;
    }
    unsafe extern "C" fn set_body_stream(ctx: *mut c_void, producer: RawProducer) {
        // SAFETY: as above.
        unsafe { (*ctx.cast::<Seen>()).producer = Some(producer) };
    }
    unsafe extern "C" fn set_body_reader(ctx: *mut c_void, reader: RawReader) {
        // SAFETY: as above.
        unsafe { (*ctx.cast::<Seen>()).reader = Some(reader) };
    }
    unsafe extern "C" fn read_body(ctx: *mut c_void, out: *mut RawStr) -> i32 {
        // SAFETY: as above.
        let seen = unsafe { &mut *ctx.cast::<Seen>() };
        match seen.chunks.pop() {
            // SAFETY: `out` is writable.
            Some(chunk) => unsafe {
                out.write(RawStr::from_bytes(chunk));
                crate::abi::READ_CHUNK
            },
            None => crate::abi::READ_END,
        }
    }
    unsafe extern "C" fn fail(ctx: *mut c_void, message: RawStr) {
        // SAFETY: as above.
        unsafe { (*ctx.cast::<Seen>()).failed = Some(text(message)) };
    }
    unsafe extern "C" fn write(ctx: *mut c_void, chunk: RawStr) -> i32 {
        // SAFETY: as above.
        unsafe {
            (*ctx.cast::<Seen>())
                .written
                .push(chunk.as_bytes().to_vec())
        };
        0
    }
    unsafe extern "C" fn is_draining(_: *mut c_void) -> bool {
        false
    }
    unsafe extern "C" fn wait(_: *mut c_void, _: u64) -> i32 {
        crate::abi::WAIT_ELAPSED
    }

    static HOST: HostApi = HostApi {
        struct_size: size_of::<HostApi>() as u32,
        set_status,
        add_header,
        set_body,
        set_body_stream,
        read_body,
        fail,
        set_body_reader,
    };

    /// A host from before readers: its table (gem-plugin 0.2) ends before
    /// `set_body_reader`, and is that much shorter.
    #[repr(C)]
    struct OldHostApi {
        struct_size: u32,
        set_status: unsafe extern "C" fn(ctx: *mut c_void, status: u16),
        add_header: unsafe extern "C" fn(*mut c_void, RawStr, RawStr, u32),
        set_body: unsafe extern "C" fn(ctx: *mut c_void, body: RawStr, flags: u32),
        set_body_stream: unsafe extern "C" fn(ctx: *mut c_void, producer: RawProducer),
        read_body: unsafe extern "C" fn(ctx: *mut c_void, out: *mut RawStr) -> i32,
        fail: unsafe extern "C" fn(ctx: *mut c_void, message: RawStr),
    }

    static OLD_HOST: OldHostApi = OldHostApi {
        struct_size: size_of::<OldHostApi>() as u32,
        set_status,
        add_header,
        set_body,
        set_body_stream,
        read_body,
        fail,
    };

    fn call(
        handle: impl Fn(*const RawRequest),
        method: &[u8],
        target: &[u8],
        chunks: Vec<&'static [u8]>,
    ) -> Seen {
        call_host(&HOST, handle, method, target, chunks)
    }

    fn call_host(
        host: *const HostApi,
        handle: impl Fn(*const RawRequest),
        method: &[u8],
        target: &[u8],
        chunks: Vec<&'static [u8]>,
    ) -> Seen {
        let header = RawHeader {
            name: RawStr::from_bytes(b"host"),
            value: RawStr::from_bytes(b"x"),
        };
        let mut seen = Seen {
            chunks,
            ..Seen::default()
        };
        let req = RawRequest {
            method: RawStr::from_bytes(method),
            target: RawStr::from_bytes(target),
            headers: &header,
            headers_len: 1,
            body: RawStr::EMPTY,
            version: 11,
            scheme: crate::abi::SCHEME_HTTP,
            peer: RawAddr::from("127.0.0.1:4000".parse::<std::net::SocketAddr>().unwrap()),
            local: RawAddr::NONE,
            request_id: 7,
            body_streamed: 1,
            host,
            ctx: (&raw mut seen).cast::<c_void>(),
        };
        handle(&req);
        if let Some(producer) = seen.producer.take() {
            let sink = RawSink {
                ctx: (&raw mut seen).cast::<c_void>(),
                write,
                is_draining,
                wait,
                fail,
            };
            // SAFETY: a producer from the plugin, run once with a valid sink.
            unsafe { (producer.run)(producer.state, &sink) };
        }
        if let Some(reader) = seen.reader.take() {
            // Small reads, to see each one bounded by the buffer it gets.
            let mut buf = [0u8; 5];
            loop {
                let mut error = RawStr::EMPTY;
                // SAFETY: a reader from the plugin, with a valid buffer and error slot.
                let n =
                    unsafe { (reader.read)(reader.state, buf.as_mut_ptr(), buf.len(), &mut error) };
                match usize::try_from(n) {
                    Ok(0) => break,
                    Ok(n) => seen.written.push(buf[..n].to_vec()),
                    Err(_) => {
                        seen.failed = Some(text(error));
                        break;
                    }
                }
            }
            // SAFETY: freed once, after its last read.
            unsafe { (reader.drop)(reader.state) };
        }
        seen
    }

    #[test]
    fn the_exported_descriptor_serves_requests_and_survives_panics() {
        let d = descriptor();
        assert_eq!(d.abi_version, ABI_VERSION);
        assert_eq!(d.struct_size as usize, size_of::<PluginDescriptor>());
        // SAFETY: static strings.
        let (name, version) = unsafe { (d.name.as_bytes(), d.version.as_bytes()) };
        assert_eq!((name, version), (&b"gem-plugin"[..], &b"0.3.0"[..]));
        assert!(d.on_signal.is_some());
        // These tests catch panics, so they run with panic = "unwind".
        assert_eq!(d.panic_strategy, PANIC_UNWIND);

        // SAFETY: `init` takes no input; its empty answer means success.
        assert_eq!(unsafe { (d.init)() }.len, 0);
        // SAFETY: `call` passes a valid request with valid callbacks.
        let handle = |req| unsafe { (d.handle)(req) };
        let seen = call(handle, b"GET", b"/x?y", vec![]);
        assert_eq!((seen.status, seen.body.as_slice()), (200, &b"/x?y"[..]));
        assert_eq!(seen.body_flags, 0, "an owned body is copied");
        assert!(seen.headers.contains(&("x-method".into(), "GET".into(), 0)));
        assert!(seen.headers.contains(&(
            "content-type".into(),
            "text/plain; charset=utf-8".into(),
            FLAG_STATIC
        )));

        let seen = call(handle, b"GET", b"/panic", vec![]);
        let error = seen.failed.unwrap();
        assert!(error.starts_with("probe panics (at "), "{error}");
        assert_eq!(call(handle, b"GET", b"/", vec![]).status, 200);

        let seen = call(handle, b"GET", b"/\xff", vec![]);
        assert_eq!(seen.status, 400);
        assert_eq!(seen.body, b"request method or target is not UTF-8\n");
        assert_eq!(seen.body_flags, FLAG_STATIC);
    }

    #[test]
    fn streams_and_chunked_bodies_cross_the_abi() {
        let d = descriptor();
        // SAFETY: as above.
        assert_eq!(unsafe { (d.init)() }.len, 0);
        // SAFETY: as above.
        let handle = |req| unsafe { (d.handle)(req) };
        let seen = call(handle, b"GET", b"/stream", vec![]);
        assert_eq!(seen.written, vec![b"one".to_vec(), b"two".to_vec()]);
        assert!(seen.failed.is_none());

        let seen = call(handle, b"GET", b"/stream-panic", vec![]);
        assert_eq!(seen.written, vec![b"one".to_vec()]);
        let error = seen.failed.unwrap();
        assert!(
            error.starts_with("the stream panicked: producer panics"),
            "{error}"
        );

        // A reader is read by the host, a buffer at a time.
        let seen = call(handle, b"GET", b"/reader", vec![]);
        assert_eq!(seen.written.concat(), b"read by gem");
        assert_eq!(seen.written[0], b"read ");
        assert!(seen.failed.is_none());
        let seen = call(handle, b"GET", b"/reader-panic", vec![]);
        assert_eq!(seen.written, vec![b"first".to_vec()]);
        let error = seen.failed.unwrap();
        assert!(
            error.starts_with("the stream panicked: reader panics"),
            "{error}"
        );
        // A host from before readers gets the same bytes as a stream.
        assert!(size_of::<OldHostApi>() < size_of::<HostApi>());
        let old = (&raw const OLD_HOST).cast::<HostApi>();
        let seen = call_host(old, handle, b"GET", b"/reader", vec![]);
        assert!(seen.reader.is_none());
        assert_eq!(seen.written.concat(), b"read by gem");

        let seen = call(handle, b"POST", b"/count", vec![b"abc", b"de"]);
        assert_eq!(seen.body, b"5 Some(127.0.0.1:4000)");
        // This test host lends the chunks last first.
        let seen = call(handle, b"POST", b"/two-readers", vec![b"abc", b"de"]);
        let text = String::from_utf8(seen.body).unwrap();
        assert!(
            text.starts_with("[100, 101] [100, 101] Err(") && text.contains("another BodyReader"),
            "{text}"
        );
        let asks = |target: &[u8]| {
            let asked = std::cell::Cell::new(false);
            // SAFETY: as above.
            let ask = |req| asked.set(unsafe { (d.streams_body)(req) });
            call(ask, b"POST", target, vec![]);
            asked.get()
        };
        assert!(asks(b"/count"));
        assert!(!asks(b"/echo"));
    }

    #[test]
    fn handle_before_init_is_an_error_not_ub() {
        static CELL: OnceLock<Probe> = OnceLock::new();
        // SAFETY: `call` passes a valid request with valid callbacks.
        let handle = |req| unsafe { handle::<Probe>(&CELL, req) };
        let error = call(handle, b"GET", b"/", vec![]).failed.unwrap();
        assert!(error.contains("before a successful init"), "{error}");
    }

    #[test]
    fn init_errors_and_panics_become_messages() {
        struct Refuses;
        impl Plugin for Refuses {
            fn init() -> Result<Self, String> {
                Err("no config".into())
            }
            fn handle(&self, _req: &Request<'_>) -> Response {
                Response::new(200)
            }
        }
        struct Panics;
        impl Plugin for Panics {
            fn init() -> Result<Self, String> {
                panic!("init blew up")
            }
            fn handle(&self, _req: &Request<'_>) -> Response {
                Response::new(200)
            }
        }
        static REFUSES: OnceLock<Refuses> = OnceLock::new();
        static PANICS: OnceLock<Panics> = OnceLock::new();
        // SAFETY: init messages are leaked, so live for the process.
        let message = |s: RawStr| String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned();
        assert_eq!(message(init(&REFUSES)), "no config");
        let panicked = message(init(&PANICS));
        assert!(
            panicked.starts_with("init panicked: init blew up"),
            "{panicked}"
        );
        assert!(REFUSES.get().is_none() && PANICS.get().is_none());
    }
}
