//! gem's one line protocol: typed messages as JSON, one per line, with a bounded line
//! length, so a peer that never sends a newline costs at most that much memory.
//!
//! Every message type carries a version field `v`; checking it is the receiver's job,
//! since only it knows which versions it speaks.

use std::os::unix::net::UnixStream as StdUnixStream;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;
use tokio_util::codec::{Decoder, Encoder, Framed, LinesCodec, LinesCodecError};

/// How much of a line that is not valid JSON an error quotes.
const QUOTE: usize = 200;

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The peer sent a line longer than the limit.
    #[error("the line is longer than the limit of {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// Reading or writing failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A line is not the JSON message expected.
    #[error("bad message {received:?}: {source}")]
    BadJson {
        /// The line (its start, if long).
        received: String,
        /// What is wrong with it.
        source: serde_json::Error,
    },
    /// A message could not be turned into JSON.
    #[error("cannot encode the message: {0}")]
    Encode(serde_json::Error),
    /// The peer closed the connection in the middle of a line.
    #[error("the connection closed in the middle of a line ({bytes} bytes without a newline)")]
    Truncated {
        /// The bytes of the unfinished line.
        bytes: usize,
    },
}

/// A connection speaking the line protocol. `recv` is cancellation-safe, so it may sit
/// in a `tokio::select!` branch.
#[derive(Debug)]
pub(crate) struct Wire<T> {
    framed: Framed<T, LineCodec>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Wire<T> {
    /// Speaks over `io`, refusing received lines longer than `max_line` bytes.
    pub(crate) fn new(io: T, max_line: usize) -> Wire<T> {
        Wire {
            framed: Framed::new(io, LineCodec::new(max_line)),
        }
    }

    /// The connection underneath.
    pub(crate) fn get_ref(&self) -> &T {
        self.framed.get_ref()
    }

    /// Sends `msg` as one line and flushes it.
    pub(crate) async fn send<M: Serialize>(&mut self, msg: &M) -> Result<(), WireError> {
        let line = serde_json::to_string(msg).map_err(WireError::Encode)?;
        self.framed.send(line).await
    }

    /// The next message; `None` once the peer has closed the connection cleanly.
    pub(crate) async fn recv<M: DeserializeOwned>(&mut self) -> Result<Option<M>, WireError> {
        let Some(line) = self.framed.next().await.transpose()? else {
            return Ok(None);
        };
        serde_json::from_str(&line)
            .map(Some)
            .map_err(|source| WireError::BadJson {
                received: quote(&line),
                source,
            })
    }
}

impl Wire<UnixStream> {
    /// Wraps a blocking std socket (e.g. one inherited as an fd); must be called inside
    /// a tokio runtime.
    pub(crate) fn from_std(stream: StdUnixStream, max_line: usize) -> Result<Self, WireError> {
        stream.set_nonblocking(true)?;
        Ok(Wire::new(UnixStream::from_std(stream)?, max_line))
    }
}

fn quote(line: &str) -> String {
    match line.char_indices().nth(QUOTE) {
        Some((end, _)) => format!("{}...", &line[..end]),
        None => line.to_owned(),
    }
}

/// [`LinesCodec`] with typed errors, and a line cut short by EOF reported as such
/// (`LinesCodec` would hand it over as if it were complete).
#[derive(Debug)]
struct LineCodec {
    lines: LinesCodec,
    max: usize,
}

impl LineCodec {
    fn new(max: usize) -> LineCodec {
        LineCodec {
            lines: LinesCodec::new_with_max_length(max),
            max,
        }
    }

    fn typed(&self, err: LinesCodecError) -> WireError {
        match err {
            LinesCodecError::MaxLineLengthExceeded => WireError::TooLong { max: self.max },
            LinesCodecError::Io(err) => WireError::Io(err),
        }
    }
}

impl Decoder for LineCodec {
    type Item = String;
    type Error = WireError;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<String>, WireError> {
        self.lines.decode(buf).map_err(|e| self.typed(e))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<String>, WireError> {
        match self.decode(buf)? {
            Some(line) => Ok(Some(line)),
            None if buf.is_empty() => Ok(None),
            None => Err(WireError::Truncated { bytes: buf.len() }),
        }
    }
}

impl Encoder<String> for LineCodec {
    type Error = WireError;

    fn encode(&mut self, line: String, buf: &mut BytesMut) -> Result<(), WireError> {
        self.lines.encode(line, buf).map_err(|e| self.typed(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use tokio::io::AsyncWriteExt;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        v: u32,
        n: u64,
    }

    #[tokio::test]
    async fn messages_round_trip_and_eof_is_none() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Wire::new(a, 64), Wire::new(b, 64));
        a.send(&Ping { v: 1, n: 7 }).await.unwrap();
        a.send(&Ping { v: 1, n: 8 }).await.unwrap();
        drop(a);
        assert_eq!(b.recv().await.unwrap(), Some(Ping { v: 1, n: 7 }));
        assert_eq!(b.recv().await.unwrap(), Some(Ping { v: 1, n: 8 }));
        assert_eq!(b.recv::<Ping>().await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_long_line_is_refused_without_waiting_for_its_end() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut b = Wire::new(b, 16);
        a.write_all(&[b'x'; 100]).await.unwrap();
        let err = b.recv::<Ping>().await.unwrap_err();
        assert!(matches!(err, WireError::TooLong { max: 16 }), "{err}");
        assert!(err.to_string().contains("16 bytes"), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_quoted_and_a_cut_line_is_truncated() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut b = Wire::new(b, 64);
        a.write_all(b"{\"v\":1}\n{\"v\":1,\"n\"").await.unwrap();
        drop(a);
        let err = b.recv::<Ping>().await.unwrap_err();
        assert!(
            matches!(&err, WireError::BadJson { received, .. } if received == r#"{"v":1}"#),
            "{err}"
        );
        let err = b.recv::<Ping>().await.unwrap_err();
        assert!(matches!(err, WireError::Truncated { bytes: 10 }), "{err}");
    }

    #[tokio::test]
    async fn a_std_socket_is_adopted() {
        let (a, b) = StdUnixStream::pair().unwrap();
        let (mut a, mut b) = (
            Wire::from_std(a, 64).unwrap(),
            Wire::from_std(b, 64).unwrap(),
        );
        a.send(&Ping { v: 1, n: 1 }).await.unwrap();
        assert_eq!(b.recv().await.unwrap(), Some(Ping { v: 1, n: 1 }));
    }

    #[test]
    fn long_garbage_is_quoted_in_part() {
        let quoted = quote(&"é".repeat(1000));
        assert_eq!(quoted.chars().count(), QUOTE + 3);
    }
}
