//! How the backend's connections are opened: in plain text or over TLS, for
//! the pool and for the release listener alike.

use distrlock_core::Result;

use crate::config::PostgresConfig;

/// How the backend's own connections are opened.
#[derive(Clone)]
pub(crate) enum Connector {
    Plain,
    #[cfg(feature = "tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    /// The connector for `pg`, one of `config`'s connections.
    pub(crate) fn for_config(config: &PostgresConfig, pg: &tokio_postgres::Config) -> Result<Self> {
        #[cfg(feature = "tls")]
        {
            if let Some(tls) = &config.tls {
                return Ok(Connector::Rustls(tls.connector()?));
            }
            if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                return Ok(Connector::Rustls(
                    crate::tls::TlsConfig::webpki_roots().connector()?,
                ));
            }
        }
        let _ = (config, pg);
        Ok(Connector::Plain)
    }
}
