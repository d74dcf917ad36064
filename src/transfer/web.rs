//! Web sources (feature `web`): a directory of published snapshots on a static HTTP(S) server or
//! an object store (see [`crate::snapshot::publish`]) read as a source of a download. The index
//! and manifests are small bounded reads; archive bytes and outboard nodes come in `Range`
//! requests whose every chunk the download checks against the content root, as a peer's.
//!
//! A server is trusted for nothing: it must answer a range request with `206` and exactly the
//! range asked (`Content-Range` and length both checked before a byte of the body is used);
//! `200` with the whole file, a redirect (never followed), another status, a body that ends
//! early or stalls are typed errors. Each read has its deadline.

use std::ops::Range;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prost::bytes::Bytes;

use super::WebRoots;
use crate::chunk::ChunkSize;
use crate::discovery::SnapshotAd;
use crate::hash::{BankHash, ContentRoot};
use crate::snapshot::{Base, INDEX_FILE, Manifest, SnapshotKey, SnapshotKind};

/// Most bytes of an index read.
pub const MAX_INDEX_BYTES: usize = 1 << 20;

/// Most snapshots an index may list.
pub const MAX_INDEX_SNAPSHOTS: usize = 1024;

/// Why a web source failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebError {
    /// The URL is not an absolute `http://` or `https://` URL.
    #[error("not an http(s) URL: {0}")]
    BadUrl(String),
    /// The request could not be made or answered (connection, TLS, protocol).
    #[error("{url}: {message}")]
    Http {
        /// What was asked for.
        url: String,
        /// What failed.
        message: String,
    },
    /// The server answered with a status other than the one asked for.
    #[error("{url}: HTTP {status}")]
    Status {
        /// What was asked for.
        url: String,
        /// Its status.
        status: u16,
    },
    /// The server answered with a redirect: redirects are not followed.
    #[error("{url}: redirected (HTTP {status}); redirects are not followed")]
    Redirect {
        /// What was asked for.
        url: String,
        /// Its status.
        status: u16,
    },
    /// The server ignored the `Range` header and answered with the whole file.
    #[error("{url}: the server does not honour Range requests")]
    NoRange {
        /// What was asked for.
        url: String,
    },
    /// The server answered another range, or another length, than the one asked for.
    #[error("{url}: asked for bytes {asked:?}, the answer says {got}")]
    WrongRange {
        /// What was asked for.
        url: String,
        /// The range asked.
        asked: Range<u64>,
        /// What the answer's headers say.
        got: String,
    },
    /// The body ended before the length it announced.
    #[error("{url}: the body ended after {got} of {expected} bytes")]
    Truncated {
        /// What was asked for.
        url: String,
        /// Bytes expected.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The body was longer than allowed.
    #[error("{url}: more than the {limit} bytes allowed")]
    TooLarge {
        /// What was asked for.
        url: String,
        /// The limit.
        limit: usize,
    },
    /// Nothing arrived within the deadline, or a small file did not arrive whole within it.
    #[error("{url}: not received within {after:?}")]
    Stalled {
        /// What was asked for.
        url: String,
        /// The deadline.
        after: Duration,
    },
    /// The index is not what the publishing layout says.
    #[error("{url}: bad index: {message}")]
    BadIndex {
        /// The index's URL.
        url: String,
        /// What is wrong.
        message: String,
    },
}

impl WebError {
    /// Whether trying the same server again later can help (a connection lost, a 5xx, a stall,
    /// a body cut short); else it cannot serve this download.
    pub fn is_transient(&self) -> bool {
        match self {
            WebError::Http { .. } | WebError::Stalled { .. } | WebError::Truncated { .. } => true,
            WebError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// An error with its causes, the way an operator needs it: a client error says "connect", its
/// cause says which certificate check failed.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// The TCP side of the client: no Nagle delay (a request is one write, and a response's last
/// small segment must not wait for an ACK), a bounded connect.
fn connector() -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    http
}

/// A published directory on a web server: its base URL and an HTTP(S) client.
#[derive(Clone)]
pub struct WebSource {
    base: String,
    client: Client<Https, Empty<Bytes>>,
}

impl std::fmt::Debug for WebSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSource")
            .field("base", &self.base)
            .finish()
    }
}

impl std::fmt::Display for WebSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

/// One snapshot a web source's index lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebListing {
    /// Its directory, relative to the base URL.
    pub path: String,
    /// What the index says of it (a claim until checked).
    pub ad: SnapshotAd,
    /// The attestations the index lists for it (claims until checked).
    pub attestations: Vec<crate::snapshot::Attestation>,
}

impl WebSource {
    /// The published directory at `base` (`http://` or `https://`; a trailing `/` is added).
    /// HTTPS servers are checked against the Mozilla roots and the OS's trust store (see
    /// [`WebRoots`]); [`WebSource::with_roots`] adds CA bundles.
    pub fn new(base: &str) -> Result<Self, WebError> {
        let roots = WebRoots::new(&[]).map_err(|e| WebError::Http {
            url: base.to_string(),
            message: e.to_string(),
        })?;
        Self::with_roots(base, &roots)
    }

    /// The published directory at `base`, HTTPS servers checked against `roots`.
    pub fn with_roots(base: &str, roots: &WebRoots) -> Result<Self, WebError> {
        let mut base = base.trim().to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        let uri: Uri = base.parse().map_err(|_| WebError::BadUrl(base.clone()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(WebError::BadUrl(base));
        }
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(roots.client_config())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector());
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(https);
        Ok(Self { base, client })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path.trim_start_matches('/'))
    }

    async fn get(
        &self,
        url: &str,
        range: Option<&Range<u64>>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, WebError> {
        let uri: Uri = url.parse().map_err(|_| WebError::BadUrl(url.to_string()))?;
        let mut req = Request::get(uri);
        if let Some(r) = range {
            req = req.header(RANGE, format!("bytes={}-{}", r.start, r.end - 1));
        }
        let req = req.body(Empty::new()).map_err(|e| WebError::Http {
            url: url.to_string(),
            message: e.to_string(),
        })?;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| WebError::Stalled {
                url: url.to_string(),
                after: timeout,
            })?
            .map_err(|e| WebError::Http {
                url: url.to_string(),
                message: with_causes(&e),
            })?;
        let status = resp.status();
        if status.is_redirection() {
            return Err(WebError::Redirect {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        Ok(resp)
    }

    /// The whole of a small file (an index, a manifest), at most `limit` bytes, all within
    /// `timeout`: a server that trickles bytes cannot hold the reader.
    async fn small(
        &self,
        path: &str,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, WebError> {
        let url = self.url(path);
        tokio::time::timeout(timeout, self.small_within(url.clone(), limit, timeout))
            .await
            .unwrap_or(Err(WebError::Stalled {
                url,
                after: timeout,
            }))
    }

    async fn small_within(
        &self,
        url: String,
        limit: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, WebError> {
        let resp = self.get(&url, None, timeout).await?;
        if resp.status() != StatusCode::OK {
            return Err(WebError::Status {
                url,
                status: resp.status().as_u16(),
            });
        }
        let mut body = Body::new(resp.into_body(), url.clone(), None, timeout);
        let mut out = Vec::new();
        while let Some(piece) = body.next().await? {
            if out.len() + piece.len() > limit {
                return Err(WebError::TooLarge { url, limit });
            }
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// What the index lists (checked for its shape, bounded; its claims are only claims).
    pub async fn index(&self, timeout: Duration) -> Result<Vec<WebListing>, WebError> {
        let bytes = self.small(INDEX_FILE, MAX_INDEX_BYTES, timeout).await?;
        parse_index(&bytes).map_err(|message| WebError::BadIndex {
            url: self.url(INDEX_FILE),
            message,
        })
    }

    /// The manifest of the snapshot in `path`.
    pub async fn manifest(&self, path: &str, timeout: Duration) -> Result<Manifest, WebError> {
        let file = format!("{path}/{}", crate::snapshot::MANIFEST_FILE);
        let bytes = self
            .small(&file, crate::snapshot::MAX_MANIFEST_BYTES, timeout)
            .await?;
        Manifest::decode(&bytes).map_err(|e| WebError::BadIndex {
            url: self.url(&file),
            message: format!("manifest: {e}"),
        })
    }

    /// Bytes `range` of the file `file` (relative to the base): a body that yields exactly
    /// them, each piece within `timeout`, once the answer is `206` for exactly that range.
    pub(crate) async fn range(
        &self,
        file: &str,
        range: Range<u64>,
        timeout: Duration,
    ) -> Result<Body, WebError> {
        let url = self.url(file);
        let resp = self.get(&url, Some(&range), timeout).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => return Err(WebError::NoRange { url }),
            s => {
                return Err(WebError::Status {
                    url,
                    status: s.as_u16(),
                });
            }
        }
        let len = range.end - range.start;
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        let content_range = header(CONTENT_RANGE).unwrap_or_default();
        let expected = format!("bytes {}-{}/", range.start, range.end - 1);
        let length_ok = header(CONTENT_LENGTH).is_none_or(|l| l.trim() == len.to_string());
        if !content_range.starts_with(&expected) || !length_ok {
            return Err(WebError::WrongRange {
                url,
                asked: range,
                got: format!(
                    "Content-Range {content_range:?}, Content-Length {:?}",
                    header(CONTENT_LENGTH)
                ),
            });
        }
        Ok(Body::new(resp.into_body(), url, Some(len), timeout))
    }
}

/// A response body read piece by piece, each within a deadline, held to its length.
pub(crate) struct Body {
    inner: Incoming,
    url: String,
    expected: Option<u64>,
    got: u64,
    timeout: Duration,
}

impl Body {
    fn new(inner: Incoming, url: String, expected: Option<u64>, timeout: Duration) -> Self {
        Self {
            inner,
            url,
            expected,
            got: 0,
            timeout,
        }
    }

    /// The next piece, `None` at the end (an end before the expected length is an error, and
    /// so is a byte beyond it).
    pub(crate) async fn next(&mut self) -> Result<Option<Bytes>, WebError> {
        loop {
            let frame = tokio::time::timeout(self.timeout, self.inner.frame())
                .await
                .map_err(|_| WebError::Stalled {
                    url: self.url.clone(),
                    after: self.timeout,
                })?;
            match frame {
                None => {
                    return match self.expected {
                        Some(expected) if self.got < expected => Err(WebError::Truncated {
                            url: self.url.clone(),
                            expected,
                            got: self.got,
                        }),
                        _ => Ok(None),
                    };
                }
                Some(Err(e)) => {
                    return Err(WebError::Http {
                        url: self.url.clone(),
                        message: e.to_string(),
                    });
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    self.got += data.len() as u64;
                    if let Some(expected) = self.expected
                        && self.got > expected
                    {
                        return Err(WebError::WrongRange {
                            url: self.url.clone(),
                            asked: 0..expected,
                            got: format!("{} bytes or more", self.got),
                        });
                    }
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Parses an index (see [`crate::snapshot::publish`]): every field checked, at most
/// [`MAX_INDEX_SNAPSHOTS`] snapshots.
pub(crate) fn parse_index(bytes: &[u8]) -> Result<Vec<WebListing>, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if v.get("format").and_then(|f| f.as_u64()) != Some(u64::from(crate::snapshot::INDEX_FORMAT)) {
        return Err("not index format 1".into());
    }
    let list = v
        .get("snapshots")
        .and_then(|s| s.as_array())
        .ok_or("no snapshot list")?;
    if list.len() > MAX_INDEX_SNAPSHOTS {
        return Err(format!("{} snapshots, more than allowed", list.len()));
    }
    list.iter().map(parse_listing).collect()
}

fn parse_listing(e: &serde_json::Value) -> Result<WebListing, String> {
    let num = |name: &str| {
        e.get(name)
            .and_then(|v| v.as_u64())
            .ok_or(format!("no {name}"))
    };
    let text = |v: &serde_json::Value, name: &str| {
        v.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or(format!("no {name}"))
    };
    let digest = |v: &serde_json::Value, name: &str| -> Result<[u8; 32], String> {
        text(v, name)?
            .parse::<ContentRoot>()
            .map(|digest| digest.0)
            .map_err(|_| format!("{name} is not 64 hex digits"))
    };
    let path = text(e, "path")?;
    if path.is_empty()
        || path.len() > 128
        || path.starts_with('.')
        || !path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("path {path:?} is not a snapshot directory name"));
    }
    let kind = match text(e, "kind")?.as_str() {
        "full" => SnapshotKind::Full,
        "incremental" => SnapshotKind::Incremental,
        other => return Err(format!("kind {other:?}")),
    };
    let base = match e.get("base") {
        None | Some(serde_json::Value::Null) => None,
        Some(b) => Some(Base {
            slot: b
                .get("slot")
                .and_then(|v| v.as_u64())
                .ok_or("no base slot")?,
            bank_hash: BankHash(digest(b, "bank_hash")?),
            content_root: ContentRoot(digest(b, "content_root")?),
        }),
    };
    let slot = num("slot")?;
    if (kind == SnapshotKind::Incremental) != base.is_some()
        || base.as_ref().is_some_and(|b| b.slot >= slot)
    {
        return Err(format!("the base of slot {slot} does not fit its kind"));
    }
    let chunk_size = ChunkSize::new(num("chunk_size")?).map_err(|e| e.to_string())?;
    let archive_size = num("archive_size")?;
    if archive_size == 0 {
        return Err("an empty archive".into());
    }
    Ok(WebListing {
        path,
        ad: SnapshotAd {
            key: SnapshotKey {
                kind,
                slot,
                bank_hash: BankHash(digest(e, "bank_hash")?),
                content_root: ContentRoot(digest(e, "content_root")?),
                archive_size,
                base,
            },
            chunk_size,
            entry_count: num("entry_count")?,
            state_bytes: num("state_bytes")?,
        },
        attestations: parse_attestations(e)?,
    })
}

/// The listing's attestations: absent is none; at most
/// [`MAX_ATTESTATIONS`](crate::snapshot::MAX_ATTESTATIONS), each a signer key and signature in
/// hex.
fn parse_attestations(e: &serde_json::Value) -> Result<Vec<crate::snapshot::Attestation>, String> {
    let list = match e.get("attestations") {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(v) => v.as_array().ok_or("attestations is not a list")?,
    };
    if list.len() > crate::snapshot::MAX_ATTESTATIONS {
        return Err(format!("{} attestations, more than allowed", list.len()));
    }
    list.iter()
        .map(|a| {
            let field = |name: &str| {
                a.get(name)
                    .and_then(|v| v.as_str())
                    .ok_or(format!("no attestation {name}"))
            };
            crate::snapshot::Attestation::from_hex(field("signer")?, field("signature")?)
                .map_err(|e| e.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_the_publisher_writes_is_read_back_and_bad_ones_are_refused() {
        let m = crate::snapshot::manifest::sample(SnapshotKind::Incremental);
        let json =
            crate::snapshot::publish::index_json(&[("incr-150".into(), m.clone(), Vec::new())]);
        let listed = parse_index(json.as_bytes()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, "incr-150");
        assert_eq!(listed[0].ad, SnapshotAd::of(&m));
        for bad in [
            json.replace("\"format\":1", "\"format\":2"),
            json.replace("incr-150", "../etc"),
            json.replace("\"kind\":\"incremental\"", "\"kind\":\"full\""),
            json.replace("\"chunk_size\":16384", "\"chunk_size\":3"),
            json.replace(&"02".repeat(32), "zz"),
            // 64 bytes, not 64 hex digits (a byte-wise slice would split a character).
            json.replace(&"02".repeat(32), &"\u{e9}".repeat(32)),
            json.replace(&"02".repeat(32), &"+2".repeat(32)),
            "not json".to_string(),
        ] {
            assert!(parse_index(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(WebSource::new("ftp://x/").is_err());
        assert_eq!(
            WebSource::new("http://127.0.0.1:1/snaps").unwrap().base(),
            "http://127.0.0.1:1/snaps/"
        );
    }
}
