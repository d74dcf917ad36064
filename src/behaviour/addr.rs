//! Address choice: which of this node's addresses to advertise for its chunk stream, and which
//! of a peer's to dial.

use std::net::{IpAddr, SocketAddr};

use libp2p::core::{Multiaddr, multiaddr::Protocol};

use crate::discovery::message::MAX_STREAMER_ADDRS;

/// The IP address a multiaddr starts with, if any.
pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// The chunk-stream addresses to advertise: the configured ones; else the bound address if it
/// is specific; else the streamer's port on each IP the swarm listens on (same family),
/// loopback last (peers on other hosts cannot use it).
pub(crate) fn streamer_addrs(
    configured: &[SocketAddr],
    bound: SocketAddr,
    listen: &[Multiaddr],
) -> Vec<SocketAddr> {
    if !configured.is_empty() {
        return configured.to_vec();
    }
    if !bound.ip().is_unspecified() {
        return vec![bound];
    }
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in listen.iter().filter_map(ip_of) {
        if !ip.is_unspecified() && !ips.contains(&ip) && ip.is_ipv4() == bound.is_ipv4() {
            ips.push(ip);
        }
    }
    ips.sort_by_key(|ip| ip.is_loopback());
    ips.truncate(MAX_STREAMER_ADDRS);
    ips.into_iter()
        .map(|ip| SocketAddr::new(ip, bound.port()))
        .collect()
}

/// Which of a peer's chunk-stream addresses (never empty) to use: the one on the IP the node is
/// connected to the peer on, else the first that is not loopback, else the first.
pub(crate) fn pick_addr(addrs: &[SocketAddr], connected: Option<IpAddr>) -> SocketAddr {
    addrs
        .iter()
        .find(|a| Some(a.ip()) == connected)
        .or_else(|| addrs.iter().find(|a| !a.ip().is_loopback()))
        .copied()
        .unwrap_or(addrs[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chunk_stream_address_follows_the_connection() {
        let addrs: Vec<SocketAddr> = vec![
            "127.0.0.1:9".parse().unwrap(),
            "10.0.0.5:9".parse().unwrap(),
            "192.0.2.7:9".parse().unwrap(),
        ];
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(pick_addr(&addrs, ip("192.0.2.7")), addrs[2]);
        assert_eq!(pick_addr(&addrs, ip("127.0.0.1")), addrs[0]);
        assert_eq!(pick_addr(&addrs, None), addrs[1], "not loopback");
        assert_eq!(pick_addr(&addrs, ip("203.0.113.1")), addrs[1]);
        assert_eq!(pick_addr(&addrs[..1], None), addrs[0]);
    }

    #[test]
    fn advertised_addresses_come_from_the_listen_addresses_loopback_last() {
        let bound: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let listen: Vec<Multiaddr> = vec![
            "/ip4/127.0.0.1/udp/1/quic-v1".parse().unwrap(),
            "/ip4/10.1.2.3/udp/1/quic-v1".parse().unwrap(),
            "/ip6/::1/udp/1/quic-v1".parse().unwrap(),
            "/ip4/10.1.2.3/tcp/2".parse().unwrap(),
        ];
        assert_eq!(
            streamer_addrs(&[], bound, &listen),
            vec![
                "10.1.2.3:7000".parse::<SocketAddr>().unwrap(),
                "127.0.0.1:7000".parse().unwrap()
            ]
        );
        let specific: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(streamer_addrs(&[], specific, &listen), vec![specific]);
        let set: SocketAddr = "198.51.100.1:1".parse().unwrap();
        assert_eq!(streamer_addrs(&[set], bound, &listen), vec![set]);
    }
}
