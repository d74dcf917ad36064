//! What a node of the simulated swarm answers: what it says it holds, and whether it serves a
//! request that reaches it (its upload slots, by what each peer gave it lately).

use std::collections::HashMap;

use super::{Ev, Job, Node, NodeId, Sim};
use crate::transfer::download::bits::Bits;
use crate::transfer::download::picker::Have;
use crate::transfer::download::scheduler::RequestFailure;
use crate::transfer::streamer::slots::{HaveReply, SUGGESTED_BLOCKS, have_reply};

impl Sim<'_> {
    /// What `node` gave `peer`'s ledger lately, as `peer` sees it.
    pub(super) fn given(&self, peer: NodeId, node: NodeId) -> f64 {
        let now = self.now;
        self.nodes[peer].given.get(&node).map_or(0.0, |g| {
            let halves = now.saturating_sub(g.at).as_secs_f64() / 20.0;
            g.bytes * 0.5f64.powf(halves)
        })
    }

    /// What `node` says it holds to `asker` (everything once complete, or, when more ask than
    /// it has upload slots for, the few pieces it offers this asker if it holds a slot, none
    /// if not; else its pieces on disk). A node that downloads too takes the asker as a
    /// source in turn.
    pub(super) fn have_of(&mut self, node: NodeId, asker: NodeId) -> Have {
        let now = self.instant();
        let pieces = self.chunk_count.div_ceil(self.piece_chunks) as usize;
        let holding = self.nodes[asker]
            .sched
            .as_ref()
            .map(|s| s.pieces_done().to_bytes());
        let complete = self.nodes[node].seed || self.nodes[node].done_at.is_some();
        if !complete
            && !self.nodes[node].peers.contains(&asker)
            && let Some(s) = self.nodes[node].sched.as_mut()
            && s.handle_source(true, now).is_some()
        {
            self.nodes[node].peers.push(asker);
        }
        let given: HashMap<NodeId, f64> = self.nodes[node]
            .slots_candidates(asker)
            .into_iter()
            .map(|p| (p, self.given(node, p)))
            .collect();
        let n = &mut self.nodes[node];
        let contended = n.slots.contended(now);
        let slot = || {
            let given = |p: &NodeId| given.get(p).copied().unwrap_or(0.0);
            let admitted = n.slots.admit(asker, now, given);
            if admitted {
                n.slots.done(asker, 0, now);
            }
            admitted
        };
        match have_reply(complete, contended, holding.is_some(), slot) {
            HaveReply::Everything => Have::All,
            HaveReply::Nothing => Have::Some(Bits::new(pieces)),
            HaveReply::Suggest => {
                let offer = n.suggestions.answer(
                    SUGGESTED_BLOCKS,
                    self.piece_chunks,
                    holding.as_deref(),
                    asker as u32,
                    now,
                );
                Have::Some(Bits::from_bytes(&offer, pieces).expect("the length asked"))
            }
            HaveReply::Verified => match &n.sched {
                None => Have::Some(Bits::new(pieces)),
                Some(s) => {
                    let done = s.chunk_done();
                    let mut bits = Bits::new(pieces);
                    for p in 0..pieces {
                        let start = p as u64 * self.piece_chunks;
                        let end = (start + self.piece_chunks).min(self.chunk_count);
                        if (start..end).all(|c| done.get(c as usize)) {
                            bits.set(p);
                        }
                    }
                    Have::Some(bits)
                }
            },
        }
    }

    /// A request reaches its server: refused when it does not hold the range or has no upload
    /// slot for the client, else queued on the client's connection.
    pub(super) fn arrive(&mut self, job: Job) {
        if self.cancelled.contains(&(job.client, job.id)) {
            return;
        }
        let (server, client, id) = (job.server, job.client, job.id);
        let n = &self.nodes[server];
        let holds = n.seed
            || n.done_at.is_some()
            || n.sched
                .as_ref()
                .is_some_and(|s| job.chunks.clone().all(|c| s.chunk_done().get(c as usize)));
        let failure = if !holds {
            self.not_held += 1;
            Some(RequestFailure::NotHeld)
        } else {
            let now = self.instant();
            let given: HashMap<NodeId, f64> = self.nodes[server]
                .slots_candidates(client)
                .into_iter()
                .map(|p| (p, self.given(server, p)))
                .collect();
            let given = |p: &NodeId| given.get(p).copied().unwrap_or(0.0);
            if self.nodes[server].slots.admit(client, now, given) {
                None
            } else {
                self.busy += 1;
                Some(RequestFailure::Busy)
            }
        };
        if let Some(failure) = failure {
            let at = self.message(server, client);
            self.push(
                at,
                Ev::Refused {
                    client,
                    id,
                    failure,
                },
            );
            return;
        }
        self.advance(server);
        let now = self.instant();
        let n = &mut self.nodes[server];
        if n.seed || n.done_at.is_some() {
            let _ = n.suggestions.sent(job.chunks.clone(), now);
        }

        n.queues.entry(client).or_default().push_back(job);
        if !n.sending.iter().any(|s| s.job.client == client) {
            self.next_of(server, client);
        }
        self.reschedule(server);
    }
}

impl Node {
    /// The peers the slots may compare `asker` with: those holding one, and the asker.
    fn slots_candidates(&self, asker: NodeId) -> Vec<NodeId> {
        let mut c: Vec<NodeId> = self.given.keys().copied().collect();
        c.push(asker);
        c
    }
}
