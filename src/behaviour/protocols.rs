//! snapsync's own protocols on the swarm: its gossipsub, under its own protocol id prefix so it
//! never meets the owner's, and the direct request-response protocol.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::{gossipsub, request_response};

use super::config::Config;
use super::direct::{DirectCodec, PROTOCOL};
use super::event::BehaviourError;

/// Gossipsub protocol prefix of snapsync's own gossipsub, so it never meets the owner's.
const GOSSIP_PROTOCOL_PREFIX: &str = "/snapsync/meshsub";

/// How long a direct request may take before it fails.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocols' behaviour. Public only because the [`super::Behaviour`]'s connection handler
/// type names it; not part of the API.
#[doc(hidden)]
#[allow(unreachable_pub, missing_docs)]
pub mod wire {
    use libp2p::{gossipsub, request_response};

    use super::DirectCodec;

    #[derive(libp2p::swarm::NetworkBehaviour)]
    #[behaviour(prelude = "libp2p::swarm::derive_prelude")]
    pub struct Protocols {
        pub(crate) gossipsub: gossipsub::Behaviour,
        pub(crate) direct: request_response::Behaviour<DirectCodec>,
    }
}

pub(crate) use wire::{Protocols, ProtocolsEvent};

/// snapsync's protocols for the node with `keypair`, subscribed to the network's topic.
pub(crate) fn build(
    keypair: &Keypair,
    config: &Config,
) -> Result<(Protocols, gossipsub::IdentTopic), BehaviourError> {
    let gossip_error = |e: &dyn std::fmt::Display| BehaviourError::Gossipsub(e.to_string());
    let heartbeat = config.heartbeat_interval();
    let gossip_config = gossipsub::ConfigBuilder::default()
        .protocol_id_prefix(GOSSIP_PROTOCOL_PREFIX)
        .max_transmit_size(config.discovery().max_message_bytes())
        .heartbeat_interval(heartbeat)
        .heartbeat_initial_delay(heartbeat.min(Duration::from_secs(1)))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .build()
        .map_err(|e| gossip_error(&e))?;
    let mut gossipsub = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(keypair.clone()),
        gossip_config,
    )
    .map_err(|e| gossip_error(&e))?;
    let topic = gossipsub::IdentTopic::new(config.topic());
    gossipsub.subscribe(&topic).map_err(|e| gossip_error(&e))?;
    let direct = request_response::Behaviour::with_codec(
        DirectCodec {
            max_bytes: config.discovery().max_message_bytes(),
        },
        [(PROTOCOL, request_response::ProtocolSupport::Full)],
        request_response::Config::default().with_request_timeout(DIRECT_TIMEOUT),
    );
    Ok((Protocols { gossipsub, direct }, topic))
}
