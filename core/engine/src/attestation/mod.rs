//! Attestation: how a device proves who it is. Symmetric keys (individual and group-derived),
//! X.509 chains, and TPM types.

pub mod symmetric;
pub mod tpm;
pub mod x509;

/// A credential as the transport extracted it from the connection or request.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// Nothing presented (first TPM call, or an anonymous request).
    None,
    /// A SAS token (MQTT password or HTTP `Authorization` header), unparsed.
    Sas(String),
    /// The DER certificates the client presented in the TLS handshake, leaf first.
    X509(Vec<Vec<u8>>),
}

impl std::fmt::Debug for Credential {
    /// Never prints token signatures.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::None => f.write_str("None"),
            Credential::Sas(_) => f.write_str("Sas(<redacted>)"),
            Credential::X509(chain) => write!(f, "X509({} certificates)", chain.len()),
        }
    }
}
