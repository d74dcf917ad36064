//! The roster's rules, one test each: places by delivery.

use super::roster::{MAX_SOURCES, Standing};
use super::*;

const CHUNK: u64 = 16 * 1024;
const SEC: Duration = Duration::from_secs(1);

/// Four places; a source is snubbed after 10 s, the least useful rotate every 30 s.
fn config() -> SchedulerConfig {
    SchedulerConfig {
        request_chunks: 4,
        initial_window: 2,
        max_window: 8,
        max_inflight: 64,
        min_request_timeout: Duration::from_secs(2),
        min_peer_rate: 1024,
        hedge: false,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        max_peer_failures: 3,
        no_progress_timeout: Duration::from_secs(60),
        have_interval: SEC,
        max_peers: 4,
        snub_timeout: 10 * SEC,
        rotate_interval: 30 * SEC,
        jitter_seed: Some(1),
    }
}

fn sched(chunks: u64) -> (Scheduler, Instant) {
    let now = Instant::now();
    let s = Scheduler::new(config(), chunks * CHUNK, CHUNK, chunks, &Bits::new(0), now);
    (s, now)
}

/// Polls every command; connects the sources told to connect.
fn drive(s: &mut Scheduler, now: Instant) -> Vec<Command> {
    let commands: Vec<Command> = std::iter::from_fn(|| s.poll_command(now)).collect();
    for c in &commands {
        if let Command::Connect(p) = c {
            s.handle_connected(*p);
        }
    }
    commands
}

fn connects(commands: &[Command]) -> Vec<PeerIdx> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Connect(p) => Some(*p),
            _ => None,
        })
        .collect()
}

fn closes(commands: &[Command]) -> Vec<PeerIdx> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Close(p) => Some(*p),
            _ => None,
        })
        .collect()
}

fn requests(commands: &[Command]) -> Vec<(ReqId, PeerIdx)> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Request { id, peer, .. } => Some((*id, *peer)),
            _ => None,
        })
        .collect()
}

fn standings(s: &Scheduler) -> Vec<Standing> {
    (0..s.peers.len())
        .map(|i| s.peer_report(i).standing)
        .collect()
}

/// Runs the download from `from` to `to` in steps of 100 ms: `answer` says, per request, by
/// source, whether it delivers (else it fails as the returned failure says).
fn run(
    s: &mut Scheduler,
    from: Instant,
    to: Instant,
    answer: impl Fn(PeerIdx) -> Result<(), RequestFailure>,
) -> Vec<Command> {
    let mut all = Vec::new();
    let mut t = from;
    while t <= to && !s.is_complete() {
        s.handle_timeout(t);
        let commands = drive(s, t);
        for (id, peer) in requests(&commands) {
            match answer(peer) {
                Ok(()) => {
                    s.handle_success(id, t);
                }
                Err(f) => s.handle_failure(id, f, t),
            }
        }
        all.extend(commands);
        t += Duration::from_millis(100);
    }
    all
}

#[test]
fn every_source_heard_of_is_kept_and_only_the_places_are_connected() {
    let (mut s, now) = sched(400);
    for _ in 0..7 {
        assert!(s.handle_source(false, now).is_some());
    }
    let commands = drive(&mut s, now);
    assert_eq!(
        connects(&commands),
        vec![0, 1, 2, 3],
        "the first four heard of"
    );
    use Standing::*;
    assert_eq!(
        standings(&s),
        vec![Active, Active, Active, Active, Waiting, Waiting, Waiting]
    );
}

#[test]
fn a_source_that_delivers_nothing_gives_its_place_to_a_waiting_one() {
    // Each way of delivering nothing: busy, not held, a stall (requests that time out and
    // fail; it also leaves its place for failing, after `max_peer_failures`).
    for failure in [
        RequestFailure::Busy,
        RequestFailure::NotHeld,
        RequestFailure::Transient,
    ] {
        let (mut s, now) = sched(4000);
        for _ in 0..5 {
            s.handle_source(false, now);
        }
        // Source 0 delivers nothing; 1 to 3 deliver.
        let answer = |peer: PeerIdx| if peer == 0 { Err(failure) } else { Ok(()) };
        let mut all = run(&mut s, now, now + 9 * SEC, answer);
        if failure != RequestFailure::Transient {
            assert!(
                closes(&all).is_empty(),
                "{failure:?}: not before the snub timeout"
            );
        }
        all.extend(run(&mut s, now + 9 * SEC, now + 11 * SEC, answer));
        assert_eq!(closes(&all), vec![0], "{failure:?}");
        assert_eq!(
            connects(&all)[4..],
            [4],
            "{failure:?}: the spare takes the place"
        );
        assert_eq!(s.peer_report(0).standing, Standing::Waiting, "{failure:?}");
        for p in 1..4 {
            assert_eq!(s.peer_report(p).standing, Standing::Active, "{failure:?}");
        }
    }
}

#[test]
fn nobody_is_snubbed_while_no_spare_waits() {
    let (mut s, now) = sched(4000);
    for _ in 0..2 {
        s.handle_source(false, now);
    }
    let commands = run(&mut s, now, now + 30 * SEC, |p| {
        if p == 0 {
            Err(RequestFailure::Busy)
        } else {
            Ok(())
        }
    });
    assert!(closes(&commands).is_empty());
    assert_eq!(s.peer_report(0).standing, Standing::Active);
}

#[test]
fn a_source_is_not_snubbed_for_what_it_could_not_deliver_while_the_download_waited() {
    let (mut s, now) = sched(4000);
    s.set_paused(true, now);
    for _ in 0..5 {
        s.handle_source(false, now);
    }
    // Twenty seconds waiting for the disk: nothing was asked, nothing is held against anyone.
    let waited = run(&mut s, now, now + 20 * SEC, |_| Ok(()));
    assert!(closes(&waited).is_empty());
    s.set_paused(false, now + 20 * SEC);
    let after = run(&mut s, now + 20 * SEC, now + 25 * SEC, |_| Ok(()));
    assert!(closes(&after).is_empty());
    assert!(s.done_bytes() > 0);
    // Once requests go out, one that delivers nothing is snubbed as soon as it is due.
    let t = now + 25 * SEC;
    let snubbed = run(&mut s, t, t + 11 * SEC, |p| {
        if p == 0 {
            Err(RequestFailure::Busy)
        } else {
            Ok(())
        }
    });
    assert_eq!(closes(&snubbed), vec![0]);
}

#[test]
fn untried_spares_come_first_then_those_that_delivered_most() {
    let (mut s, now) = sched(40_000);
    for _ in 0..4 {
        s.handle_source(false, now);
    }
    // 1 delivers three pieces, 0 one, 2 and 3 none.
    let mut delivered = [0; 4];
    let wanted = [1, 3, 0, 0];
    let mut t = now;
    while delivered != wanted {
        t += SEC / 10;
        for (id, p) in requests(&drive(&mut s, t)) {
            if delivered[p] < wanted[p] {
                delivered[p] += 1;
                s.handle_success(id, t);
            } else {
                s.handle_failure(id, RequestFailure::Busy, t);
            }
        }
    }
    for p in 0..4 {
        s.give_place_up(p, roster::Why::Rotated, t);
    }
    s.handle_source(false, t);
    s.handle_source(false, t);
    let mut back = connects(&drive(&mut s, t));
    back.sort();
    assert_eq!(
        back,
        vec![0, 1, 4, 5],
        "the untried, then those that delivered"
    );
    for p in [0, 1, 4, 5] {
        s.give_place_up(p, roster::Why::Rotated, t);
    }
    let mut back = connects(&drive(&mut s, t));
    back.sort();
    assert_eq!(
        back,
        vec![0, 1, 2, 3],
        "by bytes delivered, then as heard of"
    );
}

#[test]
fn the_least_useful_give_their_places_to_untried_sources_every_interval() {
    let (mut s, now) = sched(400_000);
    for _ in 0..4 {
        s.handle_source(false, now);
    }
    // All four deliver, 3 least (every other request busy); then an untried source arrives.
    let slow = std::cell::Cell::new(false);
    let answer = |p: PeerIdx| {
        if p == 3 {
            slow.set(!slow.get());
            if slow.get() {
                return Err(RequestFailure::Busy);
            }
        }
        Ok(())
    };
    run(&mut s, now, now + 29 * SEC, answer);
    s.handle_source(false, now + 29 * SEC);
    let turned = run(&mut s, now + 29 * SEC, now + 31 * SEC, answer);
    assert_eq!(closes(&turned), vec![3], "the one that delivered least");
    assert_eq!(connects(&turned), vec![4]);
    // With nobody untried left, nobody rotates.
    let quiet = run(&mut s, now + 31 * SEC, now + 62 * SEC, |_| Ok(()));
    assert!(closes(&quiet).is_empty());
}

#[test]
fn holders_of_part_take_at_most_three_quarters_and_seeds_get_a_place_beyond_the_limit() {
    let (mut s, now) = sched(400);
    for _ in 0..6 {
        s.handle_source(true, now);
    }
    let first = drive(&mut s, now);
    assert_eq!(
        connects(&first),
        vec![0, 1, 2],
        "three quarters of four places"
    );
    s.handle_source(false, now);
    assert_eq!(connects(&drive(&mut s, now)), vec![6]);
    // A full house of partial holders and one seed: another seed still gets a place.
    let (mut s, now) = sched(400);
    for _ in 0..3 {
        s.handle_source(true, now);
    }
    s.handle_source(false, now);
    s.handle_source(false, now);
    assert_eq!(connects(&drive(&mut s, now)), vec![0, 1, 2, 3]);
    s.handle_source(false, now);
    assert!(
        connects(&drive(&mut s, now)).is_empty(),
        "a quarter are seeds already"
    );
}

/// A download of 40,000 chunks with a seed (source 0) and `partials` holders of part after
/// it, connected; the first three of those say they hold every piece.
fn seed_and_holders_of_part(partials: usize) -> (Scheduler, Instant) {
    let (mut s, now) = sched(40_000);
    s.handle_source(false, now);
    for _ in 0..partials {
        s.handle_source(true, now);
    }
    drive(&mut s, now);
    let mut all = Bits::new(10_000);
    for i in 0..10_000 {
        all.set(i);
    }
    for p in 1..4 {
        s.handle_have(p, Ok(Have::Some(all.clone())), now);
    }
    (s, now)
}

/// The seed (source 0) says busy; the others deliver.
fn busy_seed(p: PeerIdx) -> Result<(), RequestFailure> {
    if p == 0 {
        Err(RequestFailure::Busy)
    } else {
        Ok(())
    }
}

#[test]
fn a_starving_download_takes_a_snubbed_seed_back_before_its_wait_ends() {
    // A seed that says busy, three holders of part that deliver (the quota of four places),
    // a fourth holder of part waiting.
    let (mut s, now) = seed_and_holders_of_part(4);
    let served = run(&mut s, now, now + 11 * SEC, busy_seed);
    assert_eq!(
        closes(&served),
        vec![0],
        "the seed is snubbed for the spare"
    );
    use Standing::*;
    assert_eq!(
        standings(&s),
        vec![Waiting, Active, Active, Active, Waiting]
    );
    // The holders of part leave: the spare takes a place.
    let t = now + 11 * SEC + SEC / 10;
    for p in 1..4 {
        s.handle_disconnected(p, Lost::Left, t);
    }
    assert_eq!(connects(&drive(&mut s, t)), vec![4]);
    // The newcomer has nothing to give yet: nothing is in flight, and once nothing new has
    // arrived for a quarter of the minimum request timeout (0.5 s here), the seed is back,
    // long before its wait ends (at 20 s).
    let starving = s.poll_timeout(t);
    assert!(starving <= t + SEC / 2, "{:?}", starving - t);
    assert!(connects(&run(&mut s, t, starving - SEC / 10, |_| Ok(()))).is_empty());
    s.handle_timeout(starving);
    assert_eq!(connects(&drive(&mut s, starving)), vec![0]);
    assert_eq!(
        standings(&s),
        vec![Active, Waiting, Waiting, Waiting, Active]
    );
}

#[test]
fn a_starving_download_takes_back_a_complete_holder_before_a_downloader_that_delivered() {
    // A seed and a downloader that delivered before, both snubbed: the downloader may have
    // gone since (a crowd's holders leave once synced), the seed is the source of last resort.
    let (mut s, now) = sched(4000);
    s.handle_source(false, now);
    s.handle_source(true, now);
    drive(&mut s, now);
    s.peers[1].bytes = 10 * CHUNK;
    s.give_place_up(0, super::roster::Why::NothingDelivered, now);
    s.give_place_up(1, super::roster::Why::NothingDelivered, now);
    let t = now + SEC;
    s.handle_timeout(t);
    assert_eq!(connects(&drive(&mut s, t)), vec![0]);
    use Standing::*;
    assert_eq!(standings(&s), vec![Active, Waiting]);
}

#[test]
fn a_place_freed_goes_to_a_waiting_spare_before_anyone_is_snubbed_for_it() {
    // A seed that says busy (past the snub timeout, nobody waiting) and three holders of
    // part that deliver, in the four places.
    let (mut s, now) = seed_and_holders_of_part(3);
    assert!(closes(&run(&mut s, now, now + 11 * SEC, busy_seed)).is_empty());
    // A holder of part leaves as another is heard of: the newcomer takes the place freed,
    // and the seed keeps its own.
    let t = now + 11 * SEC + SEC / 10;
    s.handle_disconnected(1, Lost::Left, t);
    s.handle_source(true, t);
    let after = drive(&mut s, t);
    assert_eq!(connects(&after), vec![4]);
    assert!(closes(&after).is_empty(), "{after:?}");
    use Standing::*;
    assert_eq!(standings(&s), vec![Active, Waiting, Active, Active, Active]);
}

#[test]
fn a_source_shutting_down_gives_its_place_up_at_once_and_its_pieces_go_to_others() {
    let (mut s, now) = sched(4000);
    for _ in 0..5 {
        s.handle_source(false, now);
    }
    run(&mut s, now, now + SEC, |_| Ok(()));
    let t = now + 2 * SEC;
    drive(&mut s, t);
    assert!(s.requests.values().any(|r| r.peer == 0));
    s.handle_disconnected(0, Lost::Left, t);
    assert!(
        s.requests.values().all(|r| r.peer != 0),
        "its requests are handed out again"
    );
    let after = drive(&mut s, t);
    assert_eq!(connects(&after), vec![4], "a spare takes the place at once");
    assert!(closes(&after).is_empty(), "its connection is gone already");
    assert_eq!(s.peer_report(0).standing, Standing::Waiting);
    // A connection lost for another reason keeps the place (reconnected after a backoff).
    s.handle_disconnected(1, Lost::Failed, t);
    assert!(connects(&drive(&mut s, t)).is_empty());
    assert_eq!(s.peer_report(1).standing, Standing::Active);
}

#[test]
fn banned_and_refusing_sources_never_come_back_and_failing_ones_do() {
    let (mut s, now) = sched(4000);
    for _ in 0..3 {
        s.handle_source(false, now);
    }
    drive(&mut s, now);
    let reqs = requests(&drive(&mut s, now));
    let of = |p: PeerIdx| reqs.iter().find(|r| r.1 == p).unwrap().0;
    s.handle_corrupt(of(0), now);
    s.handle_failure(of(1), RequestFailure::Fatal, now);
    // Source 2 fails, again and again (each after its backoff).
    let mut t = now;
    for _ in 0..config().max_peer_failures {
        t += 3 * SEC;
        drive(&mut s, t);
        let ids: Vec<ReqId> = s
            .requests
            .iter()
            .filter(|(_, r)| r.peer == 2)
            .map(|(id, _)| *id)
            .collect();
        s.handle_failure(ids[0], RequestFailure::Transient, t);
    }
    use Standing::*;
    assert_eq!(standings(&s), vec![Banned, Out, Waiting]);
    // Only the failing one comes back, after a while.
    let back = run(&mut s, t, t + 40 * SEC, |_| Err(RequestFailure::Busy));
    assert_eq!(connects(&back), vec![2]);
    assert_eq!(s.stuck(t + 40 * SEC), None);
}

#[test]
fn a_complete_holders_manifest_replaces_a_partial_holders_and_then_the_download_is_done() {
    let (mut s, now) = sched(4);
    s.handle_source(true, now);
    s.handle_source(false, now);
    let commands: Vec<Command> = std::iter::from_fn(|| s.poll_command(now)).collect();
    assert_eq!(connects(&commands), vec![0, 1]);
    assert_eq!(
        s.handle_connected(0),
        Some(true),
        "the first manifest is taken"
    );
    assert_eq!(
        s.handle_connected(1),
        Some(true),
        "a complete holder's replaces it"
    );
    assert!(!s.is_finished());
    let reqs = requests(&drive(&mut s, now));
    for (id, _) in reqs {
        s.handle_success(id, now);
    }
    assert!(s.is_complete() && s.is_finished());
    // A connection that comes up after its source left the place is not used.
    let (mut s, now) = sched(4);
    s.handle_source(false, now);
    let _ = std::iter::from_fn(|| s.poll_command(now)).count();
    s.handle_connect_failed(0, RequestFailure::Fatal, now);
    assert_eq!(s.handle_connected(0), None);
}

#[test]
fn bytes_are_credited_to_the_source_that_wrote_them_and_add_up_across_places_given_up() {
    let (mut s, now) = sched(64);
    for _ in 0..5 {
        s.handle_source(false, now);
    }
    drive(&mut s, now);
    let reqs = requests(&drive(&mut s, now));
    // Source 0 writes half of its first piece, then gives its place up (snubbed later).
    let (id0, _) = reqs.iter().find(|r| r.1 == 0).copied().unwrap();
    let start = s.requests[&id0].chunks.start;
    assert_eq!(s.handle_written(id0, start + 2, now), 2 * CHUNK);
    assert_eq!(s.peer_report(0).bytes, 2 * CHUNK);
    s.give_place_up(0, roster::Why::NothingDelivered, now);
    for (id, p) in &reqs {
        if *p != 0 {
            s.handle_success(*id, now);
        }
    }
    // The rest of its piece goes to someone else; only the new bytes are theirs.
    let mut t = now;
    while !s.is_complete() {
        t += SEC / 10;
        for (id, _) in requests(&drive(&mut s, t)) {
            s.handle_success(id, t);
        }
    }
    let credited: u64 = (0..5).map(|p| s.peer_report(p).bytes).sum();
    assert_eq!(
        credited,
        s.done_bytes(),
        "per-source bytes add up to what was fetched"
    );
    assert_eq!(s.peer_report(0).bytes, 2 * CHUNK, "kept after it left");
    assert_eq!(
        (0..5)
            .map(|p| s.peer_report(p).duplicate_bytes)
            .sum::<u64>(),
        0
    );
}

#[test]
fn bytes_a_hedge_delivered_twice_are_counted_apart() {
    let mut c = config();
    c.hedge = true;
    let now = Instant::now();
    let mut s = Scheduler::new(c, 4 * CHUNK, CHUNK, 4, &Bits::new(0), now);
    s.handle_source(false, now);
    s.handle_source(false, now);
    drive(&mut s, now);
    let reqs = requests(&drive(&mut s, now));
    assert_eq!(reqs.len(), 1, "one piece, to the first");
    // The holder delivers a chunk, then is late: the other fetches the rest too; both
    // deliver it.
    s.handle_written(reqs[0].0, 1, now + SEC * 4 / 10);
    let t = now + SEC * 6 / 10;
    s.handle_timeout(t);
    let hedged = requests(&drive(&mut s, t));
    assert_eq!(hedged.len(), 1);
    assert_eq!(
        s.requests[&hedged[0].0].chunks,
        1..4,
        "from the first chunk missing"
    );
    s.handle_written(hedged[0].0, 4, t);
    s.handle_written(reqs[0].0, 4, t);
    assert_eq!(s.peer_report(hedged[0].1).bytes, 3 * CHUNK);
    assert_eq!(s.peer_report(reqs[0].1).bytes, CHUNK);
    assert_eq!(s.peer_report(reqs[0].1).duplicate_bytes, 3 * CHUNK);
}

#[test]
fn a_download_is_not_stuck_while_sources_never_tried_wait() {
    let (mut s, now) = sched(4000);
    for _ in 0..40 {
        s.handle_source(false, now);
    }
    // Nobody delivers; the snubbed give their places to the untried, four at a time, every
    // ten seconds: past the no-progress limit, some have not had their turn yet.
    let limit = config().no_progress_timeout;
    let mut all = run(&mut s, now, now + limit + SEC, |_| {
        Err(RequestFailure::NotHeld)
    });
    assert!(s.peers.iter().any(|p| p.place.is_untried()));
    assert_eq!(s.stuck(now + limit + SEC), None);
    let end = now + 2 * limit;
    all.extend(run(&mut s, now + limit + SEC, end, |_| {
        Err(RequestFailure::NotHeld)
    }));
    let tried: std::collections::HashSet<PeerIdx> = connects(&all).into_iter().collect();
    assert_eq!(tried.len(), 40, "every source had its turn");
    assert_eq!(s.stuck(end), Some(Stuck::NoProgress));
}

#[test]
fn the_table_is_bounded_and_reuses_the_entries_of_sources_that_delivered_nothing() {
    let (mut s, now) = sched(400);
    for _ in 0..MAX_SOURCES {
        assert!(s.handle_source(false, now).is_some());
    }
    assert_eq!(s.handle_source(false, now), None, "full of untried sources");
    let commands = drive(&mut s, now);
    let first = connects(&commands)[0];
    s.give_place_up(first, roster::Why::NothingDelivered, now);
    assert_eq!(
        s.handle_source(true, now),
        Some(first),
        "its entry is taken"
    );
    assert_eq!(s.peers.len(), MAX_SOURCES);
}
