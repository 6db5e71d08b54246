//! The rustls client configuration of the device client (ring provider, TLS 1.2 and 1.3).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use zerotouch_engine::attestation::x509::Certificate;
use zerotouch_proto::Timestamp;

use super::ClientError;

/// Trust anchors for the server certificate.
pub(crate) enum Roots<'a> {
    /// Only the certificates of this PEM (a self-hosted server's CA), read from `file` when
    /// given (named in errors).
    Pem { pem: &'a [u8], file: Option<&'a Path> },
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
        Roots::Pem { pem, file } => {
            let source =
                file.map_or_else(|| "the CA PEM".to_owned(), |f| format!("the CA file {}", f.display()));
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ClientError::Config(format!("{source}: {e}")))?;
                store
                    .add(cert.clone())
                    .map_err(|e| ClientError::Config(format!("{source}: CA certificate: {e}")))?;
                pinned.push(cert);
            }
            if store.is_empty() {
                let message = match file {
                    Some(_) => format!("{source} holds no PEM certificate"),
                    None => format!("{source} holds no certificate"),
                };
                return Err(ClientError::Config(message));
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
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
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
            builder.with_client_cert_resolver(Arc::new(DeviceIdentity::new(chain, key, &provider)?))
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The device's certificate chain and key, offered to every server that asks. Built here rather
/// than by `with_client_auth_cert`, whose key check reads the leaf with webpki and so refuses a
/// version 1 certificate (no extensions), which OpenSSL up to 3.1 issues by default and which a
/// DPS service takes; the key is checked against the leaf's public key instead.
#[derive(Debug)]
struct DeviceIdentity(Arc<CertifiedKey>);

impl DeviceIdentity {
    fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Self, ClientError> {
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| ClientError::Config(format!("device key: {e}")))?;
        let leaf = chain.first().map(|c| Certificate::from_der(c.as_ref()));
        let leaf = leaf
            .transpose()
            .map_err(|e| ClientError::Config(format!("device certificate: {e}")))?
            .ok_or_else(|| ClientError::Config("the device certificate PEM holds no certificate".into()))?;
        // A key type whose public half rustls cannot derive goes unchecked here; the server's
        // check of the handshake signature still refuses a key that does not match.
        if signing.public_key().is_some_and(|public| public.as_ref() != leaf.spki_der()) {
            return Err(ClientError::Config(
                "device certificate and key: the key is not the certificate's".into(),
            ));
        }
        Ok(Self(Arc::new(CertifiedKey::new(chain, signing))))
    }
}

impl ResolvesClientCert for DeviceIdentity {
    fn resolve(&self, _root_hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use zerotouch_testkit::certs::{x509_v1, TestCa};

    use super::*;

    fn config(chain_pem: &str, key_pem: &str) -> Result<Arc<ClientConfig>, ClientError> {
        let ca = TestCa::root("server root");
        let identity = Identity { chain_pem: chain_pem.as_bytes(), key_pem: key_pem.as_bytes() };
        client_config(Roots::Pem { pem: ca.pem().as_bytes(), file: None }, Some(identity), &[])
    }

    #[test]
    fn a_version_1_certificate_with_its_key_is_accepted_and_a_foreign_key_is_named() {
        assert!(config(x509_v1::DEVICE_PEM, x509_v1::DEVICE_KEY_PEM).is_ok());
        let other = TestCa::root("other").device("d");
        let Err(ClientError::Config(message)) = config(x509_v1::DEVICE_PEM, other.key_pem()) else {
            panic!("a key that is not the certificate's was accepted");
        };
        assert!(message.contains("the key is not the certificate's"), "{message}");
        // The same for a version 3 certificate.
        assert!(config(other.pem(), other.key_pem()).is_ok());
        assert!(config(other.pem(), x509_v1::DEVICE_KEY_PEM).is_err());
    }
}
