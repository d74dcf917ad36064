//! Which piece a source is asked for, a part of the scheduler: pure, seeded, unit-tested.
//!
//! While every source holds the whole snapshot, pieces go lowest first (the scheduler's
//! cursor): sequential writes, and a loader reading the archive as it arrives keeps pace. In a
//! crowd, where some sources hold part of it (other downloaders serving what they verified),
//! the rules are BitTorrent's, which twenty years of swarms have tried:
//! - **Random first.** The first few pieces are picked at random among those the source has, so
//!   that a crowd starting together holds different pieces at once and has something to trade.
//! - **Rarest first.** Then the piece the fewest sources hold, ties at random: what is rare is
//!   fetched while its holders are still there, pieces spread evenly, and the last pieces are
//!   not the ones nobody has.
//! - **Common pieces in order.** When the lowest piece still open (missing, not in flight) is
//!   held by at least half the partial sources (and two), it is taken before any rarer one: a common piece gains
//!   nothing by waiting, and taking those in order lets the loader, which reads the archive as
//!   it arrives, keep pace with the download instead of loading most of it at the end.
//! - **A complete source spends its uplink on what no partial source can give now.** From a
//!   source holding everything (a seed), a piece is not taken while a partial source with room
//!   in its window holds it: the seed's uplink goes out in pieces nobody else has yet, so one
//!   whole copy leaves it as early as possible and the crowd trades the rest.
//! - The endgame is the scheduler's hedged tail.
//!
//! Picking costs a bounded sample of the open pieces (missing, not in flight), kept in a set
//! with constant-time updates, so it stays cheap at a million chunks.

use rand::Rng;

use super::bits::Bits;

/// How many candidate pieces rarest-first compares (a sample: cheap at any size, and with
/// random ties, pieces spread as well as with a full scan).
const SAMPLE: usize = 32;

/// Most open pieces looked at for a complete source (those partial sources can give are
/// skipped; when this many are, the complete source is not needed now).
const SCAN: usize = 1024;

/// What a source holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Have {
    /// Every piece (it holds the snapshot, or has not said otherwise).
    All,
    /// Not known yet: it is asked first.
    Unknown,
    /// These pieces.
    Some(Bits),
}

impl Have {
    /// The pieces held, for a partial source that said.
    pub(crate) fn bits(&self) -> Option<&Bits> {
        match self {
            Have::Some(bits) => Some(bits),
            _ => None,
        }
    }

    pub(crate) fn has(&self, piece: usize) -> bool {
        match self {
            Have::All => true,
            Have::Unknown => false,
            Have::Some(bits) => bits.get(piece),
        }
    }

    /// Whether it holds part of the snapshot (or may: not said yet).
    pub(crate) fn is_partial(&self) -> bool {
        !matches!(self, Have::All)
    }
}

/// The pieces not done and not in flight, as a set with constant-time insert, remove and
/// random access.
#[derive(Debug, Clone)]
pub(crate) struct OpenSet {
    list: Vec<u32>,
    pos: Vec<u32>,
}

const ABSENT: u32 = u32::MAX;

impl OpenSet {
    /// The set of `pieces` pieces, all open.
    pub(crate) fn full(pieces: usize) -> Self {
        Self {
            list: (0..pieces as u32).collect(),
            pos: (0..pieces as u32).collect(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn contains(&self, piece: usize) -> bool {
        self.pos.get(piece).is_some_and(|p| *p != ABSENT)
    }

    pub(crate) fn insert(&mut self, piece: usize) {
        if piece < self.pos.len() && self.pos[piece] == ABSENT {
            self.pos[piece] = self.list.len() as u32;
            self.list.push(piece as u32);
        }
    }

    pub(crate) fn remove(&mut self, piece: usize) {
        let Some(&at) = self.pos.get(piece) else {
            return;
        };
        if at == ABSENT {
            return;
        }
        let last = *self.list.last().expect("not empty");
        self.list.swap_remove(at as usize);
        if last as usize != piece {
            self.pos[last as usize] = at;
        }
        self.pos[piece] = ABSENT;
    }

    fn at(&self, i: usize) -> usize {
        self.list[i] as usize
    }
}

/// How many partial sources hold each piece (complete sources hold every piece alike).
#[derive(Debug, Clone)]
pub(crate) struct Availability {
    counts: Vec<u16>,
}

impl Availability {
    pub(crate) fn new(pieces: usize) -> Self {
        Self {
            counts: vec![0; pieces],
        }
    }

    /// A partial source's holdings went from `old` to `new`. Costs a word per 64 pieces and a
    /// step per piece that changed.
    pub(crate) fn update(&mut self, old: &Have, new: &Have) {
        let (old, new) = (old.bits(), new.bits());
        for w in 0..self.counts.len().div_ceil(64) {
            let was = old.map_or(0, |b| b.word(w));
            let is = new.map_or(0, |b| b.word(w));
            let mut changed = was ^ is;
            while changed != 0 {
                let bit = changed.trailing_zeros();
                changed &= changed - 1;
                let Some(count) = self.counts.get_mut(w * 64 + bit as usize) else {
                    break;
                };
                if is & (1 << bit) != 0 {
                    *count = count.saturating_add(1);
                } else {
                    *count = count.saturating_sub(1);
                }
            }
        }
    }

    /// Partial sources holding `piece`.
    pub(crate) fn count(&self, piece: usize) -> u16 {
        self.counts.get(piece).copied().unwrap_or(0)
    }
}

/// Whether a piece that `holders` of the `partials` partial sources hold is common: at least
/// two, and at least half of them.
pub(crate) fn is_common(holders: u32, partials: u32) -> bool {
    holders >= 2 && holders * 2 >= partials
}

/// What a pick looks at: the open pieces, how many sources hold each, and whether this is one
/// of the first pieces (picked at random).
pub(crate) struct Pick<'a> {
    pub(crate) open: &'a OpenSet,
    /// How many sources hold the piece (lower is rarer).
    pub(crate) rarity: &'a dyn Fn(usize) -> u32,
    /// Pick at random (the first pieces), not rarest first.
    pub(crate) random_first: bool,
    /// The lowest open piece, when it is common (see [`is_common`]).
    pub(crate) lowest: Option<usize>,
}

impl Pick<'_> {
    /// The piece to ask a complete source for, if any: an open piece for which `spare` (a
    /// partial source with room in its window holds it) is false. Looks at a bounded number of
    /// open pieces from a random place.
    pub(crate) fn for_complete(
        &self,
        spare: &dyn Fn(usize) -> bool,
        rng: &mut impl Rng,
    ) -> Option<usize> {
        let n = self.open.len();
        if n == 0 {
            return None;
        }
        let start = rng.random_range(0..n);
        let mut best = Best::default();
        for i in 0..n.min(SCAN) {
            let piece = self.open.at((start + i) % n);
            if spare(piece) {
                continue;
            }
            if self.random_first {
                return Some(piece);
            }
            if best.consider(piece, (self.rarity)(piece)) {
                break;
            }
        }
        best.piece
    }

    /// The piece to ask a partial source holding `has` for, if any: an open one it holds.
    /// `done` are the pieces done; the scan goes a word of 64 pieces at a time from a random
    /// place.
    pub(crate) fn for_partial(&self, has: &Bits, done: &Bits, rng: &mut impl Rng) -> Option<usize> {
        let words = has.words();
        if words == 0 || self.open.len() == 0 {
            return None;
        }
        // In order when the lowest piece missing is common: nothing is gained by fetching it
        // later, and the loader reading the archive as it arrives keeps pace.
        if !self.random_first
            && let Some(lowest) = self.lowest.filter(|&p| has.get(p))
        {
            return Some(lowest);
        }
        // From a random piece: the first word from its bit up, the others whole, and the first
        // word's lower bits last.
        let start = rng.random_range(0..has.len().max(1));
        let (first, bit) = (start / 64, start % 64);
        let mut best = Best::default();
        for i in 0..=words {
            let w = (first + i) % words;
            let mask = match i {
                0 => u64::MAX << bit,
                _ if i == words => !(u64::MAX << bit),
                _ => u64::MAX,
            };
            let mut candidates = has.word(w) & !done.word(w) & mask;
            while candidates != 0 {
                let bit = candidates.trailing_zeros() as usize;
                candidates &= candidates - 1;
                let piece = w * 64 + bit;
                if !self.open.contains(piece) {
                    continue;
                }
                if self.random_first {
                    return Some(piece);
                }
                if best.consider(piece, (self.rarity)(piece)) {
                    return best.piece;
                }
            }
        }
        best.piece
    }
}

/// The rarest of the candidates seen, and how many were.
#[derive(Default)]
struct Best {
    piece: Option<usize>,
    rarity: u32,
    seen: usize,
}

impl Best {
    /// Takes a candidate; true once the sample is full.
    fn consider(&mut self, piece: usize, rarity: u32) -> bool {
        if self.piece.is_none() || rarity < self.rarity {
            self.piece = Some(piece);
            self.rarity = rarity;
        }
        self.seen += 1;
        self.seen >= SAMPLE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_xoshiro::Xoshiro256PlusPlus;

    fn rng() -> Xoshiro256PlusPlus {
        Xoshiro256PlusPlus::seed_from_u64(3)
    }

    #[test]
    fn the_open_set_takes_and_gives_back_in_constant_time() {
        let mut s = OpenSet::full(10);
        s.remove(3);
        s.remove(9);
        s.remove(3);
        assert_eq!(s.len(), 8);
        assert!(!s.contains(3) && s.contains(4) && !s.contains(9));
        s.insert(3);
        s.insert(3);
        assert_eq!(s.len(), 9);
        for p in 0..10 {
            s.remove(p);
        }
        assert_eq!(s.len(), 0);
        s.remove(42);
    }

    fn bits(len: usize, set: impl Fn(usize) -> bool) -> Bits {
        let mut b = Bits::new(len);
        (0..len).filter(|i| set(*i)).for_each(|i| b.set(i));
        b
    }

    #[test]
    fn the_first_pieces_are_random_so_a_crowd_starting_together_holds_different_ones() {
        let open = OpenSet::full(1000);
        let pick = Pick {
            open: &open,
            rarity: &|_| 1,
            random_first: true,
            lowest: None,
        };
        let mut r = rng();
        let picks: std::collections::HashSet<usize> = (0..20)
            .map(|_| pick.for_complete(&|_| false, &mut r).unwrap())
            .collect();
        assert!(picks.len() >= 18, "{picks:?}");
        let has = bits(1000, |p| p % 2 == 0);
        let done = Bits::new(1000);
        let partial: std::collections::HashSet<usize> = (0..20)
            .map(|_| pick.for_partial(&has, &done, &mut r).unwrap())
            .collect();
        assert!(
            partial.len() >= 18 && partial.iter().all(|p| p % 2 == 0),
            "{partial:?}"
        );
    }

    #[test]
    fn then_the_rarest_piece_the_source_has_goes_first() {
        let mut open = OpenSet::full(64);
        // Piece 41 is the rarest; the source has the even pieces and 41; 0 to 9 are done and
        // 10 is in flight (not open).
        let rarity = |p: usize| if p == 41 { 1 } else { 5 + (p % 3) as u32 };
        let has = bits(64, |p| p % 2 == 0 || p == 41);
        let done = bits(64, |p| p < 10);
        (0..11).for_each(|p| open.remove(p));
        let pick = Pick {
            open: &open,
            rarity: &rarity,
            random_first: false,
            lowest: None,
        };
        let mut r = rng();
        let picks: Vec<usize> = (0..50)
            .map(|_| pick.for_partial(&has, &done, &mut r).unwrap())
            .collect();
        assert!(picks.iter().all(|p| *p == 41), "{picks:?}");
        // From a complete source, the rarest among a sample of the open pieces.
        let rarest = (0..50)
            .filter(|_| pick.for_complete(&|_| false, &mut r) == Some(41))
            .count();
        // (A sample of 32 of the 53 open pieces holds it 60% of the time.)
        assert!(rarest >= 20, "{rarest} of 50");
        // A partial source that holds nothing open is asked for nothing.
        let stale = bits(64, |p| p <= 10);
        assert_eq!(pick.for_partial(&stale, &done, &mut r), None);
    }

    #[test]
    fn a_common_lowest_piece_goes_before_rarer_ones_a_rare_one_does_not() {
        let open = OpenSet::full(64);
        let done = bits(64, |_| false);
        let has = bits(64, |p| p == 3 || p == 41);
        // Piece 3 is held by 4 of 6 partial sources, 41 by one.
        let rarity = |p: usize| if p == 41 { 1 } else { 4 };
        assert!(is_common(4, 6) && is_common(2, 4) && !is_common(2, 5) && !is_common(1, 1));
        let mut pick = Pick {
            open: &open,
            rarity: &rarity,
            random_first: false,
            lowest: Some(3),
        };
        let mut r = rng();
        assert_eq!(pick.for_partial(&has, &done, &mut r), Some(3));
        // A source without it is asked for the rarest it has; the first picks stay random.
        let other = bits(64, |p| p == 5 || p == 41);
        assert_eq!(pick.for_partial(&other, &done, &mut r), Some(41));
        pick.random_first = true;
        let picks: std::collections::HashSet<usize> = (0..40)
            .filter_map(|_| pick.for_partial(&has, &done, &mut r))
            .collect();
        assert!(picks.contains(&41), "{picks:?}");
        // No common lowest piece: rarest first.
        pick.random_first = false;
        pick.lowest = None;
        assert_eq!(pick.for_partial(&has, &done, &mut r), Some(41));
    }

    #[test]
    fn a_complete_source_is_kept_for_what_no_partial_source_with_room_holds() {
        let open = OpenSet::full(8);
        // Partial sources with room hold pieces 0 to 5: the seed is asked for 6 or 7 only.
        let pick = Pick {
            open: &open,
            rarity: &|_| 1,
            random_first: false,
            lowest: None,
        };
        let mut r = rng();
        for _ in 0..20 {
            assert!(pick.for_complete(&|p| p < 6, &mut r).unwrap() >= 6);
        }
        // Everything is held by them: the seed is asked for nothing.
        assert_eq!(pick.for_complete(&|_| true, &mut r), None);
    }

    #[test]
    fn availability_follows_what_partial_sources_say_they_hold() {
        let mut a = Availability::new(130);
        let mut b = bits(130, |p| p == 1 || p == 129);
        a.update(&Have::Unknown, &Have::Some(b.clone()));
        assert_eq!((a.count(0), a.count(1), a.count(129)), (0, 1, 1));
        let before = b.clone();
        b.set(2);
        a.update(&Have::Some(before), &Have::Some(b.clone()));
        a.update(&Have::Unknown, &Have::Some(b.clone()));
        assert_eq!((a.count(1), a.count(2), a.count(129)), (2, 2, 2));
        // A source that goes away, or says it holds everything, no longer counts as partial.
        a.update(&Have::Some(b.clone()), &Have::All);
        assert_eq!((a.count(1), a.count(2)), (1, 1));
    }

    #[test]
    fn a_pick_among_half_a_million_pieces_looks_at_a_bounded_sample() {
        let open = OpenSet::full(1 << 19);
        let looked = std::cell::Cell::new(0usize);
        let rarity = |p: usize| {
            looked.set(looked.get() + 1);
            (p % 7) as u32
        };
        let mut r = rng();
        let pick = Pick {
            open: &open,
            rarity: &rarity,
            random_first: false,
            lowest: None,
        };
        for _ in 0..100 {
            pick.for_complete(&|_| false, &mut r).unwrap();
        }
        assert_eq!(looked.get(), 100 * SAMPLE);
        // Skipping what partial sources give is bounded too.
        looked.set(0);
        let spared = std::cell::Cell::new(0usize);
        let spare = |_: usize| {
            spared.set(spared.get() + 1);
            true
        };
        assert_eq!(pick.for_complete(&spare, &mut r), None);
        assert_eq!(spared.get(), SCAN);
    }
}
