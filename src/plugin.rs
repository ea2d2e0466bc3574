//! Loads a handler `.so`: reads a private copy into a sealed memfd, dlopens that, checks
//! the ABI handshake before touching anything else (refusing a plugin whose panics
//! would abort instead of unwind), and calls the plugin panic-safely through ABI 2:
//! the request lent as views ([`Exchange`]), the response written through the host's
//! callbacks, a streamed body run on a thread of its own.
#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use gem_plugin::abi::{
    ABI_VERSION, ABI_VERSION_SYMBOL, ENTRY_SYMBOL, FLAG_STATIC, HostApi, IO_ERROR, PANIC_ABORT,
    PANIC_UNWIND, PluginDescriptor, READ_CHUNK, READ_END, RawAddr, RawHeader, RawProducer,
    RawReader, RawRequest, RawSink, RawStr, SCHEME_HTTP, SCHEME_HTTPS, WAIT_DRAINING, WAIT_ELAPSED,
    WAIT_GONE,
};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Response as HttpResponse, StatusCode, Version};
use hyper::body::Incoming;
use libloading::Library;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::warn;

use crate::drain::{Counted, DrainSignal};
use crate::handler::{Handler, HandlerError, HandlerInfo, Request, Response};
use crate::respond::{Body, StreamCut};
use crate::server::{ConnFacts, Scheme};

/// Why a plugin could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file could not be read (missing, unreadable).
    #[error("cannot read plugin {}: {source}", path.display())]
    Read {
        /// The plugin file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The private in-memory copy could not be made.
    #[error("cannot copy plugin {} into memory: {reason}", path.display())]
    Copy {
        /// The plugin file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The dynamic loader refused the file (not ELF, wrong architecture, corrupt).
    #[error("cannot load plugin {}: {source}", path.display())]
    Open {
        /// The plugin file.
        path: PathBuf,
        /// The loader's message.
        source: libloading::Error,
    },
    /// A shared library, but not a gem plugin.
    #[error("{} is not a gem plugin: it has no `{ABI_VERSION_SYMBOL}` symbol", path.display())]
    NotAPlugin {
        /// The plugin file.
        path: PathBuf,
    },
    /// Built for another plugin ABI.
    #[error(
        "plugin {} was built for gem plugin ABI {plugin}, but this gem speaks ABI {host}; rebuild it against this gem's gem-plugin",
        path.display()
    )]
    AbiMismatch {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's ABI.
        plugin: u32,
        /// This host's ABI.
        host: u32,
    },
    /// Built against another gem-plugin, whose descriptor has another layout.
    #[error(
        "plugin {} was built against another version of the gem-plugin SDK: its descriptor is {plugin} bytes, this gem expects {host}; rebuild it against this gem's gem-plugin",
        path.display()
    )]
    DescriptorSize {
        /// The plugin file.
        path: PathBuf,
        /// The descriptor size the plugin reports.
        plugin: u32,
        /// `size_of::<PluginDescriptor>()` in this host.
        host: u32,
    },
    /// Built with `panic = "abort"`: the SDK's `catch_unwind` cannot stop its panics, so
    /// the first one would kill the server.
    #[error(
        "plugin {} was built with panic = \"abort\": a panic in it would kill the server, because gem can only catch panics that unwind; build it with panic = \"unwind\" (the default)",
        path.display()
    )]
    PanicAbort {
        /// The plugin file.
        path: PathBuf,
    },
    /// The descriptor is malformed.
    #[error("plugin {} has a bad descriptor: {reason}", path.display())]
    BadDescriptor {
        /// The plugin file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The plugin's `init` reported an error.
    #[error("plugin {} failed to initialise: {message}", path.display())]
    Init {
        /// The plugin file.
        path: PathBuf,
        /// The plugin's message.
        message: String,
    },
}

/// A loaded plugin. The library is never unloaded: the descriptor and the code it points
/// to stay valid for the life of the process.
#[derive(Debug)]
pub struct LoadedPlugin {
    descriptor: &'static PluginDescriptor,
    info: HandlerInfo,
    /// Hashed on a side thread: for a large `.so` it is most of the load time, and an
    /// upgrade should not wait for it.
    sha256: Arc<OnceLock<String>>,
    hashing: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl LoadedPlugin {
    /// Loads the plugin at `path` through the full handshake and runs its `init`.
    pub fn load(path: &Path) -> Result<LoadedPlugin, PluginError> {
        Self::load_from(path, path)
    }

    /// Loads the bytes at `source` (a supervisor's sealed copy, `/proc/self/fd/N`) as
    /// the plugin `path`: messages and `gem status` name `path`.
    pub(crate) fn load_from(path: &Path, source: &Path) -> Result<LoadedPlugin, PluginError> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let (library, copy) = open_private_copy(&path, source)?;
        let descriptor = handshake(&path, library)?;
        // SAFETY: both strings are static data of the never-unloaded library.
        let (name, version) =
            unsafe { (descriptor.name.as_bytes(), descriptor.version.as_bytes()) };
        let text = |bytes: &[u8], what: &str| {
            String::from_utf8(bytes.to_vec()).map_err(|_| PluginError::BadDescriptor {
                path: path.clone(),
                reason: format!("its {what} is not UTF-8"),
            })
        };
        let info = HandlerInfo {
            name: text(name, "name")?,
            version: text(version, "version")?,
            abi: Some(descriptor.abi_version),
            sha256: None,
            path: Some(path.clone()),
        };
        // SAFETY: the handshake checked the descriptor; `init` is called once, first.
        let error = unsafe { (descriptor.init)() };
        // SAFETY: an init error message stays valid for the life of the process.
        let message = unsafe { error.as_bytes() };
        if !message.is_empty() {
            return Err(PluginError::Init {
                path,
                message: String::from_utf8_lossy(message).into_owned(),
            });
        }
        let sha256 = Arc::new(OnceLock::new());
        let cell = sha256.clone();
        let hashing = std::thread::Builder::new()
            .name("gem-sha256".into())
            .spawn(move || {
                if let Ok(digest) = sha256_of(copy) {
                    let _ = cell.set(digest);
                }
            })
            .ok();
        Ok(LoadedPlugin {
            descriptor,
            info,
            sha256,
            hashing: Mutex::new(hashing),
        })
    }

    /// Waits for the `.so`'s SHA-256 (computed on a side thread since the load).
    pub fn wait_for_sha256(&self) -> Option<String> {
        let handle = self.hashing.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        self.sha256.get().cloned()
    }
}

/// The hex SHA-256 of the sealed copy (read from its start).
pub(crate) fn sha256_of(mut copy: std::fs::File) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    copy.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut copy, &mut hasher)?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The seals that make a memfd immutable for good: no shrinking, growing or writing,
/// and no change to the seals.
pub(crate) const SEALS: [memfd::FileSeal; 4] = [
    memfd::FileSeal::SealShrink,
    memfd::FileSeal::SealGrow,
    memfd::FileSeal::SealWrite,
    memfd::FileSeal::SealSeal,
];

/// A sealed in-memory copy of the bytes at `source` (the plugin `path`): nothing can
/// change it any more, whatever happens to the user's file. The kernel copies the bytes.
/// A supervisor keeps one per generation, to start a replacement from the very bytes
/// that reached ready.
pub(crate) fn sealed_copy(path: &Path, source: &Path) -> Result<memfd::Memfd, PluginError> {
    let read_err = |source| PluginError::Read {
        path: path.to_owned(),
        source,
    };
    let copy_err = |reason: String| PluginError::Copy {
        path: path.to_owned(),
        reason,
    };
    let mut source = std::fs::File::open(source).map_err(read_err)?;
    let memfd = memfd::MemfdOptions::new()
        .allow_sealing(true)
        .close_on_exec(true)
        .create("gem-plugin")
        .map_err(|e| copy_err(e.to_string()))?;
    let mut file = memfd.into_file();
    // Read errors (a directory, an unreadable file) are far likelier than memfd ones.
    std::io::copy(&mut source, &mut file).map_err(read_err)?;
    let memfd = memfd::Memfd::try_from_file(file)
        .map_err(|_| copy_err("the copy is not a memfd".into()))?;
    memfd
        .add_seals(&SEALS)
        .map_err(|e| copy_err(e.to_string()))?;
    Ok(memfd)
}

/// dlopens a [`sealed_copy`] of `source`, so that rewriting the user's file in place can
/// never change the code this process runs. Returns the library and a handle on the
/// copy, for hashing. The memfd and the library are leaked on purpose: never closing
/// the fd also keeps its `/proc/self/fd/N` name unique, so the dynamic loader can never
/// mistake a later plugin for this one.
fn open_private_copy(
    path: &Path,
    source: &Path,
) -> Result<(&'static Library, std::fs::File), PluginError> {
    let memfd = sealed_copy(path, source)?;
    let copy = memfd.as_file().try_clone().map_err(|e| PluginError::Copy {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let fd_path = format!("/proc/self/fd/{}", memfd.as_raw_fd());
    // SAFETY: loading runs the library's initialisers. A gem plugin is trusted code by
    // design (it serves every request); this is the one point where it starts running.
    let library = unsafe { Library::new(&fd_path) }.map_err(|source| PluginError::Open {
        path: path.to_owned(),
        source,
    })?;
    std::mem::forget(memfd);
    Ok((Box::leak(Box::new(library)), copy))
}

/// The ABI handshake: the version symbol first, then the entry point and the descriptor.
fn handshake(
    path: &Path,
    library: &'static Library,
) -> Result<&'static PluginDescriptor, PluginError> {
    let bad = |reason: &str| PluginError::BadDescriptor {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    // SAFETY: every gem plugin ABI exports this symbol with exactly this signature.
    let version = unsafe { library.get::<unsafe extern "C" fn() -> u32>(ABI_VERSION_SYMBOL) }
        .map_err(|_| PluginError::NotAPlugin {
            path: path.to_owned(),
        })?;
    // SAFETY: the signature matches, as above; the function takes no input.
    let plugin_abi = unsafe { version() };
    if plugin_abi != ABI_VERSION {
        return Err(PluginError::AbiMismatch {
            path: path.to_owned(),
            plugin: plugin_abi,
            host: ABI_VERSION,
        });
    }
    // SAFETY: a plugin of this ABI exports the entry point with this signature.
    let entry =
        unsafe { library.get::<unsafe extern "C" fn() -> *const PluginDescriptor>(ENTRY_SYMBOL) }
            .map_err(|_| bad(&format!("the `{ENTRY_SYMBOL}` symbol is missing")))?;
    // SAFETY: as above; the entry point only returns a pointer to a static.
    let descriptor = unsafe { entry() };
    // SAFETY: the entry point of a library of this ABI returns null or a static of the
    // never-unloaded library.
    unsafe { check_descriptor(path, descriptor) }
}

/// Checks the descriptor an entry point returned: its ABI and size first (reading only
/// the two leading fields until the layout is known to match), then the panic strategy.
///
/// # Safety
///
/// `descriptor` is null or points to a static (never freed) value at least 8 bytes
/// long whose first two `u32`s are `abi_version` and `struct_size`, followed by
/// `struct_size - 8` more bytes.
unsafe fn check_descriptor(
    path: &Path,
    descriptor: *const PluginDescriptor,
) -> Result<&'static PluginDescriptor, PluginError> {
    let bad = |reason: String| PluginError::BadDescriptor {
        path: path.to_owned(),
        reason,
    };
    if descriptor.is_null() {
        return Err(bad("the entry point returned null".into()));
    }
    let size = u32::try_from(std::mem::size_of::<PluginDescriptor>()).unwrap_or(u32::MAX);
    // SAFETY: non-null and static (the caller's contract). Only the two leading u32
    // fields are read before the size is known to match.
    let (abi, struct_size) = unsafe { ((*descriptor).abi_version, (*descriptor).struct_size) };
    if abi != ABI_VERSION {
        return Err(bad(format!(
            "it says ABI {abi}, but its `{ENTRY_SYMBOL}` symbol is for ABI {ABI_VERSION}"
        )));
    }
    if struct_size != size {
        return Err(PluginError::DescriptorSize {
            path: path.to_owned(),
            plugin: struct_size,
            host: size,
        });
    }
    // SAFETY: checked above: the layout matches this host's, and it lives forever.
    let descriptor = unsafe { &*descriptor };
    match descriptor.panic_strategy {
        PANIC_UNWIND => Ok(descriptor),
        PANIC_ABORT => Err(PluginError::PanicAbort {
            path: path.to_owned(),
        }),
        other => Err(bad(format!("its panic strategy {other} is unknown"))),
    }
}

impl Handler for LoadedPlugin {
    fn handle(&self, exchange: &mut Exchange<'_>) {
        let handle = self.descriptor.handle;
        // SAFETY: `raw` and everything it borrows outlive the call, and its callbacks
        // are this host's; the SDK catches panics, so nothing unwinds across.
        exchange.with_raw(false, |raw| unsafe { handle(raw) });
    }

    fn streams_body(&self, exchange: &mut Exchange<'_>) -> bool {
        let streams_body = self.descriptor.streams_body;
        // SAFETY: as in `handle`.
        exchange.with_raw(true, |raw| unsafe { streams_body(raw) })
    }

    /// A plugin cannot reach gem's runtime (its own copy of any crate has its own
    /// thread-locals), so nothing of gem's waits behind it.
    fn runs_inline(&self) -> bool {
        true
    }

    fn has_signal_hook(&self) -> bool {
        self.descriptor.on_signal.is_some()
    }

    fn on_signal(&self, signo: i32) {
        if let Some(hook) = self.descriptor.on_signal {
            // SAFETY: the hook takes a plain integer; the SDK catches panics.
            unsafe { hook(signo) };
        }
    }

    fn info(&self) -> HandlerInfo {
        HandlerInfo {
            sha256: self.sha256.get().cloned(),
            ..self.info.clone()
        }
    }
}

/// Headers lent to a handler from an array on the stack, up to this many (more take
/// one allocation).
const STACK_HEADERS: usize = 32;

/// The request body a handler gets.
#[derive(Debug)]
pub(crate) enum BodyIn {
    /// Read whole by the host (possibly empty).
    Whole(Bytes),
    /// Read by the handler chunk by chunk, as the client sends it; a chunk that takes
    /// longer than the `Duration` to come (`header_read_timeout`) fails the read, so a
    /// client that trickles its body cannot hold a blocking-pool thread for ever.
    Chunks(Incoming, Duration),
}

/// One request on its way through a handler: the request lent as views into hyper's
/// parsed head and the host's body, and the response the handler writes through the
/// host's callbacks (ABI 2, also for in-process handlers). Opaque outside gem.
#[derive(Debug)]
pub struct Exchange<'a> {
    head: Head<'a>,
    facts: ConnFacts,
    id: u64,
    state: State<'a>,
}

/// The parts of a request head a handler is lent, borrowed from the request itself
/// (so answering it takes no move of the request) or from its parts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head<'a> {
    pub(crate) method: &'a http::Method,
    pub(crate) uri: &'a http::Uri,
    pub(crate) version: Version,
    pub(crate) headers: &'a HeaderMap,
}

impl<'a> Head<'a> {
    pub(crate) fn of<B>(req: &'a http::Request<B>) -> Self {
        Head {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
        }
    }

    pub(crate) fn of_parts(parts: &'a http::request::Parts) -> Self {
        Head {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
        }
    }
}

/// What the host's callbacks read and write: `RawRequest::ctx` points here.
#[derive(Debug)]
struct State<'a> {
    /// Written in place: the caller's, so the response is not moved out of here.
    response: &'a mut HttpResponse<Body>,
    stream: Option<Stream>,
    error: Option<HandlerError>,
    /// The whole body, lent as `RawRequest::body` and once through `read_body`.
    whole: Bytes,
    whole_read: bool,
    /// The body the handler reads in chunks, how long one chunk may take, and the
    /// chunk lent last.
    chunks: Option<(Incoming, Duration)>,
    chunk: Bytes,
}

/// Where a streamed response body comes from.
#[derive(Debug)]
pub(crate) enum Stream {
    /// A producer that writes it on a thread of its own ([`start_stream`]).
    Push(Producer),
    /// A reader the host reads as the client takes it ([`crate::respond::Body::pull`]).
    Pull(Reader),
}

/// A handler's stream producer, owned by the host until it runs or is dropped.
#[derive(Debug)]
pub(crate) struct Producer(RawProducer);

/// A handler's body reader, owned by the host until it is dropped.
#[derive(Debug)]
pub(crate) struct Reader(RawReader);

// SAFETY: the ABI requires a reader's state to be movable to any thread (the SDK only
// accepts `Send` readers), and `read`/`drop` to be callable from any thread, one call
// at a time (`read` takes `&mut self`).
unsafe impl Send for Reader {}

impl Reader {
    /// Reads the next piece of the body into `buf`: how many bytes (0 at its end), or
    /// why the stream must be cut.
    pub(crate) fn read(&mut self, buf: &mut [u8]) -> Result<usize, String> {
        let mut error = RawStr::EMPTY;
        // SAFETY: the reader is not freed yet (only `Drop` frees it), and `buf` and
        // `error` are valid, writable and ours for the call.
        let n = unsafe { (self.0.read)(self.0.state, buf.as_mut_ptr(), buf.len(), &mut error) };
        match usize::try_from(n) {
            Ok(n) if n <= buf.len() => Ok(n),
            Ok(n) => Err(format!(
                "the stream failed: its reader said it read {n} bytes into {}",
                buf.len()
            )),
            Err(_) => {
                // SAFETY: a failed read points `error` at a message valid until the
                // next call (or leaves it empty); copied at once.
                let why = String::from_utf8_lossy(unsafe { error.as_bytes() }).into_owned();
                Err(match why.is_empty() {
                    true => "the stream failed: its reader gave no reason".to_owned(),
                    false => why,
                })
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // SAFETY: the reader is freed once, here, after its last read.
        unsafe { (self.0.drop)(self.0.state) };
    }
}

// SAFETY: the ABI requires a producer's state to be movable to any thread (the SDK
// only accepts `Send` producers), and `run`/`drop` to be callable from any thread.
unsafe impl Send for Producer {}

impl Drop for Producer {
    fn drop(&mut self) {
        if !self.0.state.is_null() {
            // SAFETY: the producer never ran (`run` nulls `state`), so it is dropped once.
            unsafe { (self.0.drop)(self.0.state) };
        }
    }
}

impl<'a> Exchange<'a> {
    /// A request for a handler: `head` from hyper, the connection's `facts`, its `id`;
    /// the handler's response is written into `response` (which should start empty).
    pub(crate) fn new(
        head: Head<'a>,
        facts: ConnFacts,
        id: u64,
        body: BodyIn,
        response: &'a mut HttpResponse<Body>,
    ) -> Self {
        let (whole, chunks) = match body {
            BodyIn::Whole(bytes) => (bytes, None),
            BodyIn::Chunks(incoming, patience) => (Bytes::new(), Some((incoming, patience))),
        };
        Exchange {
            head,
            facts,
            id,
            state: State {
                response,
                stream: None,
                error: None,
                whole,
                whole_read: false,
                chunks,
                chunk: Bytes::new(),
            },
        }
    }

    /// Answers with `f` (an in-process handler), through the same SDK glue and host
    /// callbacks as a plugin.
    pub(crate) fn respond_with(&mut self, f: impl FnOnce(&Request<'_>) -> Response) {
        // SAFETY: `raw` is valid for the call, with this host's callbacks.
        self.with_raw(false, |raw| unsafe {
            gem_plugin::__export::serve(raw, f);
        });
    }

    /// The handler's answer, the response itself being in the caller's `response`
    /// (its body empty or whole): where its streamed body comes from, or why there is
    /// no valid response.
    /// (By reference: the exchange is large, and moving it out to end it is a copy.)
    pub(crate) fn finish(&mut self) -> Result<Option<Stream>, HandlerError> {
        match self.state.error.take() {
            Some(err) => Err(err),
            None => Ok(self.state.stream.take()),
        }
    }

    /// Calls `f` with the ABI view of this request. `head_only`: for `streams_body`,
    /// before the body is read.
    fn with_raw<R>(&mut self, head_only: bool, f: impl FnOnce(&RawRequest) -> R) -> R {
        let view = |(name, value): (&HeaderName, &HeaderValue)| RawHeader {
            name: RawStr::from_bytes(name.as_str().as_bytes()),
            value: RawStr::from_bytes(value.as_bytes()),
        };
        let headers = self.head.headers;
        // Left uninitialised: only the views written below are lent.
        let mut stack = [const { MaybeUninit::<RawHeader>::uninit() }; STACK_HEADERS];
        let heap: Vec<RawHeader>;
        let lent: &[RawHeader] = if headers.len() <= STACK_HEADERS {
            for (slot, header) in stack.iter_mut().zip(headers) {
                slot.write(view(header));
            }
            // SAFETY: the loop wrote the first `headers.len()` slots (zip stops at the
            // shorter side, and the map holds no more than `STACK_HEADERS`); a
            // `RawHeader` is plain data, so nothing is left to drop.
            unsafe { std::slice::from_raw_parts(stack.as_ptr().cast::<RawHeader>(), headers.len()) }
        } else {
            heap = headers.iter().map(view).collect();
            &heap
        };
        let target = self.head.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let state = &mut self.state;
        let raw = RawRequest {
            method: RawStr::from_bytes(self.head.method.as_str().as_bytes()),
            target: RawStr::from_bytes(target.as_bytes()),
            headers: lent.as_ptr(),
            headers_len: lent.len(),
            body: match head_only {
                true => RawStr::EMPTY,
                false => RawStr::from_bytes(&state.whole),
            },
            version: version_number(self.head.version),
            scheme: match self.facts.scheme {
                Scheme::Http => SCHEME_HTTP,
                Scheme::Https => SCHEME_HTTPS,
            },
            peer: RawAddr::from(self.facts.peer),
            local: RawAddr::from(self.facts.local),
            request_id: self.id,
            body_streamed: u32::from(state.chunks.is_some()),
            host: &HOST,
            ctx: std::ptr::from_mut(state).cast::<c_void>(),
        };
        f(&raw)
    }
}

fn version_number(version: Version) -> u32 {
    match version {
        Version::HTTP_09 => 9,
        Version::HTTP_10 => 10,
        Version::HTTP_2 => 20,
        Version::HTTP_3 => 30,
        _ => 11,
    }
}

/// Header maps with room for this many headers at most are kept for reuse.
const SPARE_CAPACITY: usize = 48;

thread_local! {
    /// A request's header map, emptied, for the next response built on this thread.
    /// hyper in turn keeps each response's map (emptied) for the connection's next
    /// request head, so in steady state no header map is allocated at all.
    static SPARE_HEADERS: Cell<Option<HeaderMap>> = const { Cell::new(None) };
}

/// Keeps the header map of a request that has been answered, emptied, for the next
/// response built on this thread (unless it has no room, or too much).
pub(crate) fn recycle_headers(mut headers: HeaderMap) {
    let capacity = headers.capacity();
    if capacity == 0 || capacity > SPARE_CAPACITY {
        return;
    }
    headers.clear();
    // (`try_with`: not during the thread's own teardown.)
    let _ = SPARE_HEADERS.try_with(|spare| spare.set(Some(headers)));
}

/// An empty header map, with room if one was kept ([`recycle_headers`]).
fn spare_headers() -> HeaderMap {
    SPARE_HEADERS
        .try_with(Cell::take)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// This host's callbacks (see `gem_plugin::abi::HostApi`).
static HOST: HostApi = HostApi {
    struct_size: size_of::<HostApi>() as u32,
    set_status: host_set_status,
    add_header: host_add_header,
    set_body: host_set_body,
    set_body_stream: host_set_body_stream,
    read_body: host_read_body,
    fail: host_fail,
    set_body_reader: host_set_body_reader,
};

/// The request's state behind a callback's `ctx`.
///
/// # Safety
///
/// `ctx` is the `RawRequest::ctx` of a call in progress on this thread.
unsafe fn state<'s>(ctx: *mut c_void) -> &'s mut State<'s> {
    // SAFETY: the caller's contract: `with_raw` made it from a `&mut State` that
    // outlives the call, and nothing else touches it meanwhile.
    unsafe { &mut *ctx.cast::<State<'s>>() }
}

/// Bytes the handler passed, copied, or kept by pointer when static.
///
/// # Safety
///
/// `s` is valid now; with [`FLAG_STATIC`], for the life of the process.
unsafe fn bytes_of(s: RawStr, flags: u32) -> Bytes {
    if flags & FLAG_STATIC != 0 {
        // SAFETY: the caller's contract: static data of a never-unloaded library.
        let bytes: &'static [u8] = unsafe { s.as_bytes() };
        Bytes::from_static(bytes)
    } else {
        // SAFETY: valid now; copied before the callback returns.
        Bytes::copy_from_slice(unsafe { s.as_bytes() })
    }
}

impl State<'_> {
    fn invalid(&mut self, why: String) {
        self.error.get_or_insert(HandlerError::Invalid(why));
    }
}

unsafe extern "C" fn host_set_status(ctx: *mut c_void, status: u16) {
    // SAFETY: called by a handler during its call (the ABI's contract).
    let state = unsafe { state(ctx) };
    match StatusCode::from_u16(status) {
        Ok(status) => *state.response.status_mut() = status,
        Err(_) => state.invalid(format!("status {status} is not valid")),
    }
}

unsafe extern "C" fn host_add_header(ctx: *mut c_void, name: RawStr, value: RawStr, flags: u32) {
    // SAFETY: as in `host_set_status`.
    let state = unsafe { state(ctx) };
    // SAFETY: valid for the call.
    let (name_bytes, value_bytes) = unsafe { (name.as_bytes(), value.as_bytes()) };
    let (name, value) = match known_header(name_bytes, value_bytes) {
        Some(pair) => pair,
        None => {
            let Ok(name) = HeaderName::from_bytes(name_bytes) else {
                let name = String::from_utf8_lossy(name_bytes);
                return state.invalid(format!("header name {name:?} is not valid"));
            };
            // SAFETY: the ABI's contract for the value and its flags.
            let Ok(value) = HeaderValue::from_maybe_shared(unsafe { bytes_of(value, flags) })
            else {
                let value = String::from_utf8_lossy(value_bytes);
                return state.invalid(format!("header {name:?} has an invalid value {value:?}"));
            };
            remember_header(name_bytes, &name, &value);
            (name, value)
        }
    };
    let headers = state.response.headers_mut();
    if headers.capacity() == 0 {
        // The map replaced is `HeaderMap::new()`'s, which owns no memory ("will not
        // allocate", says its documentation): nothing is lost by not dropping it.
        std::mem::forget(std::mem::replace(headers, spare_headers()));
    }
    // `append` would panic past hyper's header map capacity (about 32k), and a panic
    // here, inside an `extern "C"` callback, would abort the server.
    if headers.try_append(name, value).is_err() {
        state.invalid("too many headers".to_owned());
    }
}

/// Header pairs that handlers on this thread sent lately, already checked: a handler
/// sends the same few (`content-type: text/plain`) with every response, and finding
/// one here costs a fraction of checking it again (or of copying an owned value).
const KNOWN_HEADERS: usize = 8;
/// Longer pairs (name and value) are checked every time instead of kept.
const KNOWN_HEADER_LEN: usize = 128;

struct KnownHeaders {
    pairs: [Option<(HeaderName, HeaderValue)>; KNOWN_HEADERS],
    /// The slot the next pair takes.
    next: usize,
}

thread_local! {
    static KNOWN: RefCell<KnownHeaders> = const {
        RefCell::new(KnownHeaders {
            pairs: [const { None }; KNOWN_HEADERS],
            next: 0,
        })
    };
}

/// A checked pair equal to `name` and `value`, if one was kept ([`remember_header`]).
fn known_header(name: &[u8], value: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    KNOWN
        .try_with(|known| {
            let known = known.try_borrow().ok()?;
            known
                .pairs
                .iter()
                .flatten()
                .find(|(n, v)| n.as_str().as_bytes() == name && v.as_bytes() == value)
                .cloned()
        })
        .ok()
        .flatten()
}

/// Keeps a checked pair for [`known_header`], in place of the oldest one kept, if the
/// handler sent `sent` as the name (already lower-case, so that it will be found).
fn remember_header(sent: &[u8], name: &HeaderName, value: &HeaderValue) {
    if sent != name.as_str().as_bytes() || sent.len() + value.len() > KNOWN_HEADER_LEN {
        return;
    }
    let _ = KNOWN.try_with(|known| {
        if let Ok(mut known) = known.try_borrow_mut() {
            let slot = known.next;
            known.pairs[slot] = Some((name.clone(), value.clone()));
            known.next = (slot + 1) % KNOWN_HEADERS;
        }
    });
}

unsafe extern "C" fn host_set_body(ctx: *mut c_void, body: RawStr, flags: u32) {
    // SAFETY: as in `host_set_status`.
    let state = unsafe { state(ctx) };
    // SAFETY: the ABI's contract for the bytes and their flags.
    *state.response.body_mut() = Body::full(unsafe { bytes_of(body, flags) });
    state.stream = None;
}

unsafe extern "C" fn host_set_body_stream(ctx: *mut c_void, producer: RawProducer) {
    // SAFETY: as in `host_set_status`.
    let state = unsafe { state(ctx) };
    *state.response.body_mut() = Body::empty();
    state.stream = Some(Stream::Push(Producer(producer)));
}

unsafe extern "C" fn host_set_body_reader(ctx: *mut c_void, reader: RawReader) {
    // SAFETY: as in `host_set_status`.
    let state = unsafe { state(ctx) };
    *state.response.body_mut() = Body::empty();
    state.stream = Some(Stream::Pull(Reader(reader)));
}

unsafe extern "C" fn host_read_body(ctx: *mut c_void, out: *mut RawStr) -> i32 {
    // SAFETY: as in `host_set_status`.
    let state = unsafe { state(ctx) };
    let Some((incoming, patience)) = state.chunks.as_mut() else {
        if state.whole_read || state.whole.is_empty() {
            return READ_END;
        }
        state.whole_read = true;
        // SAFETY: `out` is writable; the whole body lives until the call ends.
        unsafe { out.write(RawStr::from_bytes(&state.whole)) };
        return READ_CHUNK;
    };
    // A handler that reads its body in chunks runs on the blocking pool (a request
    // with a body never runs inline), where blocking on the runtime is allowed.
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return IO_ERROR;
    };
    loop {
        let next = tokio::time::timeout(*patience, http_body_util::BodyExt::frame(incoming));
        match runtime.block_on(next) {
            Ok(None) => return READ_END,
            Ok(Some(Err(_))) | Err(_) => return IO_ERROR,
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers
                };
                if data.is_empty() {
                    continue;
                }
                state.chunk = data;
                // SAFETY: `out` is writable; the chunk lives until the next read.
                unsafe { out.write(RawStr::from_bytes(&state.chunk)) };
                return READ_CHUNK;
            }
        }
    }
}

unsafe extern "C" fn host_fail(ctx: *mut c_void, message: RawStr) {
    // SAFETY: as in `host_set_status`.
    let state = unsafe { state(ctx) };
    // SAFETY: valid for the call.
    let message = String::from_utf8_lossy(unsafe { message.as_bytes() }).into_owned();
    state.error = Some(HandlerError::Panicked(message));
}

/// How many chunks a stream may have ready beyond the one being written: with the
/// producer's own buffer and [`STREAM_CHUNK`], this bounds a stream's memory whatever
/// the client's speed.
const STREAM_CHUNKS: usize = 1;
/// The largest chunk a producer's write is queued as: a larger write is split, so that
/// a producer writing 100 MiB at once does not make gem hold 100 MiB.
const STREAM_CHUNK: usize = 64 * 1024;

/// Starts `producer` on a thread of its own and returns the body that carries what it
/// writes. The body counts as a request in flight (`in_flight`) until it ends. A
/// producer that fails is logged with `what` (the method and target).
pub(crate) fn start_stream(
    producer: Producer,
    drain: DrainSignal,
    in_flight: Counted,
    what: String,
) -> Body {
    let (tx, rx) = mpsc::channel(STREAM_CHUNKS);
    let runtime = tokio::runtime::Handle::current();
    let sink = SinkState {
        tx,
        drain,
        runtime,
        what,
    };
    let spawned = std::thread::Builder::new()
        .name("gem-stream".into())
        .spawn(move || sink.run(producer));
    if let Err(err) = spawned {
        warn!(
            "[{}] no thread for a streamed body: {err}; the stream is cut",
            std::process::id()
        );
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Err(StreamCut));
        return Body::stream(rx, in_flight);
    }
    Body::stream(rx, in_flight)
}

/// What a running producer writes to: `RawSink::ctx` points here.
struct SinkState {
    tx: mpsc::Sender<Result<Bytes, StreamCut>>,
    drain: DrainSignal,
    runtime: tokio::runtime::Handle,
    what: String,
}

impl SinkState {
    fn run(self, mut producer: Producer) {
        // In-process producers may use the runtime (`Handle::current`).
        let _context = self.runtime.enter();
        let state = std::mem::replace(&mut producer.0.state, std::ptr::null_mut());
        let run = producer.0.run;
        let sink = RawSink {
            ctx: std::ptr::from_ref(&self).cast_mut().cast::<c_void>(),
            write: sink_write,
            is_draining: sink_is_draining,
            wait: sink_wait,
            fail: sink_fail,
        };
        // SAFETY: the producer runs once (its state was taken above, so `Drop` will
        // not free it too), with a sink valid for the call; the SDK catches panics.
        unsafe { run(state, &sink) };
    }
}

/// # Safety
///
/// `ctx` is a `RawSink::ctx` made by [`SinkState::run`], during the run.
unsafe fn sink<'s>(ctx: *mut c_void) -> &'s SinkState {
    // SAFETY: the caller's contract.
    unsafe { &*ctx.cast::<SinkState>() }
}

unsafe extern "C" fn sink_write(ctx: *mut c_void, chunk: RawStr) -> i32 {
    // SAFETY: called by the producer during its run.
    let sink = unsafe { sink(ctx) };
    // SAFETY: valid for the call; copied here, a piece at a time.
    let data = unsafe { chunk.as_bytes() };
    for piece in data.chunks(STREAM_CHUNK) {
        if sink
            .tx
            .blocking_send(Ok(Bytes::copy_from_slice(piece)))
            .is_err()
        {
            return IO_ERROR;
        }
    }
    0
}

unsafe extern "C" fn sink_is_draining(ctx: *mut c_void) -> bool {
    // SAFETY: as in `sink_write`.
    unsafe { sink(ctx) }.drain.is_draining()
}

unsafe extern "C" fn sink_wait(ctx: *mut c_void, timeout_ms: u64) -> i32 {
    // SAFETY: as in `sink_write`.
    let sink = unsafe { sink(ctx) };
    if sink.tx.is_closed() {
        return WAIT_GONE;
    }
    if sink.drain.is_draining() {
        return WAIT_DRAINING;
    }
    let timeout = std::time::Duration::from_millis(timeout_ms);
    sink.runtime.block_on(async {
        tokio::select! {
            biased;
            () = sink.tx.closed() => WAIT_GONE,
            () = sink.drain.draining() => WAIT_DRAINING,
            () = tokio::time::sleep(timeout) => WAIT_ELAPSED,
        }
    })
}

unsafe extern "C" fn sink_fail(ctx: *mut c_void, message: RawStr) {
    // SAFETY: as in `sink_write`.
    let sink = unsafe { sink(ctx) };
    // SAFETY: valid for the call.
    let message = String::from_utf8_lossy(unsafe { message.as_bytes() });
    warn!(
        "[{}] {}: {message}; the stream was cut",
        std::process::id(),
        sink.what
    );
    let _ = sink.tx.blocking_send(Err(StreamCut));
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;
