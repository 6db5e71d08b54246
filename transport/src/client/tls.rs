//! The rustls client configuration of the device client (ring provider, TLS 1.2 and 1.3).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::ClientError;

/// Trust anchors for the server certificate.
pub(crate) enum Roots<'a> {
    /// Only the certificates of this PEM (a self-hosted server's CA).
    Pem(&'a [u8]),
    /// The operating system's store (real Azure).
    Native,
}

/// A client certificate chain (leaf first) and its private key, both PEM.
pub(crate) struct Identity<'a> {
    pub(crate) chain_pem: &'a [u8],
    pub(crate) key_pem: &'a [u8],
}

/// Builds the rustls configuration; `alpn` is offered as given (HTTPS offers `http/1.1`).
pub(crate) fn client_config(
    roots: Roots<'_>,
    identity: Option<Identity<'_>>,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, ClientError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::Pem(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ClientError::Config(format!("CA PEM: {e}")))?;
                store.add(cert).map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
            }
        }
        Roots::Native => {
            // Unreadable entries of the system store are skipped; an empty store is the error.
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
    }
    if store.is_empty() {
        return Err(ClientError::Config(
            "no trusted CA certificate (give a CA PEM or install system roots)".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS versions: {e}")))?
        .with_root_certificates(store);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.chain_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Config(format!("device certificate PEM: {e}")))?;
            if chain.is_empty() {
                return Err(ClientError::Config("the device certificate PEM holds no certificate".into()));
            }
            let key = PrivateKeyDer::from_pem_slice(id.key_pem)
                .map_err(|e| ClientError::Config(format!("device key PEM: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Config(format!("device certificate and key: {e}")))?
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}
