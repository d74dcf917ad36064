//! The scheduler's rules, one test each.

use super::*;

const CHUNK: u64 = 16 * 1024;

fn config() -> SchedulerConfig {
    SchedulerConfig {
        request_chunks: 4,
        initial_window: 2,
        max_window: 8,
        max_inflight: 64,
        min_request_timeout: Duration::from_secs(2),
        min_peer_rate: 64 * 1024,
        hedge: true,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
        max_peer_failures: 3,
        no_progress_timeout: Duration::from_secs(30),
        have_interval: Duration::from_secs(1),
        max_peers: 16,
        snub_timeout: Duration::from_secs(20),
        rotate_interval: Duration::from_secs(30),
        jitter_seed: Some(1),
    }
}

/// What the inputs since the last call queued (cancels), drained.
fn queued(s: &mut Scheduler) -> Vec<Command> {
    s.queued.drain(..).collect()
}

fn success(s: &mut Scheduler, id: ReqId, now: Instant) -> Vec<Command> {
    s.handle_success(id, now);
    queued(s)
}

fn corrupt(s: &mut Scheduler, id: ReqId, now: Instant) -> Vec<Command> {
    s.handle_corrupt(id, now);
    queued(s)
}

/// Only the cancels among `commands`.
fn cancels(commands: &[Command]) -> Vec<ReqId> {
    commands
        .iter()
        .filter_map(|c| match c {
            Command::Cancel(id) => Some(*id),
            _ => None,
        })
        .collect()
}

fn disconnected(s: &mut Scheduler, peer: PeerIdx, now: Instant) -> Vec<Command> {
    s.handle_disconnected(peer, Lost::Failed, now);
    queued(s)
}

fn timeouts(s: &mut Scheduler, now: Instant) -> Vec<Command> {
    s.handle_timeout(now);
    queued(s)
}

fn sched(chunks: u64) -> (Scheduler, Instant) {
    let now = Instant::now();
    (
        Scheduler::new(config(), chunks * CHUNK, CHUNK, chunks, &Bits::new(0), now),
        now,
    )
}

fn drain(s: &mut Scheduler, now: Instant) -> Vec<Command> {
    std::iter::from_fn(|| s.poll_command(now)).collect()
}

fn requests(actions: &[Command]) -> Vec<(ReqId, PeerIdx, Range<u64>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Command::Request { id, peer, chunks } => Some((*id, *peer, chunks.clone())),
            _ => None,
        })
        .collect()
}

fn connect_all(s: &mut Scheduler, n: usize, now: Instant) {
    for _ in 0..n {
        s.handle_source(false, now);
    }
    let actions = drain(s, now);
    for a in &actions {
        if let Command::Connect(p) = a {
            s.handle_connected(*p);
        }
    }
}

#[test]
fn connects_then_requests_in_order_within_the_window() {
    let (mut s, now) = sched(40);
    s.handle_source(false, now);
    assert_eq!(s.poll_command(now), Some(Command::Connect(0)));
    assert_eq!(s.poll_command(now), None, "nothing until connected");
    s.handle_connected(0);
    let reqs = requests(&drain(&mut s, now));
    assert_eq!(reqs.len(), 2, "initial window");
    assert_eq!(reqs[0].2, 0..4);
    assert_eq!(reqs[1].2, 4..8);
}

#[test]
fn a_request_cut_short_keeps_the_chunks_it_delivered() {
    let (mut s, now) = sched(8);
    connect_all(&mut s, 1, now);
    let reqs = requests(&drain(&mut s, now));
    let (id, _, chunks) = reqs[0].clone();
    assert_eq!(chunks, 0..4);
    // Two chunks verified and written, then the connection drops.
    assert_eq!(s.handle_written(id, 2, now), 2 * CHUNK);
    assert_eq!(s.handle_written(id, 2, now), 0, "counted once");
    assert_eq!(s.verified_prefix(), 2 * CHUNK);
    s.handle_failure(id, RequestFailure::Transient, now);
    assert_eq!(s.chunk_done().ones(), 2, "kept for resume");
    // Only the rest of the piece is asked for again.
    let later = now + Duration::from_secs(5);
    let again = requests(&drain(&mut s, later));
    assert!(again.iter().any(|r| r.2 == (2..4)), "{again:?}");
    assert!(!again.iter().any(|r| r.2.start < 2));
    // A request no longer in flight credits nothing.
    assert_eq!(s.handle_written(id, 4, now), 0);
}

#[test]
fn completes_and_reports_bytes() {
    let (mut s, mut now) = sched(10);
    connect_all(&mut s, 1, now);
    while !s.is_complete() {
        let reqs = requests(&drain(&mut s, now));
        assert!(!reqs.is_empty());
        now += Duration::from_millis(10);
        for (id, ..) in reqs {
            assert!(success(&mut s, id, now).is_empty());
        }
    }
    assert_eq!(s.done_bytes(), 10 * CHUNK);
    assert_eq!(s.peer_report(0).bytes, 10 * CHUNK);
    assert_eq!(s.chunk_done().ones(), 10);
    assert_eq!(s.stuck(now), None);
}

#[test]
fn a_faster_peer_gets_more_pieces() {
    let (mut s, start) = sched(400);
    connect_all(&mut s, 2, start);
    // Peer 0 answers in 1 ms, peer 1 in 10 ms; simulate in 1 ms steps.
    let mut inflight: Vec<(ReqId, PeerIdx, Instant)> = Vec::new();
    let mut now = start;
    while !s.is_complete() {
        for (id, peer, _) in requests(&drain(&mut s, now)) {
            inflight.push((id, peer, now));
        }
        now += Duration::from_millis(1);
        let (due, rest): (Vec<_>, Vec<_>) = inflight.into_iter().partition(|(_, p, t)| {
            let latency = if *p == 0 { 1 } else { 10 };
            now.duration_since(*t) >= Duration::from_millis(latency)
        });
        inflight = rest;
        for (id, ..) in due {
            for c in success(&mut s, id, now) {
                if let Command::Cancel(c) = c {
                    inflight.retain(|(i, ..)| *i != c);
                }
            }
        }
    }
    let fast = s.peer_report(0).bytes;
    let slow = s.peer_report(1).bytes;
    assert!(slow > 0, "both serve");
    assert!(fast > 3 * slow, "fast {fast} slow {slow}");
    assert!(s.peer_report(0).rate > s.peer_report(1).rate);
}

#[test]
fn the_window_follows_bandwidth_times_delay() {
    let (mut s, mut now) = sched(4000);
    connect_all(&mut s, 1, now);
    // A peer delivering 64 KiB pieces every 50 ms with 200 ms latency: ~1.3 MB/s x 0.2 s,
    // about 4 pieces in flight to fill the pipe.
    let mut inflight = std::collections::VecDeque::new();
    for _ in 0..200 {
        for (id, ..) in requests(&drain(&mut s, now)) {
            inflight.push_back((id, now));
        }
        now += Duration::from_millis(50);
        if let Some((id, t)) = inflight.front().copied()
            && now.duration_since(t) >= Duration::from_millis(200)
        {
            inflight.pop_front();
            success(&mut s, id, now);
        }
    }
    let w = s.window(&s.peers[0]);
    assert!((4..=8).contains(&w), "window {w}");
    assert!(s.peer_report(0).inflight >= 4);
}

#[test]
fn total_inflight_is_bounded() {
    let now = Instant::now();
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_inflight: 3,
            ..config()
        },
        1000 * CHUNK,
        CHUNK,
        1000,
        &Bits::new(0),
        now,
    );
    connect_all(&mut s, 4, now);
    assert_eq!(requests(&drain(&mut s, now)).len(), 3);
}

#[test]
fn a_failed_request_is_retried_elsewhere_and_the_peer_backs_off() {
    let (mut s, now) = sched(8);
    connect_all(&mut s, 2, now);
    let reqs = requests(&drain(&mut s, now));
    let (id, peer, chunks) = reqs.iter().find(|r| r.1 == 0).cloned().unwrap();
    s.handle_failure(id, RequestFailure::Transient, now);
    let again = requests(&drain(&mut s, now));
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].2, chunks, "same chunks handed out again");
    assert_ne!(
        again[0].1, peer,
        "to the other peer: the failed one backs off"
    );
    // After its backoff the failed peer is used again.
    let later = now + Duration::from_secs(3);
    assert!(s.poll_timeout(now) <= now + Duration::from_millis(200));
    let others: Vec<_> = reqs.iter().filter(|r| r.1 == 0 && r.0 != id).collect();
    for r in others {
        success(&mut s, r.0, now);
    }
    let _ = drain(&mut s, later);
    assert!(s.peer_report(0).inflight > 0 || s.is_complete());
}

#[test]
fn repeated_failures_make_a_source_give_its_place_up_and_simultaneous_ones_count_once() {
    let (mut s, mut now) = sched(100);
    connect_all(&mut s, 1, now);
    // Two requests failing at once count as one failure.
    let reqs = requests(&drain(&mut s, now));
    for (id, ..) in &reqs {
        s.handle_failure(*id, RequestFailure::Transient, now);
    }
    assert_eq!(s.peers[0].failures, 1);
    for _ in 0..2 {
        now += Duration::from_secs(5);
        let reqs = requests(&drain(&mut s, now));
        assert!(!reqs.is_empty());
        s.handle_failure(reqs[0].0, RequestFailure::Transient, now);
    }
    // It gives its place up and waits, to be tried again later; nothing else delivers.
    assert_eq!(s.peer_report(0).standing, Standing::Waiting);
    assert!(drain(&mut s, now).contains(&Command::Close(0)));
    assert_eq!(s.stuck(now), None);
    let back = now + config().rotate_interval;
    assert!(drain(&mut s, back - Duration::from_millis(1)).is_empty());
    assert_eq!(drain(&mut s, back), vec![Command::Connect(0)]);
    assert_eq!(
        s.stuck(now + config().no_progress_timeout * 2),
        Some(Stuck::NoProgress)
    );
}

#[test]
fn a_fatal_failure_puts_the_source_out_at_once() {
    let (mut s, now) = sched(8);
    s.handle_source(false, now);
    assert_eq!(s.poll_command(now), Some(Command::Connect(0)));
    s.handle_connect_failed(0, RequestFailure::Fatal, now);
    assert_eq!(s.poll_command(now), None);
    assert_eq!(s.stuck(now), Some(Stuck::NoPeers));
}

#[test]
fn a_corrupt_chunk_bans_the_peer_and_reassigns_all_it_held() {
    let (mut s, now) = sched(40);
    connect_all(&mut s, 2, now);
    let reqs = requests(&drain(&mut s, now));
    let bad: Vec<_> = reqs.iter().filter(|r| r.1 == 1).cloned().collect();
    assert!(bad.len() >= 2);
    let commands = corrupt(&mut s, bad[0].0, now);
    assert_eq!(
        cancels(&commands).len(),
        bad.len() - 1,
        "its other requests are cancelled"
    );
    assert!(
        commands.contains(&Command::Close(1)),
        "and its connection closed"
    );
    assert_eq!(s.peer_report(1).standing, Standing::Banned);
    assert_eq!(s.peer_report(1).inflight, 0);
    // Everything goes to peer 0 from now on, starting with what peer 1 held.
    let mut now = now;
    for r in reqs.iter().filter(|r| r.1 == 0) {
        success(&mut s, r.0, now);
    }
    let mut first = true;
    while !s.is_complete() {
        let reqs = requests(&drain(&mut s, now));
        if first {
            assert_eq!(reqs[0].2, bad[0].2, "the banned peer's piece comes first");
            first = false;
        }
        assert!(reqs.iter().all(|r| r.1 == 0));
        now += Duration::from_millis(5);
        for (id, ..) in reqs {
            success(&mut s, id, now);
        }
    }
}

#[test]
fn a_lost_connection_hands_out_its_pieces_and_reconnects_after_backoff() {
    let (mut s, now) = sched(40);
    connect_all(&mut s, 2, now);
    let reqs = requests(&drain(&mut s, now));
    let held: Vec<_> = reqs.iter().filter(|r| r.1 == 0).cloned().collect();
    let cancels = disconnected(&mut s, 0, now);
    assert_eq!(cancels.len(), held.len());
    // Peer 1 gets them (within its window), peer 0 does not reconnect yet.
    let next = drain(&mut s, now + Duration::from_millis(1));
    assert!(!next.contains(&Command::Connect(0)));
    let reqs1 = requests(&next);
    // Peer 1's window is full until it completes something.
    for (id, ..) in requests(&drain(&mut s, now)).into_iter().chain(reqs1) {
        success(&mut s, id, now + Duration::from_millis(2));
    }
    for r in reqs.iter().filter(|r| r.1 == 1) {
        success(&mut s, r.0, now + Duration::from_millis(2));
    }
    let after = drain(&mut s, now + Duration::from_secs(3));
    assert!(after.contains(&Command::Connect(0)), "{after:?}");
    let reassigned = requests(&after);
    assert!(
        reassigned.iter().any(|r| r.2 == held[0].2) || s.chunk_done().get(held[0].2.start as usize)
    );
}

#[test]
fn what_a_cancelled_request_wrote_before_it_was_abandoned_is_credited() {
    let (mut s, now) = sched(40);
    connect_all(&mut s, 1, now);
    let reqs = requests(&drain(&mut s, now));
    let (id, _, chunks) = reqs[0].clone();
    s.handle_written(id, chunks.start + 1, now);
    // Its source is lost: the request ends here, and the I/O layer learns of it afterwards,
    // by when a second chunk was written.
    let cancels = disconnected(&mut s, 0, now);
    assert!(cancels.contains(&Command::Cancel(id)));
    let t = now + Duration::from_millis(1);
    assert_eq!(s.handle_written(id, chunks.start + 2, t), CHUNK);
    assert_eq!(s.done_bytes(), 2 * CHUNK);
    assert_eq!(s.peer_report(0).bytes, 2 * CHUNK, "credited to its source");
    // Abandoned: nothing more of it counts.
    s.handle_abandoned(id);
    assert_eq!(s.handle_written(id, chunks.end, t), 0);
    // The piece is handed out again from its first chunk not on disk, once reconnected.
    let back = now + Duration::from_secs(3);
    assert!(drain(&mut s, back).contains(&Command::Connect(0)));
    s.handle_connected(0);
    let again = requests(&drain(&mut s, back));
    assert!(
        again.iter().any(|r| r.2 == (chunks.start + 2..chunks.end)),
        "{again:?}"
    );
}

/// A download of `chunks` chunks from two connected sources that answered their first
/// requests (their rates are known); returns it and the time after the answers.
fn two_sources_that_answered(chunks: u64) -> (Scheduler, Instant) {
    let (mut s, now) = sched(chunks);
    connect_all(&mut s, 2, now);
    let mut t = now;
    for r in requests(&drain(&mut s, now)) {
        t += Duration::from_millis(1);
        success(&mut s, r.0, t);
    }
    (s, t)
}

#[test]
fn sources_silent_all_at_once_are_not_quiet_one_by_one() {
    // Two sources, both with requests in flight, and nothing arrives from either (the disk
    // stalls, say): nobody is cancelled for being quiet before the requests' deadline.
    let (mut s, t) = two_sources_that_answered(400);
    let reqs = requests(&drain(&mut s, t));
    assert!(reqs.iter().any(|r| r.1 == 0) && reqs.iter().any(|r| r.1 == 1));
    assert!(timeouts(&mut s, t + Duration::from_millis(1900)).is_empty());
    assert_eq!(
        s.peer_report(0).tally.quiet + s.peer_report(1).tally.quiet,
        0
    );
}

#[test]
fn a_source_left_alone_with_requests_in_flight_is_quiet_on_its_own() {
    // The other source leaves; the one left delivers nothing more: its requests are handed
    // out again after the quiet window (0.5 s here), not at their 2 s deadline, so that a
    // source taken back (or a new one) can have them.
    let (mut s, now) = sched(400);
    connect_all(&mut s, 2, now);
    let reqs = requests(&drain(&mut s, now));
    assert!(reqs.iter().any(|r| r.1 == 0));
    s.handle_disconnected(1, Lost::Left, now);
    drain(&mut s, now);
    let before = timeouts(&mut s, now + Duration::from_millis(400));
    assert!(before.is_empty(), "{before:?}");
    let at = now + Duration::from_millis(500);
    assert!(s.poll_timeout(now) <= at);
    let cancelled = cancels(&timeouts(&mut s, at));
    assert!(!cancelled.is_empty());
    assert_eq!(s.peer_report(0).inflight, 0);
    assert_eq!(s.peer_report(0).tally.quiet, 1);
}

#[test]
fn a_stalled_request_times_out_and_is_handed_out_again() {
    // Both peers answer at first, so their rates are known...
    let (mut s, mut t) = two_sources_that_answered(40);
    // ...then peer 1 stops answering; peer 0 goes on.
    let reqs = requests(&drain(&mut s, t));
    let stalled: Vec<_> = reqs.iter().filter(|r| r.1 == 1).cloned().collect();
    assert!(!stalled.is_empty());
    for r in reqs.iter().filter(|r| r.1 == 0) {
        t += Duration::from_millis(1);
        success(&mut s, r.0, t);
    }
    let deadline = s.poll_timeout(t);
    assert!(deadline <= t + Duration::from_secs(2), "{:?}", deadline - t);
    let cancels = timeouts(&mut s, t + Duration::from_secs(2));
    assert_eq!(cancels.len(), stalled.len());
    // The stalled pieces go to the peer that answers.
    let mut t = t + Duration::from_secs(2);
    while !s.is_complete() {
        let reqs = requests(&drain(&mut s, t));
        assert!(reqs.iter().all(|r| r.1 == 0), "{reqs:?}");
        t += Duration::from_millis(1);
        for (id, ..) in reqs {
            success(&mut s, id, t);
        }
    }
}

#[test]
fn the_tail_is_hedged_and_the_loser_cancelled() {
    let (mut s, now) = sched(8);
    connect_all(&mut s, 2, now);
    // Teach the scheduler that peer 0 is fast: complete its requests quickly.
    let reqs = requests(&drain(&mut s, now));
    let slow_piece = reqs.iter().find(|r| r.1 == 1).cloned().unwrap();
    let mut t = now;
    for r in reqs.iter().filter(|r| r.1 == 0) {
        t += Duration::from_millis(1);
        success(&mut s, r.0, t);
    }
    // Nothing is missing any more; peer 1 still holds its pieces. Peer 0 hedges.
    let hedges = requests(&drain(&mut s, t + Duration::from_millis(600)));
    assert!(!hedges.is_empty(), "no hedge");
    assert!(hedges.iter().all(|h| h.1 == 0));
    let hedge = hedges
        .iter()
        .find(|h| h.2 == slow_piece.2)
        .cloned()
        .unwrap();
    // The hedge wins; the slow request is cancelled.
    let before = s.peer_report(1).inflight;
    let cancels = success(&mut s, hedge.0, t + Duration::from_millis(601));
    assert_eq!(cancels, vec![Command::Cancel(slow_piece.0)]);
    assert_eq!(s.peer_report(1).inflight, before - 1);
    assert!(s.chunk_done().get(slow_piece.2.start as usize));
}

#[test]
fn no_progress_for_too_long_is_stuck_and_resume_skips_done_chunks() {
    let now = Instant::now();
    let mut done = Bits::new(12);
    for i in 0..8 {
        done.set(i);
    }
    done.set(9);
    let mut s = Scheduler::new(config(), 12 * CHUNK, CHUNK, 12, &done, now);
    assert_eq!(s.done_bytes(), 9 * CHUNK, "every chunk on disk counts");
    connect_all(&mut s, 1, now);
    let reqs = requests(&drain(&mut s, now));
    assert_eq!(reqs.len(), 1, "only the last piece is missing");
    assert_eq!(reqs[0].2, 8..12, "from its first to its last missing chunk");
    assert_eq!(s.stuck(now + Duration::from_secs(29)), None);
    assert_eq!(
        s.stuck(now + Duration::from_secs(30)),
        Some(Stuck::NoProgress)
    );
}

#[test]
fn a_peer_that_trickles_loses_its_piece_at_the_minimum_rate_deadline() {
    // Pieces of 64 chunks of 16 KiB (1 MiB) at 64 KiB/s: 16 s, over the 2 s floor.
    let now = Instant::now();
    let cfg = SchedulerConfig {
        request_chunks: 64,
        ..config()
    };
    let mut s = Scheduler::new(cfg, 256 * CHUNK, CHUNK, 256, &Bits::new(0), now);
    connect_all(&mut s, 2, now);
    let first = requests(&drain(&mut s, now));
    assert!(!first.is_empty());
    // Nothing completes: the deadline of a peer whose rate is unknown is the min-rate one.
    let deadlines: Vec<Instant> = s.requests.values().filter_map(|r| r.deadline).collect();
    assert!(
        deadlines
            .iter()
            .all(|&d| d == now + Duration::from_secs(16))
    );
    // Each request trickles a chunk in every 400 ms (slow, not quiet): nothing is
    // cancelled before the deadline, everything at it.
    let mut t = now;
    for step in 1..40u64 {
        t = now + Duration::from_millis(400 * step);
        for r in &first {
            s.handle_written(r.0, r.2.start + step, t);
        }
        assert!(timeouts(&mut s, t).is_empty(), "at {:?}", t - now);
    }
    assert!(t < now + Duration::from_secs(16));
    let cancels = timeouts(&mut s, now + Duration::from_secs(16));
    assert_eq!(cancels.len(), first.len());
    // What trickled in counts; the rest of each piece is handed out again.
    assert_eq!(s.done_bytes(), first.len() as u64 * 39 * CHUNK);
    // (After the backoff a failure earns.)
    let again = requests(&drain(&mut s, now + Duration::from_secs(19)));
    assert!(again.iter().any(|r| r.2.start == first[0].2.start + 39));
}

#[test]
fn a_source_gone_quiet_hands_its_requests_to_others_before_their_deadline() {
    // Both answer at first...
    let (mut s, t) = two_sources_that_answered(400);
    // ...then peer 1 delivers nothing more, while peer 0's requests, long ones, each bring
    // a chunk every 300 ms and never end.
    let reqs = requests(&drain(&mut s, t));
    let of = |p: PeerIdx| -> Vec<_> { reqs.iter().filter(|r| r.1 == p).cloned().collect() };
    let (slow, silent) = (of(0), of(1));
    assert!(!silent.is_empty() && !slow.is_empty());
    // Quiet after a quarter of the 2 s minimum request timeout, well before the deadlines
    // (once another source delivered meanwhile).
    let mut cancelled = Vec::new();
    for step in 1..=3u64 {
        let at = t + Duration::from_millis(300 * step) - Duration::from_millis(100);
        for r in &slow {
            s.handle_written(r.0, (r.2.start + step).min(r.2.end - 1), at);
        }
        if step == 1 {
            assert_eq!(s.poll_timeout(at), t + Duration::from_millis(500));
        }
        cancelled.extend(cancels(&timeouts(&mut s, at)));
    }
    let mut silent_ids: Vec<ReqId> = silent.iter().map(|r| r.0).collect();
    silent_ids.sort();
    cancelled.sort();
    assert_eq!(cancelled, silent_ids, "only the quiet source's requests");
    assert_eq!(s.peer_report(1).tally.quiet, 1);
    assert_eq!(
        s.peer_report(1).standing,
        Standing::Active,
        "it waits, no more"
    );
    assert_eq!(s.peers[1].failures, 0, "no failure is counted");
    assert_eq!(
        s.peers[1].backoff_until,
        Some(t + Duration::from_secs(1)),
        "not asked again for a quiet window"
    );
    assert_eq!(s.peer_report(0).inflight, slow.len());
    // Its pieces are open again, the first to go as room frees.
    for r in &slow {
        success(&mut s, r.0, t + Duration::from_secs(1));
    }
    let next = requests(&drain(&mut s, t + Duration::from_secs(1)));
    assert!(
        next.iter().any(|r| silent.iter().any(|q| q.2 == r.2)),
        "{next:?}"
    );
}

#[test]
fn the_verified_prefix_reaches_the_first_gap() {
    let (mut s, now) = sched(12);
    assert_eq!(s.verified_prefix(), 0);
    connect_all(&mut s, 1, now);
    let reqs = requests(&drain(&mut s, now));
    // Complete the second piece first: the prefix does not move past the gap.
    success(&mut s, reqs[1].0, now);
    assert_eq!(s.verified_prefix(), 0);
    success(&mut s, reqs[0].0, now);
    assert_eq!(s.verified_prefix(), 8 * CHUNK);
}

fn pieces(n: usize, held: impl Fn(usize) -> bool) -> Have {
    let mut b = Bits::new(n);
    (0..n).filter(|p| held(*p)).for_each(|p| b.set(p));
    Have::Some(b)
}

fn has_asks(actions: &[Command]) -> Vec<PeerIdx> {
    actions
        .iter()
        .filter_map(|a| match a {
            Command::AskHave(p) => Some(*p),
            _ => None,
        })
        .collect()
}

/// A scheduler with `complete` seeds and `partial` partial peers, all connected.
fn crowd(chunks: u64, complete: usize, partial: usize) -> (Scheduler, Instant, Vec<Command>) {
    let (mut s, now) = sched(chunks);
    for _ in 0..complete {
        s.handle_source(false, now);
    }
    for _ in 0..partial {
        s.handle_source(true, now);
    }
    let mut first = Vec::new();
    for a in drain(&mut s, now) {
        match a {
            Command::Connect(p) => {
                s.handle_connected(p);
            }
            other => first.push(other),
        }
    }
    first.extend(drain(&mut s, now));
    (s, now, first)
}

#[test]
fn a_partial_peer_is_asked_what_it_holds_and_asked_only_for_that() {
    let (mut s, now, first) = crowd(64, 0, 1);
    assert_eq!(has_asks(&first), vec![0]);
    assert!(requests(&first).is_empty(), "nothing asked before it says");
    // It holds pieces 3 and 9 of 16.
    s.handle_have(0, Ok(pieces(16, |p| p == 3 || p == 9)), now);
    let reqs = requests(&drain(&mut s, now));
    let mut got: Vec<u64> = reqs.iter().map(|r| r.2.start / 4).collect();
    got.sort();
    assert_eq!(got, vec![3, 9]);
    assert!(reqs.iter().all(|r| r.1 == 0));
}

#[test]
fn a_seed_in_a_crowd_is_spent_on_what_no_partial_peer_with_room_holds() {
    let (mut s, now, first) = crowd(64, 1, 2);
    let seed_first: Vec<ReqId> = requests(&first).iter().map(|r| r.0).collect();
    assert_eq!(seed_first.len(), 2, "the seed starts at once");
    // Peer 2 holds pieces 8 to 15 and fills its window; peer 1 holds 0 to 7, with room.
    s.handle_have(2, Ok(pieces(16, |p| p >= 8)), now);
    let to_2 = requests(&drain(&mut s, now));
    assert!(to_2.iter().all(|r| r.1 == 2 && r.2.start / 4 >= 8));
    s.handle_have(1, Ok(pieces(16, |p| p < 8)), now);
    for id in seed_first {
        s.handle_success(id, now);
    }
    // Every piece is as rare as any other: the seed still takes none peer 1 could give.
    let reqs = requests(&drain(&mut s, now));
    assert!(
        reqs.iter().any(|r| r.1 == 0) && reqs.iter().any(|r| r.1 == 1),
        "{reqs:?}"
    );
    for (_, peer, chunks) in &reqs {
        let piece = chunks.start / 4;
        match peer {
            0 => assert!(
                piece >= 8,
                "the seed is asked for {piece}, which peer 1 holds"
            ),
            _ => assert!(piece < 8),
        }
    }
}

#[test]
fn the_first_pieces_of_a_crowd_are_random_then_the_rarest_go_first_and_common_ones_in_order() {
    // Two runs with different seeds start on different pieces: a crowd starting together
    // holds different pieces at once.
    let firsts: Vec<Vec<u64>> = [1, 2]
        .iter()
        .map(|seed| {
            let mut cfg = config();
            cfg.jitter_seed = Some(*seed);
            let now = Instant::now();
            let mut s = Scheduler::new(cfg, 256 * CHUNK, CHUNK, 256, &Bits::new(0), now);
            s.handle_source(false, now);
            s.handle_source(true, now);
            for a in drain(&mut s, now) {
                if let Command::Connect(p) = a {
                    s.handle_connected(p);
                }
            }
            s.handle_have(1, Ok(pieces(64, |_| false)), now);
            requests(&drain(&mut s, now))
                .iter()
                .map(|r| r.2.start / 4)
                .collect()
        })
        .collect();
    assert_eq!(firsts[0].len(), 2);
    assert_ne!(firsts[0], firsts[1]);
    assert_ne!(firsts[0], vec![0, 1], "not in order");
    // Then rarest first: piece 5 is held by one partial peer, the rest by two of five (not
    // common).
    let from_0 = |partials: usize| {
        let (mut s, now, _) = crowd(64, 0, partials);
        s.random_picks = RANDOM_FIRST;
        s.handle_have(0, Ok(pieces(16, |_| true)), now);
        s.handle_have(1, Ok(pieces(16, |p| p != 5)), now);
        for p in 2..partials {
            s.handle_have(p, Ok(pieces(16, |_| false)), now);
        }
        let reqs = requests(&drain(&mut s, now));
        reqs.iter()
            .filter(|r| r.1 == 0)
            .map(|r| r.2.start / 4)
            .collect::<Vec<u64>>()
    };
    let rare = from_0(5);
    assert!(rare.contains(&5), "{rare:?}");
    // Held by two of two, the lowest pieces are common: they go in order.
    assert_eq!(from_0(2)[0], 0, "common pieces in order");
}

#[test]
fn a_piece_not_held_goes_elsewhere_and_a_source_that_keeps_saying_so_gives_its_place_up() {
    let (mut s, now, first) = crowd(64, 1, 1);
    s.handle_have(1, Ok(pieces(16, |_| true)), now);
    let reqs = requests(&drain(&mut s, now));
    let (id, _, chunks) = reqs.iter().find(|r| r.1 == 1).cloned().unwrap();
    let reqs = requests(&first);
    s.handle_failure(id, RequestFailure::NotHeld, now);
    // No backoff, no failure counted: the peer is asked for something else at once, and
    // the piece goes to the seed once it has room (now the rarest piece).
    let again = requests(&drain(&mut s, now));
    assert!(again.iter().all(|r| r.2 != chunks) && again.iter().any(|r| r.1 == 1));
    assert_eq!(s.peer_report(1).standing, Standing::Active);
    assert!(!s.peers[1].have.has(chunks.start as usize / 4));
    for (id, ..) in reqs.iter().filter(|r| r.1 == 0) {
        s.handle_success(*id, now);
    }
    let seed = requests(&drain(&mut s, now));
    assert!(seed.iter().any(|r| r.2 == chunks && r.1 == 0), "{seed:?}");
    // A source that says "not held" to everything it is asked gives its place up, and is not
    // banned.
    for _ in 0..roster::MAX_NOT_HELD {
        let mine: Vec<ReqId> = s
            .requests
            .iter()
            .filter(|(_, r)| r.peer == 1)
            .map(|(id, _)| *id)
            .collect();
        for id in mine {
            s.handle_failure(id, RequestFailure::NotHeld, now);
        }
        let _ = drain(&mut s, now);
    }
    assert_eq!(s.peer_report(1).standing, Standing::Waiting);
    assert_eq!(
        s.avail.count(0),
        0,
        "the pieces of a source out of its place no longer count"
    );
}

#[test]
fn busy_backs_off_but_never_drops_and_waiting_for_a_turn_is_not_being_stuck() {
    let (mut s, now) = sched(16);
    connect_all(&mut s, 1, now);
    let mut t = now;
    for _ in 0..3 * config().max_peer_failures {
        for (id, ..) in requests(&drain(&mut s, t)) {
            s.handle_failure(id, RequestFailure::Busy, t);
        }
        assert_eq!(s.peer_report(0).standing, Standing::Active);
        t = s.poll_timeout(t).max(t + Duration::from_millis(1));
        s.handle_timeout(t);
    }
    // Past the no-progress limit while the peer keeps saying it is busy: not stuck yet.
    let later = now + config().no_progress_timeout + Duration::from_secs(1);
    for (id, ..) in requests(&drain(&mut s, later)) {
        s.handle_failure(id, RequestFailure::Busy, later);
    }
    assert_eq!(s.stuck(later), None);
    // It cannot hold the download forever.
    assert_eq!(
        s.stuck(now + config().no_progress_timeout * 4),
        Some(Stuck::NoProgress)
    );
}

#[test]
fn a_partial_peer_with_room_and_nothing_wanted_is_asked_again_soon() {
    let (mut s, now, _) = crowd(64, 0, 1);
    s.handle_have(0, Ok(pieces(16, |p| p == 0)), now);
    let reqs = requests(&drain(&mut s, now));
    assert_eq!(reqs.len(), 1);
    success(&mut s, reqs[0].0, now);
    // Nothing more it is known to hold: it is asked again soon (it downloads too, and has
    // more now), before the interval has passed.
    assert!(has_asks(&drain(&mut s, now)).is_empty());
    let wake = s.poll_timeout(now);
    assert_eq!(wake, now + IDLE_ASK);
    assert!(IDLE_ASK < config().have_interval);
    assert_eq!(has_asks(&drain(&mut s, wake)), vec![0]);
    assert!(has_asks(&drain(&mut s, wake)).is_empty(), "one at a time");
    // It now holds everything: a complete peer from then on.
    s.handle_have(0, Ok(Have::All), wake);
    assert!(!s.peer_report(0).partial);
    assert_eq!(requests(&drain(&mut s, wake)).len(), 2);
}
