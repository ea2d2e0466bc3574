//! The safe request and response types that plugin authors (and in-process handlers) see.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::abi::{self, RawHeader, RawRequest};

/// The HTTP version a request came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Version {
    /// HTTP/0.9.
    Http09,
    /// HTTP/1.0.
    Http10,
    /// HTTP/1.1.
    Http11,
    /// HTTP/2.
    Http2,
    /// HTTP/3.
    Http3,
}

impl Version {
    /// `HTTP/1.1`, `HTTP/2`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http09 => "HTTP/0.9",
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
            Version::Http2 => "HTTP/2",
            Version::Http3 => "HTTP/3",
        }
    }

    /// From the ABI's major * 10 + minor.
    pub fn from_abi(v: u32) -> Version {
        match v {
            9 => Version::Http09,
            10 => Version::Http10,
            20 => Version::Http2,
            30 => Version::Http3,
            _ => Version::Http11,
        }
    }

    /// To the ABI's major * 10 + minor.
    pub fn to_abi(self) -> u32 {
        match self {
            Version::Http09 => 9,
            Version::Http10 => 10,
            Version::Http11 => 11,
            Version::Http2 => 20,
            Version::Http3 => 30,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the connection is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// Cleartext.
    Http,
    /// Over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request's headers are: the host's array, or a test's pairs.
#[derive(Clone, Copy)]
enum Headers<'a> {
    Raw(&'a [RawHeader]),
    Pairs(&'a [(&'a str, &'a [u8])]),
}

/// A request as seen by a handler: views into what gem already holds, valid for the
/// duration of one call. Nothing is copied to build it.
#[derive(Clone)]
pub struct Request<'a> {
    method: &'a str,
    target: &'a str,
    headers: Headers<'a>,
    body: &'a [u8],
    version: Version,
    scheme: Scheme,
    peer: Option<SocketAddr>,
    local: Option<SocketAddr>,
    id: u64,
    /// The host's request, for reading a streamed body.
    raw: Option<&'a RawRequest>,
    /// Set once a [`BodyReader`] reads from the host: a chunk the host lends is valid
    /// only until its next read, so a second reader (of this request or a clone) could
    /// read past the first one's chunk. Shared by the clones of one request.
    reader_taken: Option<&'a Cell<bool>>,
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("version", &self.version)
            .field("peer", &self.peer_addr())
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `bytes` as text if they are UTF-8; checked word by word when they are ASCII, as a
/// method and a target (the path and the query) from gem always are.
fn text(bytes: &[u8]) -> Option<&str> {
    match bytes.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        #[allow(unsafe_code)]
        true => Some(unsafe { std::str::from_utf8_unchecked(bytes) }),
        false => std::str::from_utf8(bytes).ok(),
    }
}

impl<'a> Request<'a> {
    /// Builds a request view, e.g. to unit-test a handler. `target` is the path with its
    /// optional `?query`. It is HTTP/1.1 over `http` with no addresses until the `with_`
    /// methods say otherwise.
    pub fn new(
        method: &'a str,
        target: &'a str,
        headers: &'a [(&'a str, &'a [u8])],
        body: &'a [u8],
    ) -> Self {
        Request {
            method,
            target,
            headers: Headers::Pairs(headers),
            body,
            version: Version::Http11,
            scheme: Scheme::Http,
            peer: None,
            local: None,
            id: 0,
            raw: None,
            reader_taken: None,
        }
    }

    /// Sets the client's and the local address.
    pub fn with_addrs(mut self, peer: SocketAddr, local: SocketAddr) -> Self {
        (self.peer, self.local) = (Some(peer), Some(local));
        self
    }

    /// Sets the HTTP version.
    pub fn with_version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }

    /// Sets the scheme.
    pub fn with_scheme(mut self, scheme: Scheme) -> Self {
        self.scheme = scheme;
        self
    }

    /// A view of the host's request. `None` when its method or target is not UTF-8.
    ///
    /// # Safety
    ///
    /// Every pointer in `raw` must be valid for `'a`, as the ABI promises for the
    /// duration of a `handle` call. `reader_taken` starts `false`, one per call.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn from_raw(
        raw: &'a RawRequest,
        reader_taken: &'a Cell<bool>,
    ) -> Option<Self> {
        // SAFETY: the caller guarantees the strings are valid for 'a.
        let (method, target, body) = unsafe {
            (
                raw.method.as_bytes(),
                raw.target.as_bytes(),
                raw.body.as_bytes(),
            )
        };
        let headers = match raw.headers.is_null() || raw.headers_len == 0 {
            true => &[][..],
            // SAFETY: the caller guarantees `headers_len` valid headers at `headers`.
            false => unsafe { std::slice::from_raw_parts(raw.headers, raw.headers_len) },
        };
        Some(Request {
            method: text(method)?,
            target: text(target)?,
            headers: Headers::Raw(headers),
            body,
            version: Version::from_abi(raw.version),
            scheme: match raw.scheme {
                abi::SCHEME_HTTPS => Scheme::Https,
                _ => Scheme::Http,
            },
            // Read from `raw` when asked for (most handlers never ask).
            peer: None,
            local: None,
            id: raw.request_id,
            raw: Some(raw),
            reader_taken: Some(reader_taken),
        })
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The request target as sent: the path and the optional `?query`.
    pub fn target(&self) -> &'a str {
        self.target
    }

    /// The path, without the query.
    pub fn path(&self) -> &'a str {
        self.split_query().0
    }

    /// The raw query string after `?`, if any.
    pub fn query(&self) -> Option<&'a str> {
        self.split_query().1
    }

    /// The target split at its first `?` (a byte search: `?` is ASCII, and targets are
    /// short).
    fn split_query(&self) -> (&'a str, Option<&'a str>) {
        let target: &'a str = self.target;
        match target.bytes().position(|b| b == b'?') {
            Some(at) => (&target[..at], Some(&target[at + 1..])),
            None => (target, None),
        }
    }

    /// The first value of query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query()?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All headers in the order received (names lower-case when they came from gem).
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let (raw, pairs) = match self.headers {
            Headers::Raw(raw) => (raw, &[][..]),
            Headers::Pairs(pairs) => (&[][..], pairs),
        };
        raw.iter()
            .filter_map(|h| {
                // SAFETY: header strings are valid for 'a (see `from_raw`).
                #[allow(unsafe_code)]
                let (name, value) = unsafe { (h.name.as_bytes(), h.value.as_bytes()) };
                Some((std::str::from_utf8(name).ok()?, value))
            })
            .chain(pairs.iter().copied())
    }

    /// The whole request body. Empty for a handler that reads it in chunks (see
    /// [`Plugin::streams_body`](crate::Plugin::streams_body)).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The body as a reader: chunk by chunk as the client sends it, when
    /// [`Plugin::streams_body`](crate::Plugin::streams_body) asked for that, otherwise
    /// the whole body at once. Also a [`BufRead`](io::BufRead), whose `fill_buf` lends
    /// each chunk without a copy. One reader per request reads from gem: a second one
    /// (also of a clone of the request) fails its first read.
    pub fn body_reader(&self) -> BodyReader<'a> {
        let second = match (self.raw, self.reader_taken) {
            (Some(_), Some(taken)) => taken.replace(true),
            (Some(_), None) => true,
            (None, _) => false,
        };
        BodyReader {
            raw: self.raw.filter(|_| !second),
            chunk: match self.raw {
                Some(_) => &[],
                None => self.body,
            },
            ended: second,
            second,
        }
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// `http`, or `https` for a connection over TLS.
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// The client's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer
            .or_else(|| self.raw.and_then(|raw| raw.peer.to_socket_addr()))
    }

    /// The local address the client connected to.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
            .or_else(|| self.raw.and_then(|raw| raw.local.to_socket_addr()))
    }

    /// A number unique to this request within the serving process (0 in a test).
    pub fn id(&self) -> u64 {
        self.id
    }
}

/// A request body, read chunk by chunk. See [`Request::body_reader`].
#[derive(Debug)]
pub struct BodyReader<'a> {
    raw: Option<&'a RawRequest>,
    /// What is left of the current chunk.
    chunk: &'a [u8],
    ended: bool,
    /// Another reader of this request reads from gem: this one may not.
    second: bool,
}

impl BodyReader<'_> {
    /// The next chunk, copied out (`None` at the end). [`io::BufRead::fill_buf`] lends
    /// it instead.
    pub fn next_chunk(&mut self) -> io::Result<Option<Vec<u8>>> {
        use io::BufRead as _;
        let chunk = self.fill_buf()?.to_vec();
        self.consume(chunk.len());
        Ok((!chunk.is_empty()).then_some(chunk))
    }
}

impl io::BufRead for BodyReader<'_> {
    #[allow(unsafe_code)]
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.second {
            return Err(io::Error::other(
                "the request body is already read by another BodyReader of this request",
            ));
        }
        while self.chunk.is_empty() && !self.ended {
            let Some(raw) = self.raw else {
                self.ended = true;
                break;
            };
            let mut out = abi::RawStr::EMPTY;
            // SAFETY: `raw.host` and `raw.ctx` are valid during the call that lent
            // `raw`, on this thread (a `Request` is neither `Send` nor `Sync`).
            let got = unsafe { ((*raw.host).read_body)(raw.ctx, &mut out) };
            match got {
                abi::READ_CHUNK => {
                    // SAFETY: the chunk is valid until the next read, and this reader
                    // holds it only until then (the lifetime is the call's, and the
                    // next `fill_buf` replaces it before anything reads it again).
                    self.chunk = unsafe { out.as_bytes() };
                }
                abi::READ_END => self.ended = true,
                _ => {
                    self.ended = true;
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the request body could not be read",
                    ));
                }
            }
        }
        Ok(self.chunk)
    }

    fn consume(&mut self, amt: usize) {
        self.chunk = &self.chunk[amt.min(self.chunk.len())..];
    }
}

impl io::Read for BodyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use io::BufRead as _;
        let chunk = self.fill_buf()?;
        let n = chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&chunk[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Text in a response head: static text is handed to gem without a copy.
pub type Text = Cow<'static, str>;

/// What a streamed body runs: it writes the body (see [`Response::stream`]).
pub type Producer = Box<dyn FnOnce(&mut BodyWriter<'_>) -> io::Result<()> + Send>;

/// A response body. More kinds may come in later versions (readers came in 0.3).
#[non_exhaustive]
pub enum Body {
    /// No body.
    Empty,
    /// Static bytes, handed to gem without a copy.
    Static(&'static [u8]),
    /// Owned bytes, copied once into gem's response.
    Bytes(Vec<u8>),
    /// Produced on a thread of gem's while the client reads it. See
    /// [`Response::stream`].
    Stream(Producer),
    /// Read by gem into its own buffers as the client takes it. See
    /// [`Response::reader`].
    Reader(Box<dyn io::Read + Send>),
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Empty => f.write_str("Empty"),
            Body::Static(b) => write!(f, "Static({} bytes)", b.len()),
            Body::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Body::Stream(_) => f.write_str("Stream"),
            Body::Reader(_) => f.write_str("Reader"),
        }
    }
}

impl Body {
    /// The bytes, unless it is a stream or a reader.
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Body::Empty => Some(&[]),
            Body::Static(b) => Some(b),
            Body::Bytes(b) => Some(b),
            Body::Stream(_) | Body::Reader(_) => None,
        }
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Body {
        Body::Static(s.as_bytes())
    }
}

impl From<&'static [u8]> for Body {
    fn from(b: &'static [u8]) -> Body {
        Body::Static(b)
    }
}

impl<const N: usize> From<&'static [u8; N]> for Body {
    fn from(b: &'static [u8; N]) -> Body {
        Body::Static(b)
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Body::Bytes(s.into_bytes())
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Body {
        Body::Bytes(b)
    }
}

/// Headers kept inline up to this many, so a small response allocates nothing.
const INLINE_HEADERS: usize = 4;

/// A response built by a handler. gem validates the status and headers; invalid ones
/// turn into a 500 and a log line.
///
/// Static text (`&'static str`) in the head and body is handed to gem without a copy;
/// owned text (`String`, `Vec<u8>`) is copied once.
#[derive(Debug)]
pub struct Response {
    status: u16,
    inline: [(Text, Text); INLINE_HEADERS],
    inline_len: usize,
    more: Vec<(Text, Text)>,
    body: Body,
}

impl Response {
    /// An empty response with `status`.
    #[inline(always)]
    pub fn new(status: u16) -> Self {
        const NONE: (Text, Text) = (Cow::Borrowed(""), Cow::Borrowed(""));
        Response {
            status,
            inline: [NONE; INLINE_HEADERS],
            inline_len: 0,
            more: Vec::new(),
            body: Body::Empty,
        }
    }

    /// A `text/plain; charset=utf-8` response.
    #[inline(always)]
    pub fn text(status: u16, body: impl Into<Body>) -> Self {
        Response::new(status)
            .with_header("content-type", "text/plain; charset=utf-8")
            .with_body(body)
    }

    /// A response whose body `produce` writes while the client reads it, on a thread
    /// of gem's, after the head is sent. `produce` may block (sleep, read a file): a
    /// write waits while the client is slow, so memory stays bounded. It should end
    /// when a write fails (the client is gone, or the stream was cut at the end of a
    /// drain), and soon after [`BodyWriter::draining`] turns true. A panic or an `Err`
    /// cuts the stream (the client sees it end early) and is logged.
    pub fn stream<F>(status: u16, produce: F) -> Self
    where
        F: FnOnce(&mut BodyWriter<'_>) -> io::Result<()> + Send + 'static,
    {
        Response::new(status).with_body(Body::Stream(Box::new(produce)))
    }

    /// A response whose body gem reads from `reader` as the client takes it: each
    /// read fills one of gem's buffers (up to 64 KiB), which is sent as it is, so
    /// nothing is copied on gem's side and a slow client holds the reads back. The
    /// way to send a file, or generated bytes, of any size.
    ///
    /// gem calls `read` wherever it can do so soonest, possibly right on the thread
    /// that serves the connection, as it calls [`Plugin::handle`](crate::Plugin::handle):
    /// a read may take as long as a file read, but should not wait for something to
    /// happen (a network peer, a timer, a queue), and dropping the reader should be as
    /// quick (closing a file, not joining a thread). A body that waits, or that should
    /// end early when gem drains, is a [`Response::stream`]. A panic or an `Err` (other
    /// than [`io::ErrorKind::Interrupted`], which is retried) cuts the body (the client
    /// sees it end early) and is logged.
    pub fn reader<R>(status: u16, reader: R) -> Self
    where
        R: io::Read + Send + 'static,
    {
        Response::new(status).with_body(Body::Reader(Box::new(reader)))
    }

    /// A response streaming the chunks of `chunks`, each sent as it comes (see
    /// [`Response::stream`]).
    pub fn chunks<I>(status: u16, chunks: I) -> Self
    where
        I: IntoIterator + Send + 'static,
        I::IntoIter: Send,
        I::Item: AsRef<[u8]>,
    {
        Response::stream(status, move |w| {
            for chunk in chunks {
                w.send(chunk.as_ref())?;
            }
            Ok(())
        })
    }

    /// Adds a header.
    #[inline(always)]
    pub fn with_header(mut self, name: impl Into<Text>, value: impl Into<Text>) -> Self {
        let header = (name.into(), value.into());
        match self.inline.get_mut(self.inline_len) {
            Some(slot) => {
                *slot = header;
                self.inline_len += 1;
            }
            None => self.more.push(header),
        }
        self
    }

    /// Replaces the body.
    #[inline(always)]
    pub fn with_body(mut self, body: impl Into<Body>) -> Self {
        self.body = body.into();
        self
    }

    /// The status.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inline[..self.inline_len]
            .iter()
            .chain(&self.more)
            .map(|(n, v)| (n.as_ref(), v.as_ref()))
    }

    /// The body.
    pub fn body(&self) -> &Body {
        &self.body
    }

    /// The status, the headers and the body (taken, leaving it empty), for the SDK's
    /// glue: borrowed rather than moved, as a response is a few hundred bytes.
    pub(crate) fn parts(&mut self) -> (u16, impl Iterator<Item = &(Text, Text)>, Body) {
        let body = std::mem::replace(&mut self.body, Body::Empty);
        let headers = self.inline[..self.inline_len].iter().chain(&self.more);
        (self.status, headers, body)
    }
}

/// How [`BodyWriter::wait`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The time passed.
    Elapsed,
    /// A drain has begun: end the stream soon.
    Draining,
    /// The client is gone, or the stream was cut: stop.
    Gone,
}

/// Writes a streamed body (see [`Response::stream`]). Writes are buffered up to
/// 64 KiB; [`flush`](io::Write::flush) (or [`send`](BodyWriter::send)) sends at once,
/// e.g. after each server-sent event.
pub struct BodyWriter<'a> {
    sink: Sink<'a>,
    buf: Vec<u8>,
    gone: bool,
}

/// Where a [`BodyWriter`] sends its chunks.
pub(crate) enum Sink<'a> {
    /// gem's.
    Raw(&'a abi::RawSink),
    /// A test's, collecting chunks.
    Collect(&'a mut Vec<Vec<u8>>),
}

impl fmt::Debug for BodyWriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyWriter")
            .field("buffered", &self.buf.len())
            .field("gone", &self.gone)
            .finish_non_exhaustive()
    }
}

const WRITE_BUFFER: usize = 64 * 1024;
/// The buffer gem hands a [`Response::reader`]'s reads.
const READ_BUFFER: usize = 64 * 1024;

impl<'a> BodyWriter<'a> {
    pub(crate) fn new(sink: Sink<'a>) -> Self {
        BodyWriter {
            sink,
            buf: Vec::new(),
            gone: false,
        }
    }

    /// Runs `body`'s producer (or reads its reader, 64 KiB at a time, as gem does)
    /// into a list of chunks, without gem: for unit tests of a handler. `None` if the
    /// body is neither a stream nor a reader.
    pub fn collect(body: Body) -> Option<io::Result<Vec<Vec<u8>>>> {
        let produce = match body {
            Body::Stream(produce) => produce,
            Body::Reader(mut reader) => return Some(read_chunks(&mut reader)),
            _ => return None,
        };
        let mut chunks = Vec::new();
        let mut w = BodyWriter::new(Sink::Collect(&mut chunks));
        let result = produce(&mut w).and_then(|()| io::Write::flush(&mut w));
        drop(w);
        Some(result.map(|()| chunks))
    }

    /// Sends the buffered bytes and then `chunk`, at once. Blocks while the client is
    /// slow; fails once it is gone.
    pub fn send(&mut self, chunk: &[u8]) -> io::Result<()> {
        io::Write::flush(self)?;
        self.send_now(chunk)
    }

    #[allow(unsafe_code)]
    fn send_now(&mut self, chunk: &[u8]) -> io::Result<()> {
        if self.gone {
            return Err(gone());
        }
        if chunk.is_empty() {
            return Ok(());
        }
        match &mut self.sink {
            Sink::Raw(sink) => {
                // SAFETY: the sink is valid during `run`, which lent it to this writer.
                let rc = unsafe { (sink.write)(sink.ctx, abi::RawStr::from_bytes(chunk)) };
                if rc != 0 {
                    self.gone = true;
                    return Err(gone());
                }
            }
            Sink::Collect(chunks) => chunks.push(chunk.to_vec()),
        }
        Ok(())
    }

    /// Whether gem has begun to drain (a shutdown, or the old side of an upgrade): a
    /// long stream should say goodbye and end.
    #[allow(unsafe_code)]
    pub fn draining(&self) -> bool {
        match &self.sink {
            // SAFETY: as in `send_now`.
            Sink::Raw(sink) => unsafe { (sink.is_draining)(sink.ctx) },
            Sink::Collect(_) => false,
        }
    }

    /// Sleeps for `d`, waking early when a drain begins or the client goes. Sends what
    /// is buffered first.
    #[allow(unsafe_code)]
    pub fn wait(&mut self, d: Duration) -> Wait {
        if io::Write::flush(self).is_err() {
            return Wait::Gone;
        }
        match &self.sink {
            Sink::Raw(sink) => {
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                // SAFETY: as in `send_now`.
                match unsafe { (sink.wait)(sink.ctx, ms) } {
                    abi::WAIT_ELAPSED => Wait::Elapsed,
                    abi::WAIT_DRAINING => Wait::Draining,
                    _ => {
                        self.gone = true;
                        Wait::Gone
                    }
                }
            }
            Sink::Collect(_) => {
                std::thread::sleep(d);
                Wait::Elapsed
            }
        }
    }
}

/// What gem would send of `reader`: one chunk per read, as it reads it.
fn read_chunks(reader: &mut dyn io::Read) -> io::Result<Vec<Vec<u8>>> {
    let mut chunks = Vec::new();
    let mut buf = vec![0; READ_BUFFER];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(chunks),
            Ok(n) => chunks.push(buf[..n].to_vec()),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the client is gone or the stream was cut",
    )
}

impl io::Write for BodyWriter<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.gone {
            return Err(gone());
        }
        if self.buf.is_empty() && data.len() >= WRITE_BUFFER {
            self.send_now(data)?;
            return Ok(data.len());
        }
        let n = data.len().min(WRITE_BUFFER - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return match self.gone {
                true => Err(gone()),
                false => Ok(()),
            };
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.send_now(&buf);
        self.buf = buf;
        self.buf.clear();
        result
    }
}

impl BodyWriter<'_> {
    /// Whether the client went away (a write failed).
    pub(crate) fn is_gone(&self) -> bool {
        self.gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Read, Write};

    #[test]
    fn request_helpers_split_the_target_and_find_headers() {
        let headers: &[(&str, &[u8])] = &[("Content-Type", b"text/plain"), ("x-a", b"1")];
        let req = Request::new("GET", "/sleep?ms=15&x&y=2", headers, b"body");
        assert_eq!(req.path(), "/sleep");
        assert_eq!(req.query(), Some("ms=15&x&y=2"));
        assert_eq!(req.query_param("ms"), Some("15"));
        assert_eq!(req.query_param("x"), Some(""));
        assert_eq!(req.query_param("z"), None);
        assert_eq!(req.header("content-type"), Some(&b"text/plain"[..]));
        assert_eq!(req.header("missing"), None);
        assert_eq!(req.body(), b"body");
        assert_eq!(req.headers().count(), 2);
        let mut all = String::new();
        req.body_reader().read_to_string(&mut all).unwrap();
        assert_eq!(all, "body");
        let bare = Request::new("GET", "/", &[], b"");
        assert_eq!((bare.path(), bare.query()), ("/", None));
        assert_eq!(bare.body_reader().fill_buf().unwrap(), b"");
        assert_eq!(
            (bare.version(), bare.scheme()),
            (Version::Http11, Scheme::Http)
        );
        let peer: SocketAddr = "10.0.0.1:5555".parse().unwrap();
        let local: SocketAddr = "[::1]:80".parse().unwrap();
        let req = bare
            .with_addrs(peer, local)
            .with_version(Version::Http2)
            .with_scheme(Scheme::Https);
        assert_eq!(
            (req.peer_addr(), req.local_addr()),
            (Some(peer), Some(local))
        );
        assert_eq!(req.version().to_string(), "HTTP/2");
        assert_eq!(req.scheme().as_str(), "https");
    }

    #[test]
    fn addresses_cross_the_abi_intact() {
        for a in ["10.0.0.1:5555", "[fe80::1%2]:80", "[::1]:443"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(abi::RawAddr::from(addr).to_socket_addr(), Some(addr));
        }
        assert_eq!(abi::RawAddr::NONE.to_socket_addr(), None);
    }

    #[test]
    fn responses_build_up() {
        let r = Response::text(201, "hi").with_header("x-a", "1");
        assert_eq!(r.status(), 201);
        assert_eq!(r.body().as_bytes(), Some(&b"hi"[..]));
        assert!(matches!(r.body(), Body::Static(_)));
        assert!(r.headers().any(|h| h == ("x-a", "1")));
        let many = (0..10).fold(Response::new(200), |r, i| {
            r.with_header(format!("x-{i}"), i.to_string())
        });
        let names: Vec<_> = many.headers().map(|(n, _)| n.to_owned()).collect();
        assert_eq!(names.len(), 10);
        assert_eq!((names[0].as_str(), names[9].as_str()), ("x-0", "x-9"));
        assert!(matches!(
            Response::text(200, String::from("x")).body(),
            Body::Bytes(_)
        ));
    }

    #[test]
    fn streams_collect_their_chunks() {
        let mut r = Response::stream(200, |w| {
            w.write_all(b"a")?;
            w.write_all(b"b")?;
            w.flush()?;
            w.send(b"c")
        });
        let chunks = BodyWriter::collect(r.parts().2).unwrap().unwrap();
        assert_eq!(chunks, vec![b"ab".to_vec(), b"c".to_vec()]);
        let mut r = Response::chunks(200, vec!["x", "y"]);
        let chunks = BodyWriter::collect(r.parts().2).unwrap().unwrap();
        assert_eq!(chunks, vec![b"x".to_vec(), b"y".to_vec()]);
        assert!(BodyWriter::collect(Body::Empty).is_none());
    }
}
