//! Length-prefixed protobuf framing, for the chunk stream and the direct protocol alike: a
//! `u32` big-endian length, then that many bytes of one message. The length is checked against
//! the reader's limit before anything is allocated.

use std::io;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use prost::Message;

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// The stream failed (or ended within the frame).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The frame announced more than the limit.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The frame is not the expected protobuf message.
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
}

impl FrameError {
    /// The QUIC connection error behind a failed read or write, if that is what it was.
    pub(crate) fn connection(&self) -> Option<&quinn::ConnectionError> {
        let FrameError::Io(e) = self else {
            return None;
        };
        let inner = e.get_ref()?;
        match (
            inner.downcast_ref::<quinn::ReadError>(),
            inner.downcast_ref::<quinn::WriteError>(),
        ) {
            (Some(quinn::ReadError::ConnectionLost(c)), _)
            | (_, Some(quinn::WriteError::ConnectionLost(c))) => Some(c),
            _ => None,
        }
    }
}

/// Encodes one framed message.
pub(crate) fn encode_frame<M: Message>(msg: &M) -> Vec<u8> {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("a Vec grows as needed");
    buf
}

/// Reads one framed message of at most `max` bytes.
pub(crate) async fn read_frame<M: Message + Default, R: AsyncRead + Unpin>(
    io: &mut R,
    max: usize,
) -> Result<M, FrameError> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}

/// Writes one framed message (without closing the stream).
pub(crate) async fn write_frame<M: Message, W: AsyncWrite + Unpin>(
    io: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    io.write_all(&encode_frame(msg)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_ones_are_refused_before_allocating() {
        let msg = proto::Hello {
            protocol_version: 2,
            proof: vec![7; 32].into(),
        };
        let bytes = encode_frame(&msg);
        let mut reader = futures::io::Cursor::new(bytes.clone());
        let back: proto::Hello = read_frame(&mut reader, 64).await.unwrap();
        assert_eq!(back, msg);
        let mut reader = futures::io::Cursor::new(bytes);
        assert!(matches!(
            read_frame::<proto::Hello, _>(&mut reader, 8).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut huge = futures::io::Cursor::new(u32::MAX.to_be_bytes().to_vec());
        assert!(matches!(
            read_frame::<proto::Hello, _>(&mut huge, 1 << 20).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut out = futures::io::Cursor::new(Vec::new());
        write_frame(&mut out, &msg).await.unwrap();
        assert_eq!(out.into_inner(), encode_frame(&msg));
    }
}
