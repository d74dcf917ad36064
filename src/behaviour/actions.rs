//! Carrying out what discovery queued: gossip, direct asks and answers, syncs started and
//! cancelled, sources added to a sync, snapshots deleted, notices.

use libp2p::gossipsub;

use super::{Behaviour, TARGET};
use crate::discovery::Action;
use crate::proto;

impl Behaviour {
    /// Carries out what discovery queued. Returns whether there was anything.
    pub(super) fn carry_out_actions(&mut self) -> bool {
        let mut any = false;
        while let Some(action) = self.discovery.poll() {
            any = true;
            self.carry_out(action);
        }
        any
    }

    pub(super) fn carry_out(&mut self, action: Action) {
        match action {
            Action::Publish { kind, bytes } => {
                // When the node asks its peers, it reads its web sources' indexes too.
                if kind == crate::discovery::Published::Request {
                    self.web.ask_all();
                }
                let delivered = match self.protocols.gossipsub.publish(self.topic.clone(), bytes) {
                    Ok(_) => true,
                    // Normal at start: the first peer to join gets the request.
                    Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                        tracing::debug!(target: TARGET, ?kind, "no snapsync peer on the topic yet");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(target: TARGET, ?kind, error = %e, "cannot publish on the topic");
                        false
                    }
                };
                self.discovery.handle_published(kind, delivered);
            }
            Action::Ask { peer, request } => {
                let body = Some(proto::direct_request::Body::Ask(request));
                let id = self
                    .protocols
                    .direct
                    .send_request(&peer, proto::DirectRequest { body });
                self.asks.push(id, peer);
            }
            Action::Answer {
                peer,
                answer,
                addrs,
            } => {
                let body = Some(proto::direct_request::Body::Answer(answer));
                self.protocols.direct.send_request_with_addresses(
                    &peer,
                    proto::DirectRequest { body },
                    addrs,
                );
            }
            Action::StartSync(plan) => self.start_sync(*plan),
            Action::CancelSync => self.stop_job(),
            Action::AddSyncPeer {
                key,
                peer,
                addrs,
                holding,
            } => {
                if let Some(origin) = self.origin_of(peer, &addrs)
                    && let Some(job) = &mut self.job
                {
                    job.add_source(&key, peer, origin, holding);
                }
            }
            Action::DeleteSnapshot(root) => {
                self.condemned.put(root, ());
                if let Some(snap) = self.store.get(&root)
                    && let Err(e) = self.store.remove(&snap)
                {
                    tracing::warn!(target: TARGET, root = %root.short(), error = %e, "could not delete a snapshot that did not load");
                }
                self.refresh_local();
            }
            Action::KeepAttestations { key, attestations } => {
                let network = self.config.network().to_string();
                match self
                    .store
                    .attest(&key.content_root, &network, &attestations)
                {
                    Ok(_) => self.refresh_local(),
                    Err(e) => {
                        tracing::debug!(target: TARGET, slot = key.slot, error = %e, "could not keep the attestations heard of a held snapshot");
                    }
                }
            }
            Action::Notice(notice) => self.push_event(notice.into()),
        }
    }
}
