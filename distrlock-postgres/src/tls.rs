//! [`TlsConfig`]: TLS through rustls (feature `tls`).

use std::fmt;
use std::sync::Arc;

use distrlock_core::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// How much of the server's certificate a TLS connection checks, in libpq's
/// terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsVerify {
    /// The certificate chains to a trusted root and names the host connected
    /// to (libpq's `sslmode=verify-full`). The default.
    #[default]
    Full,
    /// The certificate chains to a trusted root, whatever host it names
    /// (libpq's `sslmode=verify-ca`).
    Chain,
    /// Nothing: the connection is encrypted, but a man in the middle who can
    /// redirect it can read it (libpq's `sslmode=require` and `prefer`). The
    /// handshake's signatures are still checked against the certificate the
    /// server presents.
    Nothing,
}

/// Which certificate authorities a TLS connection trusts, and how much it
/// verifies.
///
/// By default the server's certificate and host name are verified (like libpq's
/// `sslmode=verify-full`). Use [`TlsConfig::webpki_roots`] for servers with a
/// publicly trusted certificate (add [`with_system_roots`](Self::with_system_roots)
/// for the host's own store), or [`TlsConfig::from_pem`] with your provider's CA
/// bundle (Amazon RDS, Cloud SQL, Azure and most managed services publish one);
/// [`verify`](Self::verify) relaxes the check, and [`TlsConfig::unverified`]
/// encrypts without checking anything.
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
    verify: TlsVerify,
}

impl TlsConfig {
    /// Trusts the Mozilla root certificates (bundled, from `webpki-roots`).
    pub fn webpki_roots() -> Self {
        Self {
            roots: Arc::new(rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }),
            verify: TlsVerify::Full,
        }
    }

    /// Encrypts without verifying the server's certificate ([`TlsVerify::Nothing`]),
    /// and so without loading any root certificate.
    pub fn unverified() -> Self {
        Self {
            roots: Arc::new(rustls::RootCertStore::empty()),
            verify: TlsVerify::Nothing,
        }
    }

    /// Trusts only the certificates in this PEM bundle.
    ///
    /// Returns [`Error::InvalidConfig`] if the bundle holds no usable certificate.
    pub fn from_pem(pem: &[u8]) -> Result<Self> {
        Self {
            roots: Arc::new(rustls::RootCertStore::empty()),
            verify: TlsVerify::Full,
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

    /// Also trusts the host's root certificates: the system store
    /// (`/etc/ssl/certs` and the files `SSL_CERT_FILE` and `SSL_CERT_DIR` name,
    /// on Linux), through `rustls-native-certs`. Certificates the store holds but
    /// rustls cannot parse are skipped, and so is a store that cannot be read:
    /// the certificates already trusted stay.
    pub fn with_system_roots(mut self) -> Self {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::debug!(%error, "skipped part of the system's certificate store");
        }
        let roots = Arc::make_mut(&mut self.roots);
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system root certificates");
        self
    }

    /// How much of the server's certificate to verify (default
    /// [`TlsVerify::Full`]).
    pub fn verify(mut self, verify: TlsVerify) -> Self {
        self.verify = verify;
        self
    }

    /// How much of the server's certificate is verified.
    pub fn verification(&self) -> TlsVerify {
        self.verify
    }

    /// How many certificate authorities are trusted.
    pub fn root_count(&self) -> usize {
        self.roots.len()
    }

    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect> {
        Ok(MakeRustlsConnect::new(self.client_config()?))
    }

    /// The rustls client configuration of this TLS setup.
    fn client_config(&self) -> Result<rustls::ClientConfig> {
        let setup_failed = |e: &dyn fmt::Display| Error::InvalidConfig {
            reason: format!("TLS setup failed: {e}"),
        };
        // The ring provider, chosen here, so no process-wide default is needed.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup_failed(&e))?;
        let config = match self.verify {
            TlsVerify::Full => builder.with_root_certificates(self.roots.clone()),
            TlsVerify::Chain => {
                let inner =
                    WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider)
                        .build()
                        .map_err(|e| setup_failed(&e))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
            }
            TlsVerify::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(
                    provider.signature_verification_algorithms,
                ))),
        };
        Ok(config.with_no_client_auth())
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("roots", &self.roots.len())
            .field("verify", &self.verify)
            .finish()
    }
}

/// [`TlsVerify::Chain`]: webpki's verification, less its host-name check.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain (and its validity period) before the name, so
        // a name error means everything else passed.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// [`TlsVerify::Nothing`]: any certificate is accepted; the handshake's
/// signatures must still be made with its key.
#[derive(Debug)]
struct NoCertificateCheck(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verification_mode_builds_a_client_config() {
        for tls in [
            TlsConfig::webpki_roots(),
            TlsConfig::webpki_roots().verify(TlsVerify::Chain),
            TlsConfig::unverified(),
            TlsConfig::webpki_roots().with_system_roots(),
        ] {
            tls.client_config().unwrap();
        }
        assert_eq!(TlsConfig::unverified().root_count(), 0);
        assert_eq!(TlsConfig::unverified().verification(), TlsVerify::Nothing);
        let shown = format!("{:?}", TlsConfig::webpki_roots().verify(TlsVerify::Chain));
        assert!(shown.contains("Chain"), "{shown}");
    }
}
