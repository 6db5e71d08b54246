//! A crypto provider for tests that need to know, or repeat, the randomness.

use zerotouch_engine::crypto::{
    BadSignature, CryptoProvider, HmacKey, RandomFailure, RingCrypto, SignatureAlgorithm,
};

/// Ring's digests, MACs and signature checks, with the random bytes `random` makes: so that
/// jittered waits are known, ids repeat from run to run, or a failing source can be tested.
pub struct RingWithRandom<F> {
    ring: RingCrypto,
    random: F,
}

impl<F> RingWithRandom<F>
where
    F: Fn(&mut [u8]) -> Result<(), RandomFailure> + Send + Sync,
{
    /// Ring, with `random` filling every buffer asked for.
    pub fn new(random: F) -> Self {
        Self { ring: RingCrypto::new(), random }
    }
}

impl<F> std::fmt::Debug for RingWithRandom<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingWithRandom").finish_non_exhaustive()
    }
}

impl<F> CryptoProvider for RingWithRandom<F>
where
    F: Fn(&mut [u8]) -> Result<(), RandomFailure> + Send + Sync,
{
    fn hmac_sha256(&self, key: &[u8], msg: &[u8]) -> [u8; 32] {
        self.ring.hmac_sha256(key, msg)
    }
    fn hmac_sha256_parts(&self, key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        self.ring.hmac_sha256_parts(key, parts)
    }
    fn prepare_hmac_sha256(&self, key: &[u8]) -> Option<Box<dyn HmacKey>> {
        self.ring.prepare_hmac_sha256(key)
    }
    fn sha256(&self, data: &[u8]) -> [u8; 32] {
        self.ring.sha256(data)
    }
    fn sha1(&self, data: &[u8]) -> [u8; 20] {
        self.ring.sha1(data)
    }
    fn verify_signature(
        &self,
        algorithm: SignatureAlgorithm,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), BadSignature> {
        self.ring.verify_signature(algorithm, public_key, message, signature)
    }
    fn fill_random(&self, out: &mut [u8]) -> Result<(), RandomFailure> {
        (self.random)(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn randomness_is_what_the_closure_makes_and_the_rest_is_rings() {
        let crypto = RingWithRandom::new(|out: &mut [u8]| {
            out.fill(7);
            Ok(())
        });
        let mut out = [0u8; 4];
        crypto.fill_random(&mut out).unwrap();
        assert_eq!(out, [7; 4]);
        assert_eq!(crypto.sha256(b"abc"), RingCrypto::new().sha256(b"abc"));
        let failing = RingWithRandom::new(|_: &mut [u8]| Err(RandomFailure));
        assert!(failing.fill_random(&mut out).is_err());
    }
}
