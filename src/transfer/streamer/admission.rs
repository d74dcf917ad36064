//! [`Admission`]: the streamer's rules, a pure state machine with injected time, in
//! quinn-proto's vocabulary (`handle_*` changes state, [`Admission::poll_output`] drains what it
//! asks of the driver). The driver (`mod.rs`, `connection.rs`) only carries them out.
//!
//! The rules, each bounded before a peer has proven anything:
//! - **Before any work.** A connection is refused at once when the streamer holds
//!   `max_connections` (authenticated or not) and none can make room, or when its address
//!   group (an IPv4 address, an IPv6 /64) has `max_pending_per_ip` handshakes under way. Under
//!   load (`retry_after_pending` handshakes), a client must first prove it receives at its
//!   address (QUIC Retry): a spoofed source costs one small packet and no state.
//! - **Room for newcomers.** A full streamer closes the authenticated connection that serves
//!   least, when one served less than `min_client_rate` since it was let in (after a grace),
//!   the most crowded address group first: connections that hold places and take nothing
//!   cannot keep honest downloaders out.
//! - **After the token.** An authenticated connection takes its place in its address group
//!   (`max_connections_per_ip`) and its peer's (`max_connections_per_peer`).
//! - **Send memory.** The authenticated connections share `send_memory` evenly, each within the
//!   transport's send window and above a floor.
//! - **Response memory** is shared by peer and by address group: a PeerId, whatever its
//!   connections, and an address group, whatever its identities, hold at most
//!   `response_memory / max_uploads` (never less than one largest response), so that a few
//!   peers reading slowly cannot take all of it; it is taken whole or not at all (no queue a
//!   large waiter could block).
//! - **Upload slots** ([`UploadSlots`]): who is sent chunks now.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::slots::{UPLOAD_LINGER, UploadSlots};
use crate::metrics::RefusedReason;

/// A connection, by the id the admission gave it.
pub(crate) type ConnId = u64;

/// How long a connection is given before it can be judged idle or slow.
pub(crate) const EVICTION_GRACE: Duration = Duration::from_secs(2);

/// Memory for have answers (bitfields), apart from the chunk responses': a peer that only asks
/// what this node holds cannot take what chunk responses need.
pub(crate) const HAVE_MEMORY: u64 = 4 << 20;

/// Most of [`HAVE_MEMORY`] one peer, or one address group, holds at once (four of the largest
/// bitfields).
pub(crate) const HAVE_SHARE: u64 = 1 << 20;

/// The smallest send window a connection is given however many there are.
pub(crate) const MIN_SEND_WINDOW: u64 = 256 << 10;

/// The limits the rules apply (from the streamer's settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) max_pending_per_ip: usize,
    pub(crate) max_connections_per_ip: usize,
    pub(crate) max_connections_per_peer: usize,
    pub(crate) retry_after_pending: usize,
    pub(crate) min_client_rate: u64,
    /// Response memory in all, bytes.
    pub(crate) response_memory: u64,
    /// The largest response, encoded, bytes: every share holds at least one.
    pub(crate) largest_response: u64,
    pub(crate) send_memory: u64,
    pub(crate) send_window: u64,
    pub(crate) max_uploads: usize,
    pub(crate) upload_slot: Duration,
}

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// Let it start its handshake; it holds a place until [`Admission::handle_closed`].
    Accept(ConnId),
    /// Ask it to prove its address first (QUIC Retry).
    Retry,
    /// Refuse it, for this reason.
    Refuse(RefusedReason),
}

/// What the admission asks of its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Close this connection to make room for a newcomer.
    Evict(ConnId),
    /// Give this authenticated connection this share of the send memory.
    SendShare(ConnId, u64),
}

#[derive(Debug)]
struct Conn {
    group: IpAddr,
    /// Its peer, once authenticated.
    peer: Option<PeerId>,
    since: Instant,
    /// Data bytes served.
    served: u64,
    /// Response memory it holds, bytes.
    memory: u64,
    /// Have-answer memory it holds, bytes.
    have: u64,
    /// Asked to close to make room: it does not count as one that could.
    evicted: bool,
}

#[derive(Debug, Default)]
struct Group {
    pending: usize,
    authenticated: usize,
    memory: u64,
    have: u64,
}

#[derive(Debug, Default)]
struct PeerUse {
    connections: usize,
    memory: u64,
    have: u64,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    conns: HashMap<ConnId, Conn>,
    groups: HashMap<IpAddr, Group>,
    peers: HashMap<PeerId, PeerUse>,
    pending: usize,
    memory_used: u64,
    have_used: u64,
    next_id: ConnId,
    uploads: UploadSlots<PeerId>,
    outputs: VecDeque<Output>,
}

/// The address group limits count by: an IPv4 address, or an IPv6 address's /64 (a host is
/// given a /64, so any of its 2^64 addresses is the same host).
pub(crate) fn ip_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

impl Admission {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            uploads: UploadSlots::new(
                limits.max_uploads,
                limits.upload_slot,
                UPLOAD_LINGER,
                limits.min_client_rate,
            ),
            limits,
            conns: HashMap::new(),
            groups: HashMap::new(),
            peers: HashMap::new(),
            pending: 0,
            memory_used: 0,
            have_used: 0,
            next_id: 0,
            outputs: VecDeque::new(),
        }
    }

    /// A connection from `ip` arrives (`validated`: its address is proven; `may_retry`: a
    /// Retry may still be asked of it).
    pub(crate) fn handle_incoming(
        &mut self,
        ip: IpAddr,
        validated: bool,
        may_retry: bool,
        now: Instant,
    ) -> Incoming {
        if self.pending >= self.limits.retry_after_pending && !validated && may_retry {
            return Incoming::Retry;
        }
        let live = self.conns.values().filter(|c| !c.evicted).count();
        if live >= self.limits.max_connections {
            match self.victim(now) {
                Some(v) => {
                    self.conns.get_mut(&v).expect("a victim").evicted = true;
                    self.outputs.push_back(Output::Evict(v));
                }
                None => return Incoming::Refuse(RefusedReason::Busy),
            }
        }
        let group = ip_group(ip);
        let g = self.groups.entry(group).or_default();
        if g.pending >= self.limits.max_pending_per_ip {
            return Incoming::Refuse(RefusedReason::Busy);
        }
        g.pending += 1;
        self.pending += 1;
        let id = self.next_id;
        self.next_id += 1;
        self.conns.insert(
            id,
            Conn {
                group,
                peer: None,
                since: now,
                served: 0,
                memory: 0,
                have: 0,
                evicted: false,
            },
        );
        Incoming::Accept(id)
    }

    /// The authenticated connection that serves least, if one served less than
    /// `min_client_rate` after its grace (the most crowded address group first).
    fn victim(&self, now: Instant) -> Option<ConnId> {
        let min_rate = self.limits.min_client_rate as f64;
        let rate = |c: &Conn| {
            let secs = now
                .saturating_duration_since(c.since)
                .as_secs_f64()
                .max(1e-3);
            c.served as f64 / secs
        };
        let crowd = |c: &Conn| self.groups.get(&c.group).map_or(0, |g| g.authenticated);
        self.conns
            .iter()
            .filter(|(_, c)| c.peer.is_some() && !c.evicted)
            .filter(|(_, c)| now.saturating_duration_since(c.since) >= EVICTION_GRACE)
            .filter(|(_, c)| rate(c) < min_rate)
            .min_by(|(_, a), (_, b)| crowd(b).cmp(&crowd(a)).then(rate(a).total_cmp(&rate(b))))
            .map(|(id, _)| *id)
    }

    /// Connection `conn` proved the token as `peer`: it takes its place in its address group
    /// and its peer's, or is refused as busy.
    pub(crate) fn handle_authenticated(
        &mut self,
        conn: ConnId,
        peer: PeerId,
        now: Instant,
    ) -> Result<(), RefusedReason> {
        let Some(c) = self.conns.get(&conn) else {
            return Err(RefusedReason::Busy);
        };
        let group = c.group;
        let g = self.groups.entry(group).or_default();
        if g.authenticated >= self.limits.max_connections_per_ip {
            return Err(RefusedReason::Busy);
        }
        let p = self.peers.entry(peer).or_default();
        if p.connections >= self.limits.max_connections_per_peer {
            if p.connections == 0 {
                self.peers.remove(&peer);
            }
            return Err(RefusedReason::Busy);
        }
        p.connections += 1;
        let g = self.groups.entry(group).or_default();
        g.pending -= 1;
        g.authenticated += 1;
        self.pending -= 1;
        let c = self.conns.get_mut(&conn).expect("checked");
        c.peer = Some(peer);
        // Judged on what it takes from now on.
        c.since = now;
        self.rebalance();
        Ok(())
    }

    /// Connection `conn` ended (whatever its state): its places and memory are free, and its
    /// peer's upload slot once it has no connection left.
    pub(crate) fn handle_closed(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        let g = self.groups.entry(c.group).or_default();
        match c.peer {
            Some(_) => g.authenticated -= 1,
            None => {
                g.pending -= 1;
                self.pending -= 1;
            }
        }
        g.memory -= c.memory;
        g.have -= c.have;
        if g.pending == 0 && g.authenticated == 0 {
            self.groups.remove(&c.group);
        }
        self.memory_used -= c.memory;
        self.have_used -= c.have;
        if let Some(peer) = c.peer {
            let p = self.peers.entry(peer).or_default();
            p.connections -= 1;
            p.memory -= c.memory;
            p.have -= c.have;
            if p.connections == 0 {
                self.peers.remove(&peer);
                // Gone: its upload slot goes to the next in line at once.
                self.uploads.release(peer);
            }
            self.rebalance();
        }
    }

    /// Connection `conn` handed `bytes` data bytes to its client.
    pub(crate) fn handle_served(&mut self, conn: ConnId, bytes: u64) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.served += bytes;
        }
    }

    /// Most response memory one peer, or one address group, may hold.
    pub(crate) fn memory_share(&self) -> u64 {
        let l = &self.limits;
        (l.response_memory / l.max_uploads.max(1) as u64)
            .max(l.largest_response)
            .min(l.response_memory)
    }

    /// Takes `bytes` of response memory for a response on `conn`, if its peer, its address
    /// group and the streamer all have room: whole or not at all.
    pub(crate) fn reserve_memory(&mut self, conn: ConnId, bytes: u64) -> bool {
        let share = self.memory_share();
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        let group = self.groups.get(&c.group).map_or(0, |g| g.memory);
        let peer = c
            .peer
            .and_then(|p| self.peers.get(&p))
            .map_or(0, |p| p.memory);
        let fits = |held: u64| held + bytes <= share;
        if !fits(group) || !fits(peer) || self.memory_used + bytes > self.limits.response_memory {
            return false;
        }
        let (g, p) = (c.group, c.peer);
        self.conns.get_mut(&conn).expect("checked").memory += bytes;
        self.groups.entry(g).or_default().memory += bytes;
        if let Some(p) = p {
            self.peers.entry(p).or_default().memory += bytes;
        }
        self.memory_used += bytes;
        true
    }

    /// Takes `bytes` of have-answer memory for `conn`, if its peer, its address group and the
    /// budget have room (a bitfield never waits: one that does not fit is answered "busy").
    pub(crate) fn reserve_have(&mut self, conn: ConnId, bytes: u64) -> bool {
        let Some(c) = self.conns.get(&conn) else {
            return false;
        };
        let group = self.groups.get(&c.group).map_or(0, |g| g.have);
        let peer = c
            .peer
            .and_then(|p| self.peers.get(&p))
            .map_or(0, |p| p.have);
        if group + bytes > HAVE_SHARE
            || peer + bytes > HAVE_SHARE
            || self.have_used + bytes > HAVE_MEMORY
        {
            return false;
        }
        let (g, p) = (c.group, c.peer);
        self.conns.get_mut(&conn).expect("checked").have += bytes;
        self.groups.entry(g).or_default().have += bytes;
        if let Some(p) = p {
            self.peers.entry(p).or_default().have += bytes;
        }
        self.have_used += bytes;
        true
    }

    /// Gives back `bytes` of have-answer memory `conn` took.
    pub(crate) fn release_have(&mut self, conn: ConnId, bytes: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let bytes = bytes.min(c.have);
        c.have -= bytes;
        let (g, p) = (c.group, c.peer);
        if let Some(g) = self.groups.get_mut(&g) {
            g.have -= bytes;
        }
        if let Some(p) = p.and_then(|p| self.peers.get_mut(&p)) {
            p.have -= bytes;
        }
        self.have_used -= bytes;
    }

    /// Gives back `bytes` of response memory `conn` took.
    pub(crate) fn release_memory(&mut self, conn: ConnId, bytes: u64) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let bytes = bytes.min(c.memory);
        c.memory -= bytes;
        let (g, p) = (c.group, c.peer);
        if let Some(g) = self.groups.get_mut(&g) {
            g.memory -= bytes;
        }
        if let Some(p) = p.and_then(|p| self.peers.get_mut(&p)) {
            p.memory -= bytes;
        }
        self.memory_used -= bytes;
    }

    /// Whether `peer` may be sent a response now (see [`UploadSlots`]; `given` says what a
    /// peer gave this node lately). When it may, the response holds the slot until
    /// [`Admission::upload_done`].
    pub(crate) fn upload_slot(
        &mut self,
        peer: PeerId,
        now: Instant,
        given: impl Fn(&PeerId) -> f64,
    ) -> bool {
        self.uploads.admit(peer, now, given)
    }

    /// A response [`Admission::upload_slot`] let through ended, having sent `sent` data bytes.
    pub(crate) fn upload_done(&mut self, peer: PeerId, sent: u64, now: Instant) {
        self.uploads.done(peer, sent, now);
    }

    /// Whether more peers want uploads than there are slots.
    pub(crate) fn contended(&self, now: Instant) -> bool {
        self.uploads.contended(now)
    }

    /// Handshakes under way, and connections open.
    pub(crate) fn counts(&self) -> (usize, usize) {
        (self.pending, self.conns.len())
    }

    /// What the driver must do next, if anything.
    pub(crate) fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Gives every authenticated connection its share of the send memory.
    fn rebalance(&mut self) {
        let authenticated = self.conns.values().filter(|c| c.peer.is_some()).count();
        let share = send_share(
            self.limits.send_memory,
            self.limits.send_window,
            authenticated,
        );
        let mut ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.peer.is_some())
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            self.outputs.push_back(Output::SendShare(id, share));
        }
    }
}

/// The send window of each of `connections` authenticated connections: an equal share of
/// `send_memory`, at most the transport's send window, at least [`MIN_SEND_WINDOW`].
pub(crate) fn send_share(send_memory: u64, max_window: u64, connections: usize) -> u64 {
    (send_memory / connections.max(1) as u64).clamp(MIN_SEND_WINDOW.min(max_window), max_window)
}

/// The send window of a connection about to be sent a response: what its path carries in one
/// round trip, twice over (what is in flight, and as much waiting to go), within its share of
/// the send memory. More would only queue inside this server, where a response waits behind
/// the others for seconds while its client counts the time, and a client that gives up on it
/// has made the uplink carry bytes nobody takes.
pub(crate) fn send_window_now(cwnd: u64, share: u64) -> u64 {
    (2 * cwnd).clamp(MIN_SEND_WINDOW.min(share), share.max(1))
}

#[cfg(test)]
mod tests;
