//! [`UploadSlots`]: which peers are sent chunks now, a pure state machine with injected time.
//!
//! An uplink split among a few peers gets each piece out sooner than one split among all, and in
//! a crowd a piece that is out is one the others can fetch from its new holder. So at most
//! `max` peers hold a slot at once; the others are told the server is busy (they fetch
//! elsewhere and ask again soon). A slot lapses `linger` after its peer's last request or
//! response. Who gets a slot once all are held is BitTorrent's choker:
//! - **Tit for tat.** A slot held for `hold` goes to an asker that gave this node more verified
//!   bytes lately than its holder did (what the node's own downloads measured): the peers that
//!   redistribute what they get to this node are served first, and a crowd's uplinks go to
//!   those that upload in turn.
//! - **Slow readers lose their slot.** A slot held for `hold` whose holder took less than
//!   `min_rate` over it goes to any asker.
//! - **Turns among equals.** Of peers that gave alike (nothing, for a seed), the slot held longest
//!   goes, once held for `hold`, to the peer that has waited longest, not to whoever asks most
//!   often: every peer gets its turn. A waiter that has not asked for [`WAIT_LAPSE`] has left
//!   the queue.
//! - **One optimistic slot** (with two or more) goes to the peer that has waited longest
//!   whatever it gave, and moves on after three times `hold`, so that a newcomer with nothing
//!   to give yet gets pieces, and a fast one gets found.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::ops::Range;
use std::time::{Duration, Instant};

/// How long after its last chunk request a peer keeps its slot: a holder with work keeps a
/// request queued here (its next one is on its way within a round trip), and one without
/// gives the slot to the next in line soon.
pub(crate) const UPLOAD_LINGER: Duration = Duration::from_millis(500);

/// How long a refused peer keeps its place in the queue without asking again (a downloader
/// told the server is busy asks again within a second).
pub(crate) const WAIT_LAPSE: Duration = Duration::from_secs(3);

/// How long a free slot is kept for the peers ahead in the queue: after it, whoever asks first
/// takes it, so that a slot never stays free while someone asks (those ahead may have gone
/// elsewhere, or ask less often).
pub(crate) const CLAIM_GRACE: Duration = Duration::from_millis(300);

/// Most peers queued for a slot (far above the connections a server admits).
const MAX_WAITING: usize = 1024;

/// How many times `hold` the optimistic slot is held before it moves on.
const OPTIMISTIC_HOLDS: u32 = 3;

/// What a holder tells an asker it holds (the have-answer rule, one for the server and the
/// swarm simulator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HaveReply {
    /// Everything: a complete holder whose uploads are not contended, or one asked by a peer
    /// that does not say what it holds.
    Everything,
    /// The few blocks it suggests this asker (see [`SeedSuggestions`]): a complete holder in a crowd,
    /// to a peer that holds an upload slot.
    Suggest,
    /// Nothing: a complete holder in a crowd, to a peer without an upload slot now (it fetches
    /// elsewhere and asks again).
    Nothing,
    /// The blocks it verified: a holder that downloads the snapshot itself.
    Verified,
}

/// The have-answer rule: what a holder (`complete` or downloading, its uploads `contended` or
/// not) tells an asker that says what it holds (`asker_says`), `slot` deciding (and taking)
/// whether the asker has an upload slot now; asked only for a complete holder in a crowd.
pub(crate) fn have_reply(
    complete: bool,
    contended: bool,
    asker_says: bool,
    slot: impl FnOnce() -> bool,
) -> HaveReply {
    match (complete, contended && asker_says) {
        (false, _) => HaveReply::Verified,
        (true, false) => HaveReply::Everything,
        (true, true) if slot() => HaveReply::Suggest,
        (true, true) => HaveReply::Nothing,
    }
}

/// The upload slots of a server.
#[derive(Debug)]
pub(crate) struct UploadSlots<P> {
    max: usize,
    hold: Duration,
    linger: Duration,
    /// Bytes per second a holder must take over its slot to keep it past `hold`.
    min_rate: f64,
    slots: HashMap<P, Slot>,
    /// When a peer was last refused for want of a slot.
    refused: Option<Instant>,
    /// Peers refused for want of a slot, in the order they were first refused, with when
    /// they last asked.
    waiting: VecDeque<(P, Instant)>,
    /// Since when a slot has been free (while one is).
    free_since: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    granted: Instant,
    /// When its last response ended (or it last asked).
    last: Instant,
    /// Its responses under way: a slot does not lapse while it has any.
    active: usize,
    /// Its peer is gone: the slot is freed when its last response ends.
    released: bool,
    /// The optimistic slot.
    optimistic: bool,
    /// Data bytes sent to it over the slot.
    sent: u64,
}

impl Slot {
    /// Whether it was held long enough to be given to another.
    fn overdue(&self, hold: Duration, now: Instant) -> bool {
        let hold = if self.optimistic {
            hold * OPTIMISTIC_HOLDS
        } else {
            hold
        };
        now.saturating_duration_since(self.granted) >= hold
    }

    /// Bytes per second it took over the slot.
    fn rate(&self, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(self.granted).as_secs_f64();
        self.sent as f64 / secs.max(1e-3)
    }
}

impl<P: Copy + Eq + Hash> UploadSlots<P> {
    /// At most `max` peers at once; a slot may be given to another after `hold`, or taken from
    /// a holder that took less than `min_rate` bytes per second over it.
    pub(crate) fn new(max: usize, hold: Duration, linger: Duration, min_rate: u64) -> Self {
        Self {
            max: max.max(1),
            hold,
            linger,
            min_rate: min_rate as f64,
            slots: HashMap::new(),
            refused: None,
            waiting: VecDeque::new(),
            free_since: None,
        }
    }

    /// Whether `peer` may be sent a response now: it holds a slot, or it gets one (see the
    /// module docs; `given` says how much a peer gave this node lately). When it may, the
    /// response is under way until [`UploadSlots::done`].
    pub(crate) fn admit(&mut self, peer: P, now: Instant, given: impl Fn(&P) -> f64) -> bool {
        let linger = self.linger;
        self.slots.retain(|_, s| {
            let keep = s.active > 0 || now.saturating_duration_since(s.last) < linger;
            if !keep {
                // Free since its linger ended.
                let lapsed = s.last + linger;
                self.free_since = Some(self.free_since.map_or(lapsed, |t| t.min(lapsed)));
            }
            keep
        });
        if self.slots.len() < self.max {
            self.free_since.get_or_insert(now);
        } else {
            self.free_since = None;
        }
        if let Some(s) = self.slots.get_mut(&peer) {
            s.last = now;
            s.active += 1;
            return true;
        }
        self.waiting
            .retain(|(_, asked)| now.saturating_duration_since(*asked) < WAIT_LAPSE);
        let place = self.waiting.iter().position(|(p, _)| *p == peer);
        // Peers ahead of it in the queue, and the slots free now; a slot left free past the
        // grace goes to whoever asks.
        let ahead = place.unwrap_or(self.waiting.len());
        let free = self.max.saturating_sub(self.slots.len());
        let unclaimed = self
            .free_since
            .is_some_and(|t| now.saturating_duration_since(t) >= CLAIM_GRACE);
        let granted = if ahead < free || (free > 0 && unclaimed) {
            Some(None)
        } else {
            self.slot_to_take(peer, ahead == 0, now, &given).map(Some)
        };
        let Some(replaced) = granted else {
            self.refused = Some(now);
            match place {
                Some(i) => self.waiting[i].1 = now,
                None if self.waiting.len() < MAX_WAITING => self.waiting.push_back((peer, now)),
                None => {}
            }
            return false;
        };
        if let Some(i) = place {
            self.waiting.remove(i);
        }
        let optimistic = match replaced {
            Some(holder) => self.slots.remove(&holder).is_some_and(|s| s.optimistic),
            // The first slot, when more than one, starts as the optimistic one.
            None => self.max > 1 && !self.slots.values().any(|s| s.optimistic),
        };
        self.slots.insert(
            peer,
            Slot {
                granted: now,
                last: now,
                active: 1,
                released: false,
                optimistic,
                sent: 0,
            },
        );
        if self.slots.len() >= self.max {
            self.free_since = None;
        }
        true
    }

    /// The slot `peer` may take from its holder now, if any (`first`: it has waited longest).
    fn slot_to_take(
        &self,
        peer: P,
        first: bool,
        now: Instant,
        given: &impl Fn(&P) -> f64,
    ) -> Option<P> {
        let mine = given(&peer);
        self.slots
            .iter()
            .filter(|(_, s)| s.overdue(self.hold, now))
            .filter(|(holder, s)| {
                let slow = s.rate(now) < self.min_rate;
                let theirs = given(holder);
                slow || if s.optimistic {
                    first
                } else {
                    mine > theirs || (mine == theirs && first)
                }
            })
            // The holder that gave least, then the one that held longest.
            .min_by(|(a, sa), (b, sb)| {
                given(a)
                    .total_cmp(&given(b))
                    .then(sa.granted.cmp(&sb.granted))
            })
            .map(|(holder, _)| *holder)
    }

    /// A response to `peer` that [`UploadSlots::admit`] let through has ended, having sent
    /// `sent` data bytes: its slot lapses `linger` after its last one.
    pub(crate) fn done(&mut self, peer: P, sent: u64, now: Instant) {
        if let Some(s) = self.slots.get_mut(&peer) {
            s.active = s.active.saturating_sub(1);
            s.last = s.last.max(now);
            s.sent += sent;
            if s.released && s.active == 0 {
                self.slots.remove(&peer);
            }
        }
    }

    /// `peer` is gone: its slot is free at once (once its responses under way have ended),
    /// and it leaves the queue.
    pub(crate) fn release(&mut self, peer: P) {
        self.waiting.retain(|(p, _)| *p != peer);
        if let Some(s) = self.slots.get_mut(&peer) {
            if s.active == 0 {
                self.slots.remove(&peer);
            } else {
                s.released = true;
            }
        }
    }

    /// Whether more peers want uploads than there are slots: a peer was refused within the
    /// time a slot is held.
    pub(crate) fn contended(&self, now: Instant) -> bool {
        self.refused
            .is_some_and(|t| now.saturating_duration_since(t) < self.hold)
    }

    /// Peers holding a slot.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_have_answer_rule() {
        use HaveReply::*;
        let never = || -> bool { panic!("a slot is asked only of a complete holder in a crowd") };
        assert_eq!(have_reply(false, true, true, never), Verified);
        assert_eq!(have_reply(true, false, true, never), Everything);
        assert_eq!(
            have_reply(true, true, false, never),
            Everything,
            "an asker that says nothing"
        );
        assert_eq!(have_reply(true, true, true, || true), Suggest);
        assert_eq!(have_reply(true, true, true, || false), Nothing);
    }

    const SEC: Duration = Duration::from_secs(1);

    /// A response admitted and ended at once.
    fn ask(s: &mut UploadSlots<u32>, peer: u32, t: Instant) -> bool {
        let ok = s.admit(peer, t, |_| 0.0);
        if ok {
            s.done(peer, 0, t);
        }
        ok
    }

    /// Slots with no rate asked of their holders.
    fn slots(max: usize) -> UploadSlots<u32> {
        UploadSlots::new(max, 10 * SEC, SEC, 0)
    }

    #[test]
    fn a_few_peers_at_a_time_each_in_turn() {
        let t0 = Instant::now();
        let mut s = slots(2);
        assert!(ask(&mut s, 1, t0) && ask(&mut s, 2, t0));
        assert!(!s.contended(t0 - SEC));
        assert!(!ask(&mut s, 3, t0), "full: the third waits");
        assert!(s.contended(t0 + 9 * SEC) && !s.contended(t0 + 10 * SEC));
        // The holders keep asking: they keep their slots until one has held it for 10 s.
        for i in 1..20 {
            let t = t0 + i * SEC / 2;
            assert!(ask(&mut s, 1, t) && ask(&mut s, 2, t));
            assert!(!ask(&mut s, 3, t));
        }
        let t = t0 + 10 * SEC;
        assert!(
            ask(&mut s, 3, t),
            "the slot held longest goes to the one waiting"
        );
        assert_eq!(s.len(), 2);
        // A peer that stops asking gives its slot up after the linger.
        let later = t + 2 * SEC;
        assert!(ask(&mut s, 4, later) && ask(&mut s, 5, later));
    }

    #[test]
    fn a_slot_does_not_lapse_while_its_responses_wait() {
        let t0 = Instant::now();
        let mut s = slots(1);
        assert!(s.admit(1, t0, |_| 0.0));
        // Its response takes five seconds: the slot stays its own meanwhile.
        assert!(!ask(&mut s, 2, t0 + 5 * SEC));
        s.done(1, 0, t0 + 5 * SEC);
        assert!(!ask(&mut s, 2, t0 + 5 * SEC + SEC / 2));
        assert!(ask(&mut s, 2, t0 + 7 * SEC));
    }

    #[test]
    fn a_gone_peer_frees_its_slot_and_its_place_in_the_queue() {
        let t0 = Instant::now();
        let mut s = slots(1);
        assert!(s.admit(1, t0, |_| 0.0));
        assert!(!ask(&mut s, 2, t0), "2 waits first");
        assert!(!ask(&mut s, 3, t0), "then 3");
        // 1 goes while a response is under way: the slot is free once it ends.
        s.release(1);
        assert_eq!(s.len(), 1);
        s.done(1, 0, t0);
        assert_eq!(s.len(), 0);
        // 2 goes too: 3 is next, at once.
        s.release(2);
        assert!(ask(&mut s, 3, t0));
    }

    #[test]
    fn turns_go_in_the_order_peers_waited_not_to_who_asks_most() {
        let t0 = Instant::now();
        let mut s = slots(1);
        assert!(s.admit(1, t0, |_| 0.0));
        // Peer 2 is refused first and asks again every half second; peer 3 every 10 ms.
        assert!(!ask(&mut s, 2, t0 + SEC));
        let mut t = t0 + SEC;
        while t < t0 + 11 * SEC {
            t += Duration::from_millis(10);
            if (t - t0).as_millis().is_multiple_of(500) {
                let turn = ask(&mut s, 2, t);
                assert_eq!(
                    turn,
                    t >= t0 + 10 * SEC,
                    "2 gets the slot once it is overdue"
                );
                if turn {
                    break;
                }
            }
            assert!(!ask(&mut s, 3, t), "3 never jumps the queue");
        }
        assert_eq!(s.len(), 1);
        // A free slot waits a moment for the peer first in line, then goes to whoever asks.
        let ms = |n: u64| Duration::from_millis(n);
        let mut s = UploadSlots::new(1, 10 * SEC, UPLOAD_LINGER, 0);
        assert!(s.admit(1, t0, |_| 0.0));
        assert!(!ask(&mut s, 2, t0), "2 is first in line");
        assert!(!ask(&mut s, 3, t0 + ms(200)), "then 3");
        // 1's last response ends at 300 ms: its slot is free 500 ms later.
        s.done(1, 0, t0 + ms(300));
        assert!(
            !ask(&mut s, 3, t0 + ms(900)),
            "the slot is free: it is 2's turn"
        );
        assert!(
            ask(&mut s, 3, t0 + ms(1100)),
            "2 did not claim it in time: it goes to the one that asks"
        );
    }

    /// Every peer of `askers` asks at each half second from `from` until `to`, each response
    /// sending `sent(peer)` bytes; returns who held a slot at each ask, in order.
    fn rounds(
        s: &mut UploadSlots<u32>,
        askers: &[u32],
        from: Instant,
        to: Instant,
        given: impl Fn(&u32) -> f64,
        sent: impl Fn(&u32) -> u64,
    ) -> Vec<(Instant, u32)> {
        let mut served = Vec::new();
        let mut t = from;
        while t < to {
            for &p in askers {
                if s.admit(p, t, &given) {
                    s.done(p, sent(&p), t);
                    served.push((t, p));
                }
            }
            t += SEC / 2;
        }
        served
    }

    fn holders_at(served: &[(Instant, u32)], t: Instant) -> Vec<u32> {
        let mut h: Vec<u32> = served
            .iter()
            .filter(|(at, _)| *at == t)
            .map(|(_, p)| *p)
            .collect();
        h.sort();
        h
    }

    #[test]
    fn a_slot_goes_to_the_peer_that_gave_more_and_one_that_gives_keeps_its_own() {
        let t0 = Instant::now();
        let mut s = slots(2);
        // 1 and 2 hold the slots (1 the optimistic one); 3 gives this node a lot, 2 nothing.
        let given = |p: &u32| if *p == 3 { 1e6 } else { 0.0 };
        let none = |_: &u32| 0;
        rounds(&mut s, &[1, 2], t0, t0 + SEC, given, none);
        let early = rounds(&mut s, &[1, 2, 3], t0 + SEC, t0 + 10 * SEC, given, none);
        assert!(
            early.iter().all(|(_, p)| *p != 3),
            "not before the slot was held for its time"
        );
        let later = rounds(
            &mut s,
            &[1, 2, 3],
            t0 + 10 * SEC,
            t0 + 25 * SEC,
            given,
            none,
        );
        assert_eq!(
            holders_at(&later, t0 + 10 * SEC),
            vec![1, 2, 3],
            "3 takes 2's slot..."
        );
        assert_eq!(
            holders_at(&later, t0 + 10 * SEC + SEC / 2),
            vec![1, 3],
            "...for good"
        );
        // 3 gave more than 2: it keeps the slot, turn after turn.
        assert!(later.iter().all(|(t, p)| *p != 2 || *t == t0 + 10 * SEC));
    }

    #[test]
    fn a_holder_that_reads_slowly_loses_its_slot_to_any_asker() {
        let t0 = Instant::now();
        // 1 gives more than 2, but takes 2 KB/s of its slot.
        let given = |p: &u32| if *p == 1 { 1e6 } else { 0.0 };
        let mut s = UploadSlots::new(1, 10 * SEC, SEC, 100_000);
        rounds(&mut s, &[1], t0, t0 + SEC, given, |_| 1000);
        let got = rounds(&mut s, &[1, 2], t0 + SEC, t0 + 12 * SEC, given, |_| 1000);
        let first_2 = got.iter().find(|(_, p)| *p == 2).map(|(t, _)| *t);
        assert_eq!(
            first_2,
            Some(t0 + 10 * SEC),
            "slow: the slot goes when it is due"
        );
        // One that reads fast keeps it against one that gave nothing.
        let mut s = UploadSlots::new(1, 10 * SEC, SEC, 100_000);
        let got = rounds(&mut s, &[1, 2], t0, t0 + 30 * SEC, given, |_| 1_000_000);
        assert!(got.iter().all(|(_, p)| *p == 1));
    }

    #[test]
    fn the_optimistic_slot_goes_round_the_waiting_whatever_they_gave() {
        let t0 = Instant::now();
        let mut s = slots(2);
        // 1 and 2 give a lot, 3 and 4 nothing. 3 and 4 first wait for a slot, 3 first.
        let given = |p: &u32| if *p <= 2 { 1e6 } else { 0.0 };
        let none = |_: &u32| 0;
        rounds(&mut s, &[1, 2], t0, t0 + SEC, given, none);
        rounds(&mut s, &[1, 2, 3], t0 + SEC, t0 + 2 * SEC, given, none);
        let got = rounds(
            &mut s,
            &[1, 2, 3, 4],
            t0 + 2 * SEC,
            t0 + 100 * SEC,
            given,
            none,
        );
        // The optimistic slot moves after three holds, to the peer that waited longest.
        let mut turns: Vec<u32> = Vec::new();
        for (_, p) in &got {
            if *p >= 3 && turns.last() != Some(p) {
                turns.push(*p);
            }
        }
        assert_eq!(turns[..2], [3, 4], "each waiter in its turn: {turns:?}");
        // A giver keeps the regular slot all along.
        let mut t = t0 + 2 * SEC;
        while t < t0 + 100 * SEC {
            let h = holders_at(&got, t);
            assert!(h.contains(&1) || h.contains(&2), "{h:?} at {:?}", t - t0);
            t += SEC / 2;
        }
    }
}

/// The suggestions of the few snapshots this node seeds at once, each made when first asked about.
#[derive(Debug)]
pub(crate) struct Suggestions {
    max: usize,
    /// Keys askers' identities (seeded at random: nobody picks another's key).
    keys: std::hash::RandomState,
    by_root: std::collections::HashMap<crate::hash::ContentRoot, SeedSuggestions>,
}

/// The block a seed counts what it sent in: a default request's worth of chunks.
const SEED_BLOCK_CHUNKS: u64 = 32;

impl Suggestions {
    /// Suggestions for at most `max` snapshots (one more replaces one of them).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            keys: std::hash::RandomState::new(),
            by_root: std::collections::HashMap::new(),
        }
    }

    /// What this seed suggests `asker` of the snapshot `root` (of `chunks` chunks) that holds
    /// `holding`, in blocks of `block` (see [`SeedSuggestions::answer`]).
    pub(crate) fn answer(
        &mut self,
        root: &crate::hash::ContentRoot,
        chunks: u64,
        block: u64,
        holding: &[u8],
        asker: &impl std::hash::Hash,
        now: Instant,
    ) -> Vec<u8> {
        let key = self.key(asker);
        self.entry(root, chunks, now)
            .answer(SUGGESTED_BLOCKS, block, Some(holding), key, now)
    }

    /// `asker` was let through with a request for chunks `range` of the snapshot `root` (of
    /// `chunks` chunks): the blocks not sent yet are kept for it while the response is under
    /// way (see [`SeedSuggestions::requested`]).
    pub(crate) fn requested(
        &mut self,
        root: &crate::hash::ContentRoot,
        chunks: u64,
        range: Range<u64>,
        asker: &impl std::hash::Hash,
    ) {
        let key = self.key(asker);
        let now = Instant::now();
        self.entry(root, chunks, now).requested(range, key, now);
    }

    /// Chunks `range` of the snapshot `root` (of `chunks` chunks) were sent: counted whether
    /// or not a suggestion was made yet (what a seed sends before its uploads are contended
    /// is not suggested again first).
    pub(crate) fn sent(
        &mut self,
        root: &crate::hash::ContentRoot,
        chunks: u64,
        range: Range<u64>,
    ) -> Option<FirstCopy> {
        let now = Instant::now();
        self.entry(root, chunks, now).sent(range, now)
    }

    /// The key of `asker`'s identity.
    fn key(&self, asker: &impl std::hash::Hash) -> u32 {
        use std::hash::BuildHasher;
        self.keys.hash_one(asker) as u32
    }

    fn entry(
        &mut self,
        root: &crate::hash::ContentRoot,
        chunks: u64,
        now: Instant,
    ) -> &mut SeedSuggestions {
        if !self.by_root.contains_key(root) && self.by_root.len() >= self.max {
            let any = *self.by_root.keys().next().expect("not empty");
            self.by_root.remove(&any);
        }
        // The seed counts in blocks of its own choosing (a default request's worth of chunks,
        // or coarser for a huge snapshot), whatever block size an asker picked.
        let own_block =
            SEED_BLOCK_CHUNKS.max(chunks.div_ceil(crate::transfer::protocol::MAX_HAVE_BITS));
        // From the first block: a crowd then holds the archive's start first, and downloaders
        // that take common pieces in order load as they download.
        self.by_root
            .entry(*root)
            .or_insert_with(|| SeedSuggestions::new(chunks, own_block, now))
    }
}

/// Blocks a seed in a crowd suggests each asker.
pub(crate) const SUGGESTED_BLOCKS: usize = 4;

/// How long a suggested block is kept for its asker before it may be suggested to another.
pub(crate) const SUGGESTION_HOLD: Duration = Duration::from_secs(10);

/// Blocks a suggestion looks at past the first `k` never sent (for the asker's own). While
/// blocks not sent remain this bounds an answer's work; after the first copy an answer scans
/// every block (at most 2^21, a few milliseconds).
const SCAN_AHEAD: usize = 4096;

/// Which pieces a seed in a crowd suggests each downloader that asks what it holds (what
/// BitTorrent calls super-seeding): a few of those the asker lacks that the seed has sent
/// least, each kept for its asker for [`SUGGESTION_HOLD`], so that the seed's uplink puts out one
/// whole copy before it sends any piece twice and the crowd trades the rest among itself. It
/// is advice: a seed still serves any range it is asked for. Kept per block of chunks (nine
/// bytes each: 18 MiB for 1 TiB in 16 KiB chunks and blocks of 32), for the few snapshots a
/// streamer serves at once.
#[derive(Debug, Clone)]
pub(crate) struct SeedSuggestions {
    block: u64,
    chunks: u64,
    sent: Vec<u8>,
    /// Until when each block is kept for the asker it was suggested to, milliseconds from
    /// `epoch`.
    held_until: Vec<u32>,
    /// Which asker each block is kept for (a key of its identity).
    held_for: Vec<u32>,
    epoch: Instant,
    /// The lowest block not sent yet (every one below it was): where a suggestion starts.
    first_unsent: usize,
    /// Blocks not sent yet.
    unsent: usize,
    /// Blocks sent again while others were not sent yet.
    repeated: u64,
}

/// A seed's first whole copy has left it: every block was sent at least once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FirstCopy {
    /// Since the seed first sent or suggested a block of the snapshot.
    pub(crate) after: Duration,
    /// Blocks sent again before the last was sent once (each a block's worth of the uplink spent
    /// before the copy was out).
    pub(crate) repeated: u64,
    /// Blocks in the snapshot.
    pub(crate) blocks: usize,
}

impl SeedSuggestions {
    /// Counters for `chunks` chunks in blocks of `block`.
    pub(crate) fn new(chunks: u64, block: u64, now: Instant) -> Self {
        let block = block.max(1);
        let n = chunks.div_ceil(block) as usize;
        Self {
            block,
            chunks,
            sent: vec![0; n],
            held_until: vec![0; n],
            held_for: vec![0; n],
            epoch: now,
            first_unsent: 0,
            unsent: n,
            repeated: 0,
        }
    }

    /// A request for chunks `range` from `asker` is under way at `now`: the blocks not sent yet
    /// are kept for it, so that they are not suggested to another while they are sent (an
    /// asker told "everything" asks for blocks nobody suggested it).
    pub(crate) fn requested(&mut self, range: Range<u64>, asker: u32, now: Instant) {
        if range.is_empty() || self.sent.is_empty() {
            return;
        }
        let until = self.ms(now + SUGGESTION_HOLD);
        for b in self.blocks(&range) {
            if self.sent[b] == 0 {
                self.held_until[b] = until;
                self.held_for[b] = asker;
            }
        }
    }

    /// The blocks chunks `range` (not empty) fall in.
    fn blocks(&self, range: &Range<u64>) -> std::ops::RangeInclusive<usize> {
        let first = (range.start / self.block) as usize;
        let last = ((range.end - 1) / self.block) as usize;
        first..=last.min(self.sent.len() - 1)
    }

    /// Chunks `range` were sent at `now`; says when that puts the first whole copy out.
    pub(crate) fn sent(&mut self, range: Range<u64>, now: Instant) -> Option<FirstCopy> {
        if range.is_empty() || self.sent.is_empty() {
            return None;
        }
        let was_unsent = self.unsent;
        for b in self.blocks(&range) {
            match self.sent[b] {
                0 => self.unsent -= 1,
                _ if self.unsent > 0 => self.repeated += 1,
                _ => {}
            }
            self.sent[b] = self.sent[b].saturating_add(1);
        }
        while self.first_unsent + 1 < self.sent.len() && self.sent[self.first_unsent] > 0 {
            self.first_unsent += 1;
        }
        (was_unsent > 0 && self.unsent == 0).then(|| FirstCopy {
            after: now.saturating_duration_since(self.epoch),
            repeated: self.repeated,
            blocks: self.sent.len(),
        })
    }

    fn ms(&self, t: Instant) -> u32 {
        t.saturating_duration_since(self.epoch)
            .as_millis()
            .min(u128::from(u32::MAX)) as u32
    }

    /// The suggestion to the asker `asker` (a key of its identity) at `now`, as a bitfield of its
    /// blocks of `client_block` chunks (bit `i` is bit `i % 8` of byte `i / 8`): up to `k`
    /// blocks it lacks (`holding`, a bitfield of the same shape, says what it holds), the least
    /// sent first; of those, the ones already kept for this asker first (an asker that asks
    /// again is suggested what it was, not `k` more: the blocks kept for askers stay few), then
    /// those kept for nobody, then those kept for another; the lowest blocks first. A client
    /// block is suggested when it overlaps a suggested block.
    pub(crate) fn answer(
        &mut self,
        k: usize,
        client_block: u64,
        holding: Option<&[u8]>,
        asker: u32,
        now: Instant,
    ) -> Vec<u8> {
        let client_block = client_block.max(1);
        let n_client = self.chunks.div_ceil(client_block);
        let mut bits = vec![0u8; n_client.div_ceil(8) as usize];
        let bit = |bytes: &[u8], i: u64| {
            bytes
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
        };
        let now_ms = self.ms(now);
        let n = self.sent.len();
        // The `k` lowest (sent, whom it is kept for, block) it lacks: the lowest blocks not sent
        // yet first, so that the archive leaves in order (a downloader loads as it downloads)
        // and a block whose asker did not take it goes to the next asker at once.
        let mut best: Vec<(u8, u8, usize, usize)> = Vec::with_capacity(k + 1);
        let mut ahead = None;
        for i in 0..n {
            let b = (self.first_unsent + i) % n;
            if ahead.is_some_and(|a| i >= a) {
                break;
            }
            let start = b as u64 * self.block;
            let end = (start + self.block).min(self.chunks);
            let lacks = holding.is_none_or(|h| {
                (start / client_block..=(end.max(1) - 1) / client_block).any(|c| !bit(h, c))
            });
            if !lacks {
                continue;
            }
            let kept = match (self.held_until[b] > now_ms, self.held_for[b] == asker) {
                (true, true) => 0,
                (false, _) => 1,
                (true, false) => 2,
            };
            let key = (self.sent[b], kept, i, b);
            if best.len() < k || key < best[best.len() - 1] {
                let at = best.partition_point(|x| *x < key);
                best.insert(at, key);
                best.truncate(k);
            }
            // Nothing can beat k blocks never sent and kept for this asker; once k blocks never
            // sent are found, a bounded stretch more is looked at for this asker's own.
            if best.len() == k && best[k - 1].0 == 0 {
                if best[k - 1].1 == 0 {
                    break;
                }
                ahead.get_or_insert(i + SCAN_AHEAD);
            }
        }
        let until = self.ms(now + SUGGESTION_HOLD);
        for (_, _, _, b) in best {
            self.held_until[b] = until;
            self.held_for[b] = asker;
            let start = b as u64 * self.block;
            let end = (start + self.block).min(self.chunks);
            for i in start / client_block..=(end.max(1) - 1) / client_block {
                bits[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        bits
    }
}

#[cfg(test)]
mod suggestion_tests {
    use super::*;

    fn suggested(bits: &[u8]) -> Vec<usize> {
        (0..bits.len() * 8)
            .filter(|i| bits[i / 8] & (1 << (i % 8)) != 0)
            .collect()
    }

    #[test]
    fn each_asker_is_suggested_different_pieces_it_lacks_of_those_sent_least() {
        let t0 = Instant::now();
        let mut o = SeedSuggestions::new(10 * 32, 32, t0);
        let a = suggested(&o.answer(4, 32, None, 1, t0));
        let b = suggested(&o.answer(4, 32, None, 2, t0));
        assert_eq!(a, vec![0, 1, 2, 3]);
        assert_eq!(b, vec![4, 5, 6, 7]);
        // 0 to 5 were sent; 6 and 7 are kept for the second asker: 8 and 9 come first, then
        // the kept ones.
        for p in 0..6 {
            o.sent(p * 32..(p + 1) * 32, t0);
        }
        assert_eq!(suggested(&o.answer(4, 32, None, 3, t0)), vec![6, 7, 8, 9]);
        // Once kept no longer, and for an asker that holds 6 to 9: what it lacks, least sent
        // first.
        let later = t0 + SUGGESTION_HOLD;
        o.sent(0..32, t0);
        let holding = [0b1100_0000u8, 0b11];
        assert_eq!(
            suggested(&o.answer(3, 32, Some(&holding), 4, later)),
            vec![1, 2, 3]
        );
        // One that holds everything is suggested nothing.
        assert!(suggested(&o.answer(3, 32, Some(&[0xff, 0b11]), 4, later)).is_empty());
        // An asker with other blocks gets the blocks that overlap the suggestion.
        assert_eq!(suggested(&o.answer(1, 64, None, 5, later)).len(), 1);
    }

    #[test]
    fn the_first_whole_copy_is_reported_once_with_the_blocks_sent_twice_before_it() {
        let t0 = Instant::now();
        let mut o = SeedSuggestions::new(4 * 32, 32, t0);
        assert_eq!(o.sent(0..64, t0), None);
        // Block 1 again (a repeat), then 2 alone: still one block unsent.
        assert_eq!(o.sent(40..50, t0), None);
        assert_eq!(o.sent(64..96, t0), None);
        let out = o.sent(90..128, t0 + SUGGESTION_HOLD);
        assert_eq!(
            out,
            Some(FirstCopy {
                after: SUGGESTION_HOLD,
                repeated: 2,
                blocks: 4
            })
        );
        // Not again, and later sends are not repeats "before the copy".
        assert_eq!(o.sent(0..128, t0 + SUGGESTION_HOLD), None);
        assert_eq!(o.repeated, 2);
    }

    #[test]
    fn what_a_seed_sent_before_any_suggestion_is_not_suggested_first() {
        let root = crate::hash::ContentRoot([7; 32]);
        let mut s = Suggestions::new(2);
        let chunks = 8 * SEED_BLOCK_CHUNKS;
        // Blocks 0 to 3 were sent while the seed's uploads were not contended.
        let _ = s.sent(&root, chunks, 0..4 * SEED_BLOCK_CHUNKS);
        let bits = s.answer(&root, chunks, SEED_BLOCK_CHUNKS, &[0], &1u8, Instant::now());
        assert_eq!(suggested(&bits), vec![4, 5, 6, 7]);
    }

    #[test]
    fn an_asker_that_asks_again_is_suggested_its_own_blocks_not_more() {
        let t0 = Instant::now();
        let mut o = SeedSuggestions::new(12 * 32, 32, t0);
        assert_eq!(suggested(&o.answer(4, 32, None, 1, t0)), vec![0, 1, 2, 3]);
        // Asked again (having fetched none yet): the same four, kept for it anew; another
        // asker meanwhile gets four others.
        let t1 = t0 + SUGGESTION_HOLD / 2;
        assert_eq!(suggested(&o.answer(4, 32, None, 1, t1)), vec![0, 1, 2, 3]);
        assert_eq!(suggested(&o.answer(4, 32, None, 2, t1)), vec![4, 5, 6, 7]);
        // Having 0 and 1 (sent), it is suggested 2 and 3 and two new ones.
        o.sent(0..64, t1);
        let holding = [0b0000_0011u8, 0];
        assert_eq!(
            suggested(&o.answer(4, 32, Some(&holding), 1, t1)),
            vec![2, 3, 8, 9]
        );
        // Kept for the first asker past the first hold (renewed at t1): a third asker gets the
        // rest unsent (10, 11), then blocks kept for others before any block sent twice.
        let t2 = t0 + SUGGESTION_HOLD;
        let third = suggested(&o.answer(4, 32, None, 3, t2));
        assert_eq!(third.len(), 4);
        assert!(third.contains(&10) && third.contains(&11), "{third:?}");
        assert!(
            third.iter().all(|b| (2..12).contains(b)),
            "nothing sent before: {third:?}"
        );
    }

    #[test]
    fn blocks_requested_without_a_suggestion_are_kept_for_their_asker_while_sent() {
        let t0 = Instant::now();
        let mut o = SeedSuggestions::new(8 * 32, 32, t0);
        // Asker 1, told "everything", asks for blocks 0 and 1 in order.
        o.requested(0..64, 1, t0);
        assert_eq!(suggested(&o.answer(2, 32, None, 2, t0)), vec![2, 3]);
        assert_eq!(suggested(&o.answer(2, 32, None, 1, t0)), vec![0, 1]);
        // Once sent, they come after every block not sent yet, those kept for another too; a
        // request for a block already sent keeps nothing.
        o.sent(0..64, t0);
        o.requested(0..32, 1, t0);
        assert_eq!(suggested(&o.answer(2, 32, None, 3, t0)), vec![4, 5]);
        assert_eq!(suggested(&o.answer(4, 32, None, 4, t0)), vec![2, 3, 6, 7]);
    }
}
