//! The open client connections of a generation: how many there are, a way to shut
//! them all down from outside when a drain cuts them at `wait_timeout`, and the
//! `header_read_timeout` on each (a slowloris guard).
//!
//! The request-head deadline is kept here rather than by hyper: hyper's own timer boxes
//! a new sleep and takes the timer wheel's lock twice for every request. Here a request
//! costs two stores to its connection's deadline (cleared when its head has arrived,
//! set again once its response is sent) and a read of the kernel's coarse clock (a few
//! milliseconds fine, and a fraction of what `Instant::now()` costs), and one task per
//! generation looks over the deadlines a few times a second and shuts down the sockets
//! past theirs.
//!
//! A connection task stuck in a handler running on its worker thread cannot see the
//! cut, so the drain shuts its socket down under it. The registry holds a [`Weak`]
//! reference to each socket: shutting one down upgrades it first, so a socket is never
//! touched after it has closed, and no `unsafe` is needed for it.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

/// The sockets of the open client connections. Only [`TrackedStream`]s are in here,
/// each until it drops.
#[derive(Debug, Clone, Default)]
pub struct OpenSockets {
    registry: Arc<Mutex<Registry>>,
}

/// The tracked sockets by id; an id is never reused, so a late removal cannot hit a
/// newer socket.
#[derive(Debug, Default)]
struct Registry {
    next: u64,
    sockets: HashMap<u64, Weak<Socket>>,
    /// `header_read_timeout` in milliseconds, once [`OpenSockets::limit_heads`] set it.
    head_limit_ms: Option<u64>,
}

/// A client connection's socket and the time its next request head is due by.
#[derive(Debug)]
struct Socket {
    stream: TcpStream,
    /// The time ([`now_ms`]) by which the next request head must have arrived;
    /// [`NOT_DUE`] while a request is being answered (or on HTTP/2).
    head_due: AtomicU64,
    /// `header_read_timeout` in milliseconds; `None` for no limit.
    head_limit_ms: Option<u64>,
    /// Successful writes so far (written only by the connection's task); what the
    /// sweeper saw of them last; and when it last saw them move ([`now_ms`]): a
    /// connection that is still writing a response is not cut for a late head.
    writes: AtomicU64,
    swept_writes: AtomicU64,
    wrote_at: AtomicU64,
}

/// No request head is awaited.
const NOT_DUE: u64 = u64::MAX;

/// Milliseconds on the kernel's coarse monotonic clock: it moves at each scheduler
/// tick (a few ms), which is fine enough for deadlines of a second or more.
fn now_ms() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    let ms = u64::try_from(now.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1000)
        .saturating_add(u64::try_from(now.tv_nsec / 1_000_000).unwrap_or(0));
    ms.min(NOT_DUE - 1)
}

impl Socket {
    /// Counts a write that made progress (only the connection's task writes).
    fn wrote(&self, result: io::Result<usize>) -> io::Result<usize> {
        if matches!(result, Ok(n) if n > 0) {
            let writes = self.writes.load(Ordering::Relaxed);
            self.writes.store(writes.wrapping_add(1), Ordering::Relaxed);
        }
        result
    }

    /// From now on, a request head is awaited.
    fn await_head(&self) {
        if let Some(limit) = self.head_limit_ms {
            let due = now_ms().saturating_add(limit).min(NOT_DUE - 1);
            self.head_due.store(due, Ordering::Relaxed);
        }
    }
}

/// A connection's request-head deadline, as its serving code sees it. See the module
/// documentation.
#[derive(Debug, Clone)]
pub struct HeadDeadline(Arc<Socket>);

impl HeadDeadline {
    /// A request head has arrived: no deadline while it is answered.
    pub fn head_arrived(&self) {
        self.0.head_due.store(NOT_DUE, Ordering::Relaxed);
    }

    /// A response has been sent: the next request head is due within
    /// `header_read_timeout`.
    pub fn response_sent(&self) {
        self.0.await_head();
    }
}

impl OpenSockets {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks `stream` for as long as the returned wrapper lives. Its first request
    /// head is due within `header_read_timeout` from now.
    pub fn track(&self, stream: TcpStream) -> TrackedStream {
        let mut registry = self.lock();
        let socket = Arc::new(Socket {
            stream,
            head_due: AtomicU64::new(NOT_DUE),
            head_limit_ms: registry.head_limit_ms,
            writes: AtomicU64::new(0),
            swept_writes: AtomicU64::new(0),
            wrote_at: AtomicU64::new(0),
        });
        socket.await_head();
        let id = registry.next;
        registry.next += 1;
        registry.sockets.insert(id, Arc::downgrade(&socket));
        drop(registry);
        TrackedStream {
            id,
            sockets: self.clone(),
            stream: socket,
        }
    }

    /// Closes the connections whose next request head is `limit` late: it must arrive
    /// within `limit` of the connection's start or of its last response. Takes effect
    /// for the connections tracked from now on; a task on the current runtime (if
    /// any) looks a few times a second, and ends once these sockets are gone.
    pub fn limit_heads(&self, limit: Duration) {
        let limit_ms = u64::try_from(limit.as_millis())
            .unwrap_or(NOT_DUE - 1)
            .max(1);
        self.lock().head_limit_ms = Some(limit_ms);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime: header_read_timeout is not enforced");
            return;
        };
        let tick = (limit / 8).clamp(Duration::from_millis(10), Duration::from_millis(250));
        runtime.spawn(sweep(Arc::downgrade(&self.registry), tick));
    }

    /// How many sockets are tracked.
    pub fn len(&self) -> usize {
        self.lock().sockets.len()
    }

    /// Shuts down both directions of every tracked socket; returns how many.
    pub fn shutdown_all(&self) -> usize {
        let open: Vec<Arc<Socket>> = self
            .lock()
            .sockets
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for stream in &open {
            // Fails only for a socket the peer already closed: nothing left to do.
            let _ = socket2::SockRef::from(&stream.stream).shutdown(Shutdown::Both);
        }
        open.len()
    }
}

/// Every `tick`, shuts down the sockets whose request head is overdue, until the
/// registry is gone.
async fn sweep(registry: Weak<Mutex<Registry>>, tick: Duration) {
    let mut ticks = tokio::time::interval(tick);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticks.tick().await;
        let Some(registry) = registry.upgrade() else {
            return;
        };
        let late: Vec<(u64, Arc<Socket>)> = {
            let registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
            let now = now_ms();
            registry
                .sockets
                .values()
                .filter_map(Weak::upgrade)
                .filter_map(|s| {
                    // hyper drops a body once it has queued it, not once it is sent:
                    // while a response is still being written, its head is not late.
                    let writes = s.writes.load(Ordering::Relaxed);
                    if writes != s.swept_writes.swap(writes, Ordering::Relaxed) {
                        s.wrote_at.store(now, Ordering::Relaxed);
                    }
                    let due = s.head_due.load(Ordering::Relaxed);
                    let writing_until = s
                        .wrote_at
                        .load(Ordering::Relaxed)
                        .saturating_add(s.head_limit_ms.unwrap_or(0));
                    (due < now && writing_until < now).then_some((due, s))
                })
                .collect()
        };
        drop(registry);
        for (due, socket) in late {
            // Only once, and only if no head arrived since it was found late.
            if socket
                .head_due
                .compare_exchange(due, NOT_DUE, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let peer = socket.stream.peer_addr().ok();
            debug!(?peer, "no request head within header_read_timeout: closed");
            let _ = socket2::SockRef::from(&socket.stream).shutdown(Shutdown::Both);
        }
    }
}

/// A client connection's socket, known to [`OpenSockets`] until it drops.
#[derive(Debug)]
pub struct TrackedStream {
    id: u64,
    sockets: OpenSockets,
    /// Shared with its [`HeadDeadline`]s and a running shutdown.
    stream: Arc<Socket>,
}

impl TrackedStream {
    /// This connection's request-head deadline.
    pub fn head_deadline(&self) -> HeadDeadline {
        HeadDeadline(self.stream.clone())
    }
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.sockets.lock().sockets.remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &self.stream.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            let wanted = buf.remaining();
            let mut read = None;
            // As tokio's own `poll_read` does: a read that leaves the buffer partly
            // empty has drained the socket, so readiness is cleared (by reporting
            // `WouldBlock` to `try_io`) and the next read waits for epoll instead of
            // making a syscall that would only say `EAGAIN`.
            let outcome = stream.try_io(Interest::READABLE, || {
                let n = stream.try_read_buf(buf)?;
                read = Some(n);
                match n > 0 && n < wanted {
                    true => Err(io::ErrorKind::WouldBlock.into()),
                    false => Ok(()),
                }
            });
            match (read, outcome) {
                (Some(_), _) => return Poll::Ready(Ok(())),
                (None, Err(err)) if err.kind() == io::ErrorKind::WouldBlock => {}
                (None, result) => return Poll::Ready(result),
            }
        }
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.stream.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(self.stream.wrote(result)),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stream = &self.stream.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write_vectored(bufs) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(self.stream.wrote(result)),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        // hyper writes head and body with one `writev` only if this says so.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // TCP has no user-space buffer to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.stream.stream).shutdown(Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn shutdown_all_reaches_tracked_sockets_and_only_while_open() {
        let (mut client, server) = pair().await;
        let sockets = OpenSockets::default();
        let tracked = sockets.track(server);
        assert_eq!(sockets.len(), 1);
        assert_eq!(sockets.shutdown_all(), 1);
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "the peer sees EOF");
        drop(tracked);
        assert_eq!(sockets.len(), 0);
        assert_eq!(
            sockets.shutdown_all(),
            0,
            "a closed socket leaves the registry"
        );
    }

    #[tokio::test]
    async fn a_tracked_stream_carries_bytes_both_ways_and_shuts_down_its_write_side() {
        let (mut client, server) = pair().await;
        let mut tracked = OpenSockets::default().track(server);
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 16];
        let n = tracked.read(&mut got).await.unwrap();
        assert_eq!(&got[..n], b"ping");
        let parts = [IoSlice::new(b"po"), IoSlice::new(b"ng")];
        assert_eq!(tracked.write_vectored(&parts).await.unwrap(), 4);
        tracked.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }
}
