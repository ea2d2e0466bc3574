//! Loads a handler `.so`: reads a private copy into a sealed memfd, dlopens that, checks
//! the ABI handshake before touching anything else (refusing a plugin whose panics
//! would abort instead of unwind), and calls the plugin panic-safely.
#![allow(unsafe_code)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use gem_plugin::abi::{
    ABI_VERSION, ABI_VERSION_SYMBOL, ENTRY_SYMBOL, PANIC_ABORT, PANIC_UNWIND, PluginDescriptor,
    RawHeader, RawRequest, RawResponse, RawStr,
};
use libloading::Library;
use sha2::{Digest, Sha256};

use crate::handler::{Handler, HandlerError, HandlerInfo, Request, Response};

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
        "plugin {} was built for gem plugin ABI {plugin}, but this gem speaks ABI {host}; rebuild it against gem-plugin {host}.x",
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
        .add_seals(&[
            memfd::FileSeal::SealShrink,
            memfd::FileSeal::SealGrow,
            memfd::FileSeal::SealWrite,
            memfd::FileSeal::SealSeal,
        ])
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
    // SAFETY: a plugin of ABI 1 exports the entry point with this signature.
    let entry =
        unsafe { library.get::<unsafe extern "C" fn() -> *const PluginDescriptor>(ENTRY_SYMBOL) }
            .map_err(|_| bad(&format!("the `{ENTRY_SYMBOL}` symbol is missing")))?;
    // SAFETY: as above; the entry point only returns a pointer to a static.
    let descriptor = unsafe { entry() };
    // SAFETY: the entry point of an ABI 1 library returns null or a static of the
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
    fn handle(&self, req: &Request<'_>) -> Result<Response, HandlerError> {
        let headers: Vec<RawHeader> = req
            .headers()
            .iter()
            .map(|(n, v)| RawHeader {
                name: RawStr::from_bytes(n.as_bytes()),
                value: RawStr::from_bytes(v),
            })
            .collect();
        let raw = RawRequest {
            method: RawStr::from_bytes(req.method().as_bytes()),
            target: RawStr::from_bytes(req.target().as_bytes()),
            headers: headers.as_ptr(),
            headers_len: headers.len(),
            body: RawStr::from_bytes(req.body()),
        };
        let mut resp = RawResponse {
            status: 0,
            headers: std::ptr::null(),
            headers_len: 0,
            body: RawStr::EMPTY,
            error: RawStr::EMPTY,
            owner: std::ptr::null_mut(),
        };
        // SAFETY: `raw` and everything it borrows outlive the call; `resp` is writable.
        // The SDK catches panics, so nothing unwinds across the boundary.
        unsafe { (self.descriptor.handle)(&raw, &mut resp) };
        let result = copy_response(&resp);
        // SAFETY: `resp` was filled by this plugin's `handle` and is freed once.
        unsafe { (self.descriptor.free_response)(&mut resp) };
        result
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

/// Copies a plugin's response into host-owned memory. The plugin keeps everything `resp`
/// points to alive until `free_response`, which the caller runs only after this returns.
fn copy_response(resp: &RawResponse) -> Result<Response, HandlerError> {
    if resp.status == 0 {
        // SAFETY: alive until `free_response`, as above.
        let message = unsafe { resp.error.as_bytes() };
        return Err(HandlerError::Panicked(
            String::from_utf8_lossy(message).into_owned(),
        ));
    }
    let raw_headers = match resp.headers.is_null() {
        true => &[][..],
        // SAFETY: `headers_len` headers at `headers`, alive as above.
        false => unsafe { std::slice::from_raw_parts(resp.headers, resp.headers_len) },
    };
    let text = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| HandlerError::Invalid("a header is not UTF-8".into()))
    };
    let mut headers = Vec::with_capacity(raw_headers.len());
    for h in raw_headers {
        // SAFETY: header strings are alive as above.
        let (name, value) = unsafe { (h.name.as_bytes(), h.value.as_bytes()) };
        headers.push((text(name)?, text(value)?));
    }
    // SAFETY: alive as above.
    let body = unsafe { resp.body.as_bytes() }.to_vec();
    Ok(Response {
        status: resp.status,
        headers,
        body,
    })
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;
