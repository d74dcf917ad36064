//! The servers' uplinks in the simulated swarm: each client connection's responses one after
//! another, the responses on the wire sharing the uplink within their flows' caps, and a
//! response sent whole on to its client.

use std::time::Duration;

use super::{Ev, Job, NodeId, Sending, Sim, flow_cap};

impl Sim<'_> {
    /// The next response on `client`'s connection to `server` goes on the wire.
    pub(super) fn next_of(&mut self, server: NodeId, client: NodeId) {
        let now = self.instant();
        let cap = self.flow_cap(server, client);
        loop {
            let Some(job) = self.nodes[server]
                .queues
                .get_mut(&client)
                .and_then(|q| q.pop_front())
            else {
                return;
            };
            if self.cancelled.contains(&(job.client, job.id)) {
                self.nodes[server].slots.done(client, 0, now);
                continue;
            }
            let left = self.bytes_of(&job.chunks) as f64;
            self.nodes[server].sending.push(Sending { job, left, cap });
            return;
        }
    }

    /// A flow's rate limit under loss (unbounded without loss).
    fn flow_cap(&self, a: NodeId, b: NodeId) -> f64 {
        flow_cap(self.link(a, b) * 2, self.config.loss)
    }

    /// Each response's share of `server`'s uplink now: even, within each flow's cap.
    fn shares(&self, server: NodeId) -> Vec<f64> {
        let n = &self.nodes[server];
        let mut shares = vec![0.0; n.sending.len()];
        let mut left = n.uplink;
        let mut open: Vec<usize> = (0..n.sending.len()).collect();
        // Water-filling: flows below the even share keep their cap, the rest share the rest.
        while !open.is_empty() {
            let even = left / open.len() as f64;
            let (capped, free): (Vec<usize>, Vec<usize>) =
                open.iter().partition(|&&i| n.sending[i].cap < even);
            if capped.is_empty() {
                for i in free {
                    shares[i] = even;
                }
                break;
            }
            for i in capped {
                shares[i] = n.sending[i].cap;
                left -= n.sending[i].cap;
            }
            open = free;
        }
        shares
    }

    /// Moves `server`'s responses on to now.
    pub(super) fn advance(&mut self, server: NodeId) {
        let elapsed = self
            .now
            .saturating_sub(self.nodes[server].sending_since)
            .as_secs_f64();
        let shares = self.shares(server);
        let n = &mut self.nodes[server];
        for (s, share) in n.sending.iter_mut().zip(shares) {
            let sent = (share * elapsed).min(s.left);
            s.left -= sent;
            self.sent_bytes += sent;
            if n.seed {
                self.seed_uploaded += sent;
            }
        }
        n.sending_since = self.now;
    }

    /// Sets `server`'s next uplink tick: when its first response ends.
    pub(super) fn reschedule(&mut self, server: NodeId) {
        let shares = self.shares(server);
        let n = &mut self.nodes[server];
        n.uplink_gen += 1;
        let next = n
            .sending
            .iter()
            .zip(&shares)
            .map(|(s, share)| s.left / share.max(1.0))
            .min_by(f64::total_cmp);
        if let Some(secs) = next {
            let at = self.now + Duration::from_secs_f64(secs.max(0.0));
            let generation = n.uplink_gen;
            self.push(at, Ev::Uplink(server, generation));
        }
    }

    /// `server`'s uplink moved on: finished responses are delivered, given-up ones dropped,
    /// and each of their connections sends its next.
    pub(super) fn uplink(&mut self, server: NodeId) {
        self.advance(server);
        let now = self.instant();
        let mut i = 0;
        while i < self.nodes[server].sending.len() {
            let s = &self.nodes[server].sending[i];
            let gone = self.cancelled.contains(&(s.job.client, s.job.id));
            if s.left > 0.5 && !gone {
                i += 1;
                continue;
            }
            let s = self.nodes[server].sending.swap_remove(i);
            let bytes = self.bytes_of(&s.job.chunks);
            let client = s.job.client;
            self.nodes[server].slots.done(client, bytes, now);
            if gone {
                self.wasted += bytes as f64 - s.left;
            } else {
                self.sent(server, s.job, bytes);
            }
            self.next_of(server, client);
        }
        self.reschedule(server);
    }

    /// A response left `server` whole: it reaches its client after the link, the queue and
    /// the client's downlink.
    fn sent(&mut self, server: NodeId, job: Job, bytes: u64) {
        if self.nodes[server].seed {
            for c in job.chunks.clone() {
                self.seed_sent.set(c as usize);
            }
            if self.first_copy_out.is_none() && self.seed_sent.ones() == self.seed_sent.len() {
                self.first_copy_out = Some(self.now);
            }
        }
        let c = job.client;
        let take_in = Duration::from_secs_f64(bytes as f64 / self.config.downlink);
        let arrival = (self.now + self.link(server, c) + self.config.queue_delay)
            .max(self.nodes[c].recv_free + take_in);
        self.nodes[c].recv_free = arrival;
        self.push(
            arrival,
            Ev::Delivered {
                client: c,
                from: server,
                id: job.id,
                chunks: job.chunks,
            },
        );
    }
}
