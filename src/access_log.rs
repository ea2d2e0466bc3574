//! The access log: one line per request, formatted and written on a thread of its own,
//! never on the request path.
//!
//! [`AccessLog::log`] hands an [`Entry`] to a bounded channel without blocking; one
//! writer thread ("gem-access-log") formats the lines into a buffer and writes it out
//! whenever the channel is momentarily empty, the buffer is large, or
//! [`FLUSH_EVERY`] has passed, so lines reach the file promptly. What cannot be queued
//! (a full channel) or written (a full disk) is dropped and counted, never waited for.
//! The file is opened with `O_APPEND`, so the generations of an upgrade can write to
//! the same file at once without overwriting each other's lines.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::warn;

use crate::config::{AccessLog as Target, AccessLogFormat};
use crate::error::Error;

/// Entries the channel holds before new ones are dropped.
const CAPACITY: usize = 8192;
/// The buffer is written out at the latest when it holds this many bytes.
const FLUSH_BYTES: usize = 64 * 1024;
/// The buffer is written out at the latest this long after the previous write, even
/// when the channel never runs empty.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How long the writer lets lines gather once it has written all it had, before it
/// sleeps until the next line.
const GATHER: Duration = Duration::from_millis(10);
/// After a failed reopen, the next attempt waits this long (the old file is kept).
const REOPEN_RETRY: Duration = Duration::from_secs(1);
/// How long dropping the last clone waits for the writer to write what is queued.
const EXIT_WAIT: Duration = Duration::from_secs(5);
/// The permissions of a file the log creates (before the umask).
const FILE_MODE: u32 = 0o640;

/// What the request path hands over, owned: the request's parts the line needs.
#[derive(Debug)]
pub(crate) struct Entry {
    /// When the request arrived.
    pub(crate) time: SystemTime,
    /// The client's address.
    pub(crate) peer: SocketAddr,
    /// The request method.
    pub(crate) method: http::Method,
    /// The request target.
    pub(crate) uri: http::Uri,
    /// The HTTP version of the request.
    pub(crate) version: http::Version,
    /// The `Referer` header, if any.
    pub(crate) referer: Option<http::HeaderValue>,
    /// The `User-Agent` header, if any.
    pub(crate) user_agent: Option<http::HeaderValue>,
    /// The response status.
    pub(crate) status: u16,
    /// Response body bytes.
    pub(crate) bytes: u64,
    /// How long the request took.
    pub(crate) took: Duration,
    /// gem's generation that served it.
    pub(crate) generation: u64,
}

/// A running access log. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct AccessLog {
    /// Shared by the clones; dropping the last one ends the writer thread.
    inner: Arc<Inner>,
}

/// The state every clone shares. Dropping it (with the last clone) closes the channel
/// and waits for the writer to write what is queued.
#[derive(Debug)]
struct Inner {
    /// The writer thread's channel.
    tx: SyncSender<Msg>,
    /// Counters and flags shared with the writer thread.
    shared: Arc<Shared>,
    /// The writer thread, waited for on drop.
    writer: WriterThread,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Close the channel (this is its only sender), so the writer writes what is
        // queued and ends; then wait for it.
        let (closed, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.tx, closed));
        self.writer.finish();
    }
}

/// What the clones and the writer thread both see.
#[derive(Debug, Default)]
struct Shared {
    /// Lines dropped: not queued (channel full) or not written (write error).
    dropped: AtomicU64,
    /// Set by [`AccessLog::reopen`]; the writer reopens the file before its next line.
    reopen: AtomicBool,
}

/// What goes through the channel.
#[derive(Debug)]
enum Msg {
    /// A line to write (boxed: the channel's slots stay small).
    Entry(Box<Entry>),
    /// Nothing to write: wakes the writer to look at [`Shared::reopen`].
    Wake,
    /// Write out everything queued before this, then say so.
    Flush(mpsc::SyncSender<()>),
}

/// The writer thread.
#[derive(Debug)]
struct WriterThread {
    /// The thread (taken when joined).
    handle: Option<JoinHandle<()>>,
    /// Disconnects when the writer thread ends (its sender lives in the thread). In a
    /// mutex only so that the log is `Sync`.
    done: Mutex<Receiver<()>>,
    /// The log's name, for a warning.
    name: String,
}

impl WriterThread {
    /// Waits for the writer thread to end, once the channel is closed: it writes what
    /// is queued and ends, which disconnects `done`. A writer stuck on a stalled stream
    /// (a pipe nobody reads) is left behind after [`EXIT_WAIT`] rather than hanging the
    /// exit.
    fn finish(&mut self) {
        let done = self.done.get_mut().unwrap_or_else(PoisonError::into_inner);
        match done.recv_timeout(EXIT_WAIT) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(handle) = self.handle.take()
                    && handle.join().is_err()
                {
                    warn!("access log {}: the writer thread panicked", self.name);
                }
            }
            Err(RecvTimeoutError::Timeout) => warn!(
                "access log {}: the writer did not finish within {EXIT_WAIT:?}; \
                 lines still queued may be lost",
                self.name
            ),
        }
    }
}

impl AccessLog {
    /// Opens `target` (a file is created or appended to; a missing directory or a file
    /// that cannot be written is an error naming the path). `None` for `"off"`.
    pub(crate) fn open(
        target: &Target,
        format: AccessLogFormat,
    ) -> Result<Option<AccessLog>, Error> {
        let sink = match target {
            Target::Off => return Ok(None),
            Target::Stderr => Sink::Stream {
                name: "stderr".to_owned(),
                out: Box::new(io::stderr()),
            },
            Target::File(path) => Sink::File {
                file: open_file(path).map_err(|source| Error::File {
                    path: path.clone(),
                    source,
                })?,
                path: path.clone(),
            },
        };
        AccessLog::start(sink, format).map(Some)
    }

    /// Starts the writer thread on `sink`.
    fn start(sink: Sink, format: AccessLogFormat) -> Result<AccessLog, Error> {
        let (tx, rx) = mpsc::sync_channel(CAPACITY);
        let (done_tx, done) = mpsc::channel::<()>();
        let shared = Arc::new(Shared::default());
        let name = sink.name();
        let writer = Writer {
            sink,
            format,
            shared: shared.clone(),
            buf: Vec::with_capacity(FLUSH_BYTES + 1024),
            last_flush: Instant::now(),
            torn: false,
            failing: None,
            reopen_retry: None,
        };
        let handle = std::thread::Builder::new()
            .name("gem-access-log".to_owned())
            .spawn(move || {
                // Dropped when the thread ends, however it ends.
                let _done = done_tx;
                writer.run(&rx);
            })
            .map_err(Error::io("starting the access log's writer thread"))?;
        Ok(AccessLog {
            inner: Arc::new(Inner {
                tx,
                shared,
                writer: WriterThread {
                    handle: Some(handle),
                    done: Mutex::new(done),
                    name,
                },
            }),
        })
    }

    /// Queues one line; never blocks. A line that cannot be queued is dropped and
    /// counted.
    pub(crate) fn log(&self, entry: Entry) {
        match self.inner.tx.try_send(Msg::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.inner.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reopens the file (logrotate moved it); for `"stderr"`, nothing.
    pub(crate) fn reopen(&self) {
        self.inner.shared.reopen.store(true, Ordering::Release);
        // A full channel means the writer is busy: it looks at the flag before its next
        // line anyway.
        let _ = self.inner.tx.try_send(Msg::Wake);
    }

    /// Writes out every line queued so far, waiting at most `within` (a process about
    /// to exit: its runtime may not wait for the last clone to be dropped). Blocking.
    pub(crate) fn flush(&self, within: Duration) {
        let (done, flushed) = mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + within;
        let mut msg = Msg::Flush(done);
        loop {
            match self.inner.tx.try_send(msg) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return,
            }
        }
        let _ = flushed.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()));
    }

    /// Lines dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.inner.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Opens `path` for appending, creating it if missing.
fn open_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Where the lines go.
enum Sink {
    /// A file, reopened on request.
    File {
        /// The configured path.
        path: PathBuf,
        /// The open file (append mode).
        file: File,
    },
    /// A stream that is never reopened (standard error; a test's writer).
    Stream {
        /// What to call it in warnings.
        name: String,
        /// The stream.
        out: Box<dyn Write + Send>,
    },
}

impl Sink {
    /// What to call the log in warnings: the path or the stream's name.
    fn name(&self) -> String {
        match self {
            Sink::File { path, .. } => path.display().to_string(),
            Sink::Stream { name, .. } => name.clone(),
        }
    }

    /// The writer to write to.
    fn out(&mut self) -> &mut dyn Write {
        match self {
            Sink::File { file, .. } => file,
            Sink::Stream { out, .. } => out,
        }
    }
}

/// The writer thread's state.
struct Writer {
    /// Where lines go.
    sink: Sink,
    /// How lines look.
    format: AccessLogFormat,
    /// Shared with the clones.
    shared: Arc<Shared>,
    /// Formatted lines not yet written.
    buf: Vec<u8>,
    /// When `buf` was last written out (or found empty).
    last_flush: Instant,
    /// A write failed part way through a line: the next write starts a new line.
    torn: bool,
    /// While writes fail: how many lines were lost since they started failing.
    failing: Option<u64>,
    /// After a failed reopen: when to try again (and that a warning was given).
    reopen_retry: Option<Instant>,
}

impl Writer {
    /// Handles messages until every sender is gone, then writes what is left.
    fn run(mut self, rx: &Receiver<Msg>) {
        'outer: while let Ok(msg) = rx.recv() {
            self.handle(msg);
            loop {
                match rx.try_recv() {
                    Ok(msg) => {
                        self.handle(msg);
                        if self.buf.len() >= FLUSH_BYTES || self.last_flush.elapsed() >= FLUSH_EVERY
                        {
                            self.flush();
                        }
                    }
                    Err(TryRecvError::Empty) => {
                        self.flush();
                        // Let lines gather before blocking: a writer blocked in recv()
                        // is woken (a futex call) by every single send.
                        std::thread::sleep(GATHER);
                        match rx.try_recv() {
                            Ok(msg) => self.handle(msg),
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => break 'outer,
                        }
                    }
                    Err(TryRecvError::Disconnected) => break 'outer,
                }
            }
        }
        self.flush();
    }

    /// Reopens if asked to, then formats an entry into the buffer.
    fn handle(&mut self, msg: Msg) {
        let retry_due = self.reopen_retry.is_some_and(|at| Instant::now() >= at);
        if self.shared.reopen.swap(false, Ordering::AcqRel) || retry_due {
            self.reopen();
        }
        let entry = match msg {
            Msg::Entry(entry) => entry,
            Msg::Flush(done) => {
                self.flush();
                let _ = done.send(());
                return;
            }
            Msg::Wake => return,
        };
        let before = self.buf.len();
        match format_line(self.format, &entry, &mut self.buf) {
            Ok(()) => {}
            Err(_) => {
                // Not reachable with an in-memory buffer; counted all the same.
                self.buf.truncate(before);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Writes out the buffered lines to the old file, then opens the path anew. If that
    /// fails, the old file is kept and the reopen retried later.
    fn reopen(&mut self) {
        let Sink::File { path, .. } = &self.sink else {
            return;
        };
        let path = path.clone();
        self.flush();
        match open_file(&path) {
            Ok(file) => {
                if self.reopen_retry.take().is_some() {
                    warn!("access log {}: reopened", path.display());
                }
                self.sink = Sink::File { path, file };
                self.torn = false;
            }
            Err(e) => {
                if self.reopen_retry.is_none() {
                    warn!(
                        "access log {}: cannot reopen ({e}); writing to the file as it \
                         was opened until a reopen succeeds",
                        path.display()
                    );
                }
                self.reopen_retry = Some(Instant::now() + REOPEN_RETRY);
            }
        }
    }

    /// Writes the buffer out. The lines of a failed write are dropped and counted; a
    /// warning is given when writes start failing and when they work again.
    fn flush(&mut self) {
        self.last_flush = Instant::now();
        if self.buf.is_empty() {
            return;
        }
        let out = self.sink.out();
        let (written, result) = if self.torn {
            // The last failed write ended mid-line: end it so these lines stand alone.
            match write_some(out, b"\n") {
                (_, Ok(())) => {
                    self.torn = false;
                    write_some(out, &self.buf)
                }
                (_, Err(e)) => (0, Err(e)),
            }
        } else {
            write_some(out, &self.buf)
        };
        match result {
            Ok(()) => {
                if let Some(lost) = self.failing.take() {
                    warn!(
                        "access log {}: writing again ({lost} lines were dropped)",
                        self.sink.name()
                    );
                }
            }
            Err(e) => {
                let rest = &self.buf[written..];
                let lost = rest.iter().filter(|&&b| b == b'\n').count() as u64;
                if written > 0 {
                    self.torn = self.buf[written - 1] != b'\n';
                }
                self.shared.dropped.fetch_add(lost, Ordering::Relaxed);
                match &mut self.failing {
                    Some(total) => *total += lost,
                    None => {
                        warn!(
                            "access log {}: cannot write ({e}); dropping lines until \
                             writes work again",
                            self.sink.name()
                        );
                        self.failing = Some(lost);
                    }
                }
            }
        }
        self.buf.clear();
    }
}

/// Writes all of `buf` to `out`, or as much as it takes: returns how many bytes were
/// written, and the error that stopped it.
fn write_some(out: &mut dyn Write, buf: &[u8]) -> (usize, io::Result<()>) {
    let mut written = 0;
    while written < buf.len() {
        match out.write(&buf[written..]) {
            Ok(0) => return (written, Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, out.flush())
}

/// Appends one line (with its newline) to `out`.
fn format_line(format: AccessLogFormat, entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    match format {
        AccessLogFormat::Combined => format_combined(entry, out),
        AccessLogFormat::Json => format_json(entry, out),
    }
}

/// The combined format of Apache and nginx with three fields appended: the duration in
/// microseconds, the protocol and gem's generation.
fn format_combined(entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    let t = Civil::from(entry.time);
    let protocol = protocol(entry.version);
    write!(
        out,
        "{} - - [{:02}/{}/{}:{:02}:{:02}:{:02} +0000] \"",
        entry.peer.ip().to_canonical(),
        t.day,
        MONTHS[t.month as usize - 1],
        t.year,
        t.hour,
        t.minute,
        t.second,
    )?;
    push_escaped(out, entry.method.as_str().as_bytes());
    out.push(b' ');
    push_escaped(out, target(entry).as_bytes());
    out.push(b' ');
    push_escaped(out, protocol.as_bytes());
    write!(out, "\" {} {} \"", entry.status, entry.bytes)?;
    push_header(out, entry.referer.as_ref());
    out.extend_from_slice(b"\" \"");
    push_header(out, entry.user_agent.as_ref());
    writeln!(
        out,
        "\" {} {} {}",
        entry.took.as_micros(),
        protocol,
        entry.generation
    )
}

/// One JSON object per line.
fn format_json(entry: &Entry, out: &mut Vec<u8>) -> io::Result<()> {
    /// The line's fields, in order.
    #[derive(Serialize)]
    struct Line<'a> {
        /// RFC 3339, UTC, milliseconds.
        time: &'a str,
        /// Address and port.
        peer: SocketAddr,
        /// The request method.
        method: &'a str,
        /// The request target.
        target: Cow<'a, str>,
        /// `HTTP/1.1` and the like.
        protocol: &'a str,
        /// The response status.
        status: u16,
        /// Response body bytes.
        bytes: u64,
        /// How long the request took, in microseconds.
        duration_us: u64,
        /// The `Referer` header, or null.
        referer: Option<Cow<'a, str>>,
        /// The `User-Agent` header, or null.
        user_agent: Option<Cow<'a, str>>,
        /// gem's generation.
        generation: u64,
    }
    let t = Civil::from(entry.time);
    let time = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.millis
    );
    fn header(h: Option<&http::HeaderValue>) -> Option<Cow<'_, str>> {
        h.map(|h| String::from_utf8_lossy(h.as_bytes()))
    }
    let line = Line {
        time: &time,
        peer: SocketAddr::new(entry.peer.ip().to_canonical(), entry.peer.port()),
        method: entry.method.as_str(),
        target: target(entry),
        protocol: protocol(entry.version),
        status: entry.status,
        bytes: entry.bytes,
        duration_us: u64::try_from(entry.took.as_micros()).unwrap_or(u64::MAX),
        referer: header(entry.referer.as_ref()),
        user_agent: header(entry.user_agent.as_ref()),
        generation: entry.generation,
    };
    serde_json::to_writer(&mut *out, &line).map_err(io::Error::other)?;
    out.push(b'\n');
    Ok(())
}

/// The request target as the client sent it: HTTP/2 and later have no request line,
/// and the URI they carry is absolute, so their path and query stand for it.
fn target(entry: &Entry) -> Cow<'_, str> {
    if entry.version >= http::Version::HTTP_2
        && let Some(pq) = entry.uri.path_and_query()
    {
        return Cow::Borrowed(pq.as_str());
    }
    Cow::Owned(entry.uri.to_string())
}

/// The protocol as nginx spells it.
fn protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "-",
    }
}

/// A header's value escaped, or `-` if missing.
fn push_header(out: &mut Vec<u8>, value: Option<&http::HeaderValue>) {
    match value {
        Some(value) => push_escaped(out, value.as_bytes()),
        None => out.push(b'-'),
    }
}

/// Appends `bytes` for a quoted field, nginx style: `"`, `\`, control bytes and bytes
/// outside ASCII become `\xHH`.
fn push_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX[usize::from(b >> 4)],
                HEX[usize::from(b & 0xf)],
            ]);
        } else {
            out.push(b);
        }
    }
}

/// Month abbreviations of the combined format.
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A UTC date and time.
#[derive(Debug, PartialEq, Eq)]
struct Civil {
    /// The year.
    year: u64,
    /// 1 to 12.
    month: u32,
    /// 1 to 31.
    day: u32,
    /// 0 to 23.
    hour: u32,
    /// 0 to 59.
    minute: u32,
    /// 0 to 59.
    second: u32,
    /// 0 to 999.
    millis: u32,
}

impl From<SystemTime> for Civil {
    /// The proleptic Gregorian date of a time (times before 1970 count as 1970),
    /// by Howard Hinnant's `civil_from_days`.
    fn from(time: SystemTime) -> Civil {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        let (days, rem) = (secs / 86_400, (secs % 86_400) as u32);
        let z = days + 719_468;
        let era = z / 146_097;
        let doe = z % 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + u64::from(month <= 2);
        Civil {
            year,
            month,
            day,
            hour: rem / 3_600,
            minute: rem % 3_600 / 60,
            second: rem % 60,
            millis: since.subsec_millis(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-11-27T12:00:00Z.
    const NOV_27: u64 = 1_795_780_800;

    fn entry() -> Entry {
        Entry {
            time: UNIX_EPOCH + Duration::from_millis(NOV_27 * 1000 + 123),
            peer: "127.0.0.1:5555".parse().expect("addr"),
            method: http::Method::GET,
            uri: http::Uri::from_static("/path?q"),
            version: http::Version::HTTP_11,
            referer: None,
            user_agent: Some(http::HeaderValue::from_static("curl/8")),
            status: 200,
            bytes: 12,
            took: Duration::from_micros(153),
            generation: 3,
        }
    }

    fn line(format: AccessLogFormat, entry: &Entry) -> String {
        let mut out = Vec::new();
        format_line(format, entry, &mut out).expect("format");
        String::from_utf8(out).expect("utf-8")
    }

    /// Polls `cond` until it holds or `within` has passed.
    fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if cond() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn with_generation(generation: u64) -> Entry {
        Entry {
            generation,
            ..entry()
        }
    }

    #[test]
    fn combined_is_byte_exact() {
        assert_eq!(
            line(AccessLogFormat::Combined, &entry()),
            "127.0.0.1 - - [27/Nov/2026:12:00:00 +0000] \"GET /path?q HTTP/1.1\" 200 12 \
             \"-\" \"curl/8\" 153 HTTP/1.1 3\n"
        );
    }

    #[test]
    fn combined_escapes_quoted_fields() {
        let e = Entry {
            peer: "[::ffff:10.0.0.1]:80".parse().expect("addr"),
            referer: Some(http::HeaderValue::from_bytes(b"a\"b\\c\td\xff").expect("value")),
            user_agent: None,
            uri: http::Uri::from_static("https://example.com/x?y=1"),
            version: http::Version::HTTP_2,
            ..entry()
        };
        assert_eq!(
            line(AccessLogFormat::Combined, &e),
            "10.0.0.1 - - [27/Nov/2026:12:00:00 +0000] \"GET /x?y=1 HTTP/2.0\" 200 12 \
             \"a\\x22b\\x5Cc\\x09d\\xFF\" \"-\" 153 HTTP/2.0 3\n"
        );
    }

    #[test]
    fn json_is_byte_exact() {
        assert_eq!(
            line(AccessLogFormat::Json, &entry()),
            "{\"time\":\"2026-11-27T12:00:00.123Z\",\"peer\":\"127.0.0.1:5555\",\
             \"method\":\"GET\",\"target\":\"/path?q\",\"protocol\":\"HTTP/1.1\",\
             \"status\":200,\"bytes\":12,\"duration_us\":153,\"referer\":null,\
             \"user_agent\":\"curl/8\",\"generation\":3}\n"
        );
    }

    #[test]
    fn json_escapes_strings() {
        let e = Entry {
            referer: Some(http::HeaderValue::from_bytes(b"a\"b\\c\td").expect("value")),
            ..entry()
        };
        let text = line(AccessLogFormat::Json, &e);
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value["referer"], "a\"b\\c\td");
        assert!(text.ends_with("}\n") && text.matches('\n').count() == 1);
    }

    #[test]
    fn dates_agree_with_humantime() {
        let mut secs = vec![0, 951_782_400, 951_868_800, 1_709_164_800, 4_107_542_400];
        // Every ~3.7 days over ~130 years: month and leap-year edges included.
        secs.extend((0..13_000u64).map(|i| i * 318_617 + 86_399));
        for s in secs {
            let time = UNIX_EPOCH + Duration::from_millis(s * 1000 + 7);
            let t = Civil::from(time);
            let ours = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                t.year, t.month, t.day, t.hour, t.minute, t.second, t.millis
            );
            assert_eq!(
                ours,
                humantime::format_rfc3339_millis(time).to_string(),
                "{s}"
            );
        }
    }

    #[test]
    fn off_opens_nothing() {
        let log = AccessLog::open(&Target::Off, AccessLogFormat::Combined).expect("open");
        assert!(log.is_none());
    }

    #[test]
    fn a_file_receives_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&Target::File(path.clone()), AccessLogFormat::Json)
            .expect("open")
            .expect("a log");
        log.log(entry());
        log.log(with_generation(4));
        assert!(
            wait_for(Duration::from_secs(5), || read(&path).lines().count() == 2),
            "got {:?}",
            read(&path)
        );
        assert_eq!(
            read(&path),
            line(AccessLogFormat::Json, &entry())
                + &line(AccessLogFormat::Json, &with_generation(4))
        );
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn a_file_is_appended_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        std::fs::write(&path, "old\n").expect("write");
        let log = AccessLog::open(&Target::File(path.clone()), AccessLogFormat::Combined)
            .expect("open")
            .expect("a log");
        log.log(entry());
        drop(log);
        assert_eq!(
            read(&path),
            "old\n".to_owned() + &line(AccessLogFormat::Combined, &entry())
        );
    }

    #[test]
    fn reopen_follows_a_rotated_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let rotated = dir.path().join("access.log.1");
        let log = AccessLog::open(&Target::File(path.clone()), AccessLogFormat::Combined)
            .expect("open")
            .expect("a log");
        log.log(with_generation(1));
        assert!(wait_for(Duration::from_secs(5), || read(&path)
            .lines()
            .count()
            == 1));
        std::fs::rename(&path, &rotated).expect("rename");
        // Still written to the moved file until the reopen.
        log.log(with_generation(2));
        assert!(wait_for(Duration::from_secs(5), || read(&rotated)
            .lines()
            .count()
            == 2));
        assert!(!path.exists());
        log.reopen();
        log.log(with_generation(3));
        assert!(
            wait_for(Duration::from_secs(5), || read(&path).lines().count() == 1),
            "got {:?}",
            read(&path)
        );
        assert_eq!(
            read(&path),
            line(AccessLogFormat::Combined, &with_generation(3))
        );
        assert_eq!(
            read(&rotated),
            line(AccessLogFormat::Combined, &with_generation(1))
                + &line(AccessLogFormat::Combined, &with_generation(2))
        );
    }

    #[test]
    fn reopen_of_stderr_does_nothing() {
        let log = AccessLog::open(&Target::Stderr, AccessLogFormat::Combined)
            .expect("open")
            .expect("a log");
        log.reopen();
        log.reopen();
        drop(log);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("access.log");
        let err = AccessLog::open(&Target::File(path.clone()), AccessLogFormat::Combined)
            .expect_err("a missing directory");
        assert!(matches!(err, Error::File { .. }), "{err:?}");
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
    }

    #[test]
    fn a_directory_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = AccessLog::open(&Target::File(dir.path().to_owned()), AccessLogFormat::Json)
            .expect_err("a directory");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn lines_are_flushed_when_the_last_clone_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let log = AccessLog::open(&Target::File(path.clone()), AccessLogFormat::Combined)
            .expect("open")
            .expect("a log");
        let clone = log.clone();
        for generation in 0..1000 {
            clone.log(with_generation(generation));
        }
        drop(clone);
        // No wait: dropping the last clone writes what is queued before it returns.
        drop(log);
        let text = read(&path);
        assert_eq!(text.lines().count(), 1000);
        assert!(text.ends_with(&line(AccessLogFormat::Combined, &with_generation(999))));
    }

    /// A shared byte buffer the writer thread writes to.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
        }
    }

    /// Blocks its first write until released, telling when it got there.
    struct Gate {
        entered: Option<mpsc::Sender<()>>,
        release: Option<Receiver<()>>,
        out: Captured,
    }

    impl Write for Gate {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let (Some(entered), Some(release)) = (self.entered.take(), self.release.take()) {
                let _ = entered.send(());
                let _ = release.recv();
            }
            self.out.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_flood_is_dropped_and_counted_without_blocking() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let out = Captured::default();
        let sink = Sink::Stream {
            name: "gate".to_owned(),
            out: Box::new(Gate {
                entered: Some(entered_tx),
                release: Some(release_rx),
                out: out.clone(),
            }),
        };
        let log = AccessLog::start(sink, AccessLogFormat::Combined).expect("start");
        log.log(entry());
        entered
            .recv_timeout(Duration::from_secs(5))
            .expect("the writer reached its first write");
        // The writer is stuck: only the channel's capacity can be queued.
        const FLOOD: usize = 10 * CAPACITY;
        let started = Instant::now();
        for _ in 0..FLOOD {
            log.log(entry());
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(log.dropped(), (FLOOD - CAPACITY) as u64);
        release.send(()).expect("release");
        drop(log);
        assert_eq!(out.text().lines().count(), 1 + CAPACITY);
    }

    /// Fails every write while `fail` is set.
    struct Flaky {
        fail: Arc<AtomicBool>,
        out: Captured,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            self.out.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn write_errors_drop_and_count_lines_then_recover() {
        let fail = Arc::new(AtomicBool::new(true));
        let out = Captured::default();
        let sink = Sink::Stream {
            name: "flaky".to_owned(),
            out: Box::new(Flaky {
                fail: fail.clone(),
                out: out.clone(),
            }),
        };
        let log = AccessLog::start(sink, AccessLogFormat::Combined).expect("start");
        log.log(with_generation(1));
        log.log(with_generation(2));
        assert!(wait_for(Duration::from_secs(5), || log.dropped() == 2));
        fail.store(false, Ordering::SeqCst);
        log.log(with_generation(3));
        assert!(wait_for(Duration::from_secs(5), || !out.text().is_empty()));
        assert_eq!(
            out.text(),
            line(AccessLogFormat::Combined, &with_generation(3))
        );
        assert_eq!(log.dropped(), 2);
    }

    /// Writes at most a few bytes, then fails until `fail` is cleared.
    struct Torn {
        fail: Arc<AtomicBool>,
        out: Captured,
    }

    impl Write for Torn {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut out = self.out.0.lock().expect("lock");
            if self.fail.load(Ordering::SeqCst) {
                if out.is_empty() {
                    let n = buf.len().min(10);
                    out.extend_from_slice(&buf[..n]);
                    return Ok(n);
                }
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            out.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_torn_line_does_not_swallow_the_next() {
        let fail = Arc::new(AtomicBool::new(true));
        let out = Captured::default();
        let sink = Sink::Stream {
            name: "torn".to_owned(),
            out: Box::new(Torn {
                fail: fail.clone(),
                out: out.clone(),
            }),
        };
        let log = AccessLog::start(sink, AccessLogFormat::Combined).expect("start");
        log.log(with_generation(1));
        assert!(wait_for(Duration::from_secs(5), || log.dropped() == 1));
        // Failing before a byte is written: one line lost, and the tear is remembered.
        log.log(with_generation(2));
        assert!(wait_for(Duration::from_secs(5), || log.dropped() == 2));
        fail.store(false, Ordering::SeqCst);
        log.log(with_generation(3));
        drop(log);
        let third = line(AccessLogFormat::Combined, &with_generation(3));
        assert_eq!(out.text(), format!("127.0.0.1 \n{third}"));
    }
}
