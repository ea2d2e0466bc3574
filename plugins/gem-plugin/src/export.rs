//! What [`export_plugin!`](crate::export_plugin) expands to: the safe glue between the
//! C ABI and a [`Plugin`](crate::Plugin). Not part of the public API.

use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Once, OnceLock};

use crate::abi::{RawHeader, RawRequest, RawResponse, RawStr};
use crate::{Plugin, Request, Response};

/// The response data a `RawResponse` points into, owned by the plugin until
/// `free_response`.
struct Owned {
    headers: Vec<(String, String)>,
    raw_headers: Vec<RawHeader>,
    body: Vec<u8>,
    error: String,
}

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

/// `handle`: runs the plugin on one request and fills `resp`.
///
/// # Safety
///
/// `req` must point to a valid `RawRequest` whose pointers are valid for the call, and
/// `resp` to writable memory for a `RawResponse`.
#[allow(unsafe_code)]
pub unsafe fn handle<T: Plugin>(
    cell: &'static OnceLock<T>,
    req: *const RawRequest,
    resp: *mut RawResponse,
) {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let plugin = cell
            .get()
            .ok_or_else(|| "handle was called before a successful init".to_owned())?;
        // SAFETY: the caller guarantees `req` and everything it points to is valid now.
        let req = unsafe { &*req };
        // SAFETY: as above, for every borrowed string in the request.
        let (method, target, body) = unsafe {
            (
                req.method.as_bytes(),
                req.target.as_bytes(),
                req.body.as_bytes(),
            )
        };
        let (Ok(method), Ok(target)) = (std::str::from_utf8(method), std::str::from_utf8(target))
        else {
            return Ok(Response::text(
                400,
                "request method or target is not UTF-8\n",
            ));
        };
        let raw_headers = match req.headers.is_null() {
            true => &[][..],
            // SAFETY: the caller guarantees `headers_len` valid headers at `headers`.
            false => unsafe { std::slice::from_raw_parts(req.headers, req.headers_len) },
        };
        let headers = raw_headers
            .iter()
            .filter_map(|h| {
                // SAFETY: header strings are valid for the call, as above.
                let (name, value) = unsafe { (h.name.as_bytes(), h.value.as_bytes()) };
                Some((std::str::from_utf8(name).ok()?, value))
            })
            .collect();
        Ok(plugin.handle(&Request::new(method, target, headers, body)))
    }));
    let (owned, status) = match outcome {
        Ok(Ok(response)) => (
            Owned {
                headers: response.headers,
                raw_headers: Vec::new(),
                body: response.body,
                error: String::new(),
            },
            response.status,
        ),
        Ok(Err(message)) => (Owned::failed(message), 0),
        Err(payload) => (Owned::failed(panic_message(payload.as_ref())), 0),
    };
    // SAFETY: the caller guarantees `resp` is writable.
    unsafe { owned.into_raw(status, resp) };
}

impl Owned {
    fn failed(error: String) -> Owned {
        Owned {
            headers: Vec::new(),
            raw_headers: Vec::new(),
            body: Vec::new(),
            error,
        }
    }

    /// Moves `self` to the heap and points `resp` into it.
    ///
    /// # Safety
    ///
    /// `resp` must be writable.
    #[allow(unsafe_code)]
    unsafe fn into_raw(self, status: u16, resp: *mut RawResponse) {
        let mut boxed = Box::new(self);
        boxed.raw_headers = boxed
            .headers
            .iter()
            .map(|(n, v)| RawHeader {
                name: RawStr::from_bytes(n.as_bytes()),
                value: RawStr::from_bytes(v.as_bytes()),
            })
            .collect();
        let raw = RawResponse {
            status,
            headers: boxed.raw_headers.as_ptr(),
            headers_len: boxed.raw_headers.len(),
            body: RawStr::from_bytes(&boxed.body),
            error: RawStr::from_bytes(boxed.error.as_bytes()),
            owner: Box::into_raw(boxed).cast::<c_void>(),
        };
        // SAFETY: the caller guarantees `resp` is writable; the heap data the pointers
        // refer to does not move when the box's pointer is taken.
        unsafe { resp.write(raw) };
    }
}

/// `free_response`: releases what `handle` put into `resp`.
///
/// # Safety
///
/// `resp` must have been filled by [`handle`] and not freed since.
#[allow(unsafe_code)]
pub unsafe extern "C" fn free_response(resp: *mut RawResponse) {
    if resp.is_null() {
        return;
    }
    // SAFETY: the caller guarantees `resp` came from `handle`.
    let resp = unsafe { &mut *resp };
    if !resp.owner.is_null() {
        // SAFETY: `owner` was made by `Box::into_raw` in `into_raw` and is freed once,
        // since it is nulled right after.
        drop(unsafe { Box::from_raw(resp.owner.cast::<Owned>()) });
        resp.owner = std::ptr::null_mut();
    }
}

/// `on_signal`: forwards a signal to the plugin, swallowing a panic.
pub fn on_signal<T: Plugin>(cell: &'static OnceLock<T>, signo: i32) {
    if let Some(plugin) = cell.get() {
        let _ = catch_unwind(AssertUnwindSafe(|| plugin.on_signal(signo)));
    }
}

/// Exports `$plugin` (a type implementing [`Plugin`](crate::Plugin)) as a gem handler:
/// the `gem_plugin_abi_version` and `gem_plugin_entry_v1` symbols and the descriptor
/// behind them. Call it once per cdylib, in the cdylib crate itself: the descriptor
/// records the panic strategy of the crate the macro expands in, and gem refuses a
/// plugin built with `panic = "abort"` (see [`abi`](crate::abi#panics)).
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::export_plugin!($plugin, abi_version = $crate::abi::ABI_VERSION);
    };
    // Undocumented: lets a test plugin claim another ABI, to exercise the host's refusal.
    ($plugin:ty, abi_version = $abi:expr) => {
        const _: () = {
            use $crate::abi::{PluginDescriptor, RawRequest, RawResponse, RawStr};

            static PLUGIN: ::std::sync::OnceLock<$plugin> = ::std::sync::OnceLock::new();

            #[allow(unsafe_code)]
            unsafe extern "C" fn init() -> RawStr {
                $crate::__export::init::<$plugin>(&PLUGIN)
            }

            #[allow(unsafe_code)]
            unsafe extern "C" fn handle(req: *const RawRequest, resp: *mut RawResponse) {
                // SAFETY: the host upholds `handle`'s contract (see the ABI docs).
                unsafe { $crate::__export::handle::<$plugin>(&PLUGIN, req, resp) }
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
                free_response: $crate::__export::free_response,
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
            extern "C" fn gem_plugin_entry_v1() -> *const PluginDescriptor {
                &DESCRIPTOR
            }
        };
    };
}

#[cfg(test)]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use crate::abi::{ABI_VERSION, PANIC_UNWIND, PluginDescriptor};

    struct Probe;

    impl Plugin for Probe {
        const HAS_SIGNAL_HOOK: bool = true;

        fn init() -> Result<Self, String> {
            Ok(Probe)
        }

        fn handle(&self, req: &Request<'_>) -> Response {
            match req.path() {
                "/panic" => panic!("probe panics"),
                _ => Response::text(200, req.target()).with_header("x-method", req.method()),
            }
        }
    }

    // Expanded inside this crate, so the workspace lints and clippy check the expansion.
    crate::export_plugin!(Probe);

    unsafe extern "C" {
        // The symbol the macro above exports.
        fn gem_plugin_entry_v1() -> *const PluginDescriptor;
    }

    fn descriptor() -> &'static PluginDescriptor {
        // SAFETY: the entry point returns a pointer to a static descriptor.
        unsafe { &*gem_plugin_entry_v1() }
    }

    /// Status, headers, body and error of one call through a C-ABI `handle`.
    type Answer = (u16, Vec<(String, String)>, Vec<u8>, String);

    fn call(
        handle: impl Fn(*const RawRequest, *mut RawResponse),
        method: &[u8],
        target: &[u8],
    ) -> Answer {
        let header = RawHeader {
            name: RawStr::from_bytes(b"host"),
            value: RawStr::from_bytes(b"x"),
        };
        let req = RawRequest {
            method: RawStr::from_bytes(method),
            target: RawStr::from_bytes(target),
            headers: &header,
            headers_len: 1,
            body: RawStr::EMPTY,
        };
        let mut resp = std::mem::MaybeUninit::<RawResponse>::uninit();
        handle(&req, resp.as_mut_ptr());
        // SAFETY: `handle` always fills `resp`.
        let mut resp = unsafe { resp.assume_init() };
        let text = |s: RawStr| {
            // SAFETY: the response's strings live until `free_response`, below.
            String::from_utf8(unsafe { s.as_bytes() }.to_vec()).unwrap_or_default()
        };
        // SAFETY: as above.
        let headers = unsafe { std::slice::from_raw_parts(resp.headers, resp.headers_len) };
        let answer = (
            resp.status,
            headers
                .iter()
                .map(|h| (text(h.name), text(h.value)))
                .collect(),
            // SAFETY: as above.
            unsafe { resp.body.as_bytes() }.to_vec(),
            text(resp.error),
        );
        // SAFETY: filled by `handle`, freed once.
        unsafe { free_response(&mut resp) };
        assert!(resp.owner.is_null());
        answer
    }

    #[test]
    fn the_exported_descriptor_serves_requests_and_survives_panics() {
        let d = descriptor();
        assert_eq!(d.abi_version, ABI_VERSION);
        assert_eq!(d.struct_size as usize, size_of::<PluginDescriptor>());
        // SAFETY: static strings.
        let (name, version) = unsafe { (d.name.as_bytes(), d.version.as_bytes()) };
        assert_eq!((name, version), (&b"gem-plugin"[..], &b"0.1.0"[..]));
        assert!(d.on_signal.is_some());
        // These tests catch panics, so they run with panic = "unwind".
        assert_eq!(d.panic_strategy, PANIC_UNWIND);

        // SAFETY: `init` takes no input; its empty answer means success.
        assert_eq!(unsafe { (d.init)() }.len, 0);
        // SAFETY: `call` passes a valid request and a writable response.
        let handle = |req, resp| unsafe { (d.handle)(req, resp) };
        let (status, headers, body, _) = call(handle, b"GET", b"/x?y");
        assert_eq!((status, body.as_slice()), (200, &b"/x?y"[..]));
        assert!(headers.contains(&("x-method".into(), "GET".into())));

        let (status, _, _, error) = call(handle, b"GET", b"/panic");
        assert_eq!(status, 0);
        assert!(error.starts_with("probe panics (at "), "{error}");
        assert_eq!(call(handle, b"GET", b"/").0, 200);

        let (status, _, body, _) = call(handle, b"GET", b"/\xff");
        assert_eq!(status, 400);
        assert_eq!(body, b"request method or target is not UTF-8\n");
    }

    #[test]
    fn handle_before_init_is_an_error_not_ub() {
        static CELL: OnceLock<Probe> = OnceLock::new();
        // SAFETY: `call` passes a valid request and a writable response.
        let handle = |req, resp| unsafe { handle::<Probe>(&CELL, req, resp) };
        let (status, _, _, error) = call(handle, b"GET", b"/");
        assert_eq!(status, 0);
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
