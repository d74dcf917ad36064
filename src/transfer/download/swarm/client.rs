//! The joiners' side of the simulated swarm: each starts its real scheduler, carries out what
//! it commands, and takes in what is delivered.

use std::ops::Range;

use super::{Ev, Given, Job, NodeId, Sim};
use crate::transfer::download::bits::Bits;
use crate::transfer::download::scheduler::{Command, ReqId, Scheduler};

impl Sim<'_> {
    pub(super) fn start(&mut self, j: NodeId) {
        let mut download = self.config.download;
        download.schedule.jitter_seed = Some(self.config.seed ^ (j as u64) << 20);
        let now = self.instant();
        let mut s = Scheduler::new(
            download.schedule,
            self.config.archive_bytes,
            self.config.chunk_bytes,
            self.chunk_count,
            &Bits::new(0),
            now,
        );
        for &p in &self.nodes[j].peers {
            s.handle_source(!self.nodes[p].seed, now);
        }
        self.nodes[j].sched = Some(s);
        self.drive(j);
    }

    /// Carries out what `j`'s scheduler commands, and sets its next wake-up.
    pub(super) fn drive(&mut self, j: NodeId) {
        let now = self.instant();
        let Some(s) = self.nodes[j].sched.as_mut() else {
            return;
        };
        let commands: Vec<Command> = std::iter::from_fn(|| s.poll_command(now)).collect();
        let complete = s.is_complete();
        let wake = s.poll_timeout(now).saturating_duration_since(self.base);
        for c in commands {
            match c {
                Command::Connect(p) => {
                    let at = self.now + self.rtt(j, self.nodes[j].peers[p]);
                    self.push(at, Ev::Connected(j, p));
                }
                Command::Request { id, peer, chunks } => {
                    let server = self.nodes[j].peers[peer];
                    let at = self.message(j, server);
                    let job = Job {
                        server,
                        client: j,
                        id,
                        chunks,
                    };
                    self.push(at, Ev::Arrive(job));
                }
                Command::Cancel(id) => {
                    self.cancelled.insert((j, id));
                    if let Some(s) = self.nodes[j].sched.as_mut() {
                        s.handle_abandoned(id);
                    }
                }
                // Its requests were cancelled; nothing else is held for a connection here.
                Command::Close(_) => {}
                Command::AskHave(p) => {
                    self.have_asks += 1;
                    let server = self.nodes[j].peers[p];
                    let have = self.have_of(server, j);
                    let asked = self.message(j, server);
                    let at = asked + self.rtt(j, server) / 2 + self.queued(server);
                    self.push(at, Ev::Have(j, p, have));
                }
            }
        }
        if complete && self.nodes[j].done_at.is_none() {
            self.nodes[j].done_at = Some(self.now);
        }
        let node = &mut self.nodes[j];
        if !complete && node.wake.is_none_or(|w| w != wake) && wake > self.now {
            node.wake_gen += 1;
            node.wake = Some(wake);
            let generation = node.wake_gen;
            self.push(wake, Ev::Wake(j, generation));
        }
    }

    pub(super) fn delivered(
        &mut self,
        client: NodeId,
        from: NodeId,
        id: ReqId,
        chunks: Range<u64>,
    ) {
        let now = self.instant();
        let bytes = self.bytes_of(&chunks);
        let rtt = self.rtt(client, from);
        let Some(s) = self.nodes[client].sched.as_mut() else {
            return;
        };
        let added = s.handle_written(id, chunks.end, now) + s.handle_success(id, now);
        if let Some(p) = self.nodes[client].peers.iter().position(|n| *n == from)
            && let Some(s) = self.nodes[client].sched.as_mut()
        {
            s.handle_rtt(p, rtt);
        }
        self.wasted += (bytes - added) as f64;
        if self.nodes[from].seed {
            self.useful_from_seeds += added;
        } else {
            self.useful_from_joiners += added;
        }
        let was = self.given(client, from);
        self.nodes[client].given.insert(
            from,
            Given {
                bytes: was + added as f64,
                at: self.now,
            },
        );
        self.drive(client);
    }
}
