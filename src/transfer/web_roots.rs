//! Which certificate authorities HTTPS web sources are checked against: [`WebRoots`].
//!
//! Operators run mirrors behind the public CAs, behind their company's private CA, or trust
//! what the OS trusts. A node checks a server against the Mozilla roots (`webpki-roots`), the
//! OS's trust store (read with `rustls-native-certs`, which honours `SSL_CERT_FILE` and
//! `SSL_CERT_DIR`) and any CA bundle its owner gives (PEM files).

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why a CA bundle could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootsError {
    /// The bundle could not be read or holds no certificate in PEM.
    #[error("CA bundle {path}: {message}")]
    Bundle {
        /// The bundle.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The TLS client could not be set up with these roots.
    #[error("TLS client: {0}")]
    Tls(String),
}

/// The certificate authorities HTTPS web sources are checked against, built once and shared by
/// every source of a node.
#[derive(Clone)]
pub struct WebRoots {
    config: Arc<rustls::ClientConfig>,
    count: usize,
}

impl std::fmt::Debug for WebRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebRoots")
            .field("certificates", &self.count)
            .finish()
    }
}

/// Most bytes of a CA bundle read (a system bundle is about 200 KiB).
const MAX_BUNDLE_BYTES: u64 = 16 << 20;

impl WebRoots {
    /// The Mozilla roots, the OS's trust store, and the CA certificates of every PEM bundle in
    /// `ca_files`. A bundle that cannot be read, or holds no certificate, is an error naming
    /// it; a certificate of the OS's store that cannot be parsed is skipped.
    pub fn new(ca_files: &[PathBuf]) -> Result<Self, RootsError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let native = rustls_native_certs::load_native_certs();
        if !native.errors.is_empty() {
            tracing::debug!(target: crate::log::DOWNLOAD, errors = native.errors.len(), "some of the OS's certificates could not be read");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        tracing::debug!(target: crate::log::DOWNLOAD, added, ignored, "the OS's trust store read");
        for path in ca_files {
            for cert in read_bundle(path)? {
                roots.add(cert).map_err(|e| RootsError::Bundle {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
        }
        let count = roots.len();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| RootsError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            config: Arc::new(config),
            count,
        })
    }

    /// How many CA certificates are trusted.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether none is (never: the Mozilla roots are always there).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The TLS client settings.
    pub(crate) fn client_config(&self) -> rustls::ClientConfig {
        (*self.config).clone()
    }
}

/// The certificates of a PEM bundle, read with a bound.
fn read_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, RootsError> {
    let bad = |message: String| RootsError::Bundle {
        path: path.to_path_buf(),
        message,
    };
    // Read with a bound whatever the file is (a FIFO or a device says nothing of its length).
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_BUNDLE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(bad(format!(
            "more than the {MAX_BUNDLE_BYTES} bytes allowed"
        )));
    }
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_that_is_missing_empty_or_not_pem_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = WebRoots::new(std::slice::from_ref(&missing)).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, b"just text\n").unwrap();
        let err = WebRoots::new(std::slice::from_ref(&empty)).unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
        let broken = dir.path().join("broken.pem");
        std::fs::write(
            &broken,
            b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = WebRoots::new(std::slice::from_ref(&broken)).unwrap_err();
        assert!(err.to_string().contains("broken.pem"), "{err}");
    }

    #[test]
    fn the_mozilla_roots_are_always_trusted() {
        let roots = WebRoots::new(&[]).unwrap();
        assert!(roots.len() >= webpki_roots::TLS_SERVER_ROOTS.len());
    }
}
