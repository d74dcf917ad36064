//! Transfer benchmark: the same 1 GiB snapshot over loopback, landed on disk with fsync, by
//!
//! - (a) snapsync from 1 peer,
//! - (b) snapsync from 4 peers, each capped at 1/4 of (a)'s rate,
//! - (c) a plain TCP copy (tokio, no TLS, no checks),
//! - (d) a minimal quinn single-stream copy (default transport settings, no checks),
//! - (e) snapsync from a web source alone: the snapshot published to a directory served by a
//!   static HTTP server with Range support (nginx-style: it serves files, nothing else),
//! - (f) snapsync from one peer and that web source at once,
//!
//! with MiB/s, client CPU seconds and client peak RSS for each, then the ratios. Servers and
//! clients run as separate processes, so each client's CPU and memory are its own.
//!
//! ```text
//! cargo run --release --example transfer_bench [-- --mib 1024]
//! ```
//!
//! The last line printed is one JSON object with every figure.

#[path = "support/static_web.rs"]
mod static_web;
#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use libp2p::identity::Keypair;
use snapsync::Metrics;
use snapsync::layers::snapshot::{Manifest, SnapshotStore};
use snapsync::layers::transfer::{
    DownloadConfig, DownloadTarget, Downloader, PeerAddr, Streamer, StreamerConfig,
};
use snapsync::layers::transfer::{Holding, Origin};
use support::{arg, field, local, mib, usage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Server roles print one line per listener (JSON) and serve until killed.
async fn serve_snapsync(store: &Path, count: usize, cap: Option<u64>) {
    let store = SnapshotStore::open(store).unwrap();
    let mut streamers = Vec::new();
    for _ in 0..count {
        let keypair = Keypair::generate_ed25519();
        let config = StreamerConfig::default()
            .with_listen(local())
            .with_rate_limit(cap);
        let s = Streamer::bind(&keypair, store.clone(), config, None, Metrics::new()).unwrap();
        println!(
            "{{\"peer_id\":\"{}\",\"addr\":\"{}\"}}",
            keypair.public().to_peer_id(),
            s.local_addr()
        );
        streamers.push(s);
    }
    std::io::stdout().flush().unwrap();
    std::future::pending::<()>().await;
}

/// A static HTTP server over `root` (see `support/static_web.rs`).
async fn serve_web(root: &Path) {
    let addr = static_web::start(root.to_path_buf()).await.unwrap();
    println!("{{\"addr\":\"{addr}\"}}");
    std::io::stdout().flush().unwrap();
    std::future::pending::<()>().await;
}

async fn serve_tcp(file: &Path) {
    let listener = tokio::net::TcpListener::bind(local()).await.unwrap();
    println!("{{\"addr\":\"{}\"}}", listener.local_addr().unwrap());
    std::io::stdout().flush().unwrap();
    loop {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut f = std::fs::File::open(file).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            sock.write_all(&buf[..n]).await.unwrap();
        }
        sock.shutdown().await.unwrap();
    }
}

/// quinn settings with snapsync's tuning (for the tuned baseline): its windows, datagram size
/// and AES-GCM first.
mod tuned {
    use std::sync::Arc;

    use libp2p::identity::Keypair;
    use snapsync::layers::transfer::TransportTuning;

    pub fn endpoint() -> quinn::EndpointConfig {
        let mut c = quinn::EndpointConfig::default();
        c.max_udp_payload_size(TransportTuning::default().max_udp_payload())
            .unwrap();
        c
    }

    pub fn transport() -> Arc<quinn::TransportConfig> {
        let t = TransportTuning::default();
        let mut c = quinn::TransportConfig::default();
        c.stream_receive_window(quinn::VarInt::from_u64(t.stream_window()).unwrap())
            .receive_window(quinn::VarInt::from_u64(t.connection_window()).unwrap())
            .send_window(t.send_window());
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(t.max_udp_payload());
        c.mtu_discovery_config(Some(mtu));
        Arc::new(c)
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        use rustls::crypto::aws_lc_rs::cipher_suite::*;
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384];
        Arc::new(p)
    }

    fn identity(
        keypair: &Keypair,
        p: &rustls::crypto::CryptoProvider,
    ) -> Arc<rustls::sign::SingleCertAndKey> {
        let (cert, key) = libp2p_tls::certificate::generate(keypair).unwrap();
        let key = p.key_provider.load_private_key(key).unwrap();
        Arc::new(rustls::sign::CertifiedKey::new(vec![cert], key).into())
    }

    /// No certificate checks: a bare copy.
    #[derive(Debug)]
    struct AnyCert;

    impl rustls::client::danger::ServerCertVerifier for AnyCert {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }

    pub fn server(keypair: &Keypair) -> quinn::ServerConfig {
        let p = provider();
        let id = identity(keypair, &p);
        let mut tls = rustls::ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(id);
        tls.alpn_protocols = vec![b"bench".to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let mut c = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        c.transport_config(transport());
        c
    }

    pub fn client() -> quinn::ClientConfig {
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"bench".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut c = quinn::ClientConfig::new(Arc::new(crypto));
        c.transport_config(transport());
        c
    }
}

fn quinn_endpoint(server: Option<quinn::ServerConfig>, tuned: bool) -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind(local()).unwrap();
    let config = if tuned {
        tuned::endpoint()
    } else {
        quinn::EndpointConfig::default()
    };
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime)).unwrap()
}

/// A minimal quinn server: one stream carrying the file; default settings and libp2p-tls's
/// configs, or (tuned) snapsync's transport settings.
async fn serve_quinn(file: &Path, tuned: bool) {
    let keypair = Keypair::generate_ed25519();
    let config = if tuned {
        tuned::server(&keypair)
    } else {
        let mut tls = libp2p_tls::make_server_config(&keypair).unwrap();
        tls.alpn_protocols = vec![b"bench".to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        quinn::ServerConfig::with_crypto(Arc::new(crypto))
    };
    let endpoint = quinn_endpoint(Some(config), tuned);
    println!(
        "{{\"peer_id\":\"{}\",\"addr\":\"{}\"}}",
        keypair.public().to_peer_id(),
        endpoint.local_addr().unwrap()
    );
    std::io::stdout().flush().unwrap();
    while let Some(incoming) = endpoint.accept().await {
        let conn = incoming.await.unwrap();
        let mut send = conn.open_uni().await.unwrap();
        let mut f = std::fs::File::open(file).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut f, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n]).await.unwrap();
        }
        send.finish().unwrap();
        conn.closed().await;
    }
}

fn report(started: Instant, before: support::Usage, bytes: u64) {
    let secs = started.elapsed().as_secs_f64();
    let after = usage();
    println!(
        "{{\"secs\":{secs},\"mibs\":{},\"cpu\":{},\"peak_rss_mib\":{}}}",
        mib(bytes) / secs,
        (after.cpu - before.cpu).as_secs_f64(),
        after.peak_rss_mib
    );
}

async fn get_snapsync(
    store: &Path,
    peers: Vec<PeerAddr>,
    web: Option<String>,
    manifest: &Manifest,
) {
    let store = SnapshotStore::open(store).unwrap();
    let downloader = Downloader::new(
        Keypair::generate_ed25519(),
        store,
        DownloadConfig::default().with_bind(local()),
        None,
        Metrics::new(),
    )
    .unwrap();
    let before = usage();
    let started = Instant::now();
    let handle = downloader.start(DownloadTarget::from_manifest(manifest), peers);
    if let Some(url) = web {
        handle.add_source(
            Origin::Web(Arc::new(
                snapsync::layers::transfer::WebSource::new(&url).unwrap(),
            )),
            Holding::Complete,
        );
    }
    let got = handle.wait().await.unwrap();
    report(started, before, manifest.archive_size);
    let served: Vec<String> = got
        .per_peer
        .iter()
        .map(|(_, b)| format!("{:.0}", mib(*b)))
        .chain(
            got.per_web
                .iter()
                .map(|(_, b)| format!("{:.0} (web)", mib(*b))),
        )
        .collect();
    eprintln!("    MiB per source: {}", served.join(", "));
}

async fn get_tcp(addr: SocketAddr, out: &Path, size: u64) {
    let before = usage();
    let started = Instant::now();
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut f = std::fs::File::create(out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        // Fill a 1 MiB buffer, then write it (plain blocking writes: this process does
        // nothing else).
        let mut filled = 0;
        while filled < buf.len() {
            let n = sock.read(&mut buf[filled..]).await.unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        f.write_all(&buf[..filled]).unwrap();
        total += filled as u64;
    }
    f.sync_all().unwrap();
    assert_eq!(total, size);
    report(started, before, size);
}

async fn get_quinn(peer: PeerAddr, out: &Path, size: u64, tuned: bool) {
    let before = usage();
    let started = Instant::now();
    let config = if tuned {
        tuned::client()
    } else {
        let keypair = Keypair::generate_ed25519();
        let mut tls = libp2p_tls::make_client_config(&keypair, Some(peer.peer_id)).unwrap();
        tls.alpn_protocols = vec![b"bench".to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        quinn::ClientConfig::new(Arc::new(crypto))
    };
    let endpoint = quinn_endpoint(None, tuned);
    let conn = endpoint
        .connect_with(config, peer.addr, "x")
        .unwrap()
        .await
        .unwrap();
    let mut recv = conn.accept_uni().await.unwrap();
    let mut f = std::fs::File::create(out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match recv.read(&mut buf[filled..]).await.unwrap() {
                Some(n) => filled += n,
                None => break,
            }
        }
        if filled == 0 {
            break;
        }
        f.write_all(&buf[..filled]).unwrap();
        total += filled as u64;
    }
    f.sync_all().unwrap();
    assert_eq!(total, size);
    conn.close(0u32.into(), b"done");
    report(started, before, size);
}

fn peers_arg(lines: &[String]) -> String {
    lines
        .iter()
        .map(|l| {
            format!(
                "{}@{}",
                support::text(l, "peer_id"),
                support::text(l, "addr")
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_peers(s: &str) -> Vec<PeerAddr> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (id, addr) = p.split_once('@').unwrap();
            PeerAddr {
                peer_id: id.parse().unwrap(),
                addr: addr.parse().unwrap(),
            }
        })
        .collect()
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Some(role) = arg("--role") {
        run_role(&rt, &role);
        return;
    }
    let size_mib: u64 = arg("--mib").map(|m| m.parse().unwrap()).unwrap_or(1024);
    let results = scenarios(size_mib);
    print_results(size_mib, &results);
}

/// Runs one server or client process of the benchmark.
fn run_role(rt: &tokio::runtime::Runtime, role: &str) {
    let path = |name: &str| PathBuf::from(arg(name).unwrap());
    rt.block_on(async {
        match role {
            "serve-snapsync" => {
                let cap = arg("--cap").map(|c| c.parse().unwrap()).filter(|c| *c > 0);
                serve_snapsync(
                    &path("--store"),
                    arg("--count").unwrap().parse().unwrap(),
                    cap,
                )
                .await
            }
            "make-snapshot" => {
                let mib: u64 = arg("--mib").unwrap().parse().unwrap();
                let m = support::random_snapshot(&path("--store"), mib << 20);
                println!("{{\"root\":\"{}\"}}", m.content_root);
            }
            "serve-tcp" => serve_tcp(&path("--file")).await,
            "serve-web" => serve_web(&path("--dir")).await,
            "serve-quinn" => serve_quinn(&path("--file"), arg("--tuned").is_some()).await,
            "get-snapsync" => {
                // (The server process holds its store: its manifest file is read directly.)
                let bytes = std::fs::read(path("--manifest")).unwrap();
                let manifest = Manifest::decode(&bytes).unwrap();
                get_snapsync(
                    &path("--store"),
                    parse_peers(&arg("--peers").unwrap_or_default()),
                    arg("--web"),
                    &manifest,
                )
                .await
            }
            "get-tcp" => {
                get_tcp(
                    arg("--addr").unwrap().parse().unwrap(),
                    &path("--out"),
                    arg("--size").unwrap().parse().unwrap(),
                )
                .await
            }
            "get-quinn" => {
                let peer = parse_peers(&arg("--peers").unwrap())[0];
                get_quinn(
                    peer,
                    &path("--out"),
                    arg("--size").unwrap().parse().unwrap(),
                    arg("--tuned").is_some(),
                )
                .await
            }
            other => panic!("unknown role {other}"),
        }
    });
}

/// What each scenario measured (its client's result line), and the cap of (b)'s peers.
struct Results {
    one: String,
    four: String,
    tcp: String,
    quinn: String,
    quinn_tuned: String,
    web_alone: String,
    mixed: String,
    cap: u64,
}

/// The snapshot every scenario serves, and where the clients write.
struct Setup {
    tmp: tempfile::TempDir,
    archive: String,
    manifest: String,
    server_store: String,
    size: String,
    client_dir: PathBuf,
    client_store: String,
    out: String,
    www: String,
}

impl Setup {
    /// A snapshot of `size_mib` MiB in a server store, and the same published for a static web
    /// server.
    fn new(size_mib: u64) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let server_store = tmp.path().join("server");
        std::fs::create_dir_all(&server_store).unwrap();
        eprintln!("writing a {size_mib} MiB snapshot ...");
        let manifest = support::random_snapshot(&server_store, size_mib << 20);
        // The store is opened once here, and closed before any server process opens it.
        let store = SnapshotStore::open(&server_store).unwrap();
        let latest = store.latest().unwrap();
        let manifest_path = latest.dir().join(snapsync::layers::snapshot::MANIFEST_FILE);
        let www = tmp.path().join("www");
        snapsync::layers::snapshot::publish(&latest, &www).unwrap();
        let text = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let client_dir = tmp.path().join("client");
        Self {
            archive: text(&latest.archive_path()),
            manifest: text(&manifest_path),
            server_store: text(&server_store),
            size: manifest.archive_size.to_string(),
            client_store: text(&client_dir),
            client_dir,
            out: text(&tmp.path().join("copy.bin")),
            www: text(&www),
            tmp,
        }
    }

    /// One scenario: a server process, a client process built from the server's listener
    /// lines, then the server stopped. Each client starts from an empty directory.
    fn scenario(
        &self,
        name: &str,
        server: &[&str],
        listeners: usize,
        client: &dyn Fn(&[String]) -> Vec<String>,
    ) -> String {
        let _ = std::fs::remove_dir_all(&self.client_dir);
        let _ = std::fs::remove_file(self.tmp.path().join("copy.bin"));
        let (mut child, lines) = support::start_server(server, listeners);
        let args = client(&lines);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = support::run_phase(&refs);
        child.kill().unwrap();
        child.wait().unwrap();
        eprintln!("{name}: {result}");
        result
    }

    /// The snapsync client's arguments: the servers a scenario started, a web source, or both.
    fn client(&self, peers: Option<&[String]>, web: Option<&str>) -> Vec<String> {
        let mut args = owned(&[
            "--role",
            "get-snapsync",
            "--manifest",
            &self.manifest,
            "--store",
            &self.client_store,
        ]);
        if let Some(l) = peers {
            args.extend(["--peers".to_string(), peers_arg(l)]);
        }
        if let Some(url) = web {
            args.extend(["--web".to_string(), url.to_string()]);
        }
        args
    }

    /// A snapsync server process of `count` streamers, capped at `cap` bytes/s each if given.
    fn snapsync_server(&self, count: &str, cap: Option<&str>) -> Vec<String> {
        let mut args = owned(&[
            "--role",
            "serve-snapsync",
            "--store",
            &self.server_store,
            "--count",
            count,
        ]);
        if let Some(cap) = cap {
            args.extend(["--cap".to_string(), cap.to_string()]);
        }
        args
    }
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// Runs every scenario on a snapshot of `size_mib` MiB.
fn scenarios(size_mib: u64) -> Results {
    let setup = Setup::new(size_mib);
    let (tcp, quinn, quinn_tuned) = baselines(&setup);
    let (one, four, cap) = snapsync_peers(&setup);
    let (web_alone, mixed) = web(&setup);
    let _ = std::fs::remove_dir_all(&setup.client_dir);
    Results {
        one,
        four,
        tcp,
        quinn,
        quinn_tuned,
        web_alone,
        mixed,
        cap,
    }
}

/// (c), (d), (d'): the same bytes over plain TCP and a bare quinn stream (default, tuned).
fn baselines(s: &Setup) -> (String, String, String) {
    let quinn_client = |l: &[String], tuned: bool| {
        let mut args = owned(&[
            "--role",
            "get-quinn",
            "--peers",
            &peers_arg(l),
            "--out",
            &s.out,
            "--size",
            &s.size,
        ]);
        if tuned {
            args.extend(owned(&["--tuned", "1"]));
        }
        args
    };
    let quinn = s.scenario(
        "(d) quinn single stream",
        &["--role", "serve-quinn", "--file", &s.archive],
        1,
        &|l| quinn_client(l, false),
    );
    let quinn_tuned = s.scenario(
        "(d') quinn single stream, tuned",
        &[
            "--role",
            "serve-quinn",
            "--file",
            &s.archive,
            "--tuned",
            "1",
        ],
        1,
        &|l| quinn_client(l, true),
    );
    let tcp = s.scenario(
        "(c) plain TCP",
        &["--role", "serve-tcp", "--file", &s.archive],
        1,
        &|l| {
            owned(&[
                "--role",
                "get-tcp",
                "--addr",
                &support::text(&l[0], "addr"),
                "--out",
                &s.out,
                "--size",
                &s.size,
            ])
        },
    );
    (tcp, quinn, quinn_tuned)
}

/// (a), (b): snapsync from one peer, then from four each capped at a quarter of what one
/// reached; the cap.
fn snapsync_peers(s: &Setup) -> (String, String, u64) {
    let get = |l: &[String]| s.client(Some(l), None);
    let args = s.snapsync_server("1", None);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let one = s.scenario("(a) snapsync, 1 peer", &refs, 1, &get);
    let cap = (field(&one, "mibs") * 1024.0 * 1024.0 / 4.0) as u64;
    let args = s.snapsync_server("4", Some(&cap.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let four = s.scenario("(b) snapsync, 4 capped peers", &refs, 4, &get);
    (one, four, cap)
}

/// (e), (f): the web source alone, and beside one peer.
fn web(s: &Setup) -> (String, String) {
    let web_alone = s.scenario(
        "(e) snapsync, a web source alone",
        &["--role", "serve-web", "--dir", &s.www],
        1,
        &|l| {
            let url = format!("http://{}/", support::text(&l[0], "addr"));
            s.client(None, Some(&url))
        },
    );
    let (mut web_child, web_lines) =
        support::start_server(&["--role", "serve-web", "--dir", &s.www], 1);
    let url = format!("http://{}/", support::text(&web_lines[0], "addr"));
    let args = s.snapsync_server("1", None);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mixed = s.scenario("(f) snapsync, 1 peer and the web source", &refs, 1, &|l| {
        s.client(Some(l), Some(&url))
    });
    web_child.kill().unwrap();
    web_child.wait().unwrap();
    (web_alone, mixed)
}

/// The table, the ratios and the JSON line.
fn print_results(size_mib: u64, r: &Results) {
    let Results {
        one,
        four,
        tcp,
        quinn,
        quinn_tuned,
        web_alone,
        mixed,
        cap,
    } = r;
    let cap = *cap;
    let cap_sum_mibs = mib(cap) * 4.0;
    println!("{size_mib} MiB over loopback, landed on disk with fsync");
    println!(
        "{:<36} {:>9} {:>9} {:>13}",
        "", "MiB/s", "client CPU s", "peak RSS MiB"
    );
    for (name, r) in [
        ("(a) snapsync, 1 peer", one),
        ("(b) snapsync, 4 peers capped", four),
        ("(c) plain TCP copy", tcp),
        ("(d) quinn single stream copy", quinn),
        ("(d') same, snapsync's QUIC tuning", quinn_tuned),
        ("(e) snapsync, web source alone", web_alone),
        ("(f) snapsync, 1 peer + web source", mixed),
    ] {
        println!(
            "{:<36} {:>9.0} {:>9.2} {:>13.0}",
            name,
            field(r, "mibs"),
            field(r, "cpu"),
            field(r, "peak_rss_mib")
        );
    }
    let a_vs_d = field(one, "mibs") / field(quinn, "mibs");
    let b_vs_caps = field(four, "mibs") / cap_sum_mibs;
    println!("(a) / (d) = {a_vs_d:.2}x (goal >= 1.0)");
    println!("(b) / sum of caps ({cap_sum_mibs:.0} MiB/s) = {b_vs_caps:.2}x (goal >= 0.9)");
    println!(
        "(a) / (c) = {:.2}x",
        field(one, "mibs") / field(tcp, "mibs")
    );
    println!(
        "(a) / (d') = {:.2}x (what the checks and multi-peer machinery cost over equally tuned quinn)",
        field(one, "mibs") / field(quinn_tuned, "mibs")
    );
    println!(
        "(e) / (a) = {:.2}x, (f) / (a) = {:.2}x (a web source alone, and beside the peer)",
        field(web_alone, "mibs") / field(one, "mibs"),
        field(mixed, "mibs") / field(one, "mibs")
    );
    let peak = field(one, "peak_rss_mib")
        .max(field(four, "peak_rss_mib"))
        .max(field(web_alone, "peak_rss_mib"))
        .max(field(mixed, "peak_rss_mib"));
    println!(
        "{{\"one_peer_mibs\":{:.1},\"four_peer_mibs\":{:.1},\"cap_sum_mibs\":{cap_sum_mibs:.1},\"tcp_mibs\":{:.1},\"quinn_mibs\":{:.1},\"quinn_tuned_mibs\":{:.1},\"peak_rss_mib\":{peak:.1},\"one_peer_cpu_s\":{:.2},\"four_peer_cpu_s\":{:.2},\"tcp_cpu_s\":{:.2},\"quinn_cpu_s\":{:.2},\"one_vs_quinn\":{a_vs_d:.3},\"four_vs_caps\":{b_vs_caps:.3},\"web_mibs\":{:.1},\"web_cpu_s\":{:.2},\"mixed_mibs\":{:.1},\"mixed_cpu_s\":{:.2},\"size_mib\":{size_mib}}}",
        field(one, "mibs"),
        field(four, "mibs"),
        field(tcp, "mibs"),
        field(quinn, "mibs"),
        field(quinn_tuned, "mibs"),
        field(one, "cpu"),
        field(four, "cpu"),
        field(tcp, "cpu"),
        field(quinn, "cpu"),
        field(web_alone, "mibs"),
        field(web_alone, "cpu"),
        field(mixed, "mibs"),
        field(mixed, "cpu"),
    );
}
