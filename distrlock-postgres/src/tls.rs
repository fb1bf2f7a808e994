//! [`TlsConfig`]: TLS through rustls (feature `tls`).

use std::fmt;
use std::sync::Arc;

use distrlock_core::{Error, Result};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Which certificate authorities a TLS connection trusts.
///
/// The server's certificate and host name are always verified (like libpq's
/// `sslmode=verify-full`). Use [`TlsConfig::webpki_roots`] for servers with a
/// publicly trusted certificate, or [`TlsConfig::from_pem`] with your provider's CA
/// bundle (Amazon RDS, Cloud SQL, Azure and most managed services publish one).
///
/// ```
/// use distrlock_postgres::{PostgresConfig, TlsConfig};
///
/// let config = PostgresConfig::builder()
///     .url("postgres://app@db.example.com/app?sslmode=require")
///     .tls(TlsConfig::webpki_roots())
///     .build()
///     .unwrap();
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    roots: Arc<rustls::RootCertStore>,
}

impl TlsConfig {
    /// Trusts the Mozilla root certificates (bundled, from `webpki-roots`).
    pub fn webpki_roots() -> Self {
        Self {
            roots: Arc::new(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }),
        }
    }

    /// Trusts only the certificates in this PEM bundle.
    ///
    /// Returns [`Error::InvalidConfig`] if the bundle holds no usable certificate.
    pub fn from_pem(pem: &[u8]) -> Result<Self> {
        Self {
            roots: Arc::new(rustls::RootCertStore::empty()),
        }
        .add_pem(pem)
    }

    /// Also trusts the certificates in this PEM bundle.
    ///
    /// Returns [`Error::InvalidConfig`] if the bundle holds no usable certificate.
    pub fn add_pem(mut self, pem: &[u8]) -> Result<Self> {
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            certs.push(cert.map_err(|e| Error::InvalidConfig {
                reason: format!("unreadable PEM certificate: {e}"),
            })?);
        }
        let roots = Arc::make_mut(&mut self.roots);
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(Error::InvalidConfig {
                reason: "the PEM bundle holds no usable certificate".into(),
            });
        }
        Ok(self)
    }

    /// How many certificate authorities are trusted.
    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect> {
        // The ring provider, chosen here, so no process-wide default is needed.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::InvalidConfig {
                reason: format!("TLS setup failed: {e}"),
            })?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("roots", &self.roots.len())
            .finish()
    }
}
