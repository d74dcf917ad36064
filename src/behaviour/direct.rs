//! snapsync's direct protocol (`/snapsync/direct/2`, libp2p request-response): a node asks a
//! connected peer, or answers a request it saw on the topic, straight to the requester.
//! Framed protobuf ([`crate::frame`]), at most `max_bytes` per message.

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use prost::Message;

use crate::frame::{FrameError, encode_frame, read_frame};
use crate::proto;

/// The protocol.
pub(crate) const PROTOCOL: StreamProtocol = StreamProtocol::new("/snapsync/direct/2");

/// Length-prefixed protobuf codec of the direct protocol.
#[doc(hidden)]
#[allow(unreachable_pub)]
#[derive(Debug, Clone, Default)]
pub struct DirectCodec {
    pub(crate) max_bytes: usize,
}

async fn read_message<M: Message + Default, T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> std::io::Result<M> {
    read_frame(io, max).await.map_err(|e| match e {
        FrameError::Io(e) => e,
        other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
    })
}

async fn write_message<M: Message, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    msg: &M,
) -> std::io::Result<()> {
    io.write_all(&encode_frame(msg)).await?;
    io.close().await
}

impl libp2p::request_response::Codec for DirectCodec {
    type Protocol = StreamProtocol;
    type Request = proto::DirectRequest;
    type Response = proto::DirectResponse;

    async fn read_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Self::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_bytes).await
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> std::io::Result<Self::Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io, self.max_bytes).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Self::Request,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &req).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Self::Response,
    ) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &res).await
    }
}
