//! The open connections a drain may have to shut down from outside.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

/// The sockets of the open client connections, so that the cut at `wait_timeout` can
/// shut down a connection whose task is stuck in a handler running on its worker thread
/// (and so cannot see the cut). Only [`TrackedStream`]s are in here, each until just
/// before its socket closes.
#[derive(Debug, Clone, Default)]
pub struct OpenSockets {
    registry: Arc<Mutex<Registry>>,
}

#[derive(Debug, Default)]
struct Registry {
    next: u64,
    fds: HashMap<u64, RawFd>,
}

impl OpenSockets {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tracks `stream` for as long as the returned wrapper lives.
    pub fn track(&self, stream: tokio::net::TcpStream) -> TrackedStream {
        let mut registry = self.lock();
        let id = registry.next;
        registry.next += 1;
        registry.fds.insert(id, stream.as_raw_fd());
        TrackedStream {
            id,
            sockets: self.clone(),
            stream,
        }
    }

    /// How many sockets are tracked.
    pub fn len(&self) -> usize {
        self.lock().fds.len()
    }

    /// Whether no socket is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shuts down both directions of every tracked socket; returns how many.
    pub fn shutdown_all(&self) -> usize {
        let registry = self.lock();
        for &fd in registry.fds.values() {
            // SAFETY: a tracked fd stays open while it is in the registry: a
            // `TrackedStream` removes it, under this same lock, before its socket closes.
            let socket = unsafe { BorrowedFd::borrow_raw(fd) };
            let _ = socket2::SockRef::from(&socket).shutdown(std::net::Shutdown::Both);
        }
        registry.fds.len()
    }
}

/// A client connection's socket, known to [`OpenSockets`] until it closes.
#[derive(Debug)]
pub struct TrackedStream {
    id: u64,
    sockets: OpenSockets,
    stream: tokio::net::TcpStream,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        // Runs before the fields drop, so the fd leaves the registry while still open.
        self.sockets.lock().fds.remove(&self.id);
    }
}

impl tokio::io::AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_all_reaches_tracked_sockets_and_only_while_open() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let sockets = OpenSockets::default();
        let tracked = sockets.track(server);
        assert_eq!(sockets.shutdown_all(), 1);
        let mut buf = [0u8; 1];
        assert_eq!(client.read(&mut buf).await.unwrap(), 0, "the peer sees EOF");
        drop(tracked);
        assert_eq!(
            sockets.shutdown_all(),
            0,
            "a closed socket leaves the registry"
        );
    }
}
