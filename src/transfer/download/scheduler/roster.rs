//! Who holds a download's places: the roster, a part of the scheduler.
//!
//! Every source the download hears of is kept, up to [`MAX_SOURCES`]; `max_peers` of them hold
//! a place at once (connected, asked for pieces), the others wait as spares. A place is earned
//! by verified bytes, never by who a source is or when it was heard of (the rules of
//! BitTorrent's choker, on the downloading side, and of scoring by verified throughput):
//! - **Snubbed sources give their place up.** A source in a place that has delivered no
//!   verified byte for `snub_timeout` (since it took the place, or since its last one) while a
//!   spare waits gives its place to the spare, whatever kept it from delivering: "busy", "not
//!   held", an empty or stale bitfield, a stall, a connection that never came up. It waits as
//!   a spare itself, to be tried again once the untried ones have been (a busy seed asked by
//!   fewer is freer for the rest).
//! - **A starving download takes a snubbed source back early.** With nothing in flight and
//!   no new verified byte for a quarter of `min_request_timeout` (nor a source taken back in
//!   that time), one snubbed source that still waits (a complete holder first, then one that
//!   delivered before, then the one that delivered most) takes a free place before its wait
//!   ends: the busy seed snubbed while the crowd served is the one left when the crowd's
//!   holders leave.
//!   It is a best effort: a request in flight puts it off.
//! - **A source that leaves gives its place up at once.** One whose server closes the
//!   connection saying it shuts down (or with no code, as a node that stops) waits as a
//!   spare for `rotate_interval`, not in a place while reconnections time out. A place freed
//!   goes first to a spare that may take it; only then is anyone snubbed for a spare.
//! - **Optimistic rotation.** Every `rotate_interval`, while sources never tried wait, the
//!   sources in places that delivered least over the interval (an eighth of the places, at
//!   least one) give theirs to untried ones, so that a newcomer that would be fast gets tried.
//! - **Spares by merit.** A free place goes to the first untried spare (in the order heard
//!   of: discovery lists the sources it trusts first), then to the spare that delivered most
//!   before. Nobody is dropped for good while the download runs except a source whose bytes
//!   were proven wrong (banned) or that refused the download (unknown snapshot, wrong token or
//!   chunk size); one that failed again and again waits a while before it may come back.
//! - **Quotas.** Holders of part of the snapshot (other downloaders) take at most three
//!   quarters of the places; a complete holder takes a place beyond the limit while fewer than
//!   a quarter of those in places are complete: a crowd cannot crowd out the seeds.
//! - **The manifest.** The first source to serve a manifest that matches the target gives the
//!   download its manifest; a complete holder's replaces a partial holder's (both match; only
//!   a complete holder has served the snapshot it publishes). The download is finished when
//!   every chunk is on disk and a manifest was taken.

use std::time::{Duration, Instant};

use super::{Command, Conn, PeerIdx, Scheduler};
use crate::transfer::download::picker::Have;

/// Most sources one download keeps, spares included. Beyond it, a new source takes the entry
/// of one that was tried and delivered nothing, or is not kept.
pub(crate) const MAX_SOURCES: usize = 1024;

/// "Not held" answers in a row after which a source gives its place up.
pub(crate) const MAX_NOT_HELD: u32 = 8;

/// How a source stands in a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Holds a place.
    Active,
    /// Waits for a place.
    Waiting,
    /// Sent bytes proven wrong.
    Banned,
    /// Refused the download.
    Out,
}

/// Why a source leaves its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// No verified byte for `snub_timeout` (or "not held" too often).
    NothingDelivered,
    /// Failed `max_peer_failures` times in a row.
    Failing,
    /// Delivered least while untried sources wait.
    Rotated,
    /// Said it is shutting down.
    Left,
    /// Refused the download.
    Refused,
    /// Sent bytes proven wrong.
    Banned,
}

/// Where a source stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Place {
    /// It holds a place, since then.
    Active {
        since: Instant,
    },
    /// It waits: never tried, or tried and waiting (not before `not_before`).
    Spare {
        tried: bool,
        not_before: Option<Instant>,
    },
    Banned,
    Out,
}

impl Place {
    pub(super) fn spare(_now: Instant) -> Self {
        Place::Spare {
            tried: false,
            not_before: None,
        }
    }

    pub(super) fn is_active(&self) -> bool {
        matches!(self, Place::Active { .. })
    }

    /// In a place, or waiting for one.
    pub(super) fn may_serve(&self) -> bool {
        matches!(self, Place::Active { .. } | Place::Spare { .. })
    }

    pub(super) fn is_untried(&self) -> bool {
        matches!(self, Place::Spare { tried: false, .. })
    }

    fn may_take_place(&self, now: Instant) -> bool {
        matches!(self, Place::Spare { not_before, .. } if not_before.is_none_or(|t| t <= now))
    }

    pub(super) fn standing(&self) -> Standing {
        match self {
            Place::Active { .. } => Standing::Active,
            Place::Spare { .. } => Standing::Waiting,
            Place::Banned => Standing::Banned,
            Place::Out => Standing::Out,
        }
    }
}

/// The roster's own state.
#[derive(Debug)]
pub(super) struct Roster {
    /// Whether the manifest taken came from a partial holder, once one was taken.
    manifest_partial: Option<bool>,
    /// The places change: look at them before the next command.
    dirty: bool,
    next_look: Instant,
    last_rotation: Instant,
    rotate_interval: Duration,
    /// When requests were last allowed again (nothing is delivered while paused).
    resumed: Instant,
    /// When the starving rule last took a source back.
    last_take_back: Option<Instant>,
}

impl Roster {
    /// Looks at the places before the next command.
    pub(super) fn look_again(&mut self) {
        self.dirty = true;
    }

    pub(super) fn new(now: Instant, rotate_interval: Duration) -> Self {
        Self {
            manifest_partial: None,
            dirty: true,
            next_look: now,
            last_rotation: now,
            rotate_interval,
            resumed: now,
            last_take_back: None,
        }
    }

    /// Whether a source's manifest (`partial`: a partial holder's) is the one to take.
    pub(super) fn take_manifest(&mut self, partial: bool) -> bool {
        let take = match self.manifest_partial {
            None => true,
            Some(was_partial) => was_partial && !partial,
        };
        if take {
            self.manifest_partial = Some(partial);
        }
        take
    }

    pub(super) fn has_manifest(&self) -> bool {
        self.manifest_partial.is_some()
    }

    /// When the places must be looked at next (now, if something changed).
    pub(super) fn next_look(&self, now: Instant) -> Instant {
        if self.dirty { now } else { self.next_look }
    }
}

impl Scheduler {
    /// A source heard of (`partial`: it holds part of the snapshot only, for now). It waits as
    /// a spare and takes a place at the roster's next look, when one is free. Returns its
    /// index: a new one, or, with the table full, that of a source tried before that
    /// delivered nothing (whose entry it takes); `None` when it is not kept.
    pub(crate) fn handle_source(&mut self, partial: bool, now: Instant) -> Option<PeerIdx> {
        self.roster.dirty = true;
        if self.peers.len() < MAX_SOURCES {
            let peer = self.new_peer(partial, now);
            self.peers.push(peer);
            return Some(self.peers.len() - 1);
        }
        // The entry of a source out, or tried and found to deliver nothing, the oldest first.
        let reuse = (0..self.peers.len())
            .filter(|&i| {
                let p = &self.peers[i];
                p.bytes == 0 && matches!(p.place, Place::Out | Place::Spare { tried: true, .. })
            })
            .min_by_key(|&i| self.peers[i].order)?;
        let order = self.peers.iter().map(|p| p.order).max().unwrap_or(0) + 1;
        let mut peer = self.new_peer(partial, now);
        peer.order = order;
        self.set_have(reuse, Have::Unknown);
        self.peers[reuse] = peer;
        Some(reuse)
    }

    /// `peer`, known as a holder of part of the snapshot, holds all of it.
    pub(crate) fn handle_source_complete(&mut self, peer: PeerIdx) {
        let p = &mut self.peers[peer];
        if p.added_partial {
            p.added_partial = false;
            self.set_have(peer, Have::All);
            self.roster.dirty = true;
        }
    }

    /// Pauses or resumes requests (connections go on either way): a download requests nothing
    /// until its files are reserved. Nobody is snubbed for what it could not deliver meanwhile.
    pub(crate) fn set_paused(&mut self, paused: bool, now: Instant) {
        if self.paused && !paused {
            self.roster.resumed = now;
        }
        self.paused = paused;
        self.roster.dirty = true;
    }

    pub(super) fn roster_due(&self, now: Instant) -> bool {
        self.roster.dirty
            || now >= self.roster.next_look
            || self.take_back_at(now).is_some_and(|t| t <= now)
    }

    /// When the starving rule takes a source back, if the download starves (or will, unless
    /// something arrives) and a snubbed source that waits has room to come back.
    pub(super) fn take_back_at(&self, now: Instant) -> Option<Instant> {
        let t = self.starving_since()?;
        self.take_back_candidate(now).map(|_| t)
    }

    /// Looks at the places: snubbed sources give theirs up, the least useful rotate out while
    /// untried sources wait, free places are filled.
    pub(super) fn update_roster(&mut self, now: Instant) {
        self.roster.dirty = false;
        // Free places first: a spare that may take one now needs nobody to leave for it.
        self.fill_places(now);
        if !self.paused && !self.is_complete() {
            self.snub(now);
            self.rotate(now);
        }
        self.fill_places(now);
        self.take_back_when_starving(now);
        self.roster.next_look = self.roster_deadline(now);
    }

    /// The next moment a place may change by itself: a spare's wait ends, a source in a place
    /// reaches the snub timeout while spares wait, the next rotation while untried ones wait.
    /// (When the download starves is [`Scheduler::take_back_at`], looked at every time.)
    fn roster_deadline(&self, now: Instant) -> Instant {
        let far = now + Duration::from_secs(3600);
        let mut next = far;
        for p in &self.peers {
            if let Place::Spare {
                not_before: Some(t),
                ..
            } = p.place
                && t > now
            {
                next = next.min(t);
            }
        }
        if self.paused || self.is_complete() {
            return next;
        }
        if self.spare_waits(now) {
            for p in &self.peers {
                if let Place::Active { since } = p.place {
                    next = next.min(self.snub_basis(p, since) + self.config.snub_timeout);
                }
            }
        }
        if self.peers.iter().any(|p| p.place.is_untried()) {
            next = next.min(self.roster.last_rotation + self.roster.rotate_interval);
        }
        next.max(now)
    }

    /// Since when a source in a place (since `since`) has delivered nothing it could have.
    fn snub_basis(&self, p: &super::Peer, since: Instant) -> Instant {
        since
            .max(self.roster.resumed)
            .max(p.last_delivery.unwrap_or(since))
    }

    fn spare_waits(&self, now: Instant) -> bool {
        self.peers.iter().any(|p| p.place.may_take_place(now))
    }

    fn snub(&mut self, now: Instant) {
        if !self.spare_waits(now) {
            return;
        }
        let limit = self.config.snub_timeout;
        let snubbed: Vec<PeerIdx> = (0..self.peers.len())
            .filter(|&i| {
                let p = &self.peers[i];
                let Place::Active { since } = p.place else {
                    return false;
                };
                now.saturating_duration_since(self.snub_basis(p, since)) >= limit
            })
            .collect();
        for peer in snubbed {
            self.give_place_up(peer, Why::NothingDelivered, now);
        }
    }

    fn rotate(&mut self, now: Instant) {
        let interval = self.roster.rotate_interval;
        if now.saturating_duration_since(self.roster.last_rotation) < interval {
            return;
        }
        self.roster.last_rotation = now;
        let untried = self.peers.iter().filter(|p| p.place.is_untried()).count();
        let share = (self.config.max_peers / 8).max(1).min(untried);
        let mut candidates: Vec<PeerIdx> = (0..self.peers.len())
            .filter(|&i| {
                matches!(self.peers[i].place, Place::Active { since }
                    if now.saturating_duration_since(since) >= interval)
            })
            .collect();
        // The least delivered first; of equals, the one heard of last.
        candidates.sort_by_key(|&i| {
            (
                self.peers[i].recent_bytes,
                std::cmp::Reverse(self.peers[i].order),
            )
        });
        for &peer in candidates.iter().take(share) {
            self.give_place_up(peer, Why::Rotated, now);
        }
        for p in &mut self.peers {
            p.recent_bytes = 0;
        }
    }

    /// Sources in places: (holders of all of the snapshot, of part of it).
    fn active_counts(&self) -> (usize, usize) {
        let active = |want_partial: bool| {
            self.peers
                .iter()
                .filter(|p| p.place.is_active() && p.added_partial == want_partial)
                .count()
        };
        (active(false), active(true))
    }

    /// Whether a source (`partial`: of part of the snapshot) may take a place now.
    fn has_room(&self, partial: bool) -> bool {
        let (complete, partials) = self.active_counts();
        self.room_for(partial, complete, partials)
    }

    /// Whether a source (`partial`: of part of the snapshot) may take a place while
    /// `complete` and `partials` sources hold places.
    fn room_for(&self, partial: bool, complete: usize, partials: usize) -> bool {
        let max = self.config.max_peers.max(1);
        if partial {
            complete + partials < max && partials < (max * 3 / 4).max(1)
        } else {
            complete + partials < max || complete < max.div_ceil(4)
        }
    }

    /// A download that starves (see [`Scheduler::starving_since`]) takes back early, into a
    /// free place, one source snubbed earlier that still waits (see
    /// [`Scheduler::take_back_candidate`]). A busy seed snubbed while the crowd served is the
    /// one left once the crowd's holders leave; it need not wait out `snub_timeout`.
    fn take_back_when_starving(&mut self, now: Instant) {
        if self.starving_since().is_none_or(|t| t > now) {
            return;
        }
        if let Some(peer) = self.take_back_candidate(now) {
            self.take_place(peer, now);
            self.roster.last_take_back = Some(now);
        }
    }

    /// The source the starving rule would take back now: a snubbed one that still waits and
    /// has room, a complete holder first (a downloader that delivered may have gone since),
    /// then one that delivered before, then the one that delivered most.
    fn take_back_candidate(&self, now: Instant) -> Option<PeerIdx> {
        let (complete, partials) = self.active_counts();
        (0..self.peers.len())
            .filter(|&i| self.may_take_back(&self.peers[i], now))
            .filter(|&i| self.room_for(self.peers[i].added_partial, complete, partials))
            .min_by_key(|&i| {
                let p = &self.peers[i];
                (
                    p.added_partial,
                    p.bytes == 0,
                    std::cmp::Reverse(p.bytes),
                    p.order,
                )
            })
    }

    /// Whether `p` is a snubbed source whose wait has not ended (the starving rule's own).
    fn may_take_back(&self, p: &super::Peer, now: Instant) -> bool {
        p.snubbed && matches!(p.place, Place::Spare { not_before: Some(t), .. } if t > now)
    }

    /// From when the download counts as starving, while it is in this state: nothing in
    /// flight, not done or paused, and no new verified byte for a quarter of
    /// `min_request_timeout` since the last (and since the last source it took back: one per
    /// such window). Connection attempts bring no byte: one to a host that is gone takes its
    /// full timeout, so they do not put it off.
    fn starving_since(&self) -> Option<Instant> {
        let idle = !self.paused && !self.is_complete() && self.requests.is_empty();
        let since = self
            .roster
            .last_take_back
            .map_or(self.last_progress, |t| t.max(self.last_progress));
        idle.then(|| since + self.config.min_request_timeout / 4)
    }

    fn take_place(&mut self, peer: PeerIdx, now: Instant) {
        let p = &mut self.peers[peer];
        p.snubbed = false;
        p.place = Place::Active { since: now };
        p.failures = 0;
        p.not_held = 0;
        p.backoff_until = None;
        p.recent_bytes = 0;
    }

    fn fill_places(&mut self, now: Instant) {
        loop {
            // Untried spares first, in the order heard of; then those that delivered most.
            let best = (0..self.peers.len())
                .filter(|&i| self.peers[i].place.may_take_place(now))
                .filter(|&i| self.has_room(self.peers[i].added_partial))
                .min_by_key(|&i| {
                    let p = &self.peers[i];
                    (!p.place.is_untried(), std::cmp::Reverse(p.bytes), p.order)
                });
            let Some(peer) = best else {
                return;
            };
            self.take_place(peer, now);
        }
    }

    /// `peer` leaves its place (why says where it goes): its requests are handed out again and
    /// its connection closed.
    pub(super) fn give_place_up(&mut self, peer: PeerIdx, why: Why, now: Instant) {
        self.cancel_requests_of(peer);
        let p = &mut self.peers[peer];
        if p.conn != Conn::Disconnected {
            p.conn = Conn::Disconnected;
            self.queued.push_back(Command::Close(peer));
        }
        let p = &mut self.peers[peer];
        p.have_pending = false;
        p.have_at = None;
        p.snubbed = why == Why::NothingDelivered;
        p.failures = 0;
        p.not_held = 0;
        p.backoff_until = None;
        p.place = match why {
            Why::Banned => Place::Banned,
            Why::Refused => Place::Out,
            Why::Rotated => Place::Spare {
                tried: true,
                not_before: None,
            },
            Why::NothingDelivered => Place::Spare {
                tried: true,
                not_before: Some(now + self.config.snub_timeout),
            },
            Why::Failing | Why::Left => Place::Spare {
                tried: true,
                not_before: Some(now + self.roster.rotate_interval),
            },
        };
        let base = if p.added_partial {
            Have::Unknown
        } else {
            Have::All
        };
        self.set_have(peer, base);
        self.roster.dirty = true;
    }
}
