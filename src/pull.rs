//! A response body the host pulls from a handler's reader (`Response::reader`), one
//! chunk each time hyper asks for more: no thread of its own, no copy of the host's,
//! and a slow client holds the reads back because hyper asks only as it writes.
//!
//! A read runs where a handler call would: inline on the worker that polls the body
//! when an inline place is free (the handler [`runs_inline`]), so a fast reader costs
//! what hyper's own generated stream costs; otherwise it waits for a place or goes to
//! the blocking pool ([`Runner::run`]), and the body waits for it. Each read fills a
//! 64 KiB buffer that hyper sends as it is and gives back once written, to be read
//! into again, so a stream allocates a few buffers, not one per chunk.
//!
//! [`runs_inline`]: crate::handler::Handler::runs_inline
//! [`Runner::run`]: crate::inline::Runner::run

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tracing::warn;

use crate::drain::Counted;
use crate::plugin::Reader;
use crate::respond::StreamCut;
use crate::server::ServeContext;

/// How much one read may fill.
const CHUNK: usize = 64 * 1024;
/// How many written buffers a stream keeps for its next reads: as many as hyper
/// queues at once on an HTTP/1 connection, about.
const SPARES: usize = 8;

/// What one read gives back: the reader (to read on), its buffer, and what it read.
type ReadDone = (Reader, Vec<u8>, Result<usize, String>);

/// A read away from the worker: waiting for a place, or on the blocking pool.
type Away = Pin<Box<dyn Future<Output = Result<ReadDone, String>> + Send>>;

/// The state of a pulled body. See the module documentation.
pub(crate) struct Pull {
    /// `None` while a read is away, and once the body ended.
    reader: Option<Reader>,
    away: Option<Away>,
    spares: Arc<Spares>,
    ctx: ServeContext,
    /// The method and target, for the log line of a cut.
    what: String,
    /// The body counts as a request in flight until it ends.
    _in_flight: Counted,
}

impl std::fmt::Debug for Pull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pull")
            .field("what", &self.what)
            .field("away", &self.away.is_some())
            .finish_non_exhaustive()
    }
}

impl Pull {
    pub(crate) fn new(reader: Reader, ctx: ServeContext, in_flight: Counted, what: String) -> Self {
        Pull {
            reader: Some(reader),
            away: None,
            spares: Arc::default(),
            ctx,
            what,
            _in_flight: in_flight,
        }
    }

    /// The next chunk: `None` at the end, `Err` when the reader failed (logged).
    pub(crate) fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, StreamCut>>> {
        if let Some(away) = &mut self.away {
            let read = ready!(away.as_mut().poll(cx));
            self.away = None;
            return Poll::Ready(self.took(read));
        }
        let Some(mut reader) = self.reader.take() else {
            return Poll::Ready(None);
        };
        let mut buf = self.spares.take();
        let runner = &self.ctx.runner;
        let inline = self.ctx.handler.runs_inline();
        if inline && let Some(read) = runner.try_inline(|| reader.read(&mut buf)) {
            return Poll::Ready(self.took(read.map(|read| (reader, buf, read))));
        }
        let ctx = self.ctx.clone();
        // The read counts as in flight while it runs, even if the body is dropped
        // meanwhile (the client went away): the drain waits for the handler's code.
        let running = ctx.drain.request();
        let call = move || {
            let read = reader.read(&mut buf);
            drop(running);
            (reader, buf, read)
        };
        self.away = Some(Box::pin(async move {
            match inline {
                true => ctx.runner.run(call).await,
                false => ctx.runner.run_blocking(call).await,
            }
        }));
        self.poll_chunk(cx)
    }

    /// What a read gave: a chunk (the reader kept for the next), the end, or a cut.
    fn took(&mut self, read: Result<ReadDone, String>) -> Option<Result<Bytes, StreamCut>> {
        let why = match read {
            Ok((_, buf, Ok(0))) => {
                self.spares.put(buf);
                return None;
            }
            Ok((reader, buf, Ok(n))) => {
                self.reader = Some(reader);
                let chunk = Chunk {
                    buf,
                    len: n,
                    home: self.spares.clone(),
                };
                return Some(Ok(Bytes::from_owner(chunk)));
            }
            Ok((_, _, Err(why))) => why,
            Err(why) => format!("the stream's read failed: {why}"),
        };
        warn!(
            "[{}] {}: {why}; the stream was cut",
            std::process::id(),
            self.what
        );
        Some(Err(StreamCut))
    }
}

/// Buffers hyper has written, kept for the next reads.
#[derive(Debug, Default)]
struct Spares(Mutex<Vec<Vec<u8>>>);

impl Spares {
    /// A buffer to read into: a written one, or a new one.
    fn take(&self) -> Vec<u8> {
        let spare = self.0.lock().unwrap_or_else(PoisonError::into_inner).pop();
        spare.unwrap_or_else(|| vec![0; CHUNK])
    }

    fn put(&self, buf: Vec<u8>) {
        let mut spares = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if spares.len() < SPARES {
            spares.push(buf);
        }
    }
}

/// One read's bytes, as hyper holds them until written; then its buffer goes back.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
    home: Arc<Spares>,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.home.put(std::mem::take(&mut self.buf));
    }
}
