//! A static file server for tests: HTTP/1.1 on 127.0.0.1 over a directory, with `Range`
//! support (one range per request), and the faults real servers have.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the server behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// As a static server should.
    None,
    /// It ignores `Range` and sends the whole file with 200.
    IgnoreRange,
    /// It announces the range, then closes half way through the body of archive reads.
    Truncate,
    /// It sends archive reads with no length, closing the connection half way through the
    /// body: the end of the body looks like the end of the connection.
    TruncateUnsized,
    /// It flips a byte of every archive read.
    FlipByte,
}

/// A running server.
pub struct WebServer {
    pub addr: SocketAddr,
    /// Whether it speaks HTTPS.
    https: bool,
    /// Body bytes sent.
    pub sent: Arc<AtomicU64>,
    /// Requests answered.
    pub requests: Arc<AtomicU64>,
    /// Reads of an archive among them.
    pub archive_reads: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl WebServer {
    /// The base URL of the directory served.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/", self.addr)
    }

    /// Serves `root` with `fault`, each connection's bodies at `rate` bytes/s at most.
    pub async fn start(root: PathBuf, fault: Fault, rate: Option<u64>) -> Self {
        Self::start_with(root, fault, rate, None).await
    }

    /// Serves `root` over HTTPS with the certificate of `tls`.
    pub async fn start_tls(root: PathBuf, tls: Arc<rustls::ServerConfig>) -> Self {
        Self::start_with(root, Fault::None, None, Some(tls)).await
    }

    async fn start_with(
        root: PathBuf,
        fault: Fault,
        rate: Option<u64>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let https = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let archive_reads = Arc::new(AtomicU64::new(0));
        let counters = (sent.clone(), requests.clone(), archive_reads.clone());
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let _ = sock.set_nodelay(true);
                let (root, counters) = (root.clone(), counters.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let (s, r, a) = &counters;
                    let _ = match acceptor {
                        Some(acceptor) => match acceptor.accept(sock).await {
                            Ok(tls) => serve(tls, &root, fault, rate, s, [r, a]).await,
                            Err(e) => Err(e),
                        },
                        None => serve(sock, &root, fault, rate, s, [r, a]).await,
                    };
                });
            }
        });
        Self {
            addr,
            https,
            sent,
            requests,
            archive_reads,
            task,
        }
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut sock: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    root: &std::path::Path,
    fault: Fault,
    rate: Option<u64>,
    sent: &AtomicU64,
    [requests, archive_reads]: [&AtomicU64; 2],
) -> std::io::Result<()> {
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if sock.read(&mut byte).await? == 0 {
                return Ok(());
            }
            head.push(byte[0]);
            if head.len() > 16 * 1024 {
                return Ok(());
            }
        }
        requests.fetch_add(1, Ordering::Relaxed);
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
        let range = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            if !name.eq_ignore_ascii_case("range") {
                return None;
            }
            let spec = value.trim().strip_prefix("bytes=")?;
            let (a, b) = spec.split_once('-')?;
            Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
        });
        let file = root.join(path.trim_start_matches('/'));
        let Ok(bytes) = std::fs::read(&file) else {
            sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await?;
            continue;
        };
        let archive = path.ends_with("archive.zst");
        if archive {
            archive_reads.fetch_add(1, Ordering::Relaxed);
        }
        let (status, mut body, extra) = match range {
            Some((a, b)) if fault != Fault::IgnoreRange && a <= b && (b as usize) < bytes.len() => {
                (
                    "206 Partial Content",
                    bytes[a as usize..=b as usize].to_vec(),
                    format!("Content-Range: bytes {a}-{b}/{}\r\n", bytes.len()),
                )
            }
            Some(_) if fault != Fault::IgnoreRange => {
                sock.write_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n")
                    .await?;
                continue;
            }
            _ => ("200 OK", bytes, String::new()),
        };
        if archive && fault == Fault::FlipByte && !body.is_empty() {
            let at = body.len() / 2;
            body[at] ^= 0x40;
        }
        let unsized_cut = archive && fault == Fault::TruncateUnsized;
        let length = if unsized_cut {
            "Connection: close\r\n".to_string()
        } else {
            format!("Content-Length: {}\r\n", body.len())
        };
        let header = format!(
            "HTTP/1.1 {status}\r\n{length}{extra}Content-Type: application/octet-stream\r\n\r\n"
        );
        sock.write_all(header.as_bytes()).await?;
        let end = if archive && (fault == Fault::Truncate || unsized_cut) {
            body.len() / 2
        } else {
            body.len()
        };
        for piece in body[..end].chunks(16 * 1024) {
            if let Some(rate) = rate {
                let secs = piece.len() as f64 / rate as f64;
                tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
            }
            sock.write_all(piece).await?;
            sent.fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        if end < body.len() {
            // Cut short: the connection closes with the body half sent.
            return Ok(());
        }
    }
}

/// A private certificate authority, as a company runs one, and a server certificate it signed
/// for 127.0.0.1.
pub struct PrivateCa {
    /// The CA's certificate, PEM.
    pub ca_pem: String,
    /// The server's TLS settings.
    pub server: Arc<rustls::ServerConfig>,
}

impl PrivateCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "snapsync test private CA");
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        Self {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }
}
