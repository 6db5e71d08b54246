//! Test certificates: root and intermediate CAs, device leaves, proof-of-possession certificates.
//!
//! Built with rcgen at run time (ECDSA keys are fresh each time). RSA keys come from a fixed
//! pool of pre-generated keys in `testdata/certs/` because rcgen with ring cannot generate RSA
//! keys; an RSA-PSS chain, which rcgen cannot sign at all, is a fixed vector in [`rsa_pss`].
//!
//! ```
//! use zerotouch_testkit::certs::TestCa;
//!
//! let root = TestCa::root("Contoso root");
//! let intermediate = root.intermediate("Contoso intermediate");
//! let device = intermediate.device("dev-1");
//! // What the device sends in its TLS Certificate message: leaf, then intermediates.
//! assert_eq!(device.chain_der().len(), 2);
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cell::Cell;
use std::fmt;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SerialNumber, SignatureAlgorithm,
};
use time::OffsetDateTime;
use zerotouch_proto::Timestamp;

/// Default start of validity: 2020-01-01T00:00:00Z.
pub const DEFAULT_NOT_BEFORE: Timestamp = Timestamp::from_unix_secs(1_577_836_800);
/// Default end of validity: 2100-01-01T00:00:00Z.
pub const DEFAULT_NOT_AFTER: Timestamp = Timestamp::from_unix_secs(4_102_444_800);
/// `notAfter` of a certificate with no well-defined expiration: 9999-12-31T23:59:59Z, the
/// GeneralizedTime `99991231235959Z` RFC 5280 §4.1.2.5 prescribes (IEEE 802.1AR device
/// identity certificates use it).
pub const NO_EXPIRY: Timestamp = Timestamp::from_unix_secs(253_402_300_799);

const DAY_SECS: i64 = 86_400;

/// The key a certificate's subject gets; it also decides how that subject signs what it issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    /// ECDSA P-256; signs with ECDSA-SHA-256.
    #[default]
    EcdsaP256,
    /// ECDSA P-384; signs with ECDSA-SHA-384.
    EcdsaP384,
    /// RSA 2048 from the fixed pool; signs with PKCS#1 v1.5 SHA-256.
    Rsa,
    /// RSA 2048 from the fixed pool; signs with PKCS#1 v1.5 SHA-384.
    RsaSha384,
    /// RSA 2048 from the fixed pool; signs with PKCS#1 v1.5 SHA-512.
    RsaSha512,
    /// Ed25519: DPS does not accept it, so it serves negative tests (unsupported algorithm).
    Ed25519,
}

/// Pre-generated RSA 2048 keys (PKCS#8 PEM); see `testdata/certs/README.md`.
const RSA_KEYS: [&str; 8] = [
    include_str!("../../../testdata/certs/rsa-1.key.pem"),
    include_str!("../../../testdata/certs/rsa-2.key.pem"),
    include_str!("../../../testdata/certs/rsa-3.key.pem"),
    include_str!("../../../testdata/certs/rsa-4.key.pem"),
    include_str!("../../../testdata/certs/rsa-5.key.pem"),
    include_str!("../../../testdata/certs/rsa-6.key.pem"),
    include_str!("../../../testdata/certs/rsa-7.key.pem"),
    include_str!("../../../testdata/certs/rsa-8.key.pem"),
];

thread_local! {
    // Per thread, so that up to eight RSA keys made one after another in one test are distinct.
    static NEXT_RSA_KEY: Cell<usize> = const { Cell::new(0) };
}

impl KeyType {
    fn generate(self) -> KeyPair {
        let rsa = |alg: &'static SignatureAlgorithm| {
            let i = NEXT_RSA_KEY.with(|n| {
                let i = n.get();
                n.set((i + 1) % RSA_KEYS.len());
                i
            });
            KeyPair::from_pkcs8_pem_and_sign_algo(RSA_KEYS[i], alg).expect("pre-generated RSA key loads")
        };
        match self {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key"),
            KeyType::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key"),
            KeyType::Rsa => rsa(&rcgen::PKCS_RSA_SHA256),
            KeyType::RsaSha384 => rsa(&rcgen::PKCS_RSA_SHA384),
            KeyType::RsaSha512 => rsa(&rcgen::PKCS_RSA_SHA512),
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key"),
        }
    }
}

/// What to put in a certificate: subject, key type, validity, serial and CA flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    common_name: String,
    organization: Option<String>,
    key_type: KeyType,
    not_before: Timestamp,
    not_after: Timestamp,
    serial: Option<u64>,
    ca: Option<bool>,
    path_len: Option<u8>,
    server_auth_only: bool,
    critical_extension: Option<Vec<u64>>,
}

impl CertSpec {
    /// A certificate with subject `CN=<common_name>`, a P-256 key and the default validity
    /// ([`DEFAULT_NOT_BEFORE`] to [`DEFAULT_NOT_AFTER`]).
    pub fn new(common_name: &str) -> Self {
        Self {
            common_name: common_name.to_owned(),
            organization: None,
            key_type: KeyType::default(),
            not_before: DEFAULT_NOT_BEFORE,
            not_after: DEFAULT_NOT_AFTER,
            serial: None,
            ca: None,
            path_len: None,
            server_auth_only: false,
            critical_extension: None,
        }
    }

    /// Uses another key type.
    pub fn key_type(mut self, key_type: KeyType) -> Self {
        self.key_type = key_type;
        self
    }

    /// Adds `O=<organization>` to the subject.
    pub fn organization(mut self, organization: &str) -> Self {
        self.organization = Some(organization.to_owned());
        self
    }

    /// Valid from `not_before` to `not_after` (whole seconds).
    pub fn validity(mut self, not_before: Timestamp, not_after: Timestamp) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }

    /// Never expires: valid from [`DEFAULT_NOT_BEFORE`] until [`NO_EXPIRY`].
    pub fn without_expiry(self) -> Self {
        self.validity(DEFAULT_NOT_BEFORE, NO_EXPIRY)
    }

    /// Expired at `now`: valid from a year before until a day before.
    pub fn expired_at(self, now: Timestamp) -> Self {
        let s = now.unix_secs();
        self.validity(Timestamp::from_unix_secs(s - 365 * DAY_SECS), Timestamp::from_unix_secs(s - DAY_SECS))
    }

    /// Not yet valid at `now`: valid from a day after for a year.
    pub fn not_yet_valid_at(self, now: Timestamp) -> Self {
        let s = now.unix_secs();
        self.validity(Timestamp::from_unix_secs(s + DAY_SECS), Timestamp::from_unix_secs(s + 365 * DAY_SECS))
    }

    /// A fixed serial number (otherwise rcgen derives one).
    pub fn serial(mut self, serial: u64) -> Self {
        self.serial = Some(serial);
        self
    }

    /// Overrides whether basicConstraints says CA (by default CAs say yes and leaves carry no
    /// basicConstraints), e.g. to build an intermediate that is not allowed to issue.
    pub fn ca(mut self, ca: bool) -> Self {
        self.ca = Some(ca);
        self
    }

    /// A CA path length constraint (number of intermediates allowed below).
    pub fn path_len(mut self, path_len: u8) -> Self {
        self.path_len = Some(path_len);
        self
    }

    /// A leaf whose extendedKeyUsage allows TLS server authentication only (not client
    /// authentication, which device certificates need).
    pub fn server_auth_only(mut self) -> Self {
        self.server_auth_only = true;
        self
    }

    /// Adds a critical extension with this OID (arcs) and an empty SEQUENCE as its value, which
    /// a verifier that does not know the OID must reject.
    pub fn critical_extension(mut self, oid: &[u64]) -> Self {
        self.critical_extension = Some(oid.to_vec());
        self
    }

    fn params(&self, default_ca: bool) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(o) = &self.organization {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        dn.push(DnType::CommonName, self.common_name.as_str());
        params.distinguished_name = dn;
        params.not_before = to_datetime(self.not_before);
        params.not_after = to_datetime(self.not_after);
        params.serial_number = self.serial.map(SerialNumber::from);
        let is_ca = self.ca.unwrap_or(default_ca);
        if is_ca {
            params.is_ca = IsCa::Ca(match self.path_len {
                Some(n) => BasicConstraints::Constrained(n),
                None => BasicConstraints::Unconstrained,
            });
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        } else {
            params.is_ca = if self.ca.is_some() { IsCa::ExplicitNoCa } else { IsCa::NoCa };
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![if self.server_auth_only {
                ExtendedKeyUsagePurpose::ServerAuth
            } else {
                ExtendedKeyUsagePurpose::ClientAuth
            }];
        }
        if let Some(oid) = &self.critical_extension {
            let mut ext = rcgen::CustomExtension::from_oid_content(oid, vec![0x30, 0x00]);
            ext.set_criticality(true);
            params.custom_extensions.push(ext);
        }
        params
    }
}

fn to_datetime(ts: Timestamp) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(ts.unix_secs()).expect("timestamp within the certificate range")
}

/// A generated certificate with its private key and the certificates above it.
#[derive(Clone)]
pub struct TestCert {
    der: Vec<u8>,
    pem: String,
    key_pem: String,
    key_der: Vec<u8>,
    key_type: KeyType,
    common_name: String,
    /// Issuers, nearest first; the last one is the root. Empty for a self-signed certificate.
    ancestors: Vec<Vec<u8>>,
}

impl TestCert {
    /// A self-signed device certificate (the individual-enrollment case), not a CA.
    pub fn self_signed(spec: CertSpec) -> TestCert {
        let key = spec.key_type.generate();
        let cert = spec.params(false).self_signed(&key).expect("self-signed certificate");
        TestCert::new(&spec, &key, cert, Vec::new())
    }

    fn new(spec: &CertSpec, key: &KeyPair, cert: rcgen::Certificate, ancestors: Vec<Vec<u8>>) -> TestCert {
        TestCert {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            key_type: spec.key_type,
            common_name: spec.common_name.clone(),
            ancestors,
        }
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The PEM encoding (one `CERTIFICATE` block).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Bare base64 of the DER, as an enrollment's `certificate` may carry it.
    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.der)
    }

    /// The private key as PKCS#8 PEM (`PRIVATE KEY`).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key as PKCS#8 DER.
    pub fn key_der(&self) -> &[u8] {
        &self.key_der
    }

    /// The subject's key type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// The subject CN (for a device: its registration id).
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// What a device presents in TLS: this certificate, then its issuers up to but excluding
    /// the root.
    pub fn chain_der(&self) -> Vec<Vec<u8>> {
        let upto = self.ancestors.len().saturating_sub(1);
        std::iter::once(self.der.clone()).chain(self.ancestors[..upto].iter().cloned()).collect()
    }

    /// This certificate and every issuer including the root, nearest first.
    pub fn full_chain_der(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.der.clone()).chain(self.ancestors.iter().cloned()).collect()
    }

    /// [`TestCert::chain_der`] as concatenated PEM: the certificate file device SDKs load.
    pub fn chain_pem(&self) -> String {
        self.chain_der().iter().map(|der| to_pem(der)).collect()
    }
}

impl fmt::Debug for TestCert {
    /// Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCert")
            .field("common_name", &self.common_name)
            .field("key_type", &self.key_type)
            .field("ancestors", &self.ancestors.len())
            .finish_non_exhaustive()
    }
}

/// A certificate authority (root or intermediate) that can issue certificates. Cloning copies
/// the key, so a clone issues certificates that verify against the same CA certificate.
pub struct TestCa {
    cert: TestCert,
    params: CertificateParams,
    issuer: Issuer<'static, KeyPair>,
}

impl Clone for TestCa {
    fn clone(&self) -> Self {
        let key = self.issuer.key();
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&key.serialized_der().into(), key.algorithm())
            .expect("a key pair reloads from its own PKCS#8");
        TestCa {
            cert: self.cert.clone(),
            params: self.params.clone(),
            issuer: Issuer::new(self.params.clone(), key),
        }
    }
}

impl TestCa {
    /// A self-signed root CA `CN=<common_name>` with a P-256 key and the default validity.
    pub fn root(common_name: &str) -> TestCa {
        TestCa::root_with(CertSpec::new(common_name))
    }

    /// A self-signed root CA from `spec`.
    pub fn root_with(spec: CertSpec) -> TestCa {
        let key = spec.key_type.generate();
        let params = spec.params(true);
        let cert = params.self_signed(&key).expect("self-signed root");
        let cert = TestCert::new(&spec, &key, cert, Vec::new());
        TestCa { cert, params: params.clone(), issuer: Issuer::new(params, key) }
    }

    /// An intermediate CA `CN=<common_name>` (P-256) signed by this CA.
    pub fn intermediate(&self, common_name: &str) -> TestCa {
        self.intermediate_with(CertSpec::new(common_name))
    }

    /// An intermediate CA from `spec`, signed by this CA.
    pub fn intermediate_with(&self, spec: CertSpec) -> TestCa {
        let key = spec.key_type.generate();
        let params = spec.params(true);
        let cert = params.signed_by(&key, &self.issuer).expect("intermediate signed by CA");
        let cert = TestCert::new(&spec, &key, cert, self.cert.full_chain_der());
        TestCa { cert, params: params.clone(), issuer: Issuer::new(params, key) }
    }

    /// A device leaf with CN = `registration_id` (P-256, default validity) signed by this CA.
    pub fn device(&self, registration_id: &str) -> TestCert {
        self.device_with(CertSpec::new(registration_id))
    }

    /// A device leaf from `spec`, signed by this CA.
    pub fn device_with(&self, spec: CertSpec) -> TestCert {
        let key = spec.key_type.generate();
        let cert = spec.params(false).signed_by(&key, &self.issuer).expect("leaf signed by CA");
        TestCert::new(&spec, &key, cert, self.cert.full_chain_der())
    }

    /// A proof-of-possession certificate: CN = `code`, signed by this CA.
    pub fn verification_cert(&self, code: &str) -> TestCert {
        self.device(code)
    }

    /// This CA's own certificate.
    pub fn cert(&self) -> &TestCert {
        &self.cert
    }

    /// This CA's certificate as DER.
    pub fn der(&self) -> &[u8] {
        self.cert.der()
    }

    /// This CA's certificate as PEM.
    pub fn pem(&self) -> &str {
        self.cert.pem()
    }
}

impl fmt::Debug for TestCa {
    /// Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa").field("cert", &self.cert).finish_non_exhaustive()
    }
}

/// PEM `CERTIFICATE` block for `der`, 64 columns, LF line endings.
pub fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// DER of the single `CERTIFICATE` block in `pem`.
pub fn pem_to_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect::<String>()
        .split_whitespace()
        .collect();
    base64::engine::general_purpose::STANDARD.decode(body).expect("PEM body is base64")
}

/// A fixed RSA-PSS chain made with OpenSSL (rcgen cannot sign RSA-PSS); see
/// `testdata/certs/README.md`.
///
/// Root (rsaEncryption key, PSS-SHA-256 self-signature) → intermediate (id-RSASSA-PSS key,
/// signed PSS-SHA-384) → device `CN=pss-device` (signed PSS-SHA-512).
pub mod rsa_pss {
    use zerotouch_proto::Timestamp;

    /// The self-signed root.
    pub const ROOT_PEM: &str = include_str!("../../../testdata/certs/pss-root.pem");
    /// The intermediate CA.
    pub const INTERMEDIATE_PEM: &str = include_str!("../../../testdata/certs/pss-intermediate.pem");
    /// The device leaf.
    pub const LEAF_PEM: &str = include_str!("../../../testdata/certs/pss-leaf.pem");
    /// The device leaf's private key (PKCS#8 PEM).
    pub const LEAF_KEY_PEM: &str = include_str!("../../../testdata/certs/pss-leaf.key.pem");
    /// The leaf's CN, i.e. the registration id.
    pub const LEAF_REGISTRATION_ID: &str = "pss-device";
    /// An instant inside every certificate's validity (2027-01-01T00:00:00Z).
    pub const VALID_AT: Timestamp = Timestamp::from_unix_secs(1_798_761_600);

    /// Leaf then intermediate, as the device presents them.
    pub fn presented_chain() -> Vec<Vec<u8>> {
        vec![super::pem_to_der(LEAF_PEM), super::pem_to_der(INTERMEDIATE_PEM)]
    }

    /// The root as DER.
    pub fn root_der() -> Vec<u8> {
        super::pem_to_der(ROOT_PEM)
    }
}

/// A fixed version 1 device certificate (no extensions) under an ECDSA P-256 root: what
/// `openssl x509 -req` without `-extfile` makes up to OpenSSL 3.1 (see `testdata/certs/`).
pub mod x509_v1 {
    use zerotouch_proto::Timestamp;

    /// The self-signed root (version 3, a CA).
    pub const ROOT_PEM: &str = include_str!("../../../testdata/certs/v1-root.pem");
    /// The version 1 device certificate.
    pub const DEVICE_PEM: &str = include_str!("../../../testdata/certs/v1-device.pem");
    /// The device's private key (PKCS#8 PEM).
    pub const DEVICE_KEY_PEM: &str = include_str!("../../../testdata/certs/v1-device.key.pem");
    /// The device certificate's CN, i.e. the registration id.
    pub const REGISTRATION_ID: &str = "v1-device";
    /// An instant inside both certificates' validity (2027-01-01T00:00:00Z).
    pub const VALID_AT: Timestamp = Timestamp::from_unix_secs(1_798_761_600);
}

#[cfg(test)]
mod tests {
    use zerotouch_engine::attestation::x509::{Certificate, PresentedChain};
    use zerotouch_engine::crypto::RingCrypto;

    use super::*;

    const NOW: Timestamp = Timestamp::from_unix_secs(1_780_272_000); // 2026-06-01

    #[test]
    fn device_under_intermediate_presents_leaf_and_intermediate() {
        let root = TestCa::root("root");
        let int = root.intermediate("int");
        let dev = int.device("dev-1");
        assert_eq!(dev.chain_der(), vec![dev.der().to_vec(), int.der().to_vec()]);
        assert_eq!(dev.full_chain_der(), vec![dev.der().to_vec(), int.der().to_vec(), root.der().to_vec()]);
        let leaf = Certificate::from_der(dev.der()).unwrap();
        assert_eq!(leaf.common_name(), Some("dev-1"));
        assert_eq!(leaf.issuer_name(), "CN=int");
        assert!(!leaf.is_ca());
        PresentedChain::from_der(&dev.full_chain_der())
            .unwrap()
            .verify_internal(NOW, &RingCrypto::new())
            .unwrap();
    }

    #[test]
    fn every_key_type_signs_a_verifiable_chain() {
        let crypto = RingCrypto::new();
        for kt in
            [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Rsa, KeyType::RsaSha384, KeyType::RsaSha512]
        {
            let root = TestCa::root_with(CertSpec::new("root").key_type(kt));
            let int = root.intermediate_with(CertSpec::new("int").key_type(kt));
            let dev = int.device_with(CertSpec::new("dev").key_type(kt));
            assert_eq!(dev.key_type(), kt);
            let chain = PresentedChain::from_der(&dev.full_chain_der()).unwrap();
            chain.verify_internal(NOW, &crypto).unwrap_or_else(|e| panic!("{kt:?}: {e}"));
        }
    }

    #[test]
    fn consecutive_rsa_keys_differ() {
        let a = TestCa::root_with(CertSpec::new("a").key_type(KeyType::Rsa));
        let b = TestCa::root_with(CertSpec::new("b").key_type(KeyType::Rsa));
        assert_ne!(a.cert().key_pem(), b.cert().key_pem());
    }

    #[test]
    fn validity_helpers_make_expired_and_future_certificates() {
        let root = TestCa::root("root");
        let expired =
            Certificate::from_der(root.device_with(CertSpec::new("old").expired_at(NOW)).der()).unwrap();
        assert!(expired.not_after() < NOW);
        let future =
            Certificate::from_der(root.device_with(CertSpec::new("new").not_yet_valid_at(NOW)).der())
                .unwrap();
        assert!(future.not_before() > NOW);
        // RFC 5280 §4.1.2.5: GeneralizedTime 99991231235959Z, exactly.
        let forever = root.device_with(CertSpec::new("forever").without_expiry());
        assert!(forever.der().windows(15).any(|w| w == b"99991231235959Z"));
        assert_eq!(Certificate::from_der(forever.der()).unwrap().not_after(), NO_EXPIRY);
    }

    #[test]
    fn pem_base64_and_key_forms_round_trip() {
        let dev = TestCert::self_signed(CertSpec::new("solo").organization("Contoso").serial(0x1234));
        assert_eq!(pem_to_der(dev.pem()), dev.der());
        assert_eq!(to_pem(dev.der()), dev.pem().replace("\r\n", "\n"));
        assert_eq!(dev.chain_der(), vec![dev.der().to_vec()]);
        assert!(dev.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
        assert!(KeyPair::from_pem(dev.key_pem()).is_ok());
        let cert = Certificate::from_text(&dev.base64()).unwrap();
        assert_eq!(cert.subject_name(), "CN=solo,O=Contoso");
        assert_eq!(cert.serial_hex(), "1234");
        assert!(!format!("{dev:?}").contains("PRIVATE"));
    }

    #[test]
    fn cloned_ca_issues_certificates_that_verify_against_the_original() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<TestCa>();
        for kt in [KeyType::EcdsaP256, KeyType::Rsa] {
            let ca = TestCa::root_with(CertSpec::new("ca").key_type(kt));
            let dev = ca.clone().device("dev");
            let leaf = Certificate::from_der(dev.der()).unwrap();
            leaf.verify_issued_by(&Certificate::from_der(ca.der()).unwrap(), &RingCrypto::new()).unwrap();
        }
    }

    #[test]
    fn verification_cert_carries_the_code() {
        let root = TestCa::root("root");
        let v = root.verification_cert("ABCDEF0123");
        assert_eq!(Certificate::from_der(v.der()).unwrap().common_name(), Some("ABCDEF0123"));
    }

    #[test]
    fn rsa_pss_vectors_verify() {
        let chain = PresentedChain::from_der(&rsa_pss::presented_chain()).unwrap();
        chain.verify_internal(rsa_pss::VALID_AT, &RingCrypto::new()).unwrap();
        assert_eq!(chain.leaf().common_name(), Some(rsa_pss::LEAF_REGISTRATION_ID));
    }
}
