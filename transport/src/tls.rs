//! TLS for the device listeners: a rustls server (ring, TLS 1.2 and 1.3) that asks for, but does not require, a client certificate.
//!
//! The client certificate chain is not checked against a trust store here: group CAs live in
//! enrollments, so the engine's X.509 attestation decides. The handshake still proves the
//! client holds the leaf's private key, because the verifier checks the handshake signatures.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use zerotouch_engine::attestation::x509::Certificate;

/// Why a TLS server configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The certificate PEM holds no `CERTIFICATE` block, or a block is malformed.
    #[error("bad certificate chain PEM: {0}")]
    Certificates(String),
    /// The key PEM holds no usable private key (PKCS#8, PKCS#1 or SEC1).
    #[error("bad private key PEM: {0}")]
    PrivateKey(String),
    /// rustls refused the configuration (for example the key does not fit the certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every listener uses: ring, chosen explicitly so no process-wide default
/// (and no aws-lc) is ever needed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server configuration from a PEM certificate chain (leaf first) and a PEM private key.
///
/// # Errors
/// [`TlsError::Certificates`] / [`TlsError::PrivateKey`] when the PEM is unusable,
/// [`TlsError::Rustls`] when rustls rejects the pair.
pub fn server_config_from_pem(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificates(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::Certificates("no CERTIFICATE block".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::PrivateKey(e.to_string()))?;
    server_config(chain, key)
}

/// A server configuration from a PEM certificate chain file and a PEM private key file.
///
/// # Errors
/// [`TlsError::Io`] when a file cannot be read, otherwise as [`server_config_from_pem`].
pub fn server_config_from_files(cert_chain: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| TlsError::Io { path: path.to_owned(), source });
    server_config_from_pem(&read(cert_chain)?, &read(key)?)
}

/// A server configuration from DER certificates (leaf first) and a private key: ring, TLS 1.2
/// and 1.3, client certificates requested but optional (see [`EngineClientCertVerifier`]).
///
/// No ALPN protocols: the HTTPS listener sets `http/1.1` on its copy, MQTT needs none.
///
/// # Errors
/// [`TlsError::Rustls`] when the key does not match the certificate or is unsupported.
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM with SHA-256 first, whatever the client prefers: every TLS 1.3 client
    // supports it (RFC 8446 §9.1), and SHA-256 runs on the CPU's SHA extensions where SHA-384
    // (the AES-256 suite's hash) has none, which made the handshake's transcript hashing and
    // key schedule a tenth of the server's CPU per connection.
    provider.cipher_suites.sort_by_key(|suite| !prefers_sha256(suite.suite()));
    let provider = Arc::new(provider);
    let verifier = Arc::new(EngineClientCertVerifier::new(&provider));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert_chain, key)?;
    config.ignore_client_order = true;
    // No TLS 1.3 session tickets: a device connects once per registration, and the SDKs do
    // not resume; each ticket cost random bytes, a cache entry and a record per connection.
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The AES-128-GCM / SHA-256 suites, which the server prefers.
fn prefers_sha256(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite as S;
    matches!(
        suite,
        S::TLS13_AES_128_GCM_SHA256
            | S::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | S::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

/// Requests a client certificate, accepts the connection without one, and accepts any chain
/// whose leaf key signed the handshake.
///
/// No root hints are sent, so devices offer whatever certificate they were configured with;
/// the chain is validated later by the engine against the enrollments.
#[derive(Debug)]
pub struct EngineClientCertVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl EngineClientCertVerifier {
    /// A verifier checking handshake signatures with `provider`'s algorithms.
    pub fn new(provider: &CryptoProvider) -> Self {
        Self { algorithms: provider.signature_verification_algorithms }
    }
}

impl ClientCertVerifier for EngineClientCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Deliberately no chain check: trust anchors come from enrollments (engine).
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
            .or_else(|e| verify_with_certificate_key(e, message, cert, dss, &self.algorithms, false))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
            .or_else(|e| verify_with_certificate_key(e, message, cert, dss, &self.algorithms, true))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The handshake signature check for a client certificate that webpki would not read as an end
/// entity (`error` is why): a version 1 certificate, without extensions, which OpenSSL up to 3.1
/// issues by default (`openssl x509 -req` without `-extfile`) and devices present as they were
/// made. Its key is read with the engine's parser and checks the signature as webpki would; whether
/// the certificate is trusted is the engine's decision, against the enrollments. A signature that
/// does not verify, or a certificate neither parser reads, is refused with webpki's `error`.
fn verify_with_certificate_key(
    error: rustls::Error,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
    tls13: bool,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if !matches!(&error, rustls::Error::InvalidCertificate(e) if *e != CertificateError::BadSignature) {
        return Err(error);
    }
    let Ok(parsed) = Certificate::from_der(cert.as_ref()) else { return Err(error) };
    let spki = SubjectPublicKeyInfoDer::from(parsed.spki_der());
    if tls13 {
        return rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, algorithms);
    }
    // As rustls's TLS 1.2 check: the scheme may map to several algorithms; one must verify.
    let Ok(key) = webpki::RawPublicKeyEntity::try_from(&spki) else { return Err(error) };
    let candidates = algorithms.mapping.iter().filter(|(scheme, _)| *scheme == dss.scheme);
    for algorithm in candidates.flat_map(|(_, algorithms)| algorithms.iter()) {
        if key.verify_signature(*algorithm, message, dss.signature()).is_ok() {
            return Ok(HandshakeSignatureValid::assertion());
        }
    }
    Err(rustls::Error::InvalidCertificate(CertificateError::BadSignature))
}

/// The certificates the client presented in the handshake, leaf first, as DER (empty when it
/// sent none): what [`zerotouch_engine::attestation::Credential::X509`] carries.
pub fn peer_chain<IO>(stream: &tokio_rustls::server::TlsStream<IO>) -> Vec<Vec<u8>> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|certs| certs.iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default()
}

/// Completes the TLS handshake of an accepted connection by `deadline`: the stream and the
/// client's certificate chain (leaf first, DER; empty without one), or `None` after logging why
/// the handshake failed or timed out.
pub async fn accept_by(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    deadline: tokio::time::Instant,
) -> Option<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Vec<Vec<u8>>)> {
    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            let chain = peer_chain(&tls);
            Some((tls, chain))
        }
        Ok(Err(e)) => {
            // A device that refuses the server's certificate (wrong name, CA it does not trust)
            // or shares no protocol version or cipher suite with it is what an operator looks
            // for when devices cannot connect: at info, within the log budget. Connections that
            // just close (port probes, health checks) stay at debug.
            match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                Some(
                    tls @ (rustls::Error::AlertReceived(_)
                    | rustls::Error::PeerIncompatible(_)
                    | rustls::Error::NoApplicationProtocol),
                ) if crate::limits::CLIENT_LOG.allows() => {
                    tracing::info!(error = %tls, "TLS handshake refused by the client, or without a common protocol");
                }
                _ => tracing::debug!(error = %e, "TLS handshake failed"),
            }
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// The accept loop both device listeners (MQTT/TLS and HTTPS) share: accepts on `listener`
/// until `shutdown` completes, closes connections beyond [`Limits::max_connections`], gives each
/// one [`Limits::connect_timeout`] for its TLS handshake, then runs `handle` (stream, client
/// chain, the CONNECT deadline, a receiver that turns `true` at shutdown, the connection's slot
/// of [`Limits::max_connections`], which frees when dropped: a handler whose connection lives on
/// elsewhere, as an upgraded WebSocket does, moves it there) in a task of its own,
/// inside the span `span` makes. At shutdown it stops accepting and gives open connections, and
/// whatever else holds a shutdown receiver (WebSocket bridges), [`Limits::shutdown_grace`].
///
/// [`Limits::max_connections`]: crate::limits::Limits::max_connections
/// [`Limits::connect_timeout`]: crate::limits::Limits::connect_timeout
/// [`Limits::shutdown_grace`]: crate::limits::Limits::shutdown_grace
#[cfg(any(feature = "mqtt", feature = "http"))]
pub(crate) async fn serve_listener<F, H, Fut>(
    kind: &'static str,
    listener: tokio::net::TcpListener,
    tls: Arc<ServerConfig>,
    limits: &crate::limits::Limits,
    shutdown: F,
    span: fn(std::net::SocketAddr) -> tracing::Span,
    handle: H,
) where
    F: std::future::Future<Output = ()> + Send,
    H: Fn(
            tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
            Vec<Vec<u8>>,
            tokio::time::Instant,
            tokio::sync::watch::Receiver<bool>,
            crate::limits::AdmissionPermit,
        ) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument as _;

    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, kind, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(slot) = limits.admit_connection(peer) else { continue };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let deadline = tokio::time::Instant::now() + limits.connect_timeout;
                let mut stop = stop_rx.clone();
                let handle = handle.clone();
                connections.spawn(
                    async move {
                        // A handshake still under way when the server stops is not waited for.
                        let accepted = tokio::select! {
                            accepted = accept_by(&acceptor, tcp, deadline) => accepted,
                            _ = stop.wait_for(|stopping| *stopping) => None,
                        };
                        let Some((tls, chain)) = accepted else { return };
                        handle(tls, chain, deadline, stop, slot).await;
                    }
                    .instrument(span(peer)),
                );
            }
        }
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
        stop_tx.closed().await;
    })
    .await;
    if drained.is_err() {
        tracing::info!(open = connections.len(), kind, "shutdown grace over; closing remaining connections");
        connections.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_without_a_certificate_is_refused() {
        let err = server_config_from_pem(b"", b"").unwrap_err();
        assert!(matches!(err, TlsError::Certificates(_)), "{err}");
    }

    #[test]
    fn missing_key_file_error_names_the_file() {
        let missing = Path::new("/nonexistent/zerotouch/server.key");
        let err = server_config_from_files(missing, missing).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/zerotouch/server.key"), "{err}");
    }

    #[test]
    fn listener_offers_but_does_not_require_client_certificates_and_sends_no_hints() {
        let verifier = EngineClientCertVerifier::new(&provider());
        assert!(verifier.offer_client_auth());
        assert!(!verifier.client_auth_mandatory());
        assert!(verifier.root_hint_subjects().is_empty());
        assert!(verifier.supported_verify_schemes().contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
    }
}
