//! Every discovery rule, driven with injected time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::message::{self, AdvertLimits};
use super::*;
use crate::chunk::ChunkSize;
use crate::hash::{BankHash, ContentRoot};
use crate::metrics::MessageKind;
use crate::snapshot::{Base, SnapshotKind};

mod asking;
mod choosing;
mod executing;
mod limits;
mod serving;
mod trust;

const SEC: Duration = Duration::from_secs(1);

fn config() -> DiscoveryConfig {
    DiscoveryConfig {
        network: "n".into(),
        discovery_interval: 30 * SEC,
        answer_window: SEC,
        behind_threshold: 10,
        announce_window: 60 * SEC,
        announce_delay: SEC,
        announce_redundancy: 2,
        answer_cooldown: SEC,
        min_request_interval: Duration::from_millis(500),
        max_strikes: 3,
        max_message_bytes: 16 << 10,
        limits: AdvertLimits {
            max_archive_bytes: 1 << 30,
            max_chunks: 1 << 20,
        },
        sync_enabled: true,
        policy: TrustPolicy::default(),
        failed_cooldown: 600 * SEC,
        max_tracked_peers: 64,
        dial_budget: 2,
        max_direct_asks: 16,
        strike_decay: 600 * SEC,
        announcements_per_source: 16,
        chain_clock: None,
        // The rules of a node that follows snapshots; those of one that executes from its
        // start are tested apart.
        executes: false,
    }
}

fn machine(config: DiscoveryConfig, now: Instant) -> Discovery {
    let mut d = Discovery::new(config, PeerId::random(), Metrics::new(), now, 7);
    d.handle_streamer_addrs(vec!["127.0.0.1:9000".parse().unwrap()]);
    d
}

fn full(slot: u64, hash: u8) -> SnapshotAd {
    SnapshotAd {
        key: SnapshotKey {
            kind: SnapshotKind::Full,
            slot,
            bank_hash: BankHash([hash; 32]),
            content_root: ContentRoot([hash; 32]),
            archive_size: 1 << 20,
            base: None,
        },
        chunk_size: ChunkSize::DEFAULT,
        entry_count: 10,
        state_bytes: 1 << 21,
    }
}

fn incremental(slot: u64, hash: u8, base: &SnapshotAd) -> SnapshotAd {
    SnapshotAd {
        key: SnapshotKey {
            kind: SnapshotKind::Incremental,
            slot,
            bank_hash: BankHash([hash; 32]),
            content_root: ContentRoot([hash; 32]),
            archive_size: 1 << 12,
            base: Some(Base {
                slot: base.key.slot,
                bank_hash: base.key.bank_hash,
                content_root: base.key.content_root,
            }),
        },
        chunk_size: ChunkSize::DEFAULT,
        entry_count: 2,
        state_bytes: 1 << 13,
    }
}

fn addr() -> Vec<SocketAddr> {
    vec!["127.0.0.1:7000".parse().unwrap()]
}

/// `peer`'s advertisement of `snaps`, answering `nonce`.
fn answer(peer: PeerId, snaps: &[SnapshotAd], nonce: u64) -> crate::proto::SnapshotInfoResponse {
    message::advert(peer, snaps, &|_| Vec::new(), &[], &addr(), None, 0, nonce)
}

fn drain(d: &mut Discovery) -> Vec<Action> {
    std::iter::from_fn(|| d.poll()).collect()
}

fn publishes(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Publish { .. }))
        .count()
}

fn started(actions: &[Action]) -> bool {
    actions
        .iter()
        .any(|a| matches!(a, Action::Notice(Notice::Started { .. })))
}

/// The nonce of the last request the machine published.
fn last_nonce(actions: &[Action]) -> u64 {
    use prost::Message;
    actions
        .iter()
        .rev()
        .find_map(|a| match a {
            Action::Publish { bytes, .. } => {
                match crate::proto::DiscoveryMessage::decode(&bytes[..])
                    .ok()?
                    .body?
                {
                    crate::proto::discovery_message::Body::Request(r) => Some(r.nonce),
                    _ => None,
                }
            }
            Action::Ask { request, .. } => Some(request.nonce),
            _ => None,
        })
        .expect("a request")
}

fn plan_of(actions: &[Action]) -> Option<Plan> {
    actions.iter().find_map(|a| match a {
        Action::StartSync(p) => Some((**p).clone()),
        _ => None,
    })
}

fn local(slot: Option<u64>, snaps: Vec<SnapshotAd>) -> Local {
    Local {
        attestations: Default::default(),
        chunk_size: None,
        slot,
        snapshots: snaps,
        modified_time: 0,
    }
}

fn holder(t0: Instant) -> Discovery {
    let mut c = config();
    c.sync_enabled = false;
    let mut d = machine(c, t0);
    d.handle_local(local(Some(100), vec![full(100, 1)]));
    d
}

// ---- Free identities (issue: free identities cannot overwrite, stall or discredit a node) ----

/// A machine that asked once; returns it with the nonce of its request.
fn asking(config: DiscoveryConfig, t0: Instant, slot: Option<u64>) -> (Discovery, u64) {
    let mut d = machine(config, t0);
    d.handle_local(local(slot, vec![]));
    d.handle_timeout(t0);
    let nonce = last_nonce(&drain(&mut d));
    (d, nonce)
}

fn trusted_config(trusted: &[PeerId], quorum: usize) -> DiscoveryConfig {
    let mut c = config();
    c.policy = TrustPolicy::TrustedPeers {
        peers: trusted.iter().copied().collect(),
        quorum,
    };
    c
}

/// `peer`'s advertisement of partial holdings only, answering `nonce`.
fn partial_answer(
    peer: PeerId,
    held: &[SnapshotAd],
    nonce: u64,
) -> crate::proto::SnapshotInfoResponse {
    let partial: Vec<PartialAd> = held
        .iter()
        .map(|ad| PartialAd {
            ad: *ad,
            verified_bytes: ad.key.archive_size / 2,
        })
        .collect();
    message::advert(
        peer,
        &[],
        &|_| Vec::new(),
        &partial,
        &addr(),
        None,
        0,
        nonce,
    )
}

/// A request from `peer` at `slot`, as gossip.
fn gossip_request(peer: PeerId, nonce: u64, slot: Option<u64>) -> Vec<u8> {
    message::gossip(crate::proto::discovery_message::Body::Request(
        message::request(
            peer,
            nonce,
            slot,
            &["/ip4/127.0.0.1/tcp/1".parse().unwrap()],
        ),
    ))
}
