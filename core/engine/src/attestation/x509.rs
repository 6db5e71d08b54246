//! X.509 attestation primitives: certificate parsing, chain signatures, validity, proof of possession.
//!
//! Certificates are parsed once into an owned [`Certificate`] (cheap to clone) that keeps the DER
//! and the fields attestation needs. Signatures are checked through
//! [`CryptoProvider::verify_signature`] over the to-be-signed bytes exactly as they appear in
//! the DER, so no re-encoding can change what is verified. Revocation is not checked here: DPS revokes by disabling enrollments (spec §5.2).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use x509_cert::der::asn1::{
    BmpString, ContextSpecific, Ia5StringRef, ObjectIdentifier, PrintableStringRef, TeletexStringRef,
    Utf8StringRef,
};
use x509_cert::der::oid::db::{rfc4519, rfc5280, rfc5912};
use x509_cert::der::{
    Decode, DecodeValue, Encode, FixedTag, Header, Reader, SliceReader, Tag, TagNumber, Tagged,
};
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
use x509_cert::name::Name;
use x509_cert::spki::AlgorithmIdentifierOwned;
use zerotouch_proto::service::X509CertificateInfo;
use zerotouch_proto::Timestamp;

use crate::crypto::{CryptoProvider, SignatureAlgorithm};
use crate::error::AuthError;

/// Largest certificate accepted, in DER bytes; real device and CA certificates are a few KiB.
pub const MAX_CERTIFICATE_LEN: usize = 64 * 1024;

/// Most certificates accepted in one presented chain (leaf included).
pub const MAX_CHAIN_LEN: usize = 16;

/// Length in bytes of the randomness a verification code is made from (48 hex digits).
const VERIFICATION_CODE_BYTES: usize = 24;

/// An owned, parsed X.509 certificate. Cloning shares the parsed data.
///
/// Equality and hashing compare the DER encoding.
#[derive(Clone)]
pub struct Certificate {
    inner: Arc<Inner>,
}

struct Inner {
    der: Vec<u8>,
    /// The `tbsCertificate` TLV inside `der`: what the issuer signed.
    tbs: Range<usize>,
    /// `signatureAlgorithm` of the outer certificate.
    signature_algorithm: AlgorithmIdentifierOwned,
    signature: Vec<u8>,
    subject_name: String,
    issuer_name: String,
    common_name: Option<String>,
    not_before: Timestamp,
    not_after: Timestamp,
    serial: Vec<u8>,
    version: i32,
    /// Algorithm of the subject's key (with EC curve parameters).
    key_algorithm: AlgorithmIdentifierOwned,
    /// Contents of the `subjectPublicKey` BIT STRING.
    public_key: Vec<u8>,
    /// DER of the whole SubjectPublicKeyInfo, to recognise the same key in two certificates.
    spki_der: Vec<u8>,
    basic_constraints: Option<BasicConstraints>,
    key_usage: Option<KeyUsage>,
    /// Whether extendedKeyUsage (when present) allows TLS client authentication.
    client_auth_allowed: bool,
    /// A critical extension this verifier does not process (RFC 5280 §4.2: such a certificate
    /// must be rejected).
    unknown_critical: Option<String>,
}

fn invalid(msg: impl Into<String>) -> AuthError {
    AuthError::InvalidCertificate(msg.into())
}

fn malformed(e: x509_cert::der::Error) -> AuthError {
    invalid(format!("malformed certificate: {e}"))
}

impl Certificate {
    /// Parses one DER-encoded certificate.
    ///
    /// # Errors
    /// [`AuthError::InvalidCertificate`] when the bytes are not exactly one well-formed X.509
    /// certificate, are larger than [`MAX_CERTIFICATE_LEN`], or carry a malformed extension.
    pub fn from_der(der: &[u8]) -> Result<Certificate, AuthError> {
        if der.is_empty() {
            return Err(invalid("empty certificate"));
        }
        if der.len() > MAX_CERTIFICATE_LEN {
            return Err(invalid(format!("certificate of {} bytes is too large", der.len())));
        }
        let parsed = x509_cert::Certificate::from_der(der).map_err(malformed)?;
        let tbs = tbs_range(der).map_err(malformed)?;
        let tbs_cert = &parsed.tbs_certificate;
        if tbs_cert.signature != parsed.signature_algorithm {
            return Err(invalid("the signature algorithm inside the certificate differs from the outer one"));
        }
        let signature = parsed
            .signature
            .as_bytes()
            .ok_or_else(|| invalid("signature is not a whole number of bytes"))?
            .to_vec();
        let spki = &tbs_cert.subject_public_key_info;
        let public_key = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| invalid("public key is not a whole number of bytes"))?
            .to_vec();
        let spki_der = spki.to_der().map_err(malformed)?;

        let mut basic_constraints = None;
        let mut key_usage = None;
        let mut client_auth_allowed = true;
        let mut unknown_critical = None;
        if let Some(extensions) = &tbs_cert.extensions {
            for (i, ext) in extensions.iter().enumerate() {
                if extensions[..i].iter().any(|e| e.extn_id == ext.extn_id) {
                    return Err(invalid(format!("extension {} appears twice", ext.extn_id)));
                }
                let value = ext.extn_value.as_bytes();
                if ext.extn_id == rfc5280::ID_CE_BASIC_CONSTRAINTS {
                    basic_constraints = Some(
                        BasicConstraints::from_der(value)
                            .map_err(|e| invalid(format!("malformed basicConstraints: {e}")))?,
                    );
                } else if ext.extn_id == rfc5280::ID_CE_KEY_USAGE {
                    key_usage = Some(
                        KeyUsage::from_der(value).map_err(|e| invalid(format!("malformed keyUsage: {e}")))?,
                    );
                } else if ext.extn_id == rfc5280::ID_CE_EXT_KEY_USAGE {
                    let usages = ExtendedKeyUsage::from_der(value)
                        .map_err(|e| invalid(format!("malformed extendedKeyUsage: {e}")))?;
                    client_auth_allowed = usages
                        .0
                        .iter()
                        .any(|u| *u == rfc5280::ID_KP_CLIENT_AUTH || *u == rfc5280::ANY_EXTENDED_KEY_USAGE);
                } else if ext.critical
                    && !UNDERSTOOD_CRITICAL.contains(&ext.extn_id)
                    && unknown_critical.is_none()
                {
                    unknown_critical = Some(ext.extn_id.to_string());
                }
            }
        }

        let version = match tbs_cert.version {
            x509_cert::Version::V1 => 1,
            x509_cert::Version::V2 => 2,
            x509_cert::Version::V3 => 3,
        };

        Ok(Certificate {
            inner: Arc::new(Inner {
                der: der.to_vec(),
                tbs,
                signature_algorithm: parsed.signature_algorithm.clone(),
                signature,
                subject_name: format_name(&tbs_cert.subject),
                issuer_name: format_name(&tbs_cert.issuer),
                common_name: common_name(&tbs_cert.subject),
                not_before: to_timestamp(tbs_cert.validity.not_before),
                not_after: to_timestamp(tbs_cert.validity.not_after),
                serial: tbs_cert.serial_number.as_bytes().to_vec(),
                version,
                key_algorithm: spki.algorithm.clone(),
                public_key,
                spki_der,
                basic_constraints,
                key_usage,
                client_auth_allowed,
                unknown_critical,
            }),
        })
    }

    /// Parses a certificate given as text: one PEM `CERTIFICATE` block (explanatory text and
    /// whitespace around it are ignored) or bare base64 of the DER, as DPS enrollments carry it.
    ///
    /// # Errors
    /// [`AuthError::InvalidCertificate`] when the text holds no certificate, more than one PEM
    /// block, invalid base64, or DER that [`Certificate::from_der`] rejects.
    pub fn from_text(text: &str) -> Result<Certificate, AuthError> {
        const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
        const END: &str = "-----END CERTIFICATE-----";
        let text = text.trim();
        if text.is_empty() {
            return Err(invalid("empty certificate text"));
        }
        if text.len() > MAX_CERTIFICATE_LEN * 2 {
            return Err(invalid("certificate text is too large"));
        }
        let body = if text.contains("-----BEGIN") {
            let start =
                text.find(BEGIN).ok_or_else(|| invalid("PEM block is not a CERTIFICATE"))? + BEGIN.len();
            let rest = &text[start..];
            let end = rest.find(END).ok_or_else(|| invalid("PEM certificate has no END line"))?;
            if rest[end + END.len()..].contains("-----BEGIN") {
                return Err(invalid("expected one PEM certificate, found several"));
            }
            &rest[..end]
        } else {
            text
        };
        let compact: String = body.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let der = BASE64
            .decode(compact.as_bytes())
            .map_err(|e| invalid(format!("certificate is not base64: {e}")))?;
        Certificate::from_der(&der)
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.inner.der
    }

    /// The subject's common name (the last CN attribute when there are several), if any and
    /// readable as a string.
    pub fn common_name(&self) -> Option<&str> {
        self.inner.common_name.as_deref()
    }

    /// The subject distinguished name as an RFC 4514 string, e.g. `CN=dev1,O=Contoso`.
    pub fn subject_name(&self) -> &str {
        &self.inner.subject_name
    }

    /// The issuer distinguished name, formatted exactly like [`Certificate::subject_name`], so
    /// a child's issuer name equals its parent's subject name.
    pub fn issuer_name(&self) -> &str {
        &self.inner.issuer_name
    }

    /// Start of the validity window.
    pub fn not_before(&self) -> Timestamp {
        self.inner.not_before
    }

    /// End of the validity window (inclusive).
    pub fn not_after(&self) -> Timestamp {
        self.inner.not_after
    }

    /// Whether basicConstraints marks this certificate as a CA.
    pub fn is_ca(&self) -> bool {
        self.inner.basic_constraints.as_ref().is_some_and(|bc| bc.ca)
    }

    /// Whether subject and issuer names are the same (a root or a self-signed device certificate).
    pub fn is_self_issued(&self) -> bool {
        self.inner.subject_name == self.inner.issuer_name
    }

    /// The serial number as upper-case hex of its DER integer bytes (a leading `00` is kept).
    pub fn serial_hex(&self) -> String {
        upper_hex(&self.inner.serial)
    }

    /// Upper-case hex SHA-1 of the DER (the hub's `selfSigned` thumbprint form).
    pub fn sha1_thumbprint(&self, crypto: &dyn CryptoProvider) -> String {
        upper_hex(&crypto.sha1(&self.inner.der))
    }

    /// Upper-case hex SHA-256 of the DER.
    pub fn sha256_thumbprint(&self, crypto: &dyn CryptoProvider) -> String {
        upper_hex(&crypto.sha256(&self.inner.der))
    }

    /// The `X509CertificateInfo` the service reports for this certificate.
    pub fn info(&self, crypto: &dyn CryptoProvider) -> X509CertificateInfo {
        X509CertificateInfo {
            subject_name: self.inner.subject_name.clone(),
            sha1_thumbprint: self.sha1_thumbprint(crypto),
            sha256_thumbprint: self.sha256_thumbprint(crypto),
            issuer_name: self.inner.issuer_name.clone(),
            not_before_utc: self.inner.not_before,
            not_after_utc: self.inner.not_after,
            serial_number: self.serial_hex(),
            version: self.inner.version,
        }
    }

    /// Checks that `now` lies inside the validity window (both ends inclusive).
    ///
    /// # Errors
    /// [`AuthError::CertificateNotYetValid`] before `notBefore`, [`AuthError::CertificateExpired`]
    /// after `notAfter`.
    pub fn check_validity(&self, now: Timestamp) -> Result<(), AuthError> {
        self.check_validity_within(now, Duration::ZERO)
    }

    /// [`Certificate::check_validity`] allowing `skew` between the issuer's clock and ours on
    /// both ends of the window (a certificate minted moments ago by a clock a little ahead).
    ///
    /// # Errors
    /// As [`Certificate::check_validity`], outside the widened window.
    pub fn check_validity_within(&self, now: Timestamp, skew: Duration) -> Result<(), AuthError> {
        if now + skew < self.inner.not_before {
            Err(AuthError::CertificateNotYetValid)
        } else if now - skew > self.inner.not_after {
            Err(AuthError::CertificateExpired)
        } else {
            Ok(())
        }
    }

    /// The certificate's `SubjectPublicKeyInfo`, DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.inner.spki_der
    }

    /// Whether `other` has the same subject name and the same public key: the same issuing
    /// identity even if it was re-issued with another serial or validity.
    pub fn same_subject_and_key(&self, other: &Certificate) -> bool {
        self.inner.subject_name == other.inner.subject_name && self.inner.spki_der == other.inner.spki_der
    }

    /// Verifies that `issuer` issued this certificate: its subject name equals our issuer name
    /// and its public key verifies our signature over the to-be-signed bytes.
    ///
    /// Supported: RSA PKCS#1 v1.5 with SHA-256/384/512, RSA-PSS with SHA-256/384/512 (MGF1 with
    /// the same hash, salt length = hash length), ECDSA on P-256 and P-384 with SHA-256/384 (the
    /// curve is taken from the issuer's key). Whether `issuer` may act as a CA is checked by
    /// [`PresentedChain::verify_internal`], not here, so this also verifies self-signatures.
    ///
    /// # Errors
    /// [`AuthError::UntrustedChain`] when the names differ, [`AuthError::InvalidCertificate`]
    /// for an unsupported or inconsistent algorithm, [`AuthError::BadSignature`] when the
    /// signature does not verify.
    pub fn verify_issued_by(
        &self,
        issuer: &Certificate,
        crypto: &dyn CryptoProvider,
    ) -> Result<(), AuthError> {
        if self.inner.issuer_name != issuer.inner.subject_name {
            return Err(AuthError::UntrustedChain);
        }
        let algorithm = signature_algorithm(&self.inner.signature_algorithm, &issuer.inner.key_algorithm)?;
        let tbs = self
            .inner
            .der
            .get(self.inner.tbs.clone())
            .ok_or_else(|| invalid("to-be-signed bytes missing"))?;
        crypto
            .verify_signature(algorithm, &issuer.inner.public_key, tbs, &self.inner.signature)
            .map_err(|_| AuthError::BadSignature)
    }
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.inner.der == other.inner.der
    }
}

impl Eq for Certificate {}

impl std::hash::Hash for Certificate {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.inner.der.hash(state);
    }
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("subject", &self.inner.subject_name)
            .field("issuer", &self.inner.issuer_name)
            .field("serial", &self.serial_hex())
            .field("not_after", &self.inner.not_after)
            .finish()
    }
}

/// The certificates a device presented in its TLS handshake, leaf first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresentedChain {
    certificates: Vec<Certificate>,
}

impl PresentedChain {
    /// Parses the DER certificates of a TLS Certificate message, leaf first.
    ///
    /// # Errors
    /// [`AuthError::InvalidCertificate`] when the chain is empty, longer than
    /// [`MAX_CHAIN_LEN`], or any certificate fails to parse.
    pub fn from_der(chain: &[Vec<u8>]) -> Result<Self, AuthError> {
        let certificates =
            chain.iter().map(|der| Certificate::from_der(der)).collect::<Result<Vec<_>, _>>()?;
        Self::from_certificates(certificates)
    }

    /// Builds a chain from parsed certificates, leaf first. The certificates after the leaf may
    /// come in any order and include some that are not on the leaf's path, as TLS lets clients
    /// send them (RFC 8446 §4.4.2): the chain keeps the leaf, then the issuer of each certificate
    /// found among them by name, up to a self-issued one or one whose issuer was not sent, and
    /// drops the rest. Signatures are checked by [`PresentedChain::verify_internal`].
    ///
    /// # Errors
    /// [`AuthError::InvalidCertificate`] when the chain is empty or longer than [`MAX_CHAIN_LEN`].
    pub fn from_certificates(mut certificates: Vec<Certificate>) -> Result<Self, AuthError> {
        if certificates.is_empty() {
            return Err(invalid("no client certificate presented"));
        }
        if certificates.len() > MAX_CHAIN_LEN {
            return Err(invalid(format!("chain of {} certificates is too long", certificates.len())));
        }
        // Chains sent in order, as nearly all are, are left as they are.
        let in_order = certificates
            .windows(2)
            .all(|pair| !pair[0].is_self_issued() && pair[0].issuer_name() == pair[1].subject_name());
        if !in_order {
            certificates = issuance_order(certificates);
        }
        Ok(Self { certificates })
    }

    /// The device (leaf) certificate.
    pub fn leaf(&self) -> &Certificate {
        // from_certificates refuses an empty chain, so the first element exists.
        &self.certificates[0]
    }

    /// All presented certificates, leaf first.
    pub fn certificates(&self) -> &[Certificate] {
        &self.certificates
    }

    /// Checks the chain on its own: every certificate is valid at `now`, each one is issued by
    /// the next, and every certificate above the leaf is a CA allowed to sign certificates
    /// (basicConstraints CA, keyUsage keyCertSign when present, path length respected).
    ///
    /// The last certificate may be a self-signed root or an intermediate whose issuer was not
    /// sent; its own signature is not checked here, because trust comes from the enrollment the
    /// chain is matched against (see [`PresentedChain::anchor_position`]).
    ///
    /// # Errors
    /// [`AuthError::CertificateExpired`] / [`AuthError::CertificateNotYetValid`] for a
    /// certificate outside its window, [`AuthError::InvalidCertificate`] for a non-CA
    /// intermediate, [`AuthError::UntrustedChain`] or [`AuthError::BadSignature`] when a link
    /// does not verify (see [`Certificate::verify_issued_by`]).
    pub fn verify_internal(&self, now: Timestamp, crypto: &dyn CryptoProvider) -> Result<(), AuthError> {
        self.verify_internal_within(now, Duration::ZERO, crypto)
    }

    /// [`PresentedChain::verify_internal`] with validity windows widened by `skew` (see
    /// [`Certificate::check_validity_within`]).
    ///
    /// # Errors
    /// As [`PresentedChain::verify_internal`].
    pub fn verify_internal_within(
        &self,
        now: Timestamp,
        skew: Duration,
        crypto: &dyn CryptoProvider,
    ) -> Result<(), AuthError> {
        for (i, cert) in self.certificates.iter().enumerate() {
            cert.check_validity_within(now, skew)?;
            if let Some(oid) = &cert.inner.unknown_critical {
                return Err(invalid(format!(
                    "{:?} carries critical extension {oid}, which this verifier does not process",
                    cert.subject_name()
                )));
            }
            if i == 0 && !cert.inner.client_auth_allowed {
                return Err(invalid(format!(
                    "extended key usage of {:?} does not allow client authentication",
                    cert.subject_name()
                )));
            }
            if i > 0 {
                check_may_issue(cert, i - 1)?;
            }
            if let Some(issuer) = self.certificates.get(i + 1) {
                cert.verify_issued_by(issuer, crypto)?;
            }
        }
        Ok(())
    }

    /// Where `anchor` (an enrolled or verified certificate) attaches to this chain:
    /// `Some(i)` when `certificates()[i]` is the anchor (same subject and key),
    /// `Some(certificates().len())` when the anchor issued the last presented certificate
    /// (names match and the signature verifies), `None` otherwise. A smaller index is closer to
    /// the leaf, which is the order DPS evaluates group enrollments in.
    ///
    /// Call [`PresentedChain::verify_internal`] first: this only locates the anchor.
    pub fn anchor_position(&self, anchor: &Certificate, crypto: &dyn CryptoProvider) -> Option<usize> {
        if let Some(i) = self.certificates.iter().position(|c| c.same_subject_and_key(anchor)) {
            return Some(i);
        }
        let last = self.certificates.last()?;
        last.verify_issued_by(anchor, crypto).ok().map(|()| self.certificates.len())
    }
}

/// The first certificate, then the issuer of each certificate found among the others by name,
/// until a self-issued certificate or one whose issuer is not among them; the others are left
/// out.
fn issuance_order(mut rest: Vec<Certificate>) -> Vec<Certificate> {
    let mut path = vec![rest.remove(0)];
    while let Some(current) = path.last().filter(|c| !c.is_self_issued()) {
        let Some(at) = rest.iter().position(|c| c.subject_name() == current.issuer_name()) else { break };
        path.push(rest.remove(at));
    }
    path
}

/// Extensions a certificate may mark critical and still be accepted: the constraints and key
/// usages checked here, and identifiers and names that restrict nothing this verifier relies on
/// (the registration id comes from the subject CN).
const UNDERSTOOD_CRITICAL: [x509_cert::der::oid::ObjectIdentifier; 6] = [
    rfc5280::ID_CE_BASIC_CONSTRAINTS,
    rfc5280::ID_CE_KEY_USAGE,
    rfc5280::ID_CE_EXT_KEY_USAGE,
    rfc5280::ID_CE_SUBJECT_ALT_NAME,
    rfc5280::ID_CE_SUBJECT_KEY_IDENTIFIER,
    rfc5280::ID_CE_AUTHORITY_KEY_IDENTIFIER,
];

/// Whether `cert` may sign the certificate below it, with `intermediates_below` CA certificates
/// between it and the leaf: a CA (basicConstraints), allowed to sign certificates (keyUsage, when
/// present), within its path length constraint.
///
/// # Errors
/// [`AuthError::InvalidCertificate`] saying which rule `cert` breaks.
pub fn check_may_issue(cert: &Certificate, intermediates_below: usize) -> Result<(), AuthError> {
    let Some(bc) = cert.inner.basic_constraints.as_ref().filter(|bc| bc.ca) else {
        return Err(invalid(format!("issuing certificate {:?} is not a CA", cert.subject_name())));
    };
    if let Some(max) = bc.path_len_constraint {
        if intermediates_below > usize::from(max) {
            return Err(invalid(format!(
                "path length constraint {max} of {:?} exceeded by {intermediates_below} intermediates",
                cert.subject_name()
            )));
        }
    }
    if let Some(ku) = &cert.inner.key_usage {
        if !ku.key_cert_sign() {
            return Err(invalid(format!(
                "key usage of {:?} does not allow signing certificates",
                cert.subject_name()
            )));
        }
    }
    Ok(())
}

/// A fresh proof-of-possession verification code: 48 upper-case hex digits (fits the 64-char
/// CN limit) from the first 24 of the given random bytes.
pub fn generate_verification_code(random: &[u8; 32]) -> String {
    upper_hex(&random[..VERIFICATION_CODE_BYTES])
}

/// Checks a proof of possession (spec §5.3): `verification_cert` has subject CN equal to
/// `expected_code` (ASCII case-insensitive, since the code is hex), is valid at `now`, and was
/// signed by the key of `ca`.
///
/// # Errors
/// [`AuthError::CommonNameMismatch`] when the CN is missing or differs,
/// [`AuthError::CertificateExpired`] / [`AuthError::CertificateNotYetValid`] outside the window,
/// and the errors of [`Certificate::verify_issued_by`] when `ca` did not sign it.
pub fn verify_proof_of_possession(
    ca: &Certificate,
    verification_cert: &Certificate,
    expected_code: &str,
    now: Timestamp,
    crypto: &dyn CryptoProvider,
) -> Result<(), AuthError> {
    let cn = verification_cert.common_name().unwrap_or_default();
    if expected_code.is_empty() || !cn.eq_ignore_ascii_case(expected_code) {
        return Err(AuthError::CommonNameMismatch { cn: cn.to_owned() });
    }
    verification_cert.check_validity(now)?;
    verification_cert.verify_issued_by(ca, crypto)
}

/// Lenient base64 for certificate text: standard alphabet, padding optional.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

fn upper_hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02X}");
    }
    s
}

/// The byte range of the `tbsCertificate` TLV: the first element of the outer SEQUENCE.
fn tbs_range(der: &[u8]) -> Result<Range<usize>, x509_cert::der::Error> {
    let mut reader = SliceReader::new(der)?;
    let outer = Header::decode(&mut reader)?;
    outer.tag.assert_eq(Tag::Sequence)?;
    let start = usize::try_from(outer.encoded_len()?)?;
    let tbs = reader.tlv_bytes()?;
    Ok(start..start + tbs.len())
}

/// The one formatter for subject and issuer names (RFC 4514, most specific RDN first).
///
/// Same text as x509-cert's `Display`, which looks every attribute type up by a linear scan of
/// the whole OID database; names are formatted on every certificate parse, so the common
/// attributes with plain values are written here directly and only the rest go through `Display`.
fn format_name(name: &Name) -> String {
    let mut out = String::with_capacity(64);
    for (i, rdn) in name.0.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.0.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match (short_attribute_name(&atv.oid), directory_string(&atv.value)) {
                (Some(short), Some(value)) if is_plain_value(&value) => {
                    out.push_str(short);
                    out.push('=');
                    out.push_str(&value);
                }
                _ => out.push_str(&atv.to_string()),
            }
        }
    }
    out
}

fn short_attribute_name(oid: &x509_cert::der::oid::ObjectIdentifier) -> Option<&'static str> {
    [
        (rfc4519::CN, "CN"),
        (rfc4519::O, "O"),
        (rfc4519::OU, "OU"),
        (rfc4519::C, "C"),
        (rfc4519::L, "L"),
        (rfc4519::ST, "ST"),
    ]
    .into_iter()
    .find(|(known, _)| known == oid)
    .map(|(_, short)| short)
}

/// A value RFC 4514 writes as is: printable ASCII without characters that need escaping.
fn is_plain_value(v: &str) -> bool {
    !v.is_empty()
        && !v.starts_with([' ', '#'])
        && !v.ends_with(' ')
        && v.bytes().all(|b| (0x20..0x7f).contains(&b) && !b",+\"\\<>;=".contains(&b))
}

/// The last CN of `name`; `None` when there is none or the last one is not a readable string
/// (such a certificate cannot match a registration id, but may still serve as a CA).
fn common_name(name: &Name) -> Option<String> {
    let mut found = None;
    for rdn in name.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == rfc4519::CN {
                found = Some(directory_string(&atv.value));
            }
        }
    }
    found.flatten()
}

/// Decodes a DirectoryString (or IA5String) attribute value.
fn directory_string(value: &x509_cert::der::Any) -> Option<String> {
    match value.tag() {
        Tag::Utf8String => Utf8StringRef::try_from(value).ok().map(|s| s.as_str().to_owned()),
        Tag::PrintableString => PrintableStringRef::try_from(value).ok().map(|s| s.as_str().to_owned()),
        Tag::Ia5String => Ia5StringRef::try_from(value).ok().map(|s| s.as_str().to_owned()),
        Tag::TeletexString => TeletexStringRef::try_from(value).ok().map(|s| s.as_str().to_owned()),
        Tag::BmpString => {
            value.to_der().ok().and_then(|der| BmpString::from_der(&der).ok()).map(|s| s.to_string())
        }
        _ => None,
    }
}

/// Certificate times (1970 to 9999 in `der`) all fit a [`Timestamp`], 99991231235959Z included.
fn to_timestamp(time: x509_cert::time::Time) -> Timestamp {
    let secs = i64::try_from(time.to_unix_duration().as_secs()).unwrap_or(i64::MAX);
    Timestamp::from_unix_secs(secs)
}

const OID_RSA_ENCRYPTION: ObjectIdentifier = rfc5912::RSA_ENCRYPTION;
const OID_RSASSA_PSS: ObjectIdentifier = rfc5912::ID_RSASSA_PSS;
const OID_EC_PUBLIC_KEY: ObjectIdentifier = rfc5912::ID_EC_PUBLIC_KEY;

/// Maps the certificate's signature algorithm and the issuer's key algorithm to a
/// [`SignatureAlgorithm`], refusing inconsistent pairs (an RSA signature from an EC key).
fn signature_algorithm(
    sig: &AlgorithmIdentifierOwned,
    issuer_key: &AlgorithmIdentifierOwned,
) -> Result<SignatureAlgorithm, AuthError> {
    let oid = sig.oid;
    let key_is_rsa = issuer_key.oid == OID_RSA_ENCRYPTION || issuer_key.oid == OID_RSASSA_PSS;
    let pkcs1 = [
        (rfc5912::SHA_256_WITH_RSA_ENCRYPTION, SignatureAlgorithm::RsaPkcs1Sha256),
        (rfc5912::SHA_384_WITH_RSA_ENCRYPTION, SignatureAlgorithm::RsaPkcs1Sha384),
        (rfc5912::SHA_512_WITH_RSA_ENCRYPTION, SignatureAlgorithm::RsaPkcs1Sha512),
    ];
    if let Some((_, alg)) = pkcs1.iter().find(|(o, _)| *o == oid) {
        if !params_null_or_absent(sig) {
            return Err(invalid(format!("unexpected parameters for signature algorithm {oid}")));
        }
        // A key restricted to PSS (id-RSASSA-PSS) must not verify PKCS#1 v1.5 signatures.
        if issuer_key.oid != OID_RSA_ENCRYPTION {
            return Err(invalid(format!("RSA PKCS#1 signature from a {} key", issuer_key.oid)));
        }
        return Ok(*alg);
    }
    if oid == OID_RSASSA_PSS {
        if !key_is_rsa {
            return Err(invalid(format!("RSA-PSS signature from a {} key", issuer_key.oid)));
        }
        return pss_algorithm(sig);
    }
    let ecdsa_hash = if oid == rfc5912::ECDSA_WITH_SHA_256 {
        Some(256)
    } else if oid == rfc5912::ECDSA_WITH_SHA_384 {
        Some(384)
    } else {
        None
    };
    if let Some(hash) = ecdsa_hash {
        if sig.parameters.is_some() {
            return Err(invalid(format!("unexpected parameters for signature algorithm {oid}")));
        }
        if issuer_key.oid != OID_EC_PUBLIC_KEY {
            return Err(invalid(format!("ECDSA signature from a {} key", issuer_key.oid)));
        }
        let curve = issuer_key
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok())
            .ok_or_else(|| invalid("issuer EC key does not name its curve"))?;
        return match (curve, hash) {
            (c, 256) if c == rfc5912::SECP_256_R_1 => Ok(SignatureAlgorithm::EcdsaP256Sha256),
            (c, 384) if c == rfc5912::SECP_256_R_1 => Ok(SignatureAlgorithm::EcdsaP256Sha384),
            (c, 256) if c == rfc5912::SECP_384_R_1 => Ok(SignatureAlgorithm::EcdsaP384Sha256),
            (c, 384) if c == rfc5912::SECP_384_R_1 => Ok(SignatureAlgorithm::EcdsaP384Sha384),
            (c, _) => Err(invalid(format!("unsupported EC curve {c} (P-256 and P-384 are supported)"))),
        };
    }
    Err(invalid(format!(
        "unsupported signature algorithm {oid} (supported: RSA PKCS#1 v1.5 and RSA-PSS with SHA-256/384/512, \
         ECDSA with SHA-256/384)"
    )))
}

fn params_null_or_absent(alg: &AlgorithmIdentifierOwned) -> bool {
    alg.parameters.as_ref().is_none_or(|p| p.is_null())
}

/// RSASSA-PSS-params (RFC 4055): only the fields we need to pin the variant.
struct PssParams {
    hash: Option<AlgorithmIdentifierOwned>,
    mask_gen: Option<AlgorithmIdentifierOwned>,
    salt_length: Option<u32>,
    trailer_field: Option<u32>,
}

impl FixedTag for PssParams {
    const TAG: Tag = Tag::Sequence;
}

impl<'a> DecodeValue<'a> for PssParams {
    fn decode_value<R: Reader<'a>>(reader: &mut R, header: Header) -> x509_cert::der::Result<Self> {
        reader.read_nested(header.length, |r| {
            Ok(PssParams {
                hash: ContextSpecific::decode_explicit(r, TagNumber::N0)?.map(|c| c.value),
                mask_gen: ContextSpecific::decode_explicit(r, TagNumber::N1)?.map(|c| c.value),
                salt_length: ContextSpecific::decode_explicit(r, TagNumber::N2)?.map(|c| c.value),
                trailer_field: ContextSpecific::decode_explicit(r, TagNumber::N3)?.map(|c| c.value),
            })
        })
    }
}

fn pss_algorithm(sig: &AlgorithmIdentifierOwned) -> Result<SignatureAlgorithm, AuthError> {
    let params = sig.parameters.as_ref().ok_or_else(|| invalid("RSA-PSS signature without parameters"))?;
    let params = params
        .to_der()
        .and_then(|der| PssParams::from_der(&der))
        .map_err(|e| invalid(format!("malformed RSA-PSS parameters: {e}")))?;
    // Absent hash means SHA-1, which is not accepted.
    let hash = params.hash.ok_or_else(|| invalid("RSA-PSS with SHA-1 is not supported"))?;
    if !params_null_or_absent(&hash) {
        return Err(invalid("unexpected parameters on the RSA-PSS hash algorithm"));
    }
    let (alg, hash_len) = if hash.oid == rfc5912::ID_SHA_256 {
        (SignatureAlgorithm::RsaPssSha256, 32)
    } else if hash.oid == rfc5912::ID_SHA_384 {
        (SignatureAlgorithm::RsaPssSha384, 48)
    } else if hash.oid == rfc5912::ID_SHA_512 {
        (SignatureAlgorithm::RsaPssSha512, 64)
    } else {
        return Err(invalid(format!("unsupported RSA-PSS hash {}", hash.oid)));
    };
    let mgf = params.mask_gen.ok_or_else(|| invalid("RSA-PSS with MGF1-SHA-1 is not supported"))?;
    let mgf_hash = mgf
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<AlgorithmIdentifierOwned>().ok())
        .ok_or_else(|| invalid("RSA-PSS mask generation has no hash"))?;
    if mgf.oid != rfc5912::ID_MGF_1 || mgf_hash.oid != hash.oid || !params_null_or_absent(&mgf_hash) {
        return Err(invalid("RSA-PSS mask generation must be MGF1 with the signature hash"));
    }
    if params.salt_length != Some(hash_len) {
        return Err(invalid(format!("RSA-PSS salt length must equal the hash length ({hash_len})")));
    }
    if params.trailer_field.is_some_and(|t| t != 1) {
        return Err(invalid("RSA-PSS trailer field must be 1"));
    }
    Ok(alg)
}

// The tests verify real signatures with the ring provider.
#[cfg(test)]
#[cfg(feature = "ring")]
mod tests {
    use proptest::prelude::*;
    use zerotouch_testkit::certs::{rsa_pss, CertSpec, KeyType, TestCa, TestCert};

    use super::*;
    use crate::crypto::RingCrypto;

    /// 2026-06-01T00:00:00Z, inside the testkit's default validity.
    const NOW: Timestamp = Timestamp::from_unix_secs(1_780_272_000);

    fn parse(der: &[u8]) -> Certificate {
        Certificate::from_der(der).unwrap()
    }

    #[test]
    fn fast_name_formatting_writes_what_x509_cert_writes() {
        use std::str::FromStr;
        for text in [
            "CN=dev-1",
            "CN=dev-1,O=Contoso,C=US",
            "CN=a+OU=b,O=Contoso Ltd,L=Redmond,ST=WA,C=US",
            "CN=needs\\,escaping,O=x",
            "CN=semi\\;colon+OU=plus\\+sign",
            "UID=jsmith,DC=example,DC=net",
            "CN=caf\u{e9}",
        ] {
            let name = Name::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(format_name(&name), name.to_string(), "{text}");
        }
    }

    fn chain(cert: &TestCert) -> PresentedChain {
        PresentedChain::from_der(&cert.full_chain_der()).unwrap()
    }

    /// Replaces every occurrence of `from` in `der` by `to` (same length).
    fn patch(der: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let mut out = der.to_vec();
        let mut found = 0;
        let mut i = 0;
        while i + from.len() <= out.len() {
            if &out[i..i + from.len()] == from {
                out[i..i + from.len()].copy_from_slice(to);
                found += 1;
                i += from.len();
            } else {
                i += 1;
            }
        }
        assert!(found > 0, "pattern not found");
        out
    }

    #[test]
    fn device_chains_verify_for_every_supported_key_type() {
        let crypto = RingCrypto::new();
        for kt in
            [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa, KeyType::RsaSha384, KeyType::RsaSha512]
        {
            let root = TestCa::root_with(CertSpec::new("root").key_type(kt));
            let int = root.intermediate_with(CertSpec::new("int").key_type(kt));
            let dev = int.device_with(CertSpec::new("dev-1").key_type(kt));
            let chain = chain(&dev);
            chain.verify_internal(NOW, &crypto).unwrap_or_else(|e| panic!("{kt:?}: {e}"));
            let [leaf, int_c, root_c] = chain.certificates() else { panic!("three certificates") };
            leaf.verify_issued_by(int_c, &crypto).unwrap();
            int_c.verify_issued_by(root_c, &crypto).unwrap();
            root_c.verify_issued_by(root_c, &crypto).unwrap();
        }
    }

    #[test]
    fn signature_algorithm_follows_the_issuer_key() {
        let cases = [
            (KeyType::EcdsaP256, SignatureAlgorithm::EcdsaP256Sha256),
            (KeyType::EcdsaP384, SignatureAlgorithm::EcdsaP384Sha384),
            (KeyType::Rsa, SignatureAlgorithm::RsaPkcs1Sha256),
            (KeyType::RsaSha384, SignatureAlgorithm::RsaPkcs1Sha384),
            (KeyType::RsaSha512, SignatureAlgorithm::RsaPkcs1Sha512),
        ];
        for (kt, expected) in cases {
            let ca = TestCa::root_with(CertSpec::new("ca").key_type(kt));
            // The leaf key type differs from the issuer's: only the issuer's key counts.
            let leaf = parse(ca.device_with(CertSpec::new("dev").key_type(KeyType::EcdsaP384)).der());
            let issuer = parse(ca.der());
            let got =
                signature_algorithm(&leaf.inner.signature_algorithm, &issuer.inner.key_algorithm).unwrap();
            assert_eq!(got, expected, "{kt:?}");
        }
    }

    #[test]
    fn mixed_key_types_in_one_chain_verify() {
        let root = TestCa::root_with(CertSpec::new("rsa root").key_type(KeyType::Rsa));
        let int = root.intermediate_with(CertSpec::new("p384 int").key_type(KeyType::EcdsaP384));
        let dev = int.device_with(CertSpec::new("dev").key_type(KeyType::EcdsaP256));
        chain(&dev).verify_internal(NOW, &RingCrypto::new()).unwrap();
    }

    #[test]
    fn rsa_pss_chain_verifies_with_sha256_sha384_sha512() {
        let crypto = RingCrypto::new();
        let presented = PresentedChain::from_der(&rsa_pss::presented_chain()).unwrap();
        presented.verify_internal(rsa_pss::VALID_AT, &crypto).unwrap();
        let root = Certificate::from_text(rsa_pss::ROOT_PEM).unwrap();
        let [leaf, int] = presented.certificates() else { panic!("two certificates") };
        int.verify_issued_by(&root, &crypto).unwrap();
        root.verify_issued_by(&root, &crypto).unwrap();
        let alg = |c: &Certificate, i: &Certificate| {
            signature_algorithm(&c.inner.signature_algorithm, &i.inner.key_algorithm).unwrap()
        };
        assert_eq!(alg(&root, &root), SignatureAlgorithm::RsaPssSha256);
        assert_eq!(alg(int, &root), SignatureAlgorithm::RsaPssSha384);
        // The intermediate's key is an id-RSASSA-PSS key.
        assert_eq!(int.inner.key_algorithm.oid, OID_RSASSA_PSS);
        assert_eq!(alg(leaf, int), SignatureAlgorithm::RsaPssSha512);
        assert_eq!(presented.anchor_position(&root, &crypto), Some(2));
    }

    #[test]
    fn rsa_pss_with_a_salt_other_than_the_hash_length_is_refused() {
        let leaf = rsa_pss::presented_chain().remove(0);
        // saltLength [2] INTEGER 64 → 32, in both the inner and the outer algorithm identifier.
        let patched = patch(&leaf, &[0xa2, 0x03, 0x02, 0x01, 0x40], &[0xa2, 0x03, 0x02, 0x01, 0x20]);
        let leaf = parse(&patched);
        let int = Certificate::from_text(rsa_pss::INTERMEDIATE_PEM).unwrap();
        let err = leaf.verify_issued_by(&int, &RingCrypto::new()).unwrap_err();
        assert!(matches!(&err, AuthError::InvalidCertificate(m) if m.contains("salt")), "{err:?}");
    }

    #[test]
    fn rsa_pss_with_mgf1_on_another_hash_is_refused() {
        let leaf = rsa_pss::presented_chain().remove(0);
        // id-sha512 (…04 02 03) appears twice per identifier: as the hash and inside MGF1.
        // Turning the whole leaf's SHA-512 OIDs into SHA-384 keeps them equal, so instead
        // rewrite only the MGF1 part: [1] { SEQ { id-mgf1, SEQ { id-sha512 …
        let mgf_sha512 = [
            0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48,
            0x01, 0x65, 0x03, 0x04, 0x02, 0x03,
        ];
        let mut mgf_sha384 = mgf_sha512;
        mgf_sha384[21] = 0x02;
        let leaf = parse(&patch(&leaf, &mgf_sha512, &mgf_sha384));
        let int = Certificate::from_text(rsa_pss::INTERMEDIATE_PEM).unwrap();
        let err = leaf.verify_issued_by(&int, &RingCrypto::new()).unwrap_err();
        assert!(matches!(&err, AuthError::InvalidCertificate(m) if m.contains("MGF1")), "{err:?}");
    }

    #[test]
    fn tampered_signature_is_refused() {
        let crypto = RingCrypto::new();
        for kt in [KeyType::EcdsaP256, KeyType::Rsa] {
            let ca = TestCa::root_with(CertSpec::new("ca").key_type(kt));
            let mut der = ca.device("dev").der().to_vec();
            let last = der.len() - 1;
            der[last] ^= 0x01;
            let leaf = parse(&der);
            assert_eq!(
                leaf.verify_issued_by(&parse(ca.der()), &crypto),
                Err(AuthError::BadSignature),
                "{kt:?}"
            );
        }
    }

    #[test]
    fn tampered_subject_is_refused() {
        let ca = TestCa::root("ca");
        let der = patch(ca.device("dev-1").der(), b"dev-1", b"dev-2");
        let leaf = parse(&der);
        assert_eq!(leaf.common_name(), Some("dev-2"));
        assert_eq!(leaf.verify_issued_by(&parse(ca.der()), &RingCrypto::new()), Err(AuthError::BadSignature));
    }

    #[test]
    fn certificate_from_another_ca_is_refused() {
        let crypto = RingCrypto::new();
        let ca = TestCa::root("Contoso root");
        let leaf = parse(ca.device("dev").der());
        let other = parse(TestCa::root("Fabrikam root").der());
        assert_eq!(leaf.verify_issued_by(&other, &crypto), Err(AuthError::UntrustedChain));
        // Same name, different key: an impostor CA.
        let impostor = parse(TestCa::root("Contoso root").der());
        assert_eq!(impostor.subject_name(), leaf.issuer_name());
        assert_eq!(leaf.verify_issued_by(&impostor, &crypto), Err(AuthError::BadSignature));
    }

    #[test]
    fn rsa_signature_claimed_by_an_ec_issuer_is_refused() {
        let rsa_ca = TestCa::root_with(CertSpec::new("ca").key_type(KeyType::Rsa));
        let leaf = parse(rsa_ca.device("dev").der());
        // An EC CA with the same name: the algorithm pair itself is inconsistent.
        let ec_ca = parse(TestCa::root("ca").der());
        let err = leaf.verify_issued_by(&ec_ca, &RingCrypto::new()).unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidCertificate(m) if m.contains("RSA PKCS#1 signature")),
            "{err:?}"
        );
    }

    #[test]
    fn ed25519_is_reported_as_unsupported() {
        let ca = TestCa::root_with(CertSpec::new("ca").key_type(KeyType::Ed25519));
        let leaf = parse(ca.device("dev").der());
        let err = leaf.verify_issued_by(&parse(ca.der()), &RingCrypto::new()).unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidCertificate(m) if m.contains("unsupported signature algorithm 1.3.101.112")),
            "{err:?}"
        );
    }

    #[test]
    fn expired_and_not_yet_valid_certificates_are_refused() {
        let crypto = RingCrypto::new();
        let root = TestCa::root("root");
        let expired = root.device_with(CertSpec::new("old").expired_at(NOW));
        assert_eq!(parse(expired.der()).check_validity(NOW), Err(AuthError::CertificateExpired));
        assert_eq!(chain(&expired).verify_internal(NOW, &crypto), Err(AuthError::CertificateExpired));
        let future = root.device_with(CertSpec::new("new").not_yet_valid_at(NOW));
        assert_eq!(parse(future.der()).check_validity(NOW), Err(AuthError::CertificateNotYetValid));
        assert_eq!(chain(&future).verify_internal(NOW, &crypto), Err(AuthError::CertificateNotYetValid));

        // An expired intermediate fails the chain even if the leaf is fine.
        let old_int = root.intermediate_with(CertSpec::new("int").expired_at(NOW));
        let dev = old_int.device("dev");
        assert_eq!(chain(&dev).verify_internal(NOW, &crypto), Err(AuthError::CertificateExpired));
    }

    #[test]
    fn validity_window_includes_both_ends() {
        let nb = Timestamp::from_unix_secs(1_700_000_000);
        let na = Timestamp::from_unix_secs(1_800_000_000);
        let cert = parse(TestCa::root("r").device_with(CertSpec::new("d").validity(nb, na)).der());
        assert_eq!(cert.not_before(), nb);
        assert_eq!(cert.not_after(), na);
        assert_eq!(cert.check_validity(nb), Ok(()));
        assert_eq!(cert.check_validity(na), Ok(()));
        assert_eq!(
            cert.check_validity(Timestamp::from_unix_secs(1_699_999_999)),
            Err(AuthError::CertificateNotYetValid)
        );
        assert_eq!(
            cert.check_validity(Timestamp::from_unix_secs(1_800_000_001)),
            Err(AuthError::CertificateExpired)
        );
    }

    #[test]
    fn a_certificate_without_expiry_reports_and_keeps_year_9999() {
        let crypto = RingCrypto::new();
        let root = TestCa::root_with(CertSpec::new("root").without_expiry());
        let dev = root.device_with(CertSpec::new("dev").without_expiry());
        let cert = parse(dev.der());
        let info = cert.info(&crypto);
        assert_eq!(info.not_after_utc.to_string(), "9999-12-31T23:59:59.0000000Z");
        assert_eq!(
            serde_json::to_value(&info).unwrap()["notAfterUtc"],
            serde_json::json!("9999-12-31T23:59:59.0000000Z")
        );
        assert_eq!(cert.check_validity(NOW), Ok(()));
        assert_eq!(cert.check_validity(cert.not_after()), Ok(()));
        assert_eq!(
            cert.check_validity(cert.not_after() + Duration::from_secs(1)),
            Err(AuthError::CertificateExpired)
        );
        assert_eq!(chain(&dev).verify_internal(NOW, &crypto), Ok(()));
    }

    #[test]
    fn names_common_name_and_ca_flag_are_read() {
        let root = TestCa::root_with(CertSpec::new("Contoso root").organization("Contoso, Ltd"));
        let int = root.intermediate("Contoso intermediate");
        let dev = int.device("my-device-01");
        let root_c = parse(root.der());
        let int_c = parse(int.der());
        let leaf = parse(dev.der());
        assert_eq!(leaf.common_name(), Some("my-device-01"));
        assert_eq!(leaf.subject_name(), "CN=my-device-01");
        assert_eq!(leaf.issuer_name(), int_c.subject_name());
        // RFC 4514: most specific first, special characters escaped.
        assert_eq!(root_c.subject_name(), "CN=Contoso root,O=Contoso\\, Ltd");
        assert_eq!(int_c.issuer_name(), root_c.subject_name());
        assert!(root_c.is_ca() && int_c.is_ca() && !leaf.is_ca());
        assert!(root_c.is_self_issued() && !int_c.is_self_issued());
    }

    #[test]
    fn certificate_whose_cn_is_not_a_string_parses_without_common_name() {
        let ca = TestCa::root("ca");
        // CN value tag UTF8String (0x0c) → OCTET STRING (0x04), which is no DirectoryString.
        let der =
            patch(ca.device("dev-1").der(), &[0x55, 0x04, 0x03, 0x0c, 0x05], &[0x55, 0x04, 0x03, 0x04, 0x05]);
        let cert = parse(&der);
        assert_eq!(cert.common_name(), None);
        assert_eq!(cert.issuer_name(), "CN=ca");
    }

    #[test]
    fn certificates_and_chains_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Certificate>();
        assert_send_sync::<PresentedChain>();
    }

    #[test]
    fn thumbprints_are_upper_hex_digests_of_the_der() {
        let crypto = RingCrypto::new();
        let dev = TestCert::self_signed(CertSpec::new("dev").serial(0x0102_0304));
        let cert = parse(dev.der());
        let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02X}")).collect::<String>();
        let sha1 = hex(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, dev.der()).as_ref());
        let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, dev.der()).as_ref());
        assert_eq!(cert.sha1_thumbprint(&crypto), sha1);
        assert_eq!(cert.sha256_thumbprint(&crypto), sha256);
        assert_eq!(sha1.len(), 40);

        let info = cert.info(&crypto);
        assert_eq!(info.sha1_thumbprint, sha1);
        assert_eq!(info.sha256_thumbprint, sha256);
        assert_eq!(info.subject_name, "CN=dev");
        assert_eq!(info.issuer_name, "CN=dev");
        assert_eq!(info.serial_number, "01020304");
        assert_eq!(info.version, 3);
        assert_eq!(info.not_before_utc, cert.not_before());
        assert_eq!(info.not_after_utc, cert.not_after());
    }

    #[test]
    fn serial_with_high_bit_keeps_its_leading_zero() {
        let cert = parse(TestCert::self_signed(CertSpec::new("dev").serial(0x80)).der());
        assert_eq!(cert.serial_hex(), "0080");
    }

    #[test]
    fn enrollment_certificate_text_in_pem_or_base64_parses() {
        let dev = TestCert::self_signed(CertSpec::new("dev"));
        let expected = parse(dev.der());
        let crlf = dev.pem().replace('\n', "\r\n");
        let with_text = format!("subject=CN = dev\nissuer=CN = dev\n{}", dev.pem());
        let b64 = dev.base64();
        let wrapped: String =
            b64.as_bytes().chunks(76).map(|c| format!("{}\n", std::str::from_utf8(c).unwrap())).collect();
        let unpadded = b64.trim_end_matches('=').to_owned();
        for text in [format!("\n  {}  \n", dev.pem()), crlf, with_text, b64.clone(), wrapped, unpadded] {
            assert_eq!(Certificate::from_text(&text).unwrap(), expected, "{text:?}");
        }
    }

    #[test]
    fn malformed_certificate_text_is_refused() {
        let dev = TestCert::self_signed(CertSpec::new("dev"));
        let two = format!("{}{}", dev.pem(), dev.pem());
        let key = dev.key_pem().to_owned();
        let no_end = dev.pem().replace("-----END CERTIFICATE-----", "");
        for text in ["", "   ", "not base64 at all!", "AAAA", two.as_str(), key.as_str(), no_end.as_str()] {
            assert!(
                matches!(Certificate::from_text(text), Err(AuthError::InvalidCertificate(_))),
                "{text:?} was accepted"
            );
        }
    }

    #[test]
    fn truncated_or_padded_der_is_refused_without_panic() {
        let der = TestCa::root("r").device("dev").der().to_vec();
        for len in 0..der.len() {
            assert!(Certificate::from_der(&der[..len]).is_err(), "prefix of {len} bytes accepted");
        }
        let mut padded = der.clone();
        padded.push(0);
        assert!(Certificate::from_der(&padded).is_err());
        assert!(Certificate::from_der(&vec![0x30; MAX_CERTIFICATE_LEN + 1]).is_err());
    }

    #[test]
    fn chain_checks_issuers_are_cas_and_links_verify() {
        let crypto = RingCrypto::new();
        let root = TestCa::root("root");
        let not_ca = root.intermediate_with(CertSpec::new("not a CA").ca(false));
        let dev = not_ca.device("dev");
        let err = chain(&dev).verify_internal(NOW, &crypto).unwrap_err();
        assert!(matches!(&err, AuthError::InvalidCertificate(m) if m.contains("not a CA")), "{err:?}");

        // Path length 0 on the root allows no intermediate below it.
        let strict = TestCa::root_with(CertSpec::new("strict root").path_len(0));
        let dev = strict.intermediate("int").device("dev");
        let err = chain(&dev).verify_internal(NOW, &crypto).unwrap_err();
        assert!(matches!(&err, AuthError::InvalidCertificate(m) if m.contains("path length")), "{err:?}");
        let direct = strict.device("dev");
        chain(&direct).verify_internal(NOW, &crypto).unwrap();

        // Sent out of order, with an unrelated certificate: put in issuance order, the stranger
        // left out.
        let int = root.intermediate("int");
        let dev = int.device("dev");
        let mut ders = dev.full_chain_der();
        ders.swap(1, 2);
        ders.insert(1, TestCa::root("stranger").der().to_vec());
        let sorted = PresentedChain::from_der(&ders).unwrap();
        let subjects: Vec<&str> = sorted.certificates().iter().map(Certificate::subject_name).collect();
        assert_eq!(subjects, ["CN=dev", "CN=int", "CN=root"]);
        sorted.verify_internal(NOW, &crypto).unwrap();

        // Order by name is no trust: an intermediate of the same name from another key fails.
        let impostor = TestCa::root("other root").intermediate("int");
        let forged = vec![dev.der().to_vec(), impostor.der().to_vec()];
        let forged = PresentedChain::from_der(&forged).unwrap();
        assert!(forged.verify_internal(NOW, &crypto).is_err());
    }

    #[test]
    fn unknown_critical_extensions_and_a_leaf_not_for_client_auth_are_refused() {
        let crypto = RingCrypto::new();
        let root = TestCa::root("root");
        // A leaf whose extended key usage is for servers only.
        let server = root.device_with(CertSpec::new("dev").server_auth_only());
        let err = chain(&server).verify_internal(NOW, &crypto).unwrap_err();
        assert!(
            matches!(&err, AuthError::InvalidCertificate(m) if m.contains("client authentication")),
            "{err:?}"
        );
        // A critical extension nobody here processes, on the leaf or on an intermediate
        // (nameConstraints, 2.5.29.30, is not enforced, so it must not be accepted either).
        for (leaf, int) in [
            (CertSpec::new("dev").critical_extension(&[1, 3, 6, 1, 4, 1, 99999, 1]), CertSpec::new("int")),
            (CertSpec::new("dev"), CertSpec::new("int").critical_extension(&[2, 5, 29, 30])),
        ] {
            let dev = root.intermediate_with(int).device_with(leaf);
            let err = chain(&dev).verify_internal(NOW, &crypto).unwrap_err();
            assert!(
                matches!(&err, AuthError::InvalidCertificate(m) if m.contains("critical extension")),
                "{err:?}"
            );
        }
        // The plain chain of the same root still passes.
        chain(&root.device("dev")).verify_internal(NOW, &crypto).unwrap();
    }

    #[test]
    fn leaf_alone_or_without_root_passes_internal_checks() {
        let crypto = RingCrypto::new();
        let solo = TestCert::self_signed(CertSpec::new("solo"));
        PresentedChain::from_der(&solo.chain_der()).unwrap().verify_internal(NOW, &crypto).unwrap();
        let dev = TestCa::root("root").intermediate("int").device("dev");
        PresentedChain::from_der(&dev.chain_der()).unwrap().verify_internal(NOW, &crypto).unwrap();
    }

    #[test]
    fn empty_or_oversized_chain_is_refused() {
        assert!(matches!(PresentedChain::from_der(&[]), Err(AuthError::InvalidCertificate(_))));
        let der = TestCert::self_signed(CertSpec::new("d")).der().to_vec();
        let many = vec![der; MAX_CHAIN_LEN + 1];
        assert!(matches!(PresentedChain::from_der(&many), Err(AuthError::InvalidCertificate(_))));
        assert!(matches!(PresentedChain::from_der(&[vec![1, 2, 3]]), Err(AuthError::InvalidCertificate(_))));
    }

    #[test]
    fn enrolled_ca_is_located_in_the_presented_chain() {
        let crypto = RingCrypto::new();
        let root = TestCa::root("root");
        let int = root.intermediate("int");
        let dev = int.device("dev");
        let presented = PresentedChain::from_der(&dev.chain_der()).unwrap();
        assert_eq!(presented.leaf().common_name(), Some("dev"));
        assert_eq!(presented.anchor_position(&parse(dev.der()), &crypto), Some(0));
        assert_eq!(presented.anchor_position(&parse(int.der()), &crypto), Some(1));
        assert_eq!(presented.anchor_position(&parse(root.der()), &crypto), Some(2));
        assert_eq!(presented.anchor_position(&parse(TestCa::root("root").der()), &crypto), None);
        assert_eq!(presented.anchor_position(&parse(TestCa::root("other").der()), &crypto), None);
    }

    #[test]
    fn proof_of_possession_accepts_the_code_signed_by_the_ca() {
        let crypto = RingCrypto::new();
        let code = generate_verification_code(&[0xab; 32]);
        assert_eq!(code.len(), 48);
        assert_eq!(code, "AB".repeat(24));
        let ca = TestCa::root_with(CertSpec::new("my CA").key_type(KeyType::Rsa));
        let ca_cert = parse(ca.der());
        let proof = parse(ca.verification_cert(&code).der());
        verify_proof_of_possession(&ca_cert, &proof, &code, NOW, &crypto).unwrap();
        verify_proof_of_possession(&ca_cert, &proof, &code.to_ascii_lowercase(), NOW, &crypto).unwrap();
    }

    #[test]
    fn proof_of_possession_refuses_wrong_code_wrong_signer_and_expiry() {
        let crypto = RingCrypto::new();
        let code = generate_verification_code(&[7; 32]);
        let ca = TestCa::root("my CA");
        let ca_cert = parse(ca.der());

        let wrong_code = parse(ca.verification_cert("0123").der());
        assert_eq!(
            verify_proof_of_possession(&ca_cert, &wrong_code, &code, NOW, &crypto),
            Err(AuthError::CommonNameMismatch { cn: "0123".to_owned() })
        );
        let impostor = TestCa::root("my CA");
        let forged = parse(impostor.verification_cert(&code).der());
        assert_eq!(
            verify_proof_of_possession(&ca_cert, &forged, &code, NOW, &crypto),
            Err(AuthError::BadSignature)
        );
        let expired = parse(ca.device_with(CertSpec::new(&code).expired_at(NOW)).der());
        assert_eq!(
            verify_proof_of_possession(&ca_cert, &expired, &code, NOW, &crypto),
            Err(AuthError::CertificateExpired)
        );
        let proof = parse(ca.verification_cert(&code).der());
        assert!(verify_proof_of_possession(&ca_cert, &proof, "", NOW, &crypto).is_err());
    }

    #[test]
    fn clones_compare_equal_and_debug_shows_no_der() {
        let dev = TestCert::self_signed(CertSpec::new("dev"));
        let cert = parse(dev.der());
        assert_eq!(cert.clone(), cert);
        assert_eq!(cert.der(), dev.der());
        let debug = format!("{cert:?}");
        assert!(debug.contains("CN=dev") && !debug.contains(&dev.base64()[..16]), "{debug}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Certificate::from_der(&bytes);
            let _ = PresentedChain::from_der(&[bytes]);
        }

        #[test]
        fn arbitrary_text_never_panics(text in ".{0,512}") {
            let _ = Certificate::from_text(&text);
            let _ = Certificate::from_text(&format!("-----BEGIN CERTIFICATE-----{text}-----END CERTIFICATE-----"));
        }
    }

    #[test]
    fn no_single_byte_change_still_verifies() {
        let crypto = RingCrypto::new();
        let ca = TestCa::root("ca");
        let issuer = parse(ca.der());
        let der = ca.device("dev").der().to_vec();
        for i in 0..der.len() {
            let mut bad = der.clone();
            bad[i] ^= 0x5a;
            if let Ok(cert) = Certificate::from_der(&bad) {
                assert!(cert.verify_issued_by(&issuer, &crypto).is_err(), "flip at {i} verified");
            }
        }
    }
}
