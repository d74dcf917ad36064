//! The chunk-stream wire: framing, protocol constants and error codes.
//!
//! Every message is a protobuf from `proto/snapsync.proto`, framed as a `u32` big-endian length
//! followed by that many bytes. A connection starts with `Hello`/`Welcome` on the client's first
//! stream; each request then has its own bidirectional stream (see `docs/FORMAT.md`).

use prost::Message;
use quinn::{RecvStream, SendStream, VarInt};

/// ALPN of the chunk stream, version 1.
pub(crate) const ALPN: &[u8] = b"snapsync/chunks/1";

/// Chunk-stream protocol version carried in `Hello` and `Welcome`.
pub(crate) const PROTOCOL_VERSION: u32 = 1;

/// Largest framed message accepted (requests, headers, manifests are all far smaller).
pub(crate) const MAX_FRAME: usize = 16 * 1024;

/// Connection close codes of the chunk stream.
pub(crate) mod close {
    use super::VarInt;

    /// The client's `SNAPSHOT_TOKEN` is wrong or missing.
    pub(crate) const UNAUTHORIZED: VarInt = VarInt::from_u32(0x10);
    /// The client broke the protocol (bad frame, bad hello, wrong version).
    pub(crate) const PROTOCOL: VarInt = VarInt::from_u32(0x11);
    /// The server is shutting down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(0x12);
    /// The server has too many connections from this peer.
    pub(crate) const BUSY: VarInt = VarInt::from_u32(0x13);
    /// The client is done.
    pub(crate) const DONE: VarInt = VarInt::from_u32(0x14);
}

/// Stream reset/stop code for a request the client no longer wants.
pub(crate) const CANCELLED: VarInt = VarInt::from_u32(0x20);

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed while reading.
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The stream failed while writing.
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    /// The frame announced more than the limit (16 KiB).
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The frame is not the expected protobuf message.
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// Writes one framed message.
pub(crate) async fn write_frame<M: Message>(
    send: &mut SendStream,
    msg: &M,
) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("a Vec grows as needed");
    send.write_all(&buf).await?;
    Ok(())
}

/// Reads one framed message of at most `max` bytes.
pub(crate) async fn read_frame<M: Message + Default>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<M, FrameError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await?;
    Ok(M::decode(buf.as_slice())?)
}
