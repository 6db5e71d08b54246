//! TPM attestation vocabulary: endorsement and storage root keys and the registration id a TPM
//! device derives from its EK (spec §6.2). The nonce challenge itself arrives in a later release;
//! until then the provisioner refuses TPM registrations with a clear message.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::crypto::CryptoProvider;
use crate::error::Error;

/// A device's TPM public keys as sent in `tpm{endorsementKey, storageRootKey}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmKeys {
    /// Marshaled `TPM2B_PUBLIC` of the endorsement key.
    pub endorsement_key: Vec<u8>,
    /// Marshaled `TPM2B_PUBLIC` of the storage root key.
    pub storage_root_key: Option<Vec<u8>>,
}

impl TpmKeys {
    /// Decodes the base64 members of a `tpm` object.
    ///
    /// # Errors
    /// [`Error::BadRequest`] when a key is not base64 or is empty.
    pub fn from_base64(endorsement_key: &str, storage_root_key: Option<&str>) -> Result<Self, Error> {
        let decode = |s: &str, what: &str| {
            STANDARD
                .decode(s.trim())
                .ok()
                .filter(|k| !k.is_empty())
                .ok_or_else(|| Error::BadRequest(format!("tpm.{what} is not valid base64")))
        };
        Ok(Self {
            endorsement_key: decode(endorsement_key, "endorsementKey")?,
            storage_root_key: storage_root_key.map(|s| decode(s, "storageRootKey")).transpose()?,
        })
    }
}

/// The registration id a TPM device uses: lower-case unpadded RFC 4648 base32 of SHA-256 over the
/// EK `TPM2B_PUBLIC` bytes (52 characters from `a-z2-7`).
pub fn registration_id_from_ek(crypto: &dyn CryptoProvider, endorsement_key: &[u8]) -> String {
    base32_lower(&crypto.sha256(endorsement_key))
}

/// RFC 4648 base32, lower-case alphabet, no padding. Written here because it is ten lines and the
/// only use; a crate would add a dependency to the core for nothing.
fn base32_lower(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut out = String::with_capacity(data.len().div_ceil(5) * 8);
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            out.push(char::from(ALPHABET[((buffer >> (bits - 5)) & 31) as usize]));
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32_lower(b""), "");
        assert_eq!(base32_lower(b"f"), "my");
        assert_eq!(base32_lower(b"fo"), "mzxq");
        assert_eq!(base32_lower(b"foo"), "mzxw6");
        assert_eq!(base32_lower(b"foob"), "mzxw6yq");
        assert_eq!(base32_lower(b"fooba"), "mzxw6ytb");
        assert_eq!(base32_lower(b"foobar"), "mzxw6ytboi");
        assert_eq!(base32_lower(&[0u8; 32]).len(), 52);
    }

    #[test]
    fn tpm_keys_must_be_base64() {
        assert!(TpmKeys::from_base64("AAEC", Some("AQID")).is_ok());
        assert!(TpmKeys::from_base64("%%%", None).is_err());
        assert!(TpmKeys::from_base64("", None).is_err());
    }
}
