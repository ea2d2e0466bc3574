//! The C ABI between the gem host and a handler plugin: only `#[repr(C)]` types and
//! `extern "C"` function pointers.
//!
//! # Handshake
//!
//! 1. The host resolves [`ABI_VERSION_SYMBOL`] (`gem_plugin_abi_version`, an
//!    `extern "C" fn() -> u32`). Its name never changes, so a host can always tell
//!    which ABI a library was built for and refuse a mismatch naming both versions.
//! 2. Only if that matches [`ABI_VERSION`] does the host resolve [`ENTRY_SYMBOL`]
//!    (`gem_plugin_entry_v2`, an `extern "C" fn() -> *const PluginDescriptor`), whose
//!    name carries the ABI major version, and checks the descriptor's own
//!    `abi_version` and `struct_size`. A plugin built against an older or newer
//!    gem-plugin whose descriptor has another size is refused, asking for a rebuild
//!    against the host's gem-plugin.
//! 3. The host checks [`PluginDescriptor::panic_strategy`] and refuses a plugin that
//!    was not built with `panic = "unwind"` (see [Panics](#panics)), before any of its
//!    functions runs.
//! 4. The host calls `init` once, then `handle` for every request from many threads.
//!
//! A plugin of ABI 1 (gem-plugin 0.1) is refused at step 1 with a message naming both
//! versions: rebuild it against this gem-plugin. There is no adapter.
//!
//! # One request (ABI 2)
//!
//! Nothing is copied on the way in: [`RawRequest`] borrows the method, target and
//! headers from the host's parsed request, and the body from the host's buffer. It
//! also carries the connection's facts (peer and local address, HTTP version,
//! scheme), a request id, and the host's callbacks ([`HostApi`]). The plugin writes
//! its answer through them, straight into the host's response: status, headers, and a
//! body that is one of:
//! - bytes (copied once, or not at all when static);
//! - a [`RawReader`] that the host reads chunk by chunk into its own buffers as the
//!   client takes the body (no copy of the host's, and no thread);
//! - a [`RawProducer`] that the host runs on a thread of its own once the head is
//!   sent, writing chunks into a [`RawSink`] that blocks while the client is slow.
//!
//! A request with a body first
//! goes through `streams_body`, which may ask to read it in chunks instead of whole.
//!
//! # Memory
//!
//! Memory is freed by the side that allocated it. A [`RawRequest`] is owned by the host
//! and only borrowed for the duration of `handle`; a chunk read with
//! [`HostApi::read_body`] until the next read. Whatever the plugin hands the host
//! (header values, body bytes, stream chunks) is copied by the host before the
//! callback returns, except static data ([`FLAG_STATIC`]), which lives as long as the
//! never-unloaded library. A [`RawProducer`]'s state is the plugin's; the host calls
//! its `run` or its `drop` exactly once. A [`RawReader`] fills the host's buffers, and
//! its state is the plugin's too; the host calls its `drop` exactly once.
//!
//! # Panics
//!
//! No panic crosses the boundary: the SDK's `export_plugin!` macro wraps every exported
//! function, every producer and every reader (its reads and its drop) in
//! `catch_unwind`, and reports a panic through the host's `fail` callback, or a
//! reader's error, instead.
//!
//! That only works when panics unwind. In a plugin built with `panic = "abort"` (in a
//! Cargo profile, or `-C panic=abort`) the first panic aborts the whole process, i.e.
//! the server, before `catch_unwind` sees it. So the macro records the plugin's panic
//! strategy in the descriptor, and the host refuses any strategy but
//! [`PANIC_UNWIND`] at load time: at start, at `gem check`, or as a failed upgrade
//! while the old process keeps serving.
//!
//! The strategy is `cfg!(panic = ..)` as the crate that calls `export_plugin!` was
//! compiled. That crate is the cdylib itself, and rustc compiles the final crate with
//! the strategy its panic runtime is linked with, also when only it gets
//! `-C panic=abort` (as `cargo rustc -- -C panic=abort` does). Call the macro in the
//! cdylib crate, not in a library it depends on, so the record is exact.

use std::ffi::c_void;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// The ABI major version this SDK implements. Bumped on any incompatible change to the
/// types in this module.
pub const ABI_VERSION: u32 = 2;

/// `extern "C" fn() -> u32`: the ABI version a library was built for. Never renamed.
pub const ABI_VERSION_SYMBOL: &str = "gem_plugin_abi_version";

/// `extern "C" fn() -> *const PluginDescriptor`: the entry point for ABI major 2.
pub const ENTRY_SYMBOL: &str = "gem_plugin_entry_v2";

/// [`PluginDescriptor::panic_strategy`]: panics unwind, so the SDK catches them. The
/// only strategy the host accepts.
pub const PANIC_UNWIND: u32 = 1;

/// [`PluginDescriptor::panic_strategy`]: panics abort the process (`panic = "abort"`, or
/// any other strategy that does not unwind). Refused by the host.
pub const PANIC_ABORT: u32 = 2;

/// [`RawRequest::scheme`]: cleartext HTTP.
pub const SCHEME_HTTP: u32 = 0;
/// [`RawRequest::scheme`]: HTTP over TLS.
pub const SCHEME_HTTPS: u32 = 1;

/// Flag for [`HostApi::add_header`] and [`HostApi::set_body`]: the bytes are static
/// data (of the never-unloaded plugin, or of the host), so the host may keep a pointer
/// to them instead of copying.
pub const FLAG_STATIC: u32 = 1;

/// [`HostApi::read_body`] and [`RawSink::wait`] results.
pub const READ_CHUNK: i32 = 1;
/// [`HostApi::read_body`]: the body has ended.
pub const READ_END: i32 = 0;
/// [`HostApi::read_body`]: the body could not be read (the client went away, or sent
/// a malformed body). [`RawSink::write`]: the client is gone or the stream was cut.
pub const IO_ERROR: i32 = -1;

/// [`RawSink::wait`]: the time passed.
pub const WAIT_ELAPSED: i32 = 0;
/// [`RawSink::wait`]: a drain has begun (at once if it already had).
pub const WAIT_DRAINING: i32 = 1;
/// [`RawSink::wait`]: the client is gone, or the stream was cut.
pub const WAIT_GONE: i32 = 2;

/// A borrowed run of bytes (often UTF-8). `ptr` may be null only when `len` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawStr {
    /// First byte, or null for an empty string.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

/// One header: a name and a value, both borrowed.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RawHeader {
    /// Header name, lower-case.
    pub name: RawStr,
    /// Header value bytes; not necessarily UTF-8.
    pub value: RawStr,
}

/// A socket address, by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAddr {
    /// 4, 6, or 0 when there is no address.
    pub family: u32,
    /// The port.
    pub port: u16,
    /// The IPv4 address in the first 4 bytes, or the IPv6 address.
    pub ip: [u8; 16],
    /// IPv6 flow information.
    pub flowinfo: u32,
    /// IPv6 scope id.
    pub scope_id: u32,
}

/// A request, owned by the host and valid only during the `handle` call: method,
/// target, headers and body are views into what the host already holds.
#[repr(C)]
#[derive(Debug)]
pub struct RawRequest {
    /// `GET`, `POST`, ...
    pub method: RawStr,
    /// The request target: path and optional `?query`.
    pub target: RawStr,
    /// Pointer to `headers_len` headers.
    pub headers: *const RawHeader,
    /// Number of headers.
    pub headers_len: usize,
    /// The whole request body, when the host read it whole (bounded by
    /// `max_body_size`); empty when there is none or when the handler reads it in
    /// chunks with [`HostApi::read_body`].
    pub body: RawStr,
    /// The HTTP version, as major * 10 + minor: 9, 10, 11, 20 or 30.
    pub version: u32,
    /// [`SCHEME_HTTP`] or [`SCHEME_HTTPS`].
    pub scheme: u32,
    /// The client's address.
    pub peer: RawAddr,
    /// The local address the client connected to.
    pub local: RawAddr,
    /// A number unique to this request within the serving process.
    pub request_id: u64,
    /// Whether [`HostApi::read_body`] serves the body in chunks (the plugin's
    /// `streams_body` asked for it); 0 or 1.
    pub body_streamed: u32,
    /// The host's callbacks, valid during the call.
    pub host: *const HostApi,
    /// The host's state for this request: the first argument of every [`HostApi`]
    /// callback.
    pub ctx: *mut c_void,
}

/// The host's callbacks for one request. The response is written straight into the
/// host's response through them; every call passes [`RawRequest::ctx`]. None of them
/// may be called after `handle` returned, or from another thread.
#[repr(C)]
#[derive(Debug)]
pub struct HostApi {
    /// `size_of::<HostApi>()`, so a later minor version can add callbacks at the end.
    pub struct_size: u32,
    /// Sets the response status (200 if never called). An invalid status makes the
    /// answer a 500 with a log line.
    pub set_status: unsafe extern "C" fn(ctx: *mut c_void, status: u16),
    /// Appends a header. `flags` may hold [`FLAG_STATIC`] for the value. An invalid
    /// name or value makes the answer a 500 with a log line.
    pub add_header: unsafe extern "C" fn(ctx: *mut c_void, name: RawStr, value: RawStr, flags: u32),
    /// Sets the whole body: copied once, or kept by pointer with [`FLAG_STATIC`].
    pub set_body: unsafe extern "C" fn(ctx: *mut c_void, body: RawStr, flags: u32),
    /// Makes the body a stream: the host takes `producer` and runs it off its I/O
    /// threads once the head is sent (or drops it unrun).
    pub set_body_stream: unsafe extern "C" fn(ctx: *mut c_void, producer: RawProducer),
    /// Reads the next chunk of a streamed request body into `out`, valid until the
    /// next call or the end of `handle`. Returns [`READ_CHUNK`], [`READ_END`] or
    /// [`IO_ERROR`]. Without `body_streamed` it returns the whole body, then the end.
    pub read_body: unsafe extern "C" fn(ctx: *mut c_void, out: *mut RawStr) -> i32,
    /// The handler failed (it panicked): the answer is a 500 and a log line with
    /// `message`, whatever else was set.
    pub fail: unsafe extern "C" fn(ctx: *mut c_void, message: RawStr),
    /// Makes the body one the host pulls from `reader`. Added in gem-plugin 0.3: a
    /// gem-plugin 0.2 host's table ends before it, so check `struct_size` first and
    /// read this field through a raw pointer, without making a `&HostApi` of a table
    /// that may be shorter. The host takes `reader` and calls it once the head is sent,
    /// chunk by chunk as the client takes the body (or drops it unread).
    pub set_body_reader: unsafe extern "C" fn(ctx: *mut c_void, reader: RawReader),
}

/// A streamed response body, handed to the host with [`HostApi::set_body_stream`].
/// Owned by the host from then on, which calls exactly one of `run` and `drop`, once,
/// from any thread (the plugin's producer state must be `Send`).
#[repr(C)]
#[derive(Debug)]
pub struct RawProducer {
    /// The plugin's producer state.
    pub state: *mut c_void,
    /// Produces the whole body into `sink`, then frees `state`. Blocking is expected:
    /// the host runs it on a thread of its own, and `sink.write` blocks while the
    /// client is slow (backpressure).
    pub run: unsafe extern "C" fn(state: *mut c_void, sink: *const RawSink),
    /// Frees `state` without running it.
    pub drop: unsafe extern "C" fn(state: *mut c_void),
}

/// A response body the host pulls, handed to it with [`HostApi::set_body_reader`]:
/// for bodies whose bytes are at hand (a file, generated data), it needs no thread of
/// its own. Owned by the host from then on, which calls `read` until it returns 0 or
/// fails, then `drop`, once; from any thread, one call at a time (the plugin's reader
/// state must be `Send`).
#[repr(C)]
#[derive(Debug)]
pub struct RawReader {
    /// The plugin's reader state.
    pub state: *mut c_void,
    /// Fills up to `cap` bytes at `buf` (initialised, writable memory of the host's)
    /// and returns how many it wrote; 0 at the end of the body. Or returns
    /// [`IO_ERROR`] and points `error` at a message, valid until the next call on
    /// `state`: the stream is cut (the client sees it end without its proper end) and
    /// the message logged. The host may call it right on its I/O threads, as it calls
    /// `handle`: a read should not wait long (a file read, not a network wait; for
    /// those, a [`RawProducer`]).
    pub read: unsafe extern "C" fn(
        state: *mut c_void,
        buf: *mut u8,
        cap: usize,
        error: *mut RawStr,
    ) -> i64,
    /// Frees `state`. Like `read`, it may run on the host's I/O threads: it should
    /// be quick (closing a file, not joining a thread).
    pub drop: unsafe extern "C" fn(state: *mut c_void),
}

/// Where a [`RawProducer`] writes, valid during `run`.
#[repr(C)]
#[derive(Debug)]
pub struct RawSink {
    /// The host's state: the first argument of every callback.
    pub ctx: *mut c_void,
    /// Sends one chunk (copied once), blocking while the host holds as many chunks as
    /// it buffers. 0, or [`IO_ERROR`] once the client is gone or the stream was cut:
    /// the producer should then return.
    pub write: unsafe extern "C" fn(ctx: *mut c_void, chunk: RawStr) -> i32,
    /// Whether the server has begun to drain (a shutdown, or the old side of an
    /// upgrade): a long stream should end soon.
    pub is_draining: unsafe extern "C" fn(ctx: *mut c_void) -> bool,
    /// Sleeps up to `timeout_ms`, waking early when a drain begins or the client goes:
    /// [`WAIT_ELAPSED`], [`WAIT_DRAINING`] or [`WAIT_GONE`].
    pub wait: unsafe extern "C" fn(ctx: *mut c_void, timeout_ms: u64) -> i32,
    /// The producer failed (it panicked or returned an error): the stream is cut
    /// (the client sees it end without its proper end) and `message` is logged.
    pub fail: unsafe extern "C" fn(ctx: *mut c_void, message: RawStr),
}

/// Everything the host needs from a plugin. Lives in the plugin as a `static`.
#[repr(C)]
#[derive(Debug)]
pub struct PluginDescriptor {
    /// Must equal the host's [`ABI_VERSION`].
    pub abi_version: u32,
    /// `size_of::<PluginDescriptor>()` as the plugin saw it; the host refuses a mismatch.
    pub struct_size: u32,
    /// The plugin's name (static, UTF-8).
    pub name: RawStr,
    /// The plugin's version (static, UTF-8).
    pub version: RawStr,
    /// Called once before any request. Returns an empty `RawStr` on success, or an
    /// error message that stays valid for the life of the process.
    pub init: unsafe extern "C" fn() -> RawStr,
    /// Handles one request, writing the response through `req.host`.
    pub handle: unsafe extern "C" fn(req: *const RawRequest),
    /// Called before the body is read, for a request that has one: `true` to read it
    /// in chunks with [`HostApi::read_body`] (no `max_body_size`), `false` to get it
    /// whole in [`RawRequest::body`]. `req.body` is empty and no callback may be used.
    pub streams_body: unsafe extern "C" fn(req: *const RawRequest) -> bool,
    /// Optional hook for the `plugin` signal action; receives the signal number.
    pub on_signal: Option<unsafe extern "C" fn(signo: i32)>,
    /// How the plugin was compiled to handle panics: [`PANIC_UNWIND`] or
    /// [`PANIC_ABORT`]. The SDK's `catch_unwind` protects the server only from panics
    /// that unwind, so the host refuses anything but [`PANIC_UNWIND`].
    pub panic_strategy: u32,
}

// SAFETY: a descriptor only holds pointers to immutable statics and functions that the
// SDK makes safe to call from any thread.
#[allow(unsafe_code)]
unsafe impl Sync for PluginDescriptor {}

// SAFETY: a host vtable is a static table of functions.
#[allow(unsafe_code)]
unsafe impl Sync for HostApi {}

impl RawAddr {
    /// No address.
    pub const NONE: RawAddr = RawAddr {
        family: 0,
        port: 0,
        ip: [0; 16],
        flowinfo: 0,
        scope_id: 0,
    };

    /// The address, if there is one.
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        match self.family {
            4 => {
                let [a, b, c, d, ..] = self.ip;
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(a, b, c, d),
                    self.port,
                )))
            }
            6 => Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(self.ip),
                self.port,
                self.flowinfo,
                self.scope_id,
            ))),
            _ => None,
        }
    }
}

impl From<SocketAddr> for RawAddr {
    #[inline]
    fn from(addr: SocketAddr) -> RawAddr {
        let mut raw = RawAddr {
            port: addr.port(),
            ..RawAddr::NONE
        };
        match addr {
            SocketAddr::V4(v4) => {
                raw.family = 4;
                raw.ip[..4].copy_from_slice(&v4.ip().octets());
            }
            SocketAddr::V6(v6) => {
                raw.family = 6;
                raw.ip = v6.ip().octets();
                raw.flowinfo = v6.flowinfo();
                raw.scope_id = v6.scope_id();
            }
        }
        raw
    }
}

impl RawHeader {
    /// An empty header, to fill arrays with.
    pub const EMPTY: RawHeader = RawHeader {
        name: RawStr::EMPTY,
        value: RawStr::EMPTY,
    };
}

impl RawStr {
    /// The empty string.
    pub const EMPTY: RawStr = RawStr {
        ptr: std::ptr::null(),
        len: 0,
    };

    /// Borrows `bytes`; the caller keeps them alive for as long as the `RawStr` is used.
    pub const fn from_bytes(bytes: &[u8]) -> RawStr {
        RawStr {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// Views the bytes.
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` initialised bytes that stay valid and unchanged for `'a`
    /// (or `len` must be 0).
    #[allow(unsafe_code)]
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is valid for `'a`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}
