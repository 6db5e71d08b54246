//! SAS tokens round-trip: build → text → parse → verify, for arbitrary scopes, ids, expiries and
//! keys, in each `sr` encoding an official SDK sends; and a changed byte never verifies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use zerotouch_engine::attestation::symmetric::{check_registration_token, signed_with};
use zerotouch_engine::crypto::{CryptoProvider, RingCrypto};
use zerotouch_proto::sas::{self, SasToken};
use zerotouch_proto::{IdScope, RegistrationId, Timestamp};

fn id_strategy() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._:-]{0,40}[A-Za-z0-9-]"
}

/// The three `sr` spellings seen on the wire (spec §4.1).
fn encodings(resource: &str) -> [String; 3] {
    let upper = sas::encode_resource(resource);
    let lower = {
        let mut out = String::new();
        let mut chars = upper.chars().peekable();
        while let Some(c) = chars.next() {
            out.push(c);
            if c == '%' {
                for _ in 0..2 {
                    if let Some(h) = chars.next() {
                        out.push(h.to_ascii_lowercase());
                    }
                }
            }
        }
        out
    };
    [upper, lower, resource.to_owned()]
}

proptest! {
    #[test]
    fn built_tokens_parse_and_verify_in_every_sdk_encoding(
        scope_hex in "[0-9A-F]{8}",
        id in id_strategy(),
        expiry in 1_000_000_000i64..4_000_000_000,
        key in proptest::collection::vec(any::<u8>(), 16..64),
        key_name in proptest::option::of(Just("registration")),
    ) {
        let crypto = RingCrypto::new();
        let scope = format!("0ne{scope_hex}");
        let resource = sas::registration_resource(&scope, &id);
        for sr in encodings(&resource) {
            let sig = crypto.hmac_sha256(&key, sas::string_to_sign(&sr, expiry).as_bytes());
            let token = SasToken::build(&sr, expiry, key_name, &sig);
            let text = token.to_string();
            let parsed = SasToken::parse(&text).unwrap();
            prop_assert_eq!(&parsed, &token);
            let signature = parsed.signature().unwrap();
            prop_assert!(signed_with(&crypto, &parsed, &signature, &key));
            prop_assert_eq!(parsed.signature_sha256().map(Vec::from), Some(signature.clone()));
            check_registration_token(
                &parsed,
                &IdScope::new(scope.as_str()).unwrap(),
                &RegistrationId::new(id.as_str()).unwrap(),
                Timestamp::from_unix_secs(expiry - 1),
                Default::default(),
            ).unwrap();
            let mut other = key.clone();
            other[0] ^= 1;
            prop_assert!(!signed_with(&crypto, &parsed, &signature, &other));
        }
    }
}
