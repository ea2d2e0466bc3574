//! One connection's HTTP, HTTP/1 or HTTP/2: a connection that opens with the HTTP/2
//! preface (prior knowledge in cleartext; over TLS, what a client that negotiated `h2`
//! sends first) is served as HTTP/2, any other as HTTP/1.
//!
//! hyper-util's auto builder does the same, but hides hyper's HTTP/1 `max_header_size`:
//! without it the only bound on a request head is `max_buf_size`, which also bounds how
//! much of a response hyper queues before it writes. Held to `max_header_size`, that
//! sent a streamed body one 64 KiB `writev` at a time, at half hyper's rate. Here
//! hyper's HTTP/1 builder gets both: `max_header_size` for the head as it arrives,
//! and its own, larger `max_buf_size` for the response.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::respond::Body;

/// What an HTTP/2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connection being served: a future that ends with it, and that can be asked to
/// end gracefully (`Connection: close` or GOAWAY).
pub(crate) struct Conn<'a, S, Svc>
where
    Svc: HttpService<Incoming, ResBody = Body>,
{
    state: State<S, Svc>,
    h1: &'a http1::Builder,
    h2: &'a http2::Builder<TokioExecutor>,
}

type H1<S, Svc> = http1::Connection<TokioIo<Prefixed<S>>, Svc>;
type H2<S, Svc> = http2::Connection<TokioIo<Prefixed<S>>, Svc, TokioExecutor>;

enum State<S, Svc>
where
    Svc: HttpService<Incoming, ResBody = Body>,
{
    /// Reading the first bytes, to tell HTTP/2 from HTTP/1.
    Detecting {
        io: Option<S>,
        read: Preface,
        service: Option<Svc>,
        /// Asked to end before it knew: it ends without serving.
        cancelled: bool,
    },
    H1(Pin<Box<H1<S, Svc>>>),
    H2(Pin<Box<H2<S, Svc>>>),
    Done,
}

impl<'a, S, Svc> Conn<'a, S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = Body> + Send + Unpin + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Into<BoxError>,
{
    /// Serves `io` with `service`, with the builders' settings.
    pub(crate) fn new(
        io: S,
        service: Svc,
        h1: &'a http1::Builder,
        h2: &'a http2::Builder<TokioExecutor>,
    ) -> Self {
        Conn {
            state: State::Detecting {
                io: Some(io),
                read: Preface::default(),
                service: Some(service),
                cancelled: false,
            },
            h1,
            h2,
        }
    }

    /// Ends the connection gracefully: HTTP/1 after the response in progress, HTTP/2
    /// with GOAWAY; one that has not sent its first bytes yet, at once.
    pub(crate) fn graceful_shutdown(self: Pin<&mut Self>) {
        match &mut self.get_mut().state {
            State::Detecting { cancelled, .. } => *cancelled = true,
            State::H1(conn) => conn.as_mut().graceful_shutdown(),
            State::H2(conn) => conn.as_mut().graceful_shutdown(),
            State::Done => {}
        }
    }
}

impl<S, Svc> Future for Conn<'_, S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = Body> + Send + Unpin + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Detecting {
                    io,
                    read,
                    service,
                    cancelled,
                } => {
                    if *cancelled {
                        this.state = State::Done;
                        return Poll::Ready(Ok(()));
                    }
                    let Some(stream) = io.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    let proto = match ready!(read.poll(stream, cx)) {
                        Ok(proto) => proto,
                        Err(err) => {
                            this.state = State::Done;
                            return Poll::Ready(Err(err.into()));
                        }
                    };
                    let (Some(stream), Some(service)) = (io.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    let io = TokioIo::new(Prefixed {
                        head: read.buf,
                        at: 0,
                        len: read.filled,
                        io: stream,
                    });
                    this.state = match proto {
                        Some(Proto::H1) => {
                            State::H1(Box::pin(this.h1.serve_connection(io, service)))
                        }
                        Some(Proto::H2) => {
                            State::H2(Box::pin(this.h2.serve_connection(io, service)))
                        }
                        // Closed before it sent a byte.
                        None => State::Done,
                    };
                }
                State::H1(conn) => {
                    let result = ready!(conn.as_mut().poll(cx));
                    this.state = State::Done;
                    return Poll::Ready(result.map_err(Into::into));
                }
                State::H2(conn) => {
                    let result = ready!(conn.as_mut().poll(cx));
                    this.state = State::Done;
                    return Poll::Ready(result.map_err(Into::into));
                }
                State::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

/// The first bytes of a connection, read until they tell HTTP/2 from HTTP/1.
#[derive(Debug, Default)]
struct Preface {
    buf: [u8; H2_PREFACE.len()],
    filled: usize,
}

impl Preface {
    /// `Some` protocol once known; `None` for a connection closed before its first byte.
    fn poll<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<Option<Proto>>> {
        while self.filled < H2_PREFACE.len() {
            let mut buf = ReadBuf::new(&mut self.buf[self.filled..]);
            ready!(Pin::new(&mut *io).poll_read(cx, &mut buf))?;
            let n = buf.filled().len();
            if n == 0 {
                // The end before the preface was whole: whatever came is HTTP/1's to
                // refuse.
                return Poll::Ready(Ok((self.filled > 0).then_some(Proto::H1)));
            }
            self.filled += n;
            if self.buf[..self.filled] != H2_PREFACE[..self.filled] {
                return Poll::Ready(Ok(Some(Proto::H1)));
            }
        }
        Poll::Ready(Ok(Some(Proto::H2)))
    }
}

/// A stream whose first bytes were read already: they are read again first.
struct Prefixed<S> {
    head: [u8; H2_PREFACE.len()],
    at: usize,
    len: usize,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.len {
            let n = (this.len - this.at).min(buf.remaining());
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn detect(chunks: &[&[u8]]) -> (io::Result<Option<Proto>>, Vec<u8>) {
        let mut mock = Chunks(chunks.iter().rev().map(|c| c.to_vec()).collect());
        let mut preface = Preface::default();
        let proto = std::future::poll_fn(|cx| preface.poll(&mut mock, cx)).await;
        let mut again = Prefixed {
            head: preface.buf,
            at: 0,
            len: preface.filled,
            io: mock,
        };
        let mut all = Vec::new();
        again.read_to_end(&mut all).await.unwrap();
        (proto, all)
    }

    /// A reader that hands out its chunks (last first) one read each.
    struct Chunks(Vec<Vec<u8>>);

    impl AsyncRead for Chunks {
        fn poll_read(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(mut chunk) = this.0.pop() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    this.0.push(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_first_bytes_tell_the_protocol_and_are_read_again() {
        // HTTP/2's preface, in pieces, and what follows it.
        let (proto, all) = detect(&[b"PRI * HTTP/2.0\r\n", b"\r\nSM\r\n\r\nframes"]).await;
        assert_eq!(proto.unwrap(), Some(Proto::H2));
        assert_eq!(all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nframes");
        // HTTP/1, told at its first byte off the preface.
        let (proto, all) = detect(&[b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"]).await;
        assert_eq!(proto.unwrap(), Some(Proto::H1));
        assert_eq!(all, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n");
        // A request shorter than the preface, then the end.
        let (proto, all) = detect(&[b"PRI"]).await;
        assert_eq!(proto.unwrap(), Some(Proto::H1));
        assert_eq!(all, b"PRI");
        // Nothing at all.
        let (proto, all) = detect(&[]).await;
        assert_eq!(proto.unwrap(), None);
        assert!(all.is_empty());
    }
}
