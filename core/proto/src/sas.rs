//! Shared access signature tokens: parse in any field order, build, and the exact string-to-sign.
//!
//! Every official SDK signs the `sr` value exactly as it puts it in the token, but they disagree on
//! its encoding (spec §4.1): Python `%2F`, C `%2f`, Node symmetric key raw `/`, the Rust identity
//! service a lower-cased audience. So the token keeps `sr` and `se` *as received* and the
//! string-to-sign is built from those raw values; only the comparison of the resource with the
//! expected one happens on the decoded form.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::error::ProtoError;
use crate::time::Timestamp;

/// Prefix of every SAS token.
pub const SAS_PREFIX: &str = "SharedAccessSignature ";

/// The `skn` value devices use for DPS registration tokens.
pub const REGISTRATION_KEY_NAME: &str = "registration";

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Z a-z 0-9 _ . - ~` is encoded,
/// upper-case hex. This is the form our own device client sends.
const QUOTE_ALL: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'.').remove(b'-').remove(b'~');

/// A parsed SAS token. Field values are kept exactly as received.
///
/// The fields are ranges into the token's text, which a parsed token borrows (a registration
/// parses one token per request and only reads it); [`SasToken::into_owned`] detaches it.
#[derive(Clone)]
pub struct SasToken<'a> {
    /// The token as received, without the prefix.
    text: Cow<'a, str>,
    sr: Range<usize>,
    sig: Range<usize>,
    se: Range<usize>,
    expiry: i64,
    /// `skn`, percent-decoded (borrowed when it holds no escapes, as `registration` does).
    skn: Option<Cow<'a, str>>,
}

impl<'a> SasToken<'a> {
    /// Parses `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]` with the fields in any order
    /// (the prefix is optional, matched case-insensitively).
    ///
    /// # Errors
    /// [`ProtoError::InvalidSas`] when a field is missing, repeated or malformed.
    pub fn parse(token: &'a str) -> Result<Self, ProtoError> {
        let token = token.trim_ascii();
        let body = if token.len() >= SAS_PREFIX.len()
            && token.as_bytes()[..SAS_PREFIX.len()].eq_ignore_ascii_case(SAS_PREFIX.as_bytes())
        {
            token[SAS_PREFIX.len()..].trim_ascii_start()
        } else {
            token
        };
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        // One scan for both separators (memchr2, a word at a time): `&` and `=` are ASCII, so
        // every cut is on a character boundary. A field's first `=` ends its name; any later
        // one belongs to its value.
        let bytes = body.as_bytes();
        let mut start = 0;
        let mut eq = None;
        let cuts = memchr::memchr2_iter(b'&', b'=', bytes).chain(std::iter::once(bytes.len()));
        for at in cuts {
            if at < bytes.len() && bytes[at] == b'=' {
                eq = eq.or(Some(at));
                continue;
            }
            let (field, name_end) = (start..at, eq.take());
            start = at + 1;
            if field.is_empty() {
                continue;
            }
            let Some(name_end) = name_end else {
                let part = &body[field];
                return Err(ProtoError::InvalidSas(format!("field {part:?} has no '='")));
            };
            let k = &bytes[field.start..name_end];
            let slot = if k.eq_ignore_ascii_case(b"sr") {
                &mut sr
            } else if k.eq_ignore_ascii_case(b"sig") {
                &mut sig
            } else if k.eq_ignore_ascii_case(b"se") {
                &mut se
            } else if k.eq_ignore_ascii_case(b"skn") {
                &mut skn
            } else {
                continue; // tolerate unknown fields, as the hub does
            };
            if slot.replace(name_end + 1..field.end).is_some() {
                let k = &body[field.start..name_end];
                return Err(ProtoError::InvalidSas(format!("field {k:?} appears twice")));
            }
        }
        let sr = sr.ok_or_else(|| ProtoError::InvalidSas("missing sr".into()))?;
        let sig = sig.ok_or_else(|| ProtoError::InvalidSas("missing sig".into()))?;
        let se = se.ok_or_else(|| ProtoError::InvalidSas("missing se".into()))?;
        let se_text = &body[se.clone()];
        let expiry = decode(se_text)?
            .parse::<i64>()
            .map_err(|_| ProtoError::InvalidSas(format!("se {se_text:?} is not a Unix time in seconds")))?;
        let skn = skn.map(|v| decode(&body[v])).transpose()?;
        if sr.is_empty() || sig.is_empty() {
            return Err(ProtoError::InvalidSas("empty sr or sig".into()));
        }
        Ok(Self { text: Cow::Borrowed(body), sr, sig, se, expiry, skn })
    }

    /// The same token, owning its text.
    pub fn into_owned(self) -> SasToken<'static> {
        SasToken {
            text: Cow::Owned(self.text.into_owned()),
            sr: self.sr,
            sig: self.sig,
            se: self.se,
            expiry: self.expiry,
            skn: self.skn.map(|s| Cow::Owned(s.into_owned())),
        }
    }

    /// Builds a token from an already-encoded resource, an expiry and the raw HMAC signature.
    /// Field order `sr, sig, se, skn` (as the Python and C SDKs write it).
    pub fn build(
        sr_encoded: &str,
        expiry_secs: i64,
        key_name: Option<&str>,
        signature: &[u8],
    ) -> SasToken<'static> {
        let sig = utf8_percent_encode(&STANDARD.encode(signature), QUOTE_ALL).to_string();
        let text = format!("sr={sr_encoded}&sig={sig}&se={expiry_secs}");
        let sr = 3..3 + sr_encoded.len();
        let sig = sr.end + 5..sr.end + 5 + sig.len();
        let se = sig.end + 4..text.len();
        SasToken {
            text: Cow::Owned(text),
            sr,
            sig,
            se,
            expiry: expiry_secs,
            skn: key_name.map(|k| Cow::Owned(k.to_owned())),
        }
    }

    fn sr(&self) -> &str {
        &self.text[self.sr.clone()]
    }

    fn sig(&self) -> &str {
        &self.text[self.sig.clone()]
    }

    fn se(&self) -> &str {
        &self.text[self.se.clone()]
    }

    /// The `sr` field exactly as received.
    pub fn resource_raw(&self) -> &str {
        self.sr()
    }

    /// The `sr` field percent-decoded.
    ///
    /// # Errors
    /// [`ProtoError::InvalidSas`] when it is not valid UTF-8 after decoding.
    pub fn resource(&self) -> Result<String, ProtoError> {
        decode(self.sr()).map(Cow::into_owned)
    }

    /// Whether the percent-decoded `sr` is the DPS registration resource
    /// `{id_scope}/registrations/{registration_id}`, compared ASCII case-insensitively, without
    /// building either string. (`sr` decoding to bytes that are not UTF-8 cannot match.)
    pub fn is_registration_resource(&self, id_scope: &str, registration_id: &str) -> bool {
        // Room for an ID scope, the segment and a registration id of the longest allowed length
        // with room to spare: a resource that decodes longer cannot match.
        let mut buf = [0u8; 256];
        let Some(len) = percent_decode_into(self.sr().as_bytes(), &mut buf) else { return false };
        let decoded = &buf[..len];
        let (scope_len, segment_len) = (id_scope.len(), REGISTRATIONS_SEGMENT.len());
        decoded.len() == scope_len + segment_len + registration_id.len()
            && same_ignoring_case(&decoded[..scope_len], id_scope.as_bytes())
            && same_ignoring_case(
                &decoded[scope_len..scope_len + segment_len],
                REGISTRATIONS_SEGMENT.as_bytes(),
            )
            && same_ignoring_case(&decoded[scope_len + segment_len..], registration_id.as_bytes())
    }

    /// Expiry in Unix seconds.
    pub fn expiry_secs(&self) -> i64 {
        self.expiry
    }

    /// Expiry as a timestamp.
    pub fn expiry(&self) -> Timestamp {
        Timestamp::from_unix_secs(self.expiry)
    }

    /// The decoded `skn` field, if any.
    pub fn key_name(&self) -> Option<&str> {
        self.skn.as_deref()
    }

    /// The signature bytes: `sig` percent-decoded (`+` stays `+`), then base64-decoded.
    ///
    /// # Errors
    /// [`ProtoError::InvalidSas`] when `sig` is not base64.
    pub fn signature(&self) -> Result<Vec<u8>, ProtoError> {
        let text = decode(self.sig())?;
        STANDARD.decode(text.as_bytes()).map_err(|_| ProtoError::InvalidSas("sig is not base64".into()))
    }

    /// The signature as an HMAC-SHA256 tag, decoded on the stack: `None` when `sig` is not the
    /// base64 of exactly 32 bytes (such a token cannot carry an HMAC-SHA256 signature).
    pub fn signature_sha256(&self) -> Option<[u8; 32]> {
        // 32 bytes are 44 base64 characters; the buffer leaves room for nothing longer, so a
        // longer `sig` is refused without decoding it.
        let mut text = [0u8; 44];
        let len = percent_decode_into(self.sig().as_bytes(), &mut text)?;
        let mut out = [0u8; 33];
        match STANDARD.decode_slice(&text[..len], &mut out) {
            Ok(32) => out[..32].try_into().ok(),
            _ => None,
        }
    }

    /// The bytes the signature covers, as the three parts raw `sr`, `"\n"`, raw `se`: what a
    /// verifier feeds its MAC without joining them.
    pub fn signed_parts(&self) -> [&[u8]; 3] {
        [self.sr().as_bytes(), b"\n", self.se().as_bytes()]
    }

    /// The bytes the signature covers: raw `sr` + `"\n"` + raw `se`.
    pub fn string_to_sign(&self) -> String {
        let mut text = String::with_capacity(self.sr.len() + 1 + self.se.len());
        text.push_str(self.sr());
        text.push('\n');
        text.push_str(self.se());
        text
    }
}

/// Tokens are equal when their fields are, whatever their order or unknown fields.
impl PartialEq for SasToken<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.sr() == other.sr()
            && self.sig() == other.sig()
            && self.se() == other.se()
            && self.expiry == other.expiry
            && self.skn == other.skn
    }
}

impl Eq for SasToken<'_> {}

impl fmt::Display for SasToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SAS_PREFIX}sr={}&sig={}&se={}", self.sr(), self.sig(), self.se())?;
        if let Some(skn) = &self.skn {
            write!(f, "&skn={}", utf8_percent_encode(skn.as_ref(), QUOTE_ALL))?;
        }
        Ok(())
    }
}

impl fmt::Debug for SasToken<'_> {
    /// Never prints the signature.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("sr", &self.sr())
            .field("se", &self.se())
            .field("skn", &self.skn)
            .field("sig", &"<redacted>")
            .finish()
    }
}

/// The string-to-sign for an encoded resource and an expiry: `sr + "\n" + se`.
pub fn string_to_sign(sr_encoded: &str, expiry_secs: i64) -> String {
    format!("{sr_encoded}\n{expiry_secs}")
}

/// Encodes a resource URI as the Python SDK does (`quote(uri, safe="")`, upper-case hex).
pub fn encode_resource(uri: &str) -> String {
    utf8_percent_encode(uri, QUOTE_ALL).to_string()
}

/// The DPS registration resource `{idScope}/registrations/{registrationId}`.
pub fn registration_resource(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}{REGISTRATIONS_SEGMENT}{registration_id}")
}

/// What separates the ID scope from the registration id in the registration resource.
const REGISTRATIONS_SEGMENT: &str = "/registrations/";

/// Percent-decodes a field; borrowed when it holds no escapes.
/// Percent-decodes `text` into `out` (an escape that is not `%` and two hex digits stays as it
/// is, as with `percent_encoding`), returning the decoded length, or `None` when it does not fit.
///
/// Written here rather than taken from `percent_encoding`, which decodes through a byte-at-a-time
/// iterator or into a new `Vec`: tokens are decoded on every request, and copying the runs
/// between escapes whole into a caller's stack buffer costs a fraction of either.
fn percent_decode_into(text: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut len = 0;
    let mut rest = text;
    loop {
        let run = memchr::memchr(b'%', rest).unwrap_or(rest.len());
        out.get_mut(len..len + run)?.copy_from_slice(&rest[..run]);
        len += run;
        rest = &rest[run..];
        let Some((&percent, after)) = rest.split_first() else { return Some(len) };
        let escaped = match after {
            [hi, lo, ..] => hex_value(*hi).zip(hex_value(*lo)).map(|(hi, lo)| hi << 4 | lo),
            _ => None,
        };
        *out.get_mut(len)? = escaped.unwrap_or(percent);
        len += 1;
        rest = if escaped.is_some() { &after[2..] } else { after };
    }
}

/// ASCII case-insensitive equality, answered by a plain comparison when the cases agree, as
/// they do in the resources devices sign (the case-folding comparison goes a byte at a time).
fn same_ignoring_case(a: &[u8], b: &[u8]) -> bool {
    a == b || a.eq_ignore_ascii_case(b)
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).and_then(|v| u8::try_from(v).ok())
}

fn decode(s: &str) -> Result<Cow<'_, str>, ProtoError> {
    if !s.as_bytes().contains(&b'%') {
        return Ok(Cow::Borrowed(s));
    }
    percent_decode_str(s)
        .decode_utf8()
        .map_err(|_| ProtoError::InvalidSas("field is not UTF-8 after percent-decoding".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registration_resource_matches_in_every_sdk_spelling_and_nothing_else() {
        let token = |sr: &str| SasToken::parse(&format!("sr={sr}&sig=c2ln&se=1")).unwrap().into_owned();
        for sr in [
            "0ne00111111%2Fregistrations%2Fdev-1",
            "0ne00111111%2fregistrations%2fdev-1",
            "0ne00111111/registrations/dev-1",
            "0NE00111111/Registrations/DEV-1",
        ] {
            assert!(token(sr).is_registration_resource("0ne00111111", "dev-1"), "{sr}");
        }
        for sr in [
            "0ne00111111/registrations/dev-12",
            "0ne00111111/registrations/dev-",
            "0ne00111111/registration/dev-1",
            "0ne00111112/registrations/dev-1",
            "0ne00111111",
            "0ne00111111/registrations",
            "x",
        ] {
            assert!(!token(sr).is_registration_resource("0ne00111111", "dev-1"), "{sr}");
        }
        assert!(!token("%FF").is_registration_resource("0ne00111111", "dev-1"));
        assert!(
            !token("0ne00111111%2Fregistrations%2Fdev-%FF").is_registration_resource("0ne00111111", "dev-1")
        );
    }

    #[test]
    fn parses_python_form() {
        let t = SasToken::parse(
            "SharedAccessSignature sr=0ne00111111%2Fregistrations%2Fdev1&sig=ab%2Bc%2F%3D&se=1663952627",
        )
        .unwrap();
        assert_eq!(t.resource_raw(), "0ne00111111%2Fregistrations%2Fdev1");
        assert_eq!(t.resource().unwrap(), "0ne00111111/registrations/dev1");
        assert_eq!(t.key_name(), None);
        assert_eq!(t.expiry_secs(), 1_663_952_627);
        assert_eq!(t.string_to_sign(), "0ne00111111%2Fregistrations%2Fdev1\n1663952627");
    }

    #[test]
    fn parses_node_form_any_order() {
        let t = SasToken::parse(
            "SharedAccessSignature sr=0ne00111111/registrations/dev1&sig=abc%3D&skn=registration&se=1",
        )
        .unwrap();
        assert_eq!(t.resource_raw(), "0ne00111111/registrations/dev1");
        assert_eq!(t.key_name(), Some("registration"));
        let t2 = SasToken::parse("sig=abc%3D&se=1&skn=registration&sr=x").unwrap();
        assert_eq!(t2.resource_raw(), "x");
    }

    #[test]
    fn plus_in_sig_is_not_space() {
        let t = SasToken::parse("SharedAccessSignature sr=a&sig=f+wW&se=1").unwrap();
        assert_eq!(t.signature().unwrap(), STANDARD.decode("f+wW").unwrap());
    }

    #[test]
    fn an_hmac_sha256_signature_decodes_on_the_stack_in_every_encoding() {
        let tag: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(0xf9)).collect();
        let plain = STANDARD.encode(&tag);
        assert!(plain.contains('+') && plain.contains('/') && plain.ends_with('='), "{plain}");
        let quoted = utf8_percent_encode(&plain, QUOTE_ALL).to_string();
        let lower = quoted.replace("%2B", "%2b").replace("%2F", "%2f").replace("%3D", "%3d");
        for sig in [&plain, &quoted, &lower] {
            let text = format!("sr=a&sig={sig}&se=1");
            let t = SasToken::parse(&text).unwrap();
            assert_eq!(t.signature_sha256().map(Vec::from), Some(tag.clone()), "{sig}");
            assert_eq!(t.signature().unwrap(), tag);
        }
        // Not 32 bytes, or not base64: no HMAC-SHA256 tag.
        for sig in ["f+wW", &STANDARD.encode([1u8; 33]), &STANDARD.encode([1u8; 31]), "%%%", &"A".repeat(400)]
        {
            let text = format!("sr=a&sig={sig}&se=1");
            assert_eq!(SasToken::parse(&text).unwrap().signature_sha256(), None, "{sig}");
        }
        let t = SasToken::parse("sr=a%2Fb&sig=x&se=17").unwrap();
        assert_eq!(t.signed_parts().concat(), t.string_to_sign().into_bytes());
    }

    #[test]
    fn rejects_malformed() {
        assert!(SasToken::parse("SharedAccessSignature sr=a&sig=b").is_err());
        assert!(SasToken::parse("SharedAccessSignature sr=a&sig=b&se=x").is_err());
        assert!(SasToken::parse("SharedAccessSignature sr=a&sr=b&sig=b&se=1").is_err());
        assert!(SasToken::parse("SharedAccessSignature sr").is_err());
        assert!(SasToken::parse("sr=a&sig=b&se=1&junk").is_err());
    }

    #[test]
    fn later_equals_signs_belong_to_the_value_and_unknown_or_empty_fields_are_skipped() {
        let t =
            SasToken::parse("&&sig=ab+c/d==&x=1&=&sr=0ne/registrations/d&&se=17&skn=registration&").unwrap();
        assert_eq!(t.resource_raw(), "0ne/registrations/d");
        assert_eq!(t.signed_parts().concat(), b"0ne/registrations/d\n17");
        assert_eq!(t.key_name(), Some("registration"));
        assert_eq!(t.expiry_secs(), 17);
        assert_eq!(t.to_string().matches("sig=ab+c/d==").count(), 1);
    }

    #[test]
    fn build_then_parse() {
        let sr = encode_resource(&registration_resource("0ne00111111", "dev:1"));
        assert_eq!(sr, "0ne00111111%2Fregistrations%2Fdev%3A1");
        let t = SasToken::build(&sr, 42, Some(REGISTRATION_KEY_NAME), &[0xfb, 0xff, 0x01]);
        let text = t.to_string();
        let back = SasToken::parse(&text).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.signature().unwrap(), vec![0xfb, 0xff, 0x01]);
    }

    proptest::proptest! {
        #[test]
        fn decoding_into_a_buffer_agrees_with_percent_encoding(text in "([a-zA-Z0-9/+=]|%[0-9a-fA-FxZ]{0,2}){0,40}") {
            let expected: Vec<u8> = percent_decode_str(&text).collect();
            let mut buf = [0u8; 128];
            proptest::prop_assert_eq!(percent_decode_into(text.as_bytes(), &mut buf), Some(expected.len()));
            proptest::prop_assert_eq!(&buf[..expected.len()], &expected[..]);
            if !expected.is_empty() {
                let mut short = vec![0u8; expected.len() - 1];
                proptest::prop_assert_eq!(percent_decode_into(text.as_bytes(), &mut short), None);
            }
        }
    }
}
