//! SAS and derived-key vectors with published (or independently recomputed) inputs and outputs
//! (spec §4.5). Tests in every crate check against these, never against values they computed.

/// A group-key derivation vector.
#[derive(Debug, Clone, Copy)]
pub struct DerivedKeyVector {
    /// Base64 group key.
    pub group_key: &'static str,
    /// Registration id, exact bytes.
    pub registration_id: &'static str,
    /// Base64 derived device key.
    pub device_key: &'static str,
}

/// A SAS signature vector.
#[derive(Debug, Clone, Copy)]
pub struct SasVector {
    /// Base64 key.
    pub key: &'static str,
    /// The `sr` value exactly as sent.
    pub sr: &'static str,
    /// Expiry (Unix seconds).
    pub se: i64,
    /// Base64 signature.
    pub sig: &'static str,
}

/// V1 (published in the DPS docs and a C# unit test) and V2 (upper-case id, older doc revision).
pub const DERIVED_KEYS: [DerivedKeyVector; 2] = [
    DerivedKeyVector {
        group_key: "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        registration_id: "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6",
        device_key: "Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=",
    },
    DerivedKeyVector {
        group_key: "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==",
        registration_id: "SN-007-888-ABC-MAC-A1-B2-C3-D4-E5-F6",
        device_key: "9GWVnYuoOLXlHc346XjhLRb9pKgIOrKSwxDRSOgnvXo=",
    },
];

/// The key of V3–V6.
pub const SAS_KEY: &str =
    "18RQk/hOPJR9EbsJlk2j8WA6vWaj/yi+oaYg7zmxfQNdOyMSu+SJ8O7TSlZhDJCYmn4rzEiVKIzNiVAWjLxrGA==";

/// V3 (published hub token), V4 (Python `%2F`), V5 (C SDK `%2f`), V6 (Node / Rust raw `/`).
pub const SAS: [SasVector; 4] = [
    SasVector {
        key: SAS_KEY,
        sr: "MyExampleHub.azure-devices.net%2Fdevices%2Fmy-symkey-device",
        se: 1_663_119_026,
        sig: "f+wW8XOKeJOtiPc9Iwjc4OpExvPM7NlhM9qxN2a1aAM=",
    },
    SasVector {
        key: SAS_KEY,
        sr: "0ne00111111%2Fregistrations%2Fmy-symkey-device",
        se: 1_663_952_627,
        sig: "8VPprb8BiTkuVE0hBqHm/SVrzVpdD8VZcXugntdbhuU=",
    },
    SasVector {
        key: SAS_KEY,
        sr: "0ne00111111%2fregistrations%2fmy-symkey-device",
        se: 1_663_952_627,
        sig: "6GqlY2Tr8xDlSYE04oQcdEH7vznSt2LcTUobz9BmpAY=",
    },
    SasVector {
        key: SAS_KEY,
        sr: "0ne00111111/registrations/my-symkey-device",
        se: 1_663_952_627,
        sig: "nywv584Rsikp8eagkd4XnrDkLPXMGakB0DWzqcS0hPQ=",
    },
];
