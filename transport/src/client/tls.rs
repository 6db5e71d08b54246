//! The rustls client configuration of the device client (ring provider, TLS 1.2 and 1.3).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use zerotouch_engine::attestation::x509::Certificate;
use zerotouch_proto::Timestamp;

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
    let mut pinned = Vec::new();
    match roots {
        Roots::Pem(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ClientError::Config(format!("CA PEM: {e}")))?;
                store.add(cert.clone()).map_err(|e| ClientError::Config(format!("CA certificate: {e}")))?;
                pinned.push(cert);
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
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), Arc::clone(&provider))
        .build()
        .map_err(|e| ClientError::Config(format!("CA certificates: {e}")))?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustedOrChained { webpki, pinned }));
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

/// The server certificate check: a chain to one of the trusted CAs (webpki), or, as OpenSSL and
/// so the Python SDK accept it, the very certificate given as trusted presented as the server's
/// own, as `openssl req -x509` makes one (a self-signed certificate marked CA, which webpki
/// refuses as an end entity). Either way the host name and the validity period must fit, and
/// the handshake's signature is checked with the presented key.
#[derive(Debug)]
struct TrustedOrChained {
    webpki: Arc<WebPkiServerVerifier>,
    /// The certificates of the CA PEM, as given.
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for TrustedOrChained {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if !self.pinned.iter().any(|trusted| trusted.as_ref() == end_entity.as_ref()) {
            return self.webpki.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
        }
        rustls::client::verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
        let cert = Certificate::from_der(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let now = Timestamp::from_unix_secs(i64::try_from(now.as_secs()).unwrap_or(i64::MAX));
        cert.check_validity(now).map_err(|e| {
            rustls::Error::InvalidCertificate(match e {
                zerotouch_engine::AuthError::CertificateNotYetValid => CertificateError::NotValidYet,
                _ => CertificateError::Expired,
            })
        })?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
