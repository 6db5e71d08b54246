//! Symmetric-key attestation: SAS tokens signed with an individual enrollment key or with a
//! per-device key derived from a group key (spec §4).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use zerotouch_proto::sas::{self, SasToken, REGISTRATION_KEY_NAME};
use zerotouch_proto::{IdScope, RegistrationId, Timestamp};

use crate::crypto::{constant_time_eq, CryptoProvider};
use crate::error::{AuthError, Error};

/// Smallest accepted symmetric key, in bytes (spec §4.3).
pub const MIN_KEY_LEN: usize = 16;
/// Largest accepted symmetric key, in bytes (spec §4.3).
pub const MAX_KEY_LEN: usize = 64;

/// Decodes a base64 symmetric key and checks its length (16–64 bytes).
///
/// # Errors
/// [`Error::BadRequest`] when the key is not base64 or has the wrong length.
pub fn decode_key(key_b64: &str) -> Result<Vec<u8>, Error> {
    let key = STANDARD
        .decode(key_b64.trim())
        .map_err(|_| Error::BadRequest("symmetric key is not valid base64".into()))?;
    if !(MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len()) {
        return Err(Error::BadRequest(format!(
            "symmetric key must decode to {MIN_KEY_LEN}-{MAX_KEY_LEN} bytes, got {}",
            key.len()
        )));
    }
    Ok(key)
}

/// The per-device key of a group enrollment: `HMAC-SHA256(groupKey, registrationId)` over the
/// exact bytes of the id (case matters, spec §4.4 vectors V1/V2).
pub fn derive_device_key(crypto: &dyn CryptoProvider, group_key: &[u8], registration_id: &str) -> [u8; 32] {
    crypto.hmac_sha256(group_key, registration_id.as_bytes())
}

/// [`derive_device_key`] with base64 in and out, as the docs and CLIs present it.
///
/// # Errors
/// [`Error::BadRequest`] when the group key is not valid base64.
pub fn derive_device_key_base64(
    crypto: &dyn CryptoProvider,
    group_key_b64: &str,
    registration_id: &str,
) -> Result<String, Error> {
    let key = STANDARD
        .decode(group_key_b64.trim())
        .map_err(|_| Error::BadRequest("group key is not valid base64".into()))?;
    Ok(STANDARD.encode(derive_device_key(crypto, &key, registration_id)))
}

/// Signs a registration SAS token the way our device client sends it: `sr` encoded like the
/// Python SDK (`%2F`), `skn=registration`.
pub fn registration_token(
    crypto: &dyn CryptoProvider,
    key: &[u8],
    id_scope: &str,
    registration_id: &str,
    expiry_secs: i64,
) -> SasToken<'static> {
    let sr = sas::encode_resource(&sas::registration_resource(id_scope, registration_id));
    let sig = crypto.hmac_sha256(key, sas::string_to_sign(&sr, expiry_secs).as_bytes());
    SasToken::build(&sr, expiry_secs, Some(REGISTRATION_KEY_NAME), &sig)
}

/// Checks everything about a registration token except its signature: `sr` names
/// `{idScope}/registrations/{registrationId}` (decoded, ASCII case-insensitive), `skn` is absent
/// or `registration`, and `se` is not further in the past than `skew`.
///
/// # Errors
/// [`AuthError::WrongResource`], [`AuthError::WrongKeyName`] or [`AuthError::TokenExpired`].
pub fn check_registration_token(
    token: &SasToken<'_>,
    id_scope: &IdScope,
    registration_id: &RegistrationId,
    now: Timestamp,
    skew: std::time::Duration,
) -> Result<(), AuthError> {
    if !token.is_registration_resource(id_scope.as_str(), registration_id.as_str()) {
        return Err(AuthError::WrongResource(
            token.resource().unwrap_or_else(|_| token.resource_raw().to_owned()),
        ));
    }
    if let Some(skn) = token.key_name() {
        if skn != REGISTRATION_KEY_NAME {
            return Err(AuthError::WrongKeyName(skn.to_owned()));
        }
    }
    if token.expiry() + skew < now {
        return Err(AuthError::TokenExpired);
    }
    Ok(())
}

/// Whether `token` is signed with `key` (HMAC-SHA256 over the raw `sr` + `"\n"` + raw `se`,
/// compared in constant time).
pub fn signed_with(crypto: &dyn CryptoProvider, token: &SasToken<'_>, signature: &[u8], key: &[u8]) -> bool {
    let expected = crypto.hmac_sha256_parts(key, &token.signed_parts());
    constant_time_eq(&expected, signature)
}

#[cfg(all(test, feature = "ring"))]
mod tests {
    use super::*;
    use crate::crypto::RingCrypto;

    const V3_KEY: &str =
        "18RQk/hOPJR9EbsJlk2j8WA6vWaj/yi+oaYg7zmxfQNdOyMSu+SJ8O7TSlZhDJCYmn4rzEiVKIzNiVAWjLxrGA==";

    #[test]
    fn derived_key_matches_published_vectors() {
        let c = RingCrypto::new();
        let group =
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
        assert_eq!(
            derive_device_key_base64(&c, group, "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6").unwrap(),
            "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc="
        );
        assert_eq!(
            derive_device_key_base64(&c, group, "SN-007-888-ABC-MAC-A1-B2-C3-D4-E5-F6").unwrap(),
            "9GWVnYuoOLXlHc346XjhLRb9pKgIOrKSwxDRSOgnvXo="
        );
    }

    #[test]
    fn every_sdk_sr_encoding_verifies() {
        let c = RingCrypto::new();
        let key = STANDARD.decode(V3_KEY).unwrap();
        for (sr, sig) in [
            (
                "0ne00111111%2Fregistrations%2Fmy-symkey-device",
                "8VPprb8BiTkuVE0hBqHm/SVrzVpdD8VZcXugntdbhuU=",
            ),
            (
                "0ne00111111%2fregistrations%2fmy-symkey-device",
                "6GqlY2Tr8xDlSYE04oQcdEH7vznSt2LcTUobz9BmpAY=",
            ),
            ("0ne00111111/registrations/my-symkey-device", "nywv584Rsikp8eagkd4XnrDkLPXMGakB0DWzqcS0hPQ="),
        ] {
            let enc: String = sig.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
            let text = format!("SharedAccessSignature sr={sr}&sig={enc}&se=1663952627");
            let token = SasToken::parse(&text).unwrap();
            let signature = token.signature().unwrap();
            assert!(signed_with(&c, &token, &signature, &key), "{sr}");
            let scope = IdScope::new("0ne00111111").unwrap();
            let id = RegistrationId::new("my-symkey-device").unwrap();
            check_registration_token(
                &token,
                &scope,
                &id,
                Timestamp::from_unix_secs(1_663_952_000),
                Default::default(),
            )
            .unwrap();
        }
    }

    #[test]
    fn our_token_matches_vector_v4() {
        let c = RingCrypto::new();
        let key = STANDARD.decode(V3_KEY).unwrap();
        let t = registration_token(&c, &key, "0ne00111111", "my-symkey-device", 1_663_952_627);
        assert_eq!(STANDARD.encode(t.signature().unwrap()), "8VPprb8BiTkuVE0hBqHm/SVrzVpdD8VZcXugntdbhuU=");
    }

    #[test]
    fn token_checks_reject_wrong_resource_name_and_expiry() {
        let c = RingCrypto::new();
        let scope = IdScope::new("0ne00111111").unwrap();
        let id = RegistrationId::new("dev1").unwrap();
        let other = RegistrationId::new("dev2").unwrap();
        let t = registration_token(&c, &[1; 32], "0ne00111111", "dev1", 1000);
        let now = Timestamp::from_unix_secs(900);
        assert!(check_registration_token(&t, &scope, &id, now, Default::default()).is_ok());
        assert!(matches!(
            check_registration_token(&t, &scope, &other, now, Default::default()),
            Err(AuthError::WrongResource(_))
        ));
        assert_eq!(
            check_registration_token(&t, &scope, &id, Timestamp::from_unix_secs(1001), Default::default()),
            Err(AuthError::TokenExpired)
        );
        let text = t.to_string().replace("skn=registration", "skn=owner");
        let skn = SasToken::parse(&text).unwrap();
        assert!(matches!(
            check_registration_token(&skn, &scope, &id, now, Default::default()),
            Err(AuthError::WrongKeyName(_))
        ));
    }

    #[test]
    fn key_length_rules() {
        assert!(decode_key(&STANDARD.encode([0u8; 16])).is_ok());
        assert!(decode_key(&STANDARD.encode([0u8; 64])).is_ok());
        assert!(decode_key(&STANDARD.encode([0u8; 15])).is_err());
        assert!(decode_key(&STANDARD.encode([0u8; 65])).is_err());
        assert!(decode_key("not base64!").is_err());
    }
}
