//! [`Attestation`]: a node's signed statement that it made a snapshot by executing the chain.
//!
//! A node signs the snapshots it makes with its libp2p identity key (ed25519), so a validator's
//! word travels with the snapshot wherever it is served: in answers and announcements, relayed
//! by any holder, in a web mirror's `index.json`, in `attestations.pb` beside the archive. A
//! [`TrustPolicy::TrustedPeers`](crate::TrustPolicy::TrustedPeers) counts the signatures of its
//! trusted peers as it counts their live adverts. The signed bytes are the snapshot's
//! *statement* ([`Attestation::statement`]): domain-separated and versioned, binding the
//! network name and everything that identifies the snapshot, so an attestation cannot be
//! replayed onto another snapshot, slot, base or network.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey, ed25519};
use prost::Message;

use super::archive::SnapshotKind;
use super::manifest::SnapshotKey;
use crate::proto;

/// Most attestations kept, carried or stored per snapshot.
pub const MAX_ATTESTATIONS: usize = 8;

/// Largest `attestations.pb` read (a full one is under 1 KiB).
pub const MAX_ATTESTATIONS_BYTES: usize = 4096;

/// The domain the statement starts with; a new version changes it.
const DOMAIN: &[u8] = b"snapsync/attestation/v1\0";

/// An attestation could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    /// The signing key is not an ed25519 key (only those can attest).
    #[error("only an ed25519 identity key can attest a snapshot")]
    NotEd25519,
    /// The key could not sign.
    #[error("signing failed: {0}")]
    Signing(String),
    /// The signer is not 32 bytes or not a valid ed25519 key.
    #[error("attestation signer is not an ed25519 public key ({0} bytes)")]
    BadSigner(usize),
    /// The signature is not 64 bytes.
    #[error("attestation signature is {0} bytes, not 64")]
    BadSignature(usize),
    /// More attestations than a snapshot may carry.
    #[error("{0} attestations for one snapshot, at most {MAX_ATTESTATIONS}")]
    TooMany(usize),
    /// The bytes are not an attestation list (or are too long).
    #[error("invalid attestation list: {0}")]
    Decode(String),
    /// The signature does not verify for the snapshot and network it is given for.
    #[error("the attestation of {} does not verify for this snapshot", signer.map_or("an invalid key".to_string(), |p| p.to_string()))]
    Invalid {
        /// Who it claims to be from (`None`: not a valid ed25519 key).
        signer: Option<PeerId>,
    },
}

/// One node's signature over a snapshot's statement. Checked only against the statement of a
/// given snapshot and network ([`Attestation::verify`]); until then it is a claim.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attestation {
    signer: [u8; 32],
    signature: [u8; 64],
}

impl Attestation {
    /// The bytes a node signs for `key` on `network`: the domain, the network name, and the
    /// snapshot's kind, slot, bank hash, content root, archive size and, for an incremental,
    /// its base (docs/FORMAT.md has the layout).
    pub fn statement(network: &str, key: &SnapshotKey) -> Vec<u8> {
        let mut s = Vec::with_capacity(DOMAIN.len() + 4 + network.len() + 1 + 8 + 64 + 8 + 72);
        s.extend_from_slice(DOMAIN);
        s.extend_from_slice(&(network.len() as u32).to_be_bytes());
        s.extend_from_slice(network.as_bytes());
        s.push(match key.kind {
            SnapshotKind::Full => 0,
            SnapshotKind::Incremental => 1,
        });
        s.extend_from_slice(&key.slot.to_be_bytes());
        s.extend_from_slice(&key.bank_hash.0);
        s.extend_from_slice(&key.content_root.0);
        s.extend_from_slice(&key.archive_size.to_be_bytes());
        if let Some(b) = key.base {
            s.extend_from_slice(&b.slot.to_be_bytes());
            s.extend_from_slice(&b.bank_hash.0);
            s.extend_from_slice(&b.content_root.0);
        }
        s
    }

    /// `keypair`'s attestation of `key` on `network`.
    pub fn sign(
        keypair: &Keypair,
        network: &str,
        key: &SnapshotKey,
    ) -> Result<Self, AttestationError> {
        let public = keypair
            .public()
            .try_into_ed25519()
            .map_err(|_| AttestationError::NotEd25519)?;
        let signature = keypair
            .sign(&Self::statement(network, key))
            .map_err(|e| AttestationError::Signing(e.to_string()))?;
        let signature: [u8; 64] = signature
            .as_slice()
            .try_into()
            .map_err(|_| AttestationError::BadSignature(signature.len()))?;
        Ok(Self {
            signer: public.to_bytes(),
            signature,
        })
    }

    /// The signer's ed25519 public key, as it was given (not checked to be a valid key).
    pub fn signer_key(&self) -> &[u8; 32] {
        &self.signer
    }

    /// The signer's PeerId, when its key is a valid ed25519 key.
    pub fn signer(&self) -> Option<PeerId> {
        let key = ed25519::PublicKey::try_from_bytes(&self.signer).ok()?;
        Some(PublicKey::from(key).to_peer_id())
    }

    /// Whether the signature is the signer's over `key`'s statement on `network`.
    pub fn verify(&self, network: &str, key: &SnapshotKey) -> bool {
        ed25519::PublicKey::try_from_bytes(&self.signer)
            .is_ok_and(|k| k.verify(&Self::statement(network, key), &self.signature))
    }

    /// From its wire form; lengths checked, signature not.
    pub fn from_proto(p: &proto::Attestation) -> Result<Self, AttestationError> {
        let signer: [u8; 32] = p
            .signer
            .as_ref()
            .try_into()
            .map_err(|_| AttestationError::BadSigner(p.signer.len()))?;
        let signature: [u8; 64] = p
            .signature
            .as_ref()
            .try_into()
            .map_err(|_| AttestationError::BadSignature(p.signature.len()))?;
        Ok(Self { signer, signature })
    }

    /// Its wire form.
    pub fn to_proto(&self) -> proto::Attestation {
        proto::Attestation {
            signer: self.signer.to_vec().into(),
            signature: self.signature.to_vec().into(),
        }
    }

    /// Its signer key and signature in lower-case hex (as a web index lists them).
    pub fn to_hex(&self) -> (String, String) {
        (hex(&self.signer), hex(&self.signature))
    }

    /// From the hex of its signer key (64 digits) and signature (128 digits); lengths checked,
    /// signature not.
    pub fn from_hex(signer: &str, signature: &str) -> Result<Self, AttestationError> {
        let signer = unhex::<32>(signer).ok_or(AttestationError::BadSigner(signer.len() / 2))?;
        let signature =
            unhex::<64>(signature).ok_or(AttestationError::BadSignature(signature.len() / 2))?;
        Ok(Self { signer, signature })
    }

    /// Decodes a list carried with one snapshot: at most [`MAX_ATTESTATIONS`], lengths checked.
    pub fn decode_list(items: &[proto::Attestation]) -> Result<Vec<Self>, AttestationError> {
        if items.len() > MAX_ATTESTATIONS {
            return Err(AttestationError::TooMany(items.len()));
        }
        items.iter().map(Self::from_proto).collect()
    }

    /// The bytes of `attestations.pb` holding `list`.
    pub fn encode_file(list: &[Attestation]) -> Vec<u8> {
        proto::AttestationList {
            attestations: list.iter().map(Self::to_proto).collect(),
        }
        .encode_to_vec()
    }

    /// Reads the bytes of an `attestations.pb`: at most [`MAX_ATTESTATIONS_BYTES`] and
    /// [`MAX_ATTESTATIONS`] entries, lengths checked (signatures are checked by whoever counts
    /// them).
    pub fn decode_file(bytes: &[u8]) -> Result<Vec<Self>, AttestationError> {
        if bytes.len() > MAX_ATTESTATIONS_BYTES {
            return Err(AttestationError::Decode(format!(
                "{} bytes, at most {MAX_ATTESTATIONS_BYTES}",
                bytes.len()
            )));
        }
        let list = proto::AttestationList::decode(bytes)
            .map_err(|e| AttestationError::Decode(e.to_string()))?;
        Self::decode_list(&list.attestations)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Merges `new` into `list`: one attestation per signer (the one already there stays), at most
/// [`MAX_ATTESTATIONS`] in all. Returns whether `list` changed.
pub(crate) fn merge(list: &mut Vec<Attestation>, new: &[Attestation]) -> bool {
    let mut changed = false;
    for a in new {
        if list.len() >= MAX_ATTESTATIONS {
            break;
        }
        if list.iter().all(|b| b.signer != a.signer) {
            list.push(a.clone());
            changed = true;
        }
    }
    changed
}

/// The ed25519 public key a PeerId embeds (an ed25519 PeerId is the identity multihash of its
/// protobuf-encoded key), or `None` for a PeerId of another key type or a hashed one.
pub(crate) fn ed25519_key_of(peer: &PeerId) -> Option<[u8; 32]> {
    let bytes = peer.to_bytes();
    // Identity multihash: code 0, then the digest's length (one varint byte here).
    let (&code, rest) = bytes.split_first()?;
    let (&len, digest) = rest.split_first()?;
    if code != 0 || usize::from(len) != digest.len() || len >= 0x80 {
        return None;
    }
    let public = PublicKey::try_decode_protobuf(digest).ok()?;
    if public.to_peer_id() != *peer {
        return None;
    }
    Some(public.try_into_ed25519().ok()?.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::{BankHash, ContentRoot};
    use crate::snapshot::Base;

    fn full(slot: u64) -> SnapshotKey {
        SnapshotKey {
            kind: SnapshotKind::Full,
            slot,
            bank_hash: BankHash([1; 32]),
            content_root: ContentRoot([2; 32]),
            archive_size: 1000,
            base: None,
        }
    }

    fn incremental() -> SnapshotKey {
        SnapshotKey {
            kind: SnapshotKind::Incremental,
            slot: 150,
            bank_hash: BankHash([3; 32]),
            content_root: ContentRoot([4; 32]),
            archive_size: 100,
            base: Some(Base::of(&full(100))),
        }
    }

    #[test]
    fn an_attestation_verifies_for_its_snapshot_and_network_only() {
        let kp = Keypair::generate_ed25519();
        let a = Attestation::sign(&kp, "main", &full(100)).unwrap();
        assert!(a.verify("main", &full(100)));
        assert_eq!(a.signer(), Some(kp.public().to_peer_id()));
        assert!(!a.verify("test", &full(100)), "another network");
        assert!(!a.verify("main", &full(101)), "another slot");
        let mut k = full(100);
        k.bank_hash = BankHash([9; 32]);
        assert!(!a.verify("main", &k), "another bank hash");
        let mut k = full(100);
        k.content_root = ContentRoot([9; 32]);
        assert!(!a.verify("main", &k), "another root");
        let mut k = full(100);
        k.archive_size += 1;
        assert!(!a.verify("main", &k), "another size");
        let inc = Attestation::sign(&kp, "main", &incremental()).unwrap();
        assert!(inc.verify("main", &incremental()));
        let mut k = incremental();
        k.base = Some(Base::of(&full(99)));
        assert!(!inc.verify("main", &k), "another base");
        let mut k = incremental();
        k.kind = SnapshotKind::Full;
        k.base = None;
        assert!(!inc.verify("main", &k), "another kind");
        // Another key's signature under this signer, or a flipped bit, fails.
        let other = Attestation::sign(&Keypair::generate_ed25519(), "main", &full(100)).unwrap();
        let forged = Attestation {
            signer: a.signer,
            signature: other.signature,
        };
        assert!(!forged.verify("main", &full(100)));
        let mut flipped = a.clone();
        flipped.signature[5] ^= 1;
        assert!(!flipped.verify("main", &full(100)));
    }

    #[test]
    fn network_names_cannot_run_into_the_fields() {
        // Network "ab" then kind 0 must not read as network "ab\0": the name's length comes
        // first.
        let short = Attestation::statement("ab", &full(1));
        let long = Attestation::statement("ab\0", &full(1));
        assert!(!long.starts_with(&short[..DOMAIN.len() + 4 + 3]));
    }

    #[test]
    fn lists_round_trip_and_are_bounded() {
        let kps: Vec<Keypair> = (0..9).map(|_| Keypair::generate_ed25519()).collect();
        let list: Vec<Attestation> = kps
            .iter()
            .take(MAX_ATTESTATIONS)
            .map(|k| Attestation::sign(k, "n", &full(1)).unwrap())
            .collect();
        let bytes = Attestation::encode_file(&list);
        assert!(bytes.len() < 1024);
        assert_eq!(Attestation::decode_file(&bytes).unwrap(), list);
        let mut nine = list.clone();
        nine.push(Attestation::sign(&kps[8], "n", &full(1)).unwrap());
        assert_eq!(
            Attestation::decode_file(&Attestation::encode_file(&nine)),
            Err(AttestationError::TooMany(9))
        );
        let short = proto::Attestation {
            signer: vec![1; 31].into(),
            signature: vec![0; 64].into(),
        };
        assert_eq!(
            Attestation::from_proto(&short),
            Err(AttestationError::BadSigner(31))
        );
        assert!(Attestation::decode_file(&[0xff; 10]).is_err());
        let (signer, signature) = list[0].to_hex();
        assert_eq!(
            Attestation::from_hex(&signer, &signature),
            Ok(list[0].clone())
        );
        assert!(Attestation::from_hex(&signer[2..], &signature).is_err());
        assert!(Attestation::from_hex(&signer, &format!("zz{}", &signature[2..])).is_err());
        assert!(Attestation::from_hex(&"é".repeat(32), &signature).is_err());
        assert!(Attestation::decode_file(&vec![0; MAX_ATTESTATIONS_BYTES + 1]).is_err());
        // Merging keeps one per signer and at most the bound.
        let mut kept = list[..2].to_vec();
        assert!(!merge(&mut kept, &list[..2]));
        assert!(merge(&mut kept, &nine));
        assert_eq!(kept.len(), MAX_ATTESTATIONS);
        assert_eq!(kept, list);
    }

    #[test]
    fn an_ed25519_peer_id_gives_its_key() {
        let kp = Keypair::generate_ed25519();
        let peer = kp.public().to_peer_id();
        let a = Attestation::sign(&kp, "n", &full(1)).unwrap();
        assert_eq!(ed25519_key_of(&peer), Some(*a.signer_key()));
        assert_eq!(ed25519_key_of(&PeerId::random()), None);
    }
}
