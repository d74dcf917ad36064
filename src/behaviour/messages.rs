//! What peers send: gossip on snapsync's topic, and direct asks and answers (and their
//! failures), handed to discovery.

use std::time::Instant;

use libp2p::{gossipsub, request_response};

use super::Behaviour;
use super::TARGET;
use super::protocols::ProtocolsEvent;
use crate::discovery::Verdict;
use crate::proto;

impl Behaviour {
    pub(super) fn handle_protocols(&mut self, event: ProtocolsEvent) {
        let now = Instant::now();
        match event {
            ProtocolsEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let verdict = if message.topic == self.topic.hash() {
                    self.discovery.handle_gossip(
                        message.source,
                        propagation_source,
                        &message.data,
                        now,
                    )
                } else {
                    Verdict::Ignore
                };
                let acceptance = match verdict {
                    Verdict::Accept => gossipsub::MessageAcceptance::Accept,
                    Verdict::Reject => gossipsub::MessageAcceptance::Reject,
                    Verdict::Ignore => gossipsub::MessageAcceptance::Ignore,
                };
                self.protocols.gossipsub.report_message_validation_result(
                    &message_id,
                    &propagation_source,
                    acceptance,
                );
            }
            ProtocolsEvent::Gossipsub(gossipsub::Event::Subscribed { peer_id, topic })
                if topic == self.topic.hash() =>
            {
                tracing::debug!(target: TARGET, peer = %peer_id, "a snapsync peer joined the topic");
                self.discovery.handle_subscribed(peer_id, now);
            }
            ProtocolsEvent::Gossipsub(_) => {}
            ProtocolsEvent::Direct(event) => self.handle_direct(event, now),
        }
    }

    fn handle_direct(
        &mut self,
        event: request_response::Event<proto::DirectRequest, proto::DirectResponse>,
        now: Instant,
    ) {
        use request_response::{Event as Rr, Message};
        match event {
            Rr::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => {
                let answer = match request.body {
                    Some(proto::direct_request::Body::Ask(ask)) => {
                        self.discovery.handle_ask(peer, &ask, now)
                    }
                    Some(proto::direct_request::Body::Answer(answer)) => {
                        self.discovery.handle_answer(
                            peer,
                            &answer,
                            crate::discovery::AnswerTo::Request,
                            now,
                        );
                        None
                    }
                    None => None,
                };
                let _ = self
                    .protocols
                    .direct
                    .send_response(channel, proto::DirectResponse { answer });
            }
            Rr::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if self.asks.pop(&request_id).is_some()
                    && let Some(answer) = response.answer
                {
                    self.discovery.handle_answer(
                        peer,
                        &answer,
                        crate::discovery::AnswerTo::Ask,
                        now,
                    );
                }
            }
            Rr::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.asks.pop(&request_id);
                if matches!(
                    error,
                    request_response::OutboundFailure::UnsupportedProtocols
                ) {
                    self.discovery.handle_not_snapsync(peer);
                }
                tracing::debug!(target: TARGET, %peer, %error, "a direct message did not go through");
            }
            Rr::InboundFailure { peer, error, .. } => {
                tracing::debug!(target: TARGET, %peer, %error, "could not read a direct message");
            }
            Rr::ResponseSent { .. } => {}
        }
    }
}
