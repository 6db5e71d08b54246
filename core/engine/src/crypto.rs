//! Cryptography and randomness come in through [`CryptoProvider`]; [`RingCrypto`] is the default.
//!
//! Keeping every primitive behind one trait lets fuzzing and the simulator substitute a
//! deterministic provider, and keeps the core free of an RNG of its own.

/// Signature algorithms accepted in X.509 chains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SignatureAlgorithm {
    /// RSA PKCS#1 v1.5 with SHA-256.
    RsaPkcs1Sha256,
    /// RSA PKCS#1 v1.5 with SHA-384.
    RsaPkcs1Sha384,
    /// RSA PKCS#1 v1.5 with SHA-512.
    RsaPkcs1Sha512,
    /// RSA-PSS with SHA-256 (MGF1-SHA-256, salt 32).
    RsaPssSha256,
    /// RSA-PSS with SHA-384.
    RsaPssSha384,
    /// RSA-PSS with SHA-512.
    RsaPssSha512,
    /// ECDSA over P-256 with SHA-256 (ASN.1 DER signature).
    EcdsaP256Sha256,
    /// ECDSA over P-256 with SHA-384.
    EcdsaP256Sha384,
    /// ECDSA over P-384 with SHA-256.
    EcdsaP384Sha256,
    /// ECDSA over P-384 with SHA-384.
    EcdsaP384Sha384,
}

/// A signature did not verify (or the key/algorithm pair is unsupported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("signature verification failed")]
pub struct BadSignature;

/// The random source failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("random source failed")]
pub struct RandomFailure;

/// An HMAC-SHA256 key prepared once for many messages: a group key derives the key of every
/// device of its group, and preparing it (hashing the padded key) is half the cost of one
/// derivation.
pub trait HmacKey: Send + Sync {
    /// HMAC-SHA256 of `msg` under this key; equal to [`CryptoProvider::hmac_sha256`] with the
    /// key the value was prepared from.
    fn sign(&self, msg: &[u8]) -> [u8; 32];
}

/// Crypto primitives and randomness used by the engine.
pub trait CryptoProvider: Send + Sync {
    /// HMAC-SHA256 of `msg` under `key`.
    fn hmac_sha256(&self, key: &[u8], msg: &[u8]) -> [u8; 32];
    /// HMAC-SHA256 of the concatenation of `parts` under `key`: what a SAS verifier needs
    /// (`sr`, a newline, `se`) without joining them first. The default joins them.
    fn hmac_sha256_parts(&self, key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.hmac_sha256(key, &parts.concat())
    }
    /// `key` prepared for many [`HmacKey::sign`] calls, when this provider can do that; `None`
    /// (the default) makes callers use [`CryptoProvider::hmac_sha256`] with the raw key.
    fn prepare_hmac_sha256(&self, key: &[u8]) -> Option<Box<dyn HmacKey>> {
        let _ = key;
        None
    }
    /// SHA-256 digest.
    fn sha256(&self, data: &[u8]) -> [u8; 32];
    /// SHA-1 digest (certificate thumbprints only).
    fn sha1(&self, data: &[u8]) -> [u8; 20];
    /// Verifies `signature` over `message` with a public key given as the contents of the
    /// SubjectPublicKeyInfo `subjectPublicKey` BIT STRING (RSAPublicKey DER, or an uncompressed
    /// EC point).
    ///
    /// # Errors
    /// [`BadSignature`] when it does not verify.
    fn verify_signature(
        &self,
        algorithm: SignatureAlgorithm,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), BadSignature>;
    /// Fills `out` with cryptographically secure random bytes.
    ///
    /// # Errors
    /// [`RandomFailure`] when the source fails.
    fn fill_random(&self, out: &mut [u8]) -> Result<(), RandomFailure>;
}

/// Constant-time equality of two byte strings (length may leak, contents do not).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    if a.len() != b.len() {
        return false;
    }
    // Eight bytes at a time (subtle compares slices a byte at a time, each behind its own
    // optimisation barrier): every word is compared, whatever the earlier ones gave.
    let (a_words, b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a_words.remainder().ct_eq(b_words.remainder());
    a_words.zip(b_words).fold(tail, |equal, (x, y)| equal & word(x).ct_eq(&word(y))).into()
}

/// A chunk of exactly eight bytes as a word.
fn word(chunk: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(chunk);
    u64::from_le_bytes(bytes)
}

#[cfg(feature = "ring")]
pub use ring_provider::RingCrypto;

#[cfg(feature = "ring")]
mod ring_provider {
    use ring::{digest, hmac, rand::SecureRandom, signature};

    use super::{BadSignature, CryptoProvider, HmacKey, RandomFailure, SignatureAlgorithm};

    /// [`CryptoProvider`] backed by ring and the operating system's random source.
    #[derive(Debug)]
    pub struct RingCrypto {
        rng: ring::rand::SystemRandom,
    }

    impl RingCrypto {
        /// A provider using the system random source.
        pub fn new() -> Self {
            Self { rng: ring::rand::SystemRandom::new() }
        }
    }

    impl Default for RingCrypto {
        fn default() -> Self {
            Self::new()
        }
    }

    /// A ring HMAC key: holds the inner and outer hash states of the padded key.
    struct RingHmacKey(hmac::Key);

    impl HmacKey for RingHmacKey {
        fn sign(&self, msg: &[u8]) -> [u8; 32] {
            let tag = hmac::sign(&self.0, msg);
            let mut out = [0u8; 32];
            out.copy_from_slice(tag.as_ref());
            out
        }
    }

    impl CryptoProvider for RingCrypto {
        fn hmac_sha256(&self, key: &[u8], msg: &[u8]) -> [u8; 32] {
            RingHmacKey(hmac::Key::new(hmac::HMAC_SHA256, key)).sign(msg)
        }

        fn hmac_sha256_parts(&self, key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
            let mut context = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
            for part in parts {
                context.update(part);
            }
            let mut out = [0u8; 32];
            out.copy_from_slice(context.sign().as_ref());
            out
        }

        fn prepare_hmac_sha256(&self, key: &[u8]) -> Option<Box<dyn HmacKey>> {
            Some(Box::new(RingHmacKey(hmac::Key::new(hmac::HMAC_SHA256, key))))
        }

        fn sha256(&self, data: &[u8]) -> [u8; 32] {
            let d = digest::digest(&digest::SHA256, data);
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        }

        fn sha1(&self, data: &[u8]) -> [u8; 20] {
            let d = digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, data);
            let mut out = [0u8; 20];
            out.copy_from_slice(d.as_ref());
            out
        }

        fn verify_signature(
            &self,
            algorithm: SignatureAlgorithm,
            public_key: &[u8],
            message: &[u8],
            sig: &[u8],
        ) -> Result<(), BadSignature> {
            let alg: &dyn signature::VerificationAlgorithm = match algorithm {
                SignatureAlgorithm::RsaPkcs1Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                SignatureAlgorithm::RsaPkcs1Sha384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                SignatureAlgorithm::RsaPkcs1Sha512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                SignatureAlgorithm::RsaPssSha256 => &signature::RSA_PSS_2048_8192_SHA256,
                SignatureAlgorithm::RsaPssSha384 => &signature::RSA_PSS_2048_8192_SHA384,
                SignatureAlgorithm::RsaPssSha512 => &signature::RSA_PSS_2048_8192_SHA512,
                SignatureAlgorithm::EcdsaP256Sha256 => &signature::ECDSA_P256_SHA256_ASN1,
                SignatureAlgorithm::EcdsaP256Sha384 => &signature::ECDSA_P256_SHA384_ASN1,
                SignatureAlgorithm::EcdsaP384Sha256 => &signature::ECDSA_P384_SHA256_ASN1,
                SignatureAlgorithm::EcdsaP384Sha384 => &signature::ECDSA_P384_SHA384_ASN1,
            };
            signature::UnparsedPublicKey::new(alg, public_key).verify(message, sig).map_err(|_| BadSignature)
        }

        fn fill_random(&self, out: &mut [u8]) -> Result<(), RandomFailure> {
            self.rng.fill(out).map_err(|_| RandomFailure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_sees_every_byte_and_the_length() {
        for len in [0usize, 1, 7, 8, 9, 32, 33] {
            let a: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            assert!(constant_time_eq(&a, &a.clone()), "{len}");
            for at in 0..len {
                let mut b = a.clone();
                b[at] ^= 0x80;
                assert!(!constant_time_eq(&a, &b), "{len} {at}");
            }
            let mut longer = a.clone();
            longer.push(0);
            assert!(!constant_time_eq(&a, &longer), "{len}");
        }
    }
}
