//! Discovery messages: building them, and the checks every one received passes before it
//! changes anything.

use std::net::SocketAddr;

use libp2p::{Multiaddr, PeerId};
use prost::Message;

use crate::chunk::ChunkSize;
use crate::hash::{BankHash, ContentRoot};
use crate::proto;
use crate::snapshot::{Attestation, AttestationError, Base, SnapshotKey, SnapshotKind};

/// The design note's message type names.
pub(crate) const REQUEST_TYPE: &str = "snapshot_info_request";
/// See [`REQUEST_TYPE`].
pub(crate) const RESPONSE_TYPE: &str = "snapshot_info_response";

/// Most addresses a request may carry (each one a dial a holder might make).
pub(crate) const MAX_REQUEST_ADDRS: usize = 4;

/// Most chunk-stream addresses an advertisement may carry.
pub(crate) const MAX_STREAMER_ADDRS: usize = 8;

/// Most snapshots one advertisement may list.
pub(crate) const MAX_SNAPSHOTS: usize = 8;

/// Most partial holdings one advertisement may list.
pub(crate) const MAX_PARTIALS: usize = 4;

/// A discovery message failed its checks. The sender gets a strike.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum MessageError {
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
    BadChunkSize(#[from] crate::chunk::ChunkSizeError),
    /// The archive size is zero or over the limit, or it has more chunks than allowed.
    #[error("archive size {0} is out of bounds")]
    BadSize(u64),
    /// A snapshot whose base does not fit its kind.
    #[error("snapshot at slot {0} has a base that does not fit its kind")]
    BadBase(u64),
    /// An address is not a usable address.
    #[error("not a usable address: {0}")]
    BadAddress(String),
    /// More items than allowed.
    #[error("{0} {1}, more than allowed")]
    TooMany(usize, &'static str),
    /// A partial holding of more bytes than its snapshot has.
    #[error("holds {held} verified bytes of a snapshot of {size}")]
    BadHolding {
        /// Bytes it says it holds.
        held: u64,
        /// The snapshot's size.
        size: u64,
    },
    /// An empty gossip message, or an advertisement of nothing.
    #[error("message carries nothing")]
    Empty,
    /// The same snapshot listed twice.
    #[error("snapshot at slot {0} listed twice")]
    Duplicate(u64),
    /// An attestation list over the bound, or one of a malformed key or signature.
    #[error("attestations: {0}")]
    BadAttestation(#[from] AttestationError),
}

/// One snapshot a peer advertises, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotAd {
    /// What identifies it.
    pub key: SnapshotKey,
    /// Chunk size the peer serves it in.
    pub chunk_size: ChunkSize,
    /// Records in its archive.
    pub entry_count: u64,
    /// Bytes of its uncompressed record stream.
    pub state_bytes: u64,
}

impl SnapshotAd {
    /// The advertisement of a manifest.
    pub fn of(m: &crate::snapshot::Manifest) -> Self {
        Self {
            key: m.key(),
            chunk_size: m.chunk_size,
            entry_count: m.entry_count,
            state_bytes: m.state_bytes,
        }
    }
}

/// A snapshot a peer downloads and serves the verified chunks of meanwhile: a source for
/// others that download it too, never a voice for it (it counts toward no agreement).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartialAd {
    /// The snapshot.
    pub ad: SnapshotAd,
    /// Archive bytes it holds, verified (a claim: what it serves is checked chunk by chunk).
    pub verified_bytes: u64,
}

/// A checked advertisement: which snapshots one peer holds, and where to fetch them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The peer holding them.
    pub peer: PeerId,
    /// The snapshots, newest first.
    pub snapshots: Vec<SnapshotAd>,
    /// The snapshots it downloads and serves part of meanwhile.
    pub partial: Vec<PartialAd>,
    /// Where its chunk stream listens.
    pub streamer_addrs: Vec<SocketAddr>,
    /// The slot of the peer's own state, when it said.
    pub holder_slot: Option<u64>,
    /// When its newest snapshot was made, seconds since the Unix epoch.
    pub modified_time: u64,
    /// The attestations carried with each of `snapshots`, in the same order (a list missing at
    /// the end is an empty one). Claims until checked for the snapshot they come with.
    pub attestations: Vec<Vec<Attestation>>,
    /// The attestations carried with each of `partial`, in the same order (a partial holder
    /// relays them too: a voice for nothing, it still carries others' signatures).
    pub partial_attestations: Vec<Vec<Attestation>>,
}

impl Advert {
    /// The attestations carried with `snapshots[i]`.
    pub fn attestations_of(&self, i: usize) -> &[Attestation] {
        self.attestations.get(i).map_or(&[], Vec::as_slice)
    }

    /// The attestations carried with `partial[i]`.
    pub fn partial_attestations_of(&self, i: usize) -> &[Attestation] {
        self.partial_attestations.get(i).map_or(&[], Vec::as_slice)
    }

    /// Its newest snapshot.
    pub fn newest(&self) -> Option<&SnapshotAd> {
        self.snapshots.iter().max_by_key(|s| s.key.slot)
    }
}

/// A checked snapshot info request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    pub(crate) nonce: u64,
    pub(crate) slot: Option<u64>,
    pub(crate) addrs: Vec<Multiaddr>,
}

/// Limits a received advertisement is checked against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdvertLimits {
    pub(crate) max_archive_bytes: u64,
    pub(crate) max_chunks: u64,
}

impl AdvertLimits {
    /// An archive of `size` bytes in chunks of `chunk_size` is within the limits.
    fn check_size(&self, size: u64, chunk_size: ChunkSize) -> Result<(), MessageError> {
        if size == 0
            || size > self.max_archive_bytes
            || size.div_ceil(u64::from(chunk_size.bytes())) > self.max_chunks
        {
            return Err(MessageError::BadSize(size));
        }
        Ok(())
    }

    /// A snapshot parsed elsewhere (a web source's index) is within the limits an advert's is
    /// held to.
    pub(crate) fn check(&self, ad: &SnapshotAd) -> Result<(), MessageError> {
        self.check_size(ad.key.archive_size, ad.chunk_size)?;
        match ad.key.base {
            Some(base) if base.slot >= ad.key.slot => Err(MessageError::BadBase(ad.key.slot)),
            None if ad.key.kind == SnapshotKind::Incremental => {
                Err(MessageError::BadBase(ad.key.slot))
            }
            _ => Ok(()),
        }
    }
}

fn usable(addr: &SocketAddr) -> bool {
    let ip = addr.ip();
    !ip.is_unspecified() && !ip.is_multicast() && addr.port() != 0 && !is_broadcast(&ip)
}

fn is_broadcast(ip: &std::net::IpAddr) -> bool {
    matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast())
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
        return Err(MessageError::WrongType(ty.chars().take(64).collect()));
    }
    if claimed != actual.to_string() {
        return Err(MessageError::Spoofed {
            claimed: claimed.chars().take(64).collect(),
            actual,
        });
    }
    Ok(())
}

/// Checks a request published by `source` (the gossip message's signed author) or asked
/// directly by it.
pub(crate) fn check_request(
    msg: &proto::SnapshotInfoRequest,
    source: PeerId,
) -> Result<InfoRequest, MessageError> {
    check_header(&msg.r#type, REQUEST_TYPE, &msg.requester_id, source)?;
    if msg.requester_addrs.len() > MAX_REQUEST_ADDRS {
        return Err(MessageError::TooMany(
            msg.requester_addrs.len(),
            "addresses",
        ));
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

fn digest<T>(
    field: &'static str,
    bytes: &[u8],
    parse: fn(&[u8]) -> Result<T, crate::hash::DigestError>,
) -> Result<T, MessageError> {
    parse(bytes).map_err(|_| MessageError::BadDigest(field))
}

fn check_descriptor(
    d: &proto::SnapshotDescriptor,
    limits: AdvertLimits,
) -> Result<SnapshotAd, MessageError> {
    let chunk_size = ChunkSize::new(u64::from(d.chunk_size))?;
    limits.check_size(d.archive_size, chunk_size)?;
    let kind = match proto::Kind::try_from(d.kind) {
        Ok(proto::Kind::Full) => SnapshotKind::Full,
        Ok(proto::Kind::Incremental) => SnapshotKind::Incremental,
        Err(_) => return Err(MessageError::BadBase(d.slot)),
    };
    let base = match kind {
        SnapshotKind::Full => None,
        SnapshotKind::Incremental => {
            if d.base_slot >= d.slot {
                return Err(MessageError::BadBase(d.slot));
            }
            Some(Base {
                slot: d.base_slot,
                bank_hash: digest("base_bank_hash", &d.base_bank_hash, BankHash::from_slice)?,
                content_root: digest(
                    "base_content_root",
                    &d.base_content_root,
                    ContentRoot::from_slice,
                )?,
            })
        }
    };
    Ok(SnapshotAd {
        key: SnapshotKey {
            kind,
            slot: d.slot,
            bank_hash: digest("bank_hash", &d.bank_hash, BankHash::from_slice)?,
            content_root: digest("content_root", &d.content_root, ContentRoot::from_slice)?,
            archive_size: d.archive_size,
            base,
        },
        chunk_size,
        entry_count: d.entry_count,
        state_bytes: d.state_bytes,
    })
}

/// The snapshots an advert lists, each once, with the attestations each carries (bounded,
/// lengths checked; signatures are checked by whoever counts them).
fn check_snapshots(
    descriptors: &[proto::SnapshotDescriptor],
    limits: AdvertLimits,
) -> Result<(Vec<SnapshotAd>, Vec<Vec<Attestation>>), MessageError> {
    let snapshots = descriptors
        .iter()
        .map(|d| check_descriptor(d, limits))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some((_, dup)) = snapshots
        .iter()
        .enumerate()
        .find(|(i, s)| snapshots[..*i].iter().any(|t| t.key == s.key))
    {
        return Err(MessageError::Duplicate(dup.key.slot));
    }
    let attestations = descriptors
        .iter()
        .map(|d| Attestation::decode_list(&d.attestations))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((snapshots, attestations))
}

/// Checks an advertisement that `sender` sent (directly, or signed on gossip).
pub(crate) fn check_advert(
    msg: &proto::SnapshotInfoResponse,
    sender: PeerId,
    limits: AdvertLimits,
) -> Result<Advert, MessageError> {
    check_header(&msg.r#type, RESPONSE_TYPE, &msg.peer_id, sender)?;
    let complete = msg.has_snapshot && !msg.snapshots.is_empty();
    if !complete && msg.partial.is_empty() {
        return Err(MessageError::Empty);
    }
    if msg.snapshots.len() > MAX_SNAPSHOTS {
        return Err(MessageError::TooMany(msg.snapshots.len(), "snapshots"));
    }
    if msg.partial.len() > MAX_PARTIALS {
        return Err(MessageError::TooMany(msg.partial.len(), "partial holdings"));
    }
    if msg.streamer_addrs.len() > MAX_STREAMER_ADDRS {
        return Err(MessageError::TooMany(msg.streamer_addrs.len(), "addresses"));
    }
    let mut streamer_addrs = Vec::with_capacity(msg.streamer_addrs.len());
    for a in &msg.streamer_addrs {
        let parsed: SocketAddr = a
            .parse()
            .map_err(|_| MessageError::BadAddress(a.chars().take(64).collect()))?;
        if !usable(&parsed) {
            return Err(MessageError::BadAddress(a.chars().take(64).collect()));
        }
        streamer_addrs.push(parsed);
    }
    if streamer_addrs.is_empty() {
        return Err(MessageError::BadAddress("no chunk-stream address".into()));
    }
    let (snapshots, attestations) = if complete {
        check_snapshots(&msg.snapshots, limits)?
    } else {
        (Vec::new(), Vec::new())
    };
    let partial_attestations = msg
        .partial
        .iter()
        .map(|h| {
            h.snapshot.as_ref().map_or(Ok(Vec::new()), |d| {
                Attestation::decode_list(&d.attestations)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let partial = msg
        .partial
        .iter()
        .map(|h| {
            let d = h.snapshot.as_ref().ok_or(MessageError::Empty)?;
            let ad = check_descriptor(d, limits)?;
            if h.verified_bytes > ad.key.archive_size {
                return Err(MessageError::BadHolding {
                    held: h.verified_bytes,
                    size: ad.key.archive_size,
                });
            }
            Ok(PartialAd {
                ad,
                verified_bytes: h.verified_bytes,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Advert {
        peer: sender,
        snapshots,
        partial,
        streamer_addrs,
        holder_slot: msg.holder_slot,
        modified_time: msg.modified_time,
        attestations,
        partial_attestations,
    })
}

/// The descriptor of an advertised snapshot, with the attestations it carries.
fn descriptor(ad: &SnapshotAd, attestations: &[Attestation]) -> proto::SnapshotDescriptor {
    let k = &ad.key;
    let base = k.base;
    proto::SnapshotDescriptor {
        kind: match k.kind {
            SnapshotKind::Full => proto::Kind::Full,
            SnapshotKind::Incremental => proto::Kind::Incremental,
        } as i32,
        slot: k.slot,
        bank_hash: k.bank_hash.0.to_vec().into(),
        content_root: k.content_root.0.to_vec().into(),
        archive_size: k.archive_size,
        chunk_size: ad.chunk_size.bytes(),
        base_slot: base.map_or(0, |b| b.slot),
        base_bank_hash: base
            .map(|b| b.bank_hash.0.to_vec())
            .unwrap_or_default()
            .into(),
        base_content_root: base
            .map(|b| b.content_root.0.to_vec())
            .unwrap_or_default()
            .into(),
        entry_count: ad.entry_count,
        state_bytes: ad.state_bytes,
        attestations: attestations
            .iter()
            .take(crate::snapshot::MAX_ATTESTATIONS)
            .map(Attestation::to_proto)
            .collect(),
    }
}

/// This node's advertisement of `snapshots` (newest first, at most [`MAX_SNAPSHOTS`]) and of
/// what it downloads and serves meanwhile (at most [`MAX_PARTIALS`]), each with the
/// attestations `attested` gives for it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn advert(
    local: PeerId,
    snapshots: &[SnapshotAd],
    attested: &dyn Fn(&SnapshotKey) -> Vec<Attestation>,
    partial: &[PartialAd],
    streamer_addrs: &[SocketAddr],
    holder_slot: Option<u64>,
    modified_time: u64,
    request_nonce: u64,
) -> proto::SnapshotInfoResponse {
    let newest = snapshots.iter().max_by_key(|s| s.key.slot);
    proto::SnapshotInfoResponse {
        r#type: RESPONSE_TYPE.into(),
        has_snapshot: newest.is_some(),
        peer_id: local.to_string(),
        file_size: newest.map_or(0, |s| s.key.archive_size),
        modified_time,
        streamer_addrs: streamer_addrs
            .iter()
            .take(MAX_STREAMER_ADDRS)
            .map(|a| a.to_string())
            .collect(),
        request_nonce,
        snapshots: snapshots
            .iter()
            .take(MAX_SNAPSHOTS)
            .map(|s| descriptor(s, &attested(&s.key)))
            .collect(),
        holder_slot,
        partial: partial
            .iter()
            .take(MAX_PARTIALS)
            .map(|p| proto::PartialHolding {
                snapshot: Some(descriptor(&p.ad, &attested(&p.ad.key))),
                verified_bytes: p.verified_bytes,
            })
            .collect(),
    }
}

/// A request from this node.
pub(crate) fn request(
    local: PeerId,
    nonce: u64,
    slot: Option<u64>,
    addrs: &[Multiaddr],
) -> proto::SnapshotInfoRequest {
    proto::SnapshotInfoRequest {
        r#type: REQUEST_TYPE.into(),
        requester_id: local.to_string(),
        nonce,
        requester_slot: slot,
        requester_addrs: addrs
            .iter()
            .take(MAX_REQUEST_ADDRS)
            .map(|a| a.to_vec().into())
            .collect(),
    }
}

/// Encodes a gossip message.
pub(crate) fn gossip(body: proto::discovery_message::Body) -> Vec<u8> {
    proto::DiscoveryMessage { body: Some(body) }.encode_to_vec()
}

/// What a received gossip message is, once decoded and checked.
pub(crate) enum Gossip {
    Request(InfoRequest),
    Announcement(Advert),
}

/// Decodes and checks a gossip message signed by `source`.
pub(crate) fn check_gossip(
    data: &[u8],
    source: PeerId,
    max_bytes: usize,
    limits: AdvertLimits,
) -> Result<Gossip, MessageError> {
    if data.len() > max_bytes {
        return Err(MessageError::TooLarge(data.len()));
    }
    match proto::DiscoveryMessage::decode(data)?.body {
        Some(proto::discovery_message::Body::Request(r)) => {
            check_request(&r, source).map(Gossip::Request)
        }
        Some(proto::discovery_message::Body::Announcement(a)) => {
            check_advert(&a, source, limits).map(Gossip::Announcement)
        }
        None => Err(MessageError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: AdvertLimits = AdvertLimits {
        max_archive_bytes: 1 << 30,
        max_chunks: 1 << 19,
    };

    fn ad(kind: SnapshotKind, slot: u64) -> SnapshotAd {
        SnapshotAd {
            key: SnapshotKey {
                kind,
                slot,
                bank_hash: BankHash([1; 32]),
                content_root: ContentRoot([2; 32]),
                archive_size: 1000,
                base: (kind == SnapshotKind::Incremental).then_some(Base {
                    slot: slot - 10,
                    bank_hash: BankHash([3; 32]),
                    content_root: ContentRoot([4; 32]),
                }),
            },
            chunk_size: ChunkSize::DEFAULT,
            entry_count: 3,
            state_bytes: 200,
        }
    }

    fn advert_msg(peer: PeerId) -> proto::SnapshotInfoResponse {
        advert(
            peer,
            &[
                ad(SnapshotKind::Incremental, 60),
                ad(SnapshotKind::Full, 50),
            ],
            &|_| Vec::new(),
            &[],
            &["127.0.0.1:4000".parse().unwrap()],
            Some(61),
            5,
            9,
        )
    }

    #[test]
    fn adverts_round_trip_and_are_checked() {
        let peer = PeerId::random();
        let ok = check_advert(&advert_msg(peer), peer, LIMITS).unwrap();
        assert_eq!(ok.snapshots.len(), 2);
        assert_eq!(ok.snapshots[0], ad(SnapshotKind::Incremental, 60));
        assert_eq!(ok.newest().unwrap().key.slot, 60);
        assert_eq!(ok.holder_slot, Some(61));

        let bad = |f: &dyn Fn(&mut proto::SnapshotInfoResponse)| {
            let mut m = advert_msg(peer);
            f(&mut m);
            check_advert(&m, peer, LIMITS).unwrap_err()
        };
        assert!(matches!(
            bad(&|m| m.r#type = "other".into()),
            MessageError::WrongType(_)
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[1] = m.snapshots[0].clone()),
            MessageError::Duplicate(60)
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[0].attestations = vec![Default::default(); 9]),
            MessageError::BadAttestation(AttestationError::TooMany(9))
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[0].attestations = vec![Default::default()]),
            MessageError::BadAttestation(AttestationError::BadSigner(0))
        ));
        assert!(matches!(
            bad(&|m| m.peer_id = PeerId::random().to_string()),
            MessageError::Spoofed { .. }
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[0].chunk_size = 3),
            MessageError::BadChunkSize(_)
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[1].bank_hash = vec![1; 5].into()),
            MessageError::BadDigest("bank_hash")
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[0].base_slot = 60),
            MessageError::BadBase(60)
        ));
        assert!(matches!(
            bad(&|m| m.streamer_addrs = vec!["not an address".into()]),
            MessageError::BadAddress(_)
        ));
        for a in [
            "0.0.0.0:4000",
            "224.0.0.1:4000",
            "255.255.255.255:4000",
            "127.0.0.1:0",
        ] {
            assert!(
                matches!(
                    bad(&|m| m.streamer_addrs = vec![a.into()]),
                    MessageError::BadAddress(_)
                ),
                "{a}"
            );
        }
        assert!(matches!(
            bad(&|m| m.streamer_addrs = vec!["127.0.0.1:1".into(); 9]),
            MessageError::TooMany(9, _)
        ));
        assert!(matches!(
            bad(&|m| m.snapshots = vec![m.snapshots[0].clone(); 9]),
            MessageError::TooMany(9, _)
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[0].archive_size = 0),
            MessageError::BadSize(0)
        ));
        assert!(matches!(
            bad(&|m| m.snapshots[0].archive_size = 1 << 31),
            MessageError::BadSize(_)
        ));
        // Within the byte limit but over the chunk limit at the smallest chunk size.
        assert!(matches!(
            bad(&|m| {
                m.snapshots[0].archive_size = 1 << 30;
                m.snapshots[0].chunk_size = 1024;
            }),
            MessageError::BadSize(_)
        ));
        assert!(matches!(bad(&|m| m.snapshots.clear()), MessageError::Empty));
    }

    #[test]
    fn partial_holdings_are_checked_and_an_advert_may_carry_only_them() {
        let peer = PeerId::random();
        let holding = PartialAd {
            ad: ad(SnapshotKind::Full, 70),
            verified_bytes: 400,
        };
        let msg = advert(
            peer,
            &[],
            &|_| Vec::new(),
            &[holding],
            &["127.0.0.1:4000".parse().unwrap()],
            None,
            0,
            9,
        );
        assert!(!msg.has_snapshot);
        let ok = check_advert(&msg, peer, LIMITS).unwrap();
        assert!(ok.snapshots.is_empty() && ok.newest().is_none());
        assert_eq!(ok.partial, vec![holding]);
        let bad = |f: &dyn Fn(&mut proto::SnapshotInfoResponse)| {
            let mut m = msg.clone();
            f(&mut m);
            check_advert(&m, peer, LIMITS).unwrap_err()
        };
        assert!(matches!(
            bad(&|m| m.partial[0].verified_bytes = 1001),
            MessageError::BadHolding {
                held: 1001,
                size: 1000
            }
        ));
        assert!(matches!(
            bad(&|m| m.partial[0].snapshot.as_mut().unwrap().chunk_size = 3),
            MessageError::BadChunkSize(_)
        ));
        assert!(matches!(
            bad(&|m| m.partial[0].snapshot = None),
            MessageError::Empty
        ));
        assert!(matches!(
            bad(&|m| m.partial = vec![m.partial[0].clone(); 5]),
            MessageError::TooMany(5, _)
        ));
        assert!(matches!(bad(&|m| m.partial.clear()), MessageError::Empty));
        // A peer that says it holds nothing complete is not taken at its word for snapshots.
        let mut m = msg.clone();
        m.snapshots = advert_msg(peer).snapshots;
        assert!(check_advert(&m, peer, LIMITS).unwrap().snapshots.is_empty());
    }

    #[test]
    fn partial_holders_carry_attestations_and_the_fullest_advert_fits_a_message() {
        let peer = PeerId::random();
        let signers: Vec<libp2p::identity::Keypair> = (0..crate::snapshot::MAX_ATTESTATIONS)
            .map(|_| libp2p::identity::Keypair::generate_ed25519())
            .collect();
        let signed = |key: &SnapshotKey| -> Vec<Attestation> {
            signers
                .iter()
                .map(|k| Attestation::sign(k, "net", key).unwrap())
                .collect()
        };
        let snapshots: Vec<SnapshotAd> = (0..MAX_SNAPSHOTS as u64)
            .map(|i| ad(SnapshotKind::Full, 100 + i))
            .collect();
        let partial: Vec<PartialAd> = (0..MAX_PARTIALS as u64)
            .map(|i| PartialAd {
                ad: ad(SnapshotKind::Incremental, 200 + i),
                verified_bytes: 10,
            })
            .collect();
        let addrs: Vec<SocketAddr> = (0..MAX_STREAMER_ADDRS as u16)
            .map(|i| SocketAddr::from(([203, 0, 113, 200], 65_000 + i)))
            .collect();
        let msg = advert(
            peer,
            &snapshots,
            &signed,
            &partial,
            &addrs,
            Some(u64::MAX),
            u64::MAX,
            u64::MAX,
        );
        let ok = check_advert(&msg, peer, LIMITS).unwrap();
        for (i, p) in ok.partial.iter().enumerate() {
            assert_eq!(ok.partial_attestations_of(i), signed(&p.ad.key));
            assert!(
                ok.partial_attestations_of(i)
                    .iter()
                    .all(|a| a.verify("net", &p.ad.key))
            );
        }
        assert_eq!(ok.attestations_of(3), signed(&snapshots[3].key));
        // Every list full: the announcement fits the default message limit (16 KiB) with room.
        let bytes = gossip(proto::discovery_message::Body::Announcement(msg.clone()));
        assert!(bytes.len() < 12 << 10, "{} bytes", bytes.len());
        // A partial holding's attestations are checked as a snapshot's are.
        let mut bad = msg;
        bad.partial[1].snapshot.as_mut().unwrap().attestations = vec![Default::default(); 9];
        assert!(matches!(
            check_advert(&bad, peer, LIMITS),
            Err(MessageError::BadAttestation(AttestationError::TooMany(9)))
        ));
    }

    #[test]
    fn requests_are_checked() {
        let peer = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let msg = request(peer, 9, Some(3), std::slice::from_ref(&addr));
        let r = check_request(&msg, peer).unwrap();
        assert_eq!((r.nonce, r.slot, r.addrs), (9, Some(3), vec![addr.clone()]));
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
        let mut many = msg.clone();
        many.requester_addrs = vec![addr.to_vec().into(); 5];
        assert!(matches!(
            check_request(&many, peer),
            Err(MessageError::TooMany(5, _))
        ));
        // Built requests never carry more than the limit.
        assert_eq!(
            request(peer, 1, None, &vec![addr; 9]).requester_addrs.len(),
            4
        );
    }

    #[test]
    fn gossip_is_decoded_and_size_checked() {
        let peer = PeerId::random();
        let bytes = gossip(proto::discovery_message::Body::Announcement(advert_msg(
            peer,
        )));
        assert!(matches!(
            check_gossip(&bytes, peer, 16 << 10, LIMITS),
            Ok(Gossip::Announcement(_))
        ));
        assert!(matches!(
            check_gossip(&bytes, peer, 10, LIMITS),
            Err(MessageError::TooLarge(_))
        ));
        assert!(matches!(
            check_gossip(b"\xff\xfe junk", peer, 1024, LIMITS),
            Err(MessageError::Decode(_))
        ));
        assert!(matches!(
            check_gossip(&gossip_empty(), peer, 1024, LIMITS),
            Err(MessageError::Empty)
        ));
    }

    fn gossip_empty() -> Vec<u8> {
        proto::DiscoveryMessage { body: None }.encode_to_vec()
    }
}
