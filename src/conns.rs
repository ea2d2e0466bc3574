//! The open client connections of a generation: how many there are, and a way to shut
//! them all down from outside when a drain cuts them at `wait_timeout`.
//!
//! A connection task stuck in a handler running on its worker thread cannot see the
//! cut, so the drain shuts its socket down under it. The registry holds a [`Weak`]
//! reference to each socket: shutting one down upgrades it first, so a socket is never
//! touched after it has closed, and no `unsafe` is needed for it.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

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
    sockets: HashMap<u64, Weak<TcpStream>>,
}

impl OpenSockets {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks `stream` for as long as the returned wrapper lives.
    pub fn track(&self, stream: TcpStream) -> TrackedStream {
        let stream = Arc::new(stream);
        let mut registry = self.lock();
        let id = registry.next;
        registry.next += 1;
        registry.sockets.insert(id, Arc::downgrade(&stream));
        TrackedStream {
            id,
            sockets: self.clone(),
            stream,
        }
    }

    /// How many sockets are tracked.
    pub fn len(&self) -> usize {
        self.lock().sockets.len()
    }

    /// Shuts down both directions of every tracked socket; returns how many.
    pub fn shutdown_all(&self) -> usize {
        let open: Vec<Arc<TcpStream>> = self
            .lock()
            .sockets
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for stream in &open {
            // Fails only for a socket the peer already closed: nothing left to do.
            let _ = socket2::SockRef::from(&**stream).shutdown(Shutdown::Both);
        }
        open.len()
    }
}

/// A client connection's socket, known to [`OpenSockets`] until it drops.
#[derive(Debug)]
pub struct TrackedStream {
    id: u64,
    sockets: OpenSockets,
    /// Shared only with a running [`OpenSockets::shutdown_all`].
    stream: Arc<TcpStream>,
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
        let stream = &*self.stream;
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
        let stream = &*self.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write(buf) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let stream = &*self.stream;
        loop {
            ready!(stream.poll_write_ready(cx))?;
            match stream.try_write_vectored(bufs) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
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
        Poll::Ready(socket2::SockRef::from(&*self.stream).shutdown(Shutdown::Write))
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
