//! Validated identifiers: registration ids, device and module ids, ID scopes, operation ids, etags.
//!
//! Each newtype's constructor is the only place its rule is checked ("parse, don't validate").

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ProtoError;
use crate::text::Text;

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:path) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Text);

        impl $name {
            /// Parses and validates the identifier.
            ///
            /// # Errors
            /// [`ProtoError::InvalidId`] when the value breaks the documented rules.
            pub fn new(value: impl Into<Text>) -> Result<Self, ProtoError> {
                let value = value.into();
                $check(&value).map_err(|reason| ProtoError::InvalidId { kind: $kind, reason })?;
                Ok(Self(value))
            }

            /// The identifier exactly as given.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The identifier's text, shared (cloning it copies no characters).
            pub fn as_text(&self) -> &Text {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = ProtoError;
            fn from_str(s: &str) -> Result<Self, ProtoError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = ProtoError;
            fn try_from(s: String) -> Result<Self, ProtoError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0.into()
            }
        }

        impl From<$name> for Text {
            fn from(v: $name) -> Text {
                v.0
            }
        }

        impl From<&$name> for Text {
            fn from(v: &$name) -> Text {
                v.0.clone()
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = Text::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Maximum length of registration ids, enrollment group ids, device ids and module ids.
pub const MAX_ID_LEN: usize = 128;

/// Characters allowed in a DPS registration id or enrollment group id besides ASCII alphanumerics.
pub const REGISTRATION_ID_SPECIALS: &str = "-._:";

/// Characters allowed in an IoT Hub device or module id besides ASCII alphanumerics.
pub const DEVICE_ID_SPECIALS: &str = "-:.+%_#*?!(),=@;$'";

/// The first character of `s` that is neither an ASCII alphanumeric nor one of `specials`
/// (ASCII). Every id a request carries is checked, so the common answer (none) comes from its
/// bytes, without decoding characters: a non-ASCII character's bytes are never alphanumeric
/// ASCII nor in `specials`.
fn first_disallowed(s: &str, specials: &str) -> Option<char> {
    if s.bytes().all(|b| b.is_ascii_alphanumeric() || specials.as_bytes().contains(&b)) {
        return None;
    }
    s.chars().find(|c| !(c.is_ascii_alphanumeric() || specials.contains(*c)))
}

fn check_registration_id(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters, got {}", s.len()));
    }
    if let Some(c) = first_disallowed(s, REGISTRATION_ID_SPECIALS) {
        return Err(format!(
            "character {c:?} is not allowed (use A-Z, a-z, 0-9 and {REGISTRATION_ID_SPECIALS})"
        ));
    }
    let last = s.chars().last().unwrap_or('-');
    if !(last.is_ascii_alphanumeric() || last == '-') {
        return Err(format!("must end with an alphanumeric character or '-', not {last:?}"));
    }
    Ok(())
}

fn check_device_id(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters, got {}", s.len()));
    }
    if let Some(c) = first_disallowed(s, DEVICE_ID_SPECIALS) {
        return Err(format!(
            "character {c:?} is not allowed (use ASCII alphanumerics and {DEVICE_ID_SPECIALS})"
        ));
    }
    Ok(())
}

fn check_id_scope(s: &str) -> Result<(), String> {
    let ok =
        s.len() == 11 && s[..3].eq_ignore_ascii_case("0ne") && s[3..].chars().all(|c| c.is_ascii_hexdigit());
    if ok {
        Ok(())
    } else {
        Err(format!("expected `0ne` followed by 8 hex digits (like 0ne00111111), got {s:?}"))
    }
}

fn check_operation_id(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters"));
    }
    if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
        Ok(())
    } else {
        Err("only ASCII alphanumerics, '.' and '-' are allowed".into())
    }
}

string_newtype!(
    /// A DPS registration id: 1–128 characters from `A-Z a-z 0-9 - . _ :`, ending with an
    /// alphanumeric character or `-`.
    ///
    /// DPS treats registration ids case-insensitively: [`RegistrationId::key`] is the lower-cased
    /// form used to look records up. The id keeps the case the device sent, because derived group
    /// keys and SAS resources are computed over the exact bytes (spec §4.4).
    RegistrationId,
    "registration id",
    check_registration_id
);

impl RegistrationId {
    /// Lower-cased form, the case-insensitive lookup key of this registration.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }

    /// [`RegistrationId::key`] without a copy when the id is lower-case already, as most are:
    /// what a lookup needs.
    pub fn lookup_key(&self) -> std::borrow::Cow<'_, str> {
        if self.0.bytes().any(|b| b.is_ascii_uppercase()) {
            std::borrow::Cow::Owned(self.key())
        } else {
            std::borrow::Cow::Borrowed(&self.0)
        }
    }

    /// Whether two registration ids name the same registration (ASCII case-insensitive).
    pub fn same_registration(&self, other: &RegistrationId) -> bool {
        self.0.eq_ignore_ascii_case(&other.0)
    }
}

/// Every registration id is a device id: its characters (`A-Z a-z 0-9 - . _ :`) are all allowed
/// in device ids and both are limited to [`MAX_ID_LEN`]. A device registering through a group
/// gets its registration id as device id, so this needs no second check.
impl From<&RegistrationId> for DeviceId {
    fn from(id: &RegistrationId) -> Self {
        debug_assert!(check_device_id(&id.0).is_ok());
        DeviceId(id.0.clone())
    }
}

string_newtype!(
    /// A DPS enrollment group id: same rules as a registration id.
    EnrollmentGroupId,
    "enrollment group id",
    check_registration_id
);

impl EnrollmentGroupId {
    /// Lower-cased form, the case-insensitive lookup key of this group.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

string_newtype!(
    /// An IoT Hub device id: case-sensitive, 1–128 ASCII characters from alphanumerics and
    /// `- : . + % _ # * ? ! ( ) , = @ ; $ '`.
    DeviceId,
    "device id",
    check_device_id
);

string_newtype!(
    /// An IoT Hub module id: same character set and length as a device id.
    ModuleId,
    "module id",
    check_device_id
);

string_newtype!(
    /// A DPS ID scope: `0ne` followed by 8 hexadecimal digits, for example `0ne00111111`.
    /// Compared case-insensitively with [`IdScope::matches`].
    IdScope,
    "id scope",
    check_id_scope
);

impl IdScope {
    /// Whether `other` names this scope (ASCII case-insensitive).
    pub fn matches(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

string_newtype!(
    /// A DPS operation id such as `5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550`.
    /// Only `[0-9A-Za-z.-]`, so it never needs URL encoding in topics or paths.
    OperationId,
    "operation id",
    check_operation_id
);

impl OperationId {
    /// Builds an operation id in the shape real DPS uses, `<digit>.<16 hex>.<uuid>`, from 32
    /// random bytes supplied by the caller (the core has no RNG).
    pub fn from_random(random: &[u8; 32]) -> Self {
        // Made on every registration: formatted on the stack and copied once into its text.
        let mut text = [b'.'; 1 + 1 + 16 + 1 + 36];
        text[0] = b'0' + random[0] % 10;
        hex_into(&mut text[2..18], &random[1..9]);
        text[19..].copy_from_slice(&uuid_text(&random[16..32]));
        // Digits, hex and hyphens only: always UTF-8.
        Self(Text::from(std::str::from_utf8(&text).unwrap_or_default()))
    }
}

/// Formats 16 random bytes as a version-4 UUID string (lower-case, hyphenated).
pub fn uuid_from_bytes(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    push_uuid(&mut s, bytes);
    s
}

/// Appends [`uuid_from_bytes`] of `bytes` to `out` (no string of its own: operation ids and etags
/// are made on every registration).
pub fn push_uuid(out: &mut String, bytes: &[u8]) {
    let text = uuid_text(bytes);
    // Hex digits and hyphens only: always UTF-8.
    out.push_str(std::str::from_utf8(&text).unwrap_or_default());
}

/// [`uuid_from_bytes`] of `bytes` as ASCII on the stack (the first 16 bytes are used, missing ones
/// count as zero).
pub fn uuid_text(bytes: &[u8]) -> [u8; 36] {
    /// Where each byte's two digits go: groups of 4, 2, 2, 2 and 6 bytes between hyphens.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut b = [0u8; 16];
    for (dst, src) in b.iter_mut().zip(bytes) {
        *dst = *src;
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut out = [b'-'; 36];
    for (byte, at) in b.into_iter().zip(AT) {
        out[at..at + 2].copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
    }
    out
}

/// The two lower-case hex digits of every byte value: operation ids and etags are formatted on
/// every registration, a table look-up per byte instead of two digit look-ups and shifts.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [DIGITS[i >> 4], DIGITS[i & 15]];
        i += 1;
    }
    pairs
};

/// Writes `bytes` as lower-case hex into `out` (twice their length).
fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// An entity tag as carried in JSON bodies (opaque; DPS enrollment etags include their quotes,
/// hub identity etags do not).
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ETag(String);

impl ETag {
    /// Wraps an etag value exactly as it appears in a body.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value exactly as stored.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The value with one optional `W/` prefix and one pair of surrounding quotes removed: the
    /// form two etags are compared in.
    pub fn bare(&self) -> &str {
        strip_etag(&self.0)
    }

    /// Whether this etag and `other` denote the same version (compared in bare form).
    pub fn matches(&self, other: &ETag) -> bool {
        self.bare() == other.bare()
    }
}

impl fmt::Debug for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ETag({:?})", self.0)
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The bare form of an etag's text, as [`ETag::bare`] gives it, for etags kept as plain text:
/// surrounding ASCII whitespace, a weak `W/` prefix and one pair of quotes removed.
pub fn bare_etag(text: &str) -> &str {
    strip_etag(text)
}

fn strip_etag(s: &str) -> &str {
    let s = s.trim_ascii();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.strip_prefix('"').and_then(|x| x.strip_suffix('"')).unwrap_or(s)
}

/// The meaning of an `If-Match` header, as the official SDKs use it (hub spec §1.3, DPS §7.4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum IfMatch {
    /// No header: create (hub registry) or upsert (DPS enrollments).
    #[default]
    Absent,
    /// `*` or `"*"`: any existing entity.
    Any,
    /// A specific etag (quotes and `W/` already stripped).
    Tag(String),
}

impl IfMatch {
    /// Parses a header value; `None` means the header was absent.
    pub fn from_header(value: Option<&str>) -> Self {
        match value {
            None => IfMatch::Absent,
            Some(v) => {
                let bare = strip_etag(v);
                if bare == "*" {
                    IfMatch::Any
                } else {
                    IfMatch::Tag(bare.to_owned())
                }
            }
        }
    }

    /// Whether an entity with `current` etag satisfies this precondition (`Absent` always does).
    pub fn allows(&self, current: &ETag) -> bool {
        match self {
            IfMatch::Absent | IfMatch::Any => true,
            IfMatch::Tag(t) => t == current.bare(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_rules() {
        assert!(RegistrationId::new("sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6").is_ok());
        assert!(RegistrationId::new("a").is_ok());
        assert!(RegistrationId::new("dev:1.x_y-").is_ok());
        assert!(RegistrationId::new("").is_err());
        assert!(RegistrationId::new("dev.").is_err());
        assert!(RegistrationId::new("dev_").is_err());
        assert!(RegistrationId::new("dev/1").is_err());
        assert!(RegistrationId::new("a".repeat(129)).is_err());
        assert!(RegistrationId::new("a".repeat(128)).is_ok());
        let upper = RegistrationId::new("DEV-1").unwrap();
        assert_eq!(upper.key(), "dev-1");
        assert!(upper.same_registration(&RegistrationId::new("dev-1").unwrap()));
    }

    #[test]
    fn device_id_rules() {
        assert!(DeviceId::new("dev#1+x$'(),=@;*?!%").is_ok());
        assert!(DeviceId::new("dev/1").is_err());
        assert!(DeviceId::new("dév").is_err());
        assert!(DeviceId::new(" ").is_err());
    }

    #[test]
    fn id_scope_rules() {
        assert!(IdScope::new("0ne00111111").is_ok());
        assert!(IdScope::new("0ne0045B3C6").is_ok());
        assert!(IdScope::new("0ne0045B3C").is_err());
        assert!(IdScope::new("1ne0045B3C6").is_err());
        assert!(IdScope::new("0ne0045B3CG").is_err());
    }

    #[test]
    fn operation_id_shape() {
        let op = OperationId::from_random(&[7u8; 32]);
        let parts: Vec<&str> = op.as_str().split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1].len(), 16);
        assert_eq!(parts[2].len(), 36);
        assert!(OperationId::new(op.as_str()).is_ok());
        let mut random = [0u8; 32];
        for (i, b) in random.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(29);
        }
        assert_eq!(
            OperationId::from_random(&random).as_str(),
            "0.1d3a577491aecbe8.d0ed0a27-4461-4e9b-b8d5-f20f2c496683"
        );
    }

    #[test]
    fn uuids_are_version_4_hyphenated_lower_case_hex() {
        let bytes: Vec<u8> = (0u8..16).map(|i| i * 17).collect();
        assert_eq!(uuid_from_bytes(&bytes), "00112233-4455-4677-8899-aabbccddeeff");
        assert_eq!(uuid_from_bytes(&[0xff; 16]), "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(uuid_from_bytes(&[]), "00000000-0000-4000-8000-000000000000");
    }

    #[test]
    fn if_match_forms() {
        let tag = ETag::new("\"abc\"");
        assert_eq!(IfMatch::from_header(None), IfMatch::Absent);
        assert_eq!(IfMatch::from_header(Some("*")), IfMatch::Any);
        assert_eq!(IfMatch::from_header(Some("\"*\"")), IfMatch::Any);
        assert_eq!(IfMatch::from_header(Some("W/\"abc\"")), IfMatch::Tag("abc".into()));
        assert!(IfMatch::from_header(Some("\"abc\"")).allows(&tag));
        assert!(IfMatch::from_header(Some("abc")).allows(&tag));
        assert!(!IfMatch::from_header(Some("\"abd\"")).allows(&tag));
    }
}
