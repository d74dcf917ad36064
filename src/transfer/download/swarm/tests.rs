//! The crowd, simulated: every joiner completes, near the lower bound, with queues and loss on
//! the links.

use super::*;

fn check(config: &SwarmConfig) -> SwarmReport {
    let started = std::time::Instant::now();
    let r = run(config);
    println!(
        "swarm: {} joiners from {} seed(s), loss {:.1}%: all done in {:.1} s, bound {:.1} s \
         (ratio {:.2}), half done {:.1} s, one copy {:.1} s, out of the seeds {:.1} s; joiners \
         served {:.0}% of the bytes, seeds uploaded {:.2} copies, {:.1}% wasted, {} busy, {} \
         not held, {} have asks, {} events in {:.1} s",
        config.joiners,
        config.seeds,
        100.0 * config.loss,
        r.all_done.map_or(f64::NAN, |d| d.as_secs_f64()),
        r.bound.as_secs_f64(),
        r.ratio().unwrap_or(f64::NAN),
        r.half_done.map_or(f64::NAN, |d| d.as_secs_f64()),
        r.one_copy.as_secs_f64(),
        r.first_copy_out.map_or(f64::NAN, |d| d.as_secs_f64()),
        100.0 * r.joiner_bytes_share,
        r.seed_copies,
        100.0 * r.wasted_share,
        r.busy,
        r.not_held,
        r.have_asks,
        r.events,
        started.elapsed().as_secs_f64(),
    );
    assert_eq!(r.completed, config.joiners, "every joiner completes");
    let ratio = r.ratio().unwrap();
    assert!(
        ratio <= 1.5,
        "{} joiners from {}: {ratio:.2} x the bound",
        config.joiners,
        config.seeds
    );
    r
}

#[test]
fn ten_joiners_from_one_seed_finish_within_one_and_a_half_times_the_bound() {
    let r = check(&SwarmConfig::new(10, 1));
    assert!(r.joiner_bytes_share > 0.5);
}

#[test]
fn ten_joiners_from_three_seeds() {
    check(&SwarmConfig::new(10, 3));
}

#[test]
fn a_hundred_joiners_from_one_seed() {
    let r = check(&SwarmConfig::new(100, 1));
    assert!(r.joiner_bytes_share > 0.9);
}

#[test]
fn a_hundred_joiners_from_three_seeds() {
    check(&SwarmConfig::new(100, 3));
}

#[test]
fn a_thousand_joiners_from_one_seed_with_loss_on_every_link() {
    let r = check(&SwarmConfig {
        loss: 0.001,
        archive_bytes: 256 << 20,
        ..SwarmConfig::new(1000, 1)
    });
    assert!(r.seed_copies < 3.0, "{} copies", r.seed_copies);
}

#[test]
fn a_thousand_joiners_from_three_seeds() {
    check(&SwarmConfig::new(1000, 3));
}
