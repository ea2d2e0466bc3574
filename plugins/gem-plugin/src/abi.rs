//! The C ABI between the gem host and a handler plugin: only `#[repr(C)]` types and
//! `extern "C"` function pointers.
//!
//! # Handshake
//!
//! 1. The host resolves [`ABI_VERSION_SYMBOL`] (`gem_plugin_abi_version`, an
//!    `extern "C" fn() -> u32`). Its name never changes, so a host can always tell
//!    which ABI a library was built for and refuse a mismatch naming both versions.
//! 2. Only if that matches [`ABI_VERSION`] does the host resolve [`ENTRY_SYMBOL`]
//!    (`gem_plugin_entry_v1`, an `extern "C" fn() -> *const PluginDescriptor`), whose
//!    name carries the ABI major version, and checks the descriptor's own
//!    `abi_version` and `struct_size`. A plugin built against an older or newer
//!    gem-plugin whose descriptor has another size is refused, asking for a rebuild
//!    against the host's gem-plugin.
//! 4. The host checks [`PluginDescriptor::panic_strategy`] and refuses a plugin that
//!    was not built with `panic = "unwind"` (see [Panics](#panics)), before any of its
//!    functions runs.
//! 5. The host calls `init` once, then `handle` for every request from many threads.
//!
//! # Memory
//!
//! Memory is freed by the side that allocated it. A [`RawRequest`] is owned by the host
//! and only borrowed for the duration of `handle`. A [`RawResponse`] filled by the plugin
//! is owned by the plugin until the host hands it back to `free_response`.
//!
//! # Panics
//!
//! No panic crosses the boundary: the SDK's `export_plugin!` macro wraps every exported
//! function in `catch_unwind` and reports a panic as an error value instead.
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

/// The ABI major version this SDK implements. Bumped on any incompatible change to the
/// types in this module.
pub const ABI_VERSION: u32 = 1;

/// `extern "C" fn() -> u32`: the ABI version a library was built for. Never renamed.
pub const ABI_VERSION_SYMBOL: &str = "gem_plugin_abi_version";

/// `extern "C" fn() -> *const PluginDescriptor`: the entry point for ABI major 1.
pub const ENTRY_SYMBOL: &str = "gem_plugin_entry_v1";

/// [`PluginDescriptor::panic_strategy`]: panics unwind, so the SDK catches them. The
/// only strategy the host accepts.
pub const PANIC_UNWIND: u32 = 1;

/// [`PluginDescriptor::panic_strategy`]: panics abort the process (`panic = "abort"`, or
/// any other strategy that does not unwind). Refused by the host.
pub const PANIC_ABORT: u32 = 2;

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
    /// Header name as sent by the client (HTTP/1) or lower-case (HTTP/2).
    pub name: RawStr,
    /// Header value bytes; not necessarily UTF-8.
    pub value: RawStr,
}

/// A request, owned by the host and valid only during the `handle` call.
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
    /// The whole request body (the host buffers it, bounded by `max_body`).
    pub body: RawStr,
}

/// A response, filled by the plugin's `handle` and owned by the plugin until the host
/// passes it to `free_response`.
#[repr(C)]
#[derive(Debug)]
pub struct RawResponse {
    /// HTTP status code. 0 means the handler failed (it panicked); `error` says why.
    pub status: u16,
    /// Pointer to `headers_len` headers, owned by the plugin.
    pub headers: *const RawHeader,
    /// Number of headers.
    pub headers_len: usize,
    /// Response body, owned by the plugin.
    pub body: RawStr,
    /// When `status` is 0: a message describing the failure.
    pub error: RawStr,
    /// Opaque plugin allocation backing the fields above; released by `free_response`.
    pub owner: *mut c_void,
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
    /// Handles one request; always fills `resp` (status 0 on failure).
    pub handle: unsafe extern "C" fn(req: *const RawRequest, resp: *mut RawResponse),
    /// Releases what `handle` allocated into `resp`.
    pub free_response: unsafe extern "C" fn(resp: *mut RawResponse),
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
