//! The chunk-stream wire, for both sides: framing, the protocol constants, the one table of
//! refusals and their close codes, and the handshake in which each side proves it knows the
//! shared token without sending it.
//!
//! Every message is a protobuf from `proto/snapsync.proto`, framed as [`crate::frame`] says. A
//! connection starts with `Hello`/`Welcome` on the client's first stream; each request then has
//! its own bidirectional stream (see `docs/FORMAT.md`).
//!
//! # The token proof
//!
//! Neither side ever sends the token. Both derive `key = BLAKE3-derive_key("snapsync 2026-11
//! chunk stream token", token)` and prove they know it with a keyed BLAKE3 hash over material
//! unique to this TLS session (the TLS exporter), both PeerIds and the role:
//!
//! ```text
//! proof(role) = BLAKE3-keyed(key, "snapsync token proof v2" || role || exporter(32)
//!                                 || u16_be(len) || client PeerId || u16_be(len) || server PeerId)
//! role = 0x01 (client, in Hello), 0x02 (server, in Welcome)
//! exporter = TLS-Exporter("EXPORTER-snapsync-token-v2", no context, 32 bytes)
//! ```
//!
//! A server without the token learns a value bound to its own session, useless anywhere else;
//! the client learns whether the server knows the token too, and refuses one that does not.
//! A weak token can still be guessed offline from a recorded proof: use a random one
//! ([`super::Token::generate`]).

use libp2p::PeerId;
use prost::Message;
use quinn::{RecvStream, VarInt};

pub(crate) use crate::frame::{FrameError, encode_frame, write_frame};

use super::Token;
use crate::proto;

/// ALPN of the chunk stream, version 2.
pub(crate) const ALPN: &[u8] = b"snapsync/chunks/2";

/// Chunk-stream protocol version carried in `Hello` and `Welcome`.
pub(crate) const PROTOCOL_VERSION: u32 = 2;

/// Largest framed message accepted (requests, headers, manifests are all far smaller).
pub(crate) const MAX_FRAME: usize = 16 * 1024;

/// Largest `Hello` or `Welcome`.
pub(crate) const MAX_HELLO: usize = 256;

/// Most bits a have bitfield carries (256 KiB of it): a client asks in blocks big enough.
pub(crate) const MAX_HAVE_BITS: u64 = 1 << 21;

/// Longest a downloading holder keeps a have question for news (`GetHave.wait_ms`), and what
/// a downloader asks for.
pub(crate) const HAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Connection close codes that are not refusals.
pub(crate) mod close {
    use super::VarInt;

    /// The client broke the protocol (bad frame, bad hello, no hello in time).
    pub(crate) const PROTOCOL: VarInt = VarInt::from_u32(0x11);
    /// The server is shutting down.
    pub(crate) const SHUTDOWN: VarInt = VarInt::from_u32(0x12);
    /// The client is done (or shutting down).
    pub(crate) const DONE: VarInt = VarInt::from_u32(0x14);
    /// The client did not read a response within the write deadline.
    pub(crate) const TOO_SLOW: VarInt = VarInt::from_u32(0x15);
    /// The server did not prove it knows the token.
    pub(crate) const SERVER_UNAUTHENTICATED: VarInt = VarInt::from_u32(0x16);
    /// The server was full and this connection served least (idle or slow): it may come back.
    pub(crate) const EVICTED: VarInt = VarInt::from_u32(0x17);
    /// The connection opened no request for the server's idle limit: it may come back.
    pub(crate) const IDLE: VarInt = VarInt::from_u32(0x18);
}

/// Stream reset/stop code for a request the client no longer wants.
pub(crate) const CANCELLED: VarInt = VarInt::from_u32(0x20);

/// Why a server refuses a connection: what it says in `Welcome`, the code it closes with, and
/// what the client reads from either. The one table both sides use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The token proof is wrong or missing.
    Unauthorized,
    /// Too many connections from this peer or address.
    Busy,
    /// Unsupported protocol version.
    Version,
}

impl Refusal {
    const ALL: [Refusal; 3] = [Refusal::Unauthorized, Refusal::Busy, Refusal::Version];

    pub(crate) fn code(self) -> VarInt {
        VarInt::from_u32(match self {
            Refusal::Unauthorized => 0x10,
            Refusal::Busy => 0x13,
            Refusal::Version => 0x11,
        })
    }

    pub(crate) fn proto(self) -> proto::Refusal {
        match self {
            Refusal::Unauthorized => proto::Refusal::Unauthorized,
            Refusal::Busy => proto::Refusal::Busy,
            Refusal::Version => proto::Refusal::Version,
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "unauthorized: wrong or missing SNAPSHOT_TOKEN",
            Refusal::Busy => "busy: too many connections from this peer or address",
            Refusal::Version => "unsupported chunk-stream protocol version",
        }
    }

    pub(crate) fn from_proto(value: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.proto() as i32 == value)
    }

    /// The refusal a close code stands for (the version refusal shares the protocol code).
    pub(crate) fn from_code(code: VarInt) -> Option<Self> {
        [Refusal::Unauthorized, Refusal::Busy]
            .into_iter()
            .find(|r| r.code() == code)
    }
}

/// Reads one framed message of at most `max` bytes (never more than [`MAX_FRAME`]).
pub(crate) async fn read_frame<M: Message + Default>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<M, FrameError> {
    crate::frame::read_frame(recv, max.min(MAX_FRAME)).await
}

/// Exporter label of the token proof.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-snapsync-token-v2";

/// Which side proves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client = 1,
    Server = 2,
}

/// What a side needs to prove and check the token on a connection.
#[derive(Debug, Clone)]
pub(crate) struct TokenKey([u8; 32]);

impl TokenKey {
    pub(crate) fn new(token: &Token) -> Self {
        Self(blake3::derive_key(
            "snapsync 2026-11 chunk stream token",
            token.as_bytes(),
        ))
    }

    /// The proof of `role` on `conn`, between `client` and `server`; `None` if the TLS
    /// session cannot export keying material (it always can with TLS 1.3).
    pub(crate) fn proof(
        &self,
        conn: &quinn::Connection,
        role: Role,
        client: &PeerId,
        server: &PeerId,
    ) -> Option<blake3::Hash> {
        let mut exporter = [0u8; 32];
        conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .ok()?;
        Some(self.proof_over(&exporter, role, client, server))
    }

    fn proof_over(
        &self,
        exporter: &[u8; 32],
        role: Role,
        client: &PeerId,
        server: &PeerId,
    ) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(b"snapsync token proof v2");
        h.update(&[role as u8]);
        h.update(exporter);
        for id in [client, server] {
            let bytes = id.to_bytes();
            h.update(&(bytes.len() as u16).to_be_bytes());
            h.update(&bytes);
        }
        h.finalize()
    }

    /// Whether `received` is the proof of `role` (compared in constant time).
    pub(crate) fn check(
        &self,
        conn: &quinn::Connection,
        role: Role,
        client: &PeerId,
        server: &PeerId,
        received: &[u8],
    ) -> bool {
        let Ok(received) = <[u8; 32]>::try_from(received) else {
            return false;
        };
        self.proof(conn, role, client, server)
            // blake3::Hash compares in constant time.
            .is_some_and(|expected| expected == blake3::Hash::from_bytes(received))
    }
}

/// The client's `Hello`.
pub(crate) fn hello(proof: Option<blake3::Hash>) -> proto::Hello {
    proto::Hello {
        protocol_version: PROTOCOL_VERSION,
        proof: proof
            .map(|p| p.as_bytes().to_vec())
            .unwrap_or_default()
            .into(),
    }
}

/// The server's `Welcome`: accepted (with its own proof), or refused.
pub(crate) fn welcome(outcome: Result<Option<blake3::Hash>, Refusal>) -> proto::Welcome {
    match outcome {
        Ok(proof) => proto::Welcome {
            protocol_version: PROTOCOL_VERSION,
            refused: proto::Refusal::None as i32,
            message: String::new(),
            proof: proof
                .map(|p| p.as_bytes().to_vec())
                .unwrap_or_default()
                .into(),
        },
        Err(r) => proto::Welcome {
            protocol_version: PROTOCOL_VERSION,
            refused: r.proto() as i32,
            message: r.message().into(),
            proof: Default::default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_one_to_one() {
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_proto(r.proto() as i32), Some(r));
            let w = welcome(Err(r));
            assert_eq!(Refusal::from_proto(w.refused), Some(r));
            assert!(!w.message.is_empty());
        }
        assert_eq!(Refusal::from_proto(proto::Refusal::None as i32), None);
        assert_eq!(
            Refusal::from_code(Refusal::Busy.code()),
            Some(Refusal::Busy)
        );
        assert_eq!(Refusal::from_code(close::DONE), None);
    }

    #[test]
    fn proofs_depend_on_token_session_peers_and_role() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let key = TokenKey::new(&Token::new("secret"));
        let x = [1u8; 32];
        let p = key.proof_over(&x, Role::Client, &a, &b);
        assert_ne!(p, key.proof_over(&x, Role::Server, &a, &b), "role");
        assert_ne!(p, key.proof_over(&[2; 32], Role::Client, &a, &b), "session");
        assert_ne!(p, key.proof_over(&x, Role::Client, &b, &a), "peers");
        let other = TokenKey::new(&Token::new("secreT"));
        assert_ne!(p, other.proof_over(&x, Role::Client, &a, &b), "token");
        assert!(!p.as_bytes().windows(6).any(|w| w == b"secret"));
    }
}
