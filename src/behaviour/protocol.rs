//! Discovery messages: the direct-answer protocol and the checks every message passes.

use std::net::SocketAddr;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use prost::Message;

use crate::ChunkSize;
use crate::hash::{BankHash, ContentRoot};
use crate::proto;

/// Request-response protocol that carries a direct answer to a snapshot info request.
pub(crate) const ANSWER_PROTOCOL: StreamProtocol = StreamProtocol::new("/snapsync/answer/1");

/// Gossipsub protocol prefix of snapsync's own gossipsub, so it never meets the owner's.
pub(crate) const GOSSIP_PROTOCOL_PREFIX: &str = "/snapsync/meshsub";

/// The design note's message type names.
pub(crate) const REQUEST_TYPE: &str = "snapshot_info_request";
/// See [`REQUEST_TYPE`].
pub(crate) const RESPONSE_TYPE: &str = "snapshot_info_response";

/// Most addresses one message may carry.
pub(crate) const MAX_ADDRS: usize = 8;

/// A discovery message failed its checks. The sender gets a strike.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// Not a protobuf message of the expected kind.
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Larger than allowed.
    #[error("message of {0} bytes is too large")]
    TooLarge(usize),
    /// The `type` field is not the one of this message.
    #[error("message type {0:?} does not match its contents")]
    WrongType(String),
    /// The claimed sender is not the peer that sent it.
    #[error("message claims to be from {claimed}, but comes from {actual}")]
    Spoofed {
        /// The peer id in the message.
        claimed: String,
        /// The peer that sent or signed it.
        actual: PeerId,
    },
    /// A hash field is not 32 bytes.
    #[error("field {0} is not a 32-byte hash")]
    BadDigest(&'static str),
    /// The chunk size is out of bounds.
    #[error("chunk size: {0}")]
    BadChunkSize(#[from] crate::ChunkSizeError),
    /// The archive size is zero or over the limit.
    #[error("archive size {0} is out of bounds")]
    BadSize(u64),
    /// An address is not a usable address.
    #[error("not a usable address: {0}")]
    BadAddress(String),
    /// More addresses than allowed.
    #[error("{0} addresses, more than allowed")]
    TooManyAddresses(usize),
    /// An empty gossip message, or an answer that advertises nothing.
    #[error("message carries nothing")]
    Empty,
}

/// A checked snapshot advertisement: who holds which snapshot, and where to fetch it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The peer holding it.
    pub peer: PeerId,
    /// Slot.
    pub slot: u64,
    /// Bank hash.
    pub bank_hash: BankHash,
    /// Content root.
    pub content_root: ContentRoot,
    /// Archive size in bytes.
    pub archive_size: u64,
    /// Chunk size the peer serves.
    pub chunk_size: ChunkSize,
    /// When the snapshot was made, seconds since the Unix epoch.
    pub modified_time: u64,
    /// Where its chunk stream listens.
    pub streamer_addrs: Vec<SocketAddr>,
}

/// A checked snapshot info request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub(crate) nonce: u64,
    pub(crate) slot: Option<u64>,
    pub(crate) addrs: Vec<Multiaddr>,
}

fn usable(addr: &SocketAddr) -> bool {
    !addr.ip().is_unspecified() && !addr.ip().is_multicast() && addr.port() != 0
}

/// The fields every discovery message opens with: its type, and the peer it claims to come
/// from, which must be the peer it did come from.
fn check_header(
    ty: &str,
    expected: &str,
    claimed: &str,
    actual: PeerId,
) -> Result<(), MessageError> {
    if ty != expected {
        return Err(MessageError::WrongType(ty.to_owned()));
    }
    if claimed != actual.to_string() {
        return Err(MessageError::Spoofed {
            claimed: claimed.chars().take(64).collect(),
            actual,
        });
    }
    Ok(())
}

/// Checks a request published by `source` (the gossip message's signed author).
pub(crate) fn check_request(
    msg: &proto::SnapshotInfoRequest,
    source: PeerId,
) -> Result<InfoRequest, MessageError> {
    check_header(&msg.r#type, REQUEST_TYPE, &msg.requester_id, source)?;
    if msg.requester_addrs.len() > MAX_ADDRS {
        return Err(MessageError::TooManyAddresses(msg.requester_addrs.len()));
    }
    let addrs = msg
        .requester_addrs
        .iter()
        .map(|a| {
            Multiaddr::try_from(a.to_vec())
                .map_err(|e| MessageError::BadAddress(format!("requester address: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(InfoRequest {
        nonce: msg.nonce,
        slot: msg.requester_slot,
        addrs,
    })
}

/// Checks an advertisement that `sender` sent (directly, or signed on gossip).
pub(crate) fn check_advert(
    msg: &proto::SnapshotInfoResponse,
    sender: PeerId,
    max_archive_bytes: u64,
) -> Result<Advert, MessageError> {
    check_header(&msg.r#type, RESPONSE_TYPE, &msg.peer_id, sender)?;
    if !msg.has_snapshot {
        return Err(MessageError::Empty);
    }
    if msg.file_size == 0 || msg.file_size > max_archive_bytes {
        return Err(MessageError::BadSize(msg.file_size));
    }
    if msg.streamer_addrs.len() > MAX_ADDRS {
        return Err(MessageError::TooManyAddresses(msg.streamer_addrs.len()));
    }
    let mut streamer_addrs = Vec::with_capacity(msg.streamer_addrs.len());
    for a in &msg.streamer_addrs {
        let parsed: SocketAddr = a
            .parse()
            .map_err(|_| MessageError::BadAddress(a.chars().take(64).collect()))?;
        if !usable(&parsed) {
            return Err(MessageError::BadAddress(a.clone()));
        }
        streamer_addrs.push(parsed);
    }
    if streamer_addrs.is_empty() {
        return Err(MessageError::BadAddress("no chunk-stream address".into()));
    }
    Ok(Advert {
        peer: sender,
        slot: msg.slot,
        bank_hash: BankHash::from_slice(&msg.bank_hash)
            .map_err(|_| MessageError::BadDigest("bank_hash"))?,
        content_root: ContentRoot::from_slice(&msg.content_root)
            .map_err(|_| MessageError::BadDigest("content_root"))?,
        archive_size: msg.file_size,
        chunk_size: ChunkSize::new(u64::from(msg.chunk_size))?,
        modified_time: msg.modified_time,
        streamer_addrs,
    })
}

/// Length-prefixed protobuf codec of the answer protocol.
#[doc(hidden)]
#[allow(unreachable_pub)]
#[derive(Debug, Clone, Default)]
pub struct AnswerCodec {
    pub(crate) max_bytes: usize,
}

async fn read_message<M: Message + Default, T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> std::io::Result<M> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            MessageError::TooLarge(len),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

async fn write_message<M: Message, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    msg: &M,
) -> std::io::Result<()> {
    let bytes = msg.encode_to_vec();
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl libp2p::request_response::Codec for AnswerCodec {
    type Protocol = StreamProtocol;
    type Request = proto::SnapshotInfoResponse;
    type Response = proto::Ack;

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
        read_message(io, 64).await
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

#[cfg(test)]
mod tests {
    use super::*;

    fn advert_msg(peer: PeerId) -> proto::SnapshotInfoResponse {
        proto::SnapshotInfoResponse {
            r#type: RESPONSE_TYPE.into(),
            has_snapshot: true,
            peer_id: peer.to_string(),
            file_size: 1000,
            modified_time: 5,
            slot: 50,
            bank_hash: vec![1; 32].into(),
            content_root: vec![2; 32].into(),
            chunk_size: 16384,
            streamer_addrs: vec!["127.0.0.1:4000".into()],
            request_nonce: 0,
        }
    }

    #[test]
    fn adverts_are_checked() {
        let peer = PeerId::random();
        let ok = check_advert(&advert_msg(peer), peer, 1 << 30).unwrap();
        assert_eq!(ok.slot, 50);
        assert_eq!(ok.streamer_addrs, vec!["127.0.0.1:4000".parse().unwrap()]);

        let bad = |f: &dyn Fn(&mut proto::SnapshotInfoResponse)| {
            let mut m = advert_msg(peer);
            f(&mut m);
            check_advert(&m, peer, 1 << 30).unwrap_err()
        };
        assert!(matches!(
            bad(&|m| m.r#type = "other".into()),
            MessageError::WrongType(_)
        ));
        assert!(matches!(
            bad(&|m| m.peer_id = PeerId::random().to_string()),
            MessageError::Spoofed { .. }
        ));
        assert!(matches!(
            bad(&|m| m.chunk_size = 3),
            MessageError::BadChunkSize(_)
        ));
        assert!(matches!(
            bad(&|m| m.bank_hash = vec![1; 5].into()),
            MessageError::BadDigest("bank_hash")
        ));
        assert!(matches!(
            bad(&|m| m.streamer_addrs = vec!["not an address".into()]),
            MessageError::BadAddress(_)
        ));
        assert!(matches!(
            bad(&|m| m.streamer_addrs = vec!["0.0.0.0:4000".into()]),
            MessageError::BadAddress(_)
        ));
        assert!(matches!(
            bad(&|m| m.streamer_addrs = vec!["127.0.0.1:1".into(); 9]),
            MessageError::TooManyAddresses(9)
        ));
        assert!(matches!(
            bad(&|m| m.file_size = 0),
            MessageError::BadSize(0)
        ));
        assert!(matches!(
            bad(&|m| m.file_size = 1 << 31),
            MessageError::BadSize(_)
        ));
        assert!(matches!(
            bad(&|m| m.has_snapshot = false),
            MessageError::Empty
        ));
    }

    #[test]
    fn requests_are_checked() {
        let peer = PeerId::random();
        let msg = proto::SnapshotInfoRequest {
            r#type: REQUEST_TYPE.into(),
            requester_id: peer.to_string(),
            nonce: 9,
            requester_slot: Some(3),
            requester_addrs: vec![
                "/ip4/127.0.0.1/tcp/1"
                    .parse::<Multiaddr>()
                    .unwrap()
                    .to_vec()
                    .into(),
            ],
        };
        let r = check_request(&msg, peer).unwrap();
        assert_eq!((r.nonce, r.slot, r.addrs.len()), (9, Some(3), 1));
        assert!(matches!(
            check_request(&msg, PeerId::random()),
            Err(MessageError::Spoofed { .. })
        ));
        let mut garbage = msg.clone();
        garbage.requester_addrs = vec![vec![0xff, 0xfe].into()];
        assert!(matches!(
            check_request(&garbage, peer),
            Err(MessageError::BadAddress(_))
        ));
    }
}
