//! Property tests: identifier rules, SAS token round trips, MQTT topic and HTTP route grammar.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use zerotouch_proto::http::{Route, RouteMatch, KNOWN_API_VERSIONS};
use zerotouch_proto::ids::{DEVICE_ID_SPECIALS, MAX_ID_LEN, REGISTRATION_ID_SPECIALS};
use zerotouch_proto::mqtt::{ConnectUsername, DeviceRequest, ResponseTopic};
use zerotouch_proto::sas::{encode_resource, registration_resource, REGISTRATION_KEY_NAME};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, IdScope, OperationId, RegistrationId, SasToken};

const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn chars_of(alphabet: String) -> impl Strategy<Value = char> {
    let chars: Vec<char> = alphabet.chars().collect();
    prop::sample::select(chars)
}

fn string_of(alphabet: String, len: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = String> {
    prop::collection::vec(chars_of(alphabet), len).prop_map(|v| v.into_iter().collect())
}

fn reg_alphabet() -> String {
    format!("{ALNUM}{REGISTRATION_ID_SPECIALS}")
}

fn reg_last_chars() -> String {
    format!("{ALNUM}-")
}

/// A registration id by the documented rules: 1–128 of `[A-Za-z0-9-._:]`, last alphanumeric or `-`.
fn valid_registration_id() -> impl Strategy<Value = String> {
    (string_of(reg_alphabet(), 0..=MAX_ID_LEN - 1), chars_of(reg_last_chars())).prop_map(|(mut s, c)| {
        s.push(c);
        s
    })
}

fn valid_device_id() -> impl Strategy<Value = String> {
    string_of(format!("{ALNUM}{DEVICE_ID_SPECIALS}"), 1..=MAX_ID_LEN)
}

fn id_scope() -> impl Strategy<Value = IdScope> {
    string_of("0123456789ABCDEFabcdef".into(), 8..=8)
        .prop_map(|hex| IdScope::new(format!("0ne{hex}")).unwrap())
}

fn operation_id() -> impl Strategy<Value = OperationId> {
    string_of(format!("{ALNUM}.-"), 1..=MAX_ID_LEN).prop_map(|s| OperationId::new(s).unwrap())
}

/// `$rid` values as devices send them: UUIDs, decimal packet ids, `1`, or any text without `& # +`.
fn rid() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
        (0u32..65536).prop_map(|n| n.to_string()),
        Just("1".to_owned()),
        "[^&#+\u{0}]{1,40}",
    ]
}

fn api_version() -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(KNOWN_API_VERSIONS).prop_map(str::to_owned), "[ -~]{1,24}"]
}

fn rejected_char_for(allowed: String) -> impl Strategy<Value = char> {
    any::<char>().prop_filter("must be outside the allowed set", move |c| !allowed.contains(*c))
}

proptest! {
    #[test]
    fn registration_id_from_the_documented_alphabet_is_accepted(id in valid_registration_id()) {
        let parsed = RegistrationId::new(id.clone()).unwrap();
        prop_assert_eq!(parsed.as_str(), id.as_str());
        prop_assert!(EnrollmentGroupId::new(id).is_ok());
    }

    #[test]
    fn registration_id_with_a_foreign_character_is_rejected(
        id in valid_registration_id(),
        bad in rejected_char_for(reg_alphabet()),
        at in any::<prop::sample::Index>(),
    ) {
        let mut chars: Vec<char> = id.chars().collect();
        chars.insert(at.index(chars.len() + 1), bad);
        let s: String = chars.into_iter().collect();
        prop_assert!(RegistrationId::new(s.clone()).is_err());
        prop_assert!(EnrollmentGroupId::new(s).is_err());
    }

    #[test]
    fn registration_id_ending_in_dot_underscore_or_colon_is_rejected(
        id in valid_registration_id(),
        last in prop::sample::select(vec!['.', '_', ':']),
    ) {
        let mut s = id;
        if s.len() == MAX_ID_LEN {
            s.pop();
        }
        s.push(last);
        prop_assert!(RegistrationId::new(s).is_err());
    }

    #[test]
    fn registration_id_longer_than_128_is_rejected(
        head in string_of(reg_alphabet(), MAX_ID_LEN..=300),
        last in chars_of(reg_last_chars()),
    ) {
        let mut s = head;
        s.push(last);
        prop_assert!(RegistrationId::new(s).is_err());
    }

    #[test]
    fn device_id_from_the_documented_alphabet_is_accepted(id in valid_device_id()) {
        let parsed = DeviceId::new(id.clone()).unwrap();
        prop_assert_eq!(parsed.as_str(), id.as_str());
    }

    #[test]
    fn device_id_with_a_foreign_character_is_rejected(
        id in valid_device_id(),
        bad in rejected_char_for(format!("{ALNUM}{DEVICE_ID_SPECIALS}")),
        at in any::<prop::sample::Index>(),
    ) {
        let mut chars: Vec<char> = id.chars().collect();
        chars.insert(at.index(chars.len() + 1), bad);
        prop_assert!(DeviceId::new(chars.into_iter().collect::<String>()).is_err());
    }

    #[test]
    fn device_id_longer_than_128_is_rejected(id in string_of(format!("{ALNUM}{DEVICE_ID_SPECIALS}"), MAX_ID_LEN + 1..=300)) {
        prop_assert!(DeviceId::new(id).is_err());
    }

    #[test]
    fn python_encoded_sas_token_round_trips(
        resource in any::<String>(),
        expiry in any::<i64>(),
        signature in prop::collection::vec(any::<u8>(), 1..64),
        key_name in prop::option::of(any::<String>()),
    ) {
        prop_assume!(!resource.is_empty());
        let sr = encode_resource(&resource);
        let token = SasToken::build(&sr, expiry, key_name.as_deref(), &signature);
        let text = token.to_string();
        let parsed = SasToken::parse(&text).unwrap();
        prop_assert_eq!(&parsed, &token);
        prop_assert_eq!(parsed.resource().unwrap(), resource);
        prop_assert_eq!(parsed.expiry_secs(), expiry);
        prop_assert_eq!(parsed.key_name(), key_name.as_deref());
        prop_assert_eq!(parsed.signature().unwrap(), signature);
        prop_assert_eq!(parsed.string_to_sign(), format!("{sr}\n{expiry}"));
    }

    #[test]
    fn raw_sr_sas_token_round_trips(
        scope in id_scope(),
        id in valid_registration_id(),
        expiry in 0i64..=4_102_444_800,
        signature in prop::collection::vec(any::<u8>(), 32..=32),
        with_skn in any::<bool>(),
    ) {
        let sr = registration_resource(scope.as_str(), &id);
        let skn = with_skn.then_some(REGISTRATION_KEY_NAME);
        let token = SasToken::build(&sr, expiry, skn, &signature);
        let text = token.to_string();
        let parsed = SasToken::parse(&text).unwrap();
        prop_assert_eq!(&parsed, &token);
        prop_assert_eq!(parsed.resource_raw(), sr.as_str());
        prop_assert_eq!(parsed.resource().unwrap(), sr.clone());
        prop_assert_eq!(parsed.signature().unwrap(), signature);
        prop_assert_eq!(parsed.string_to_sign(), format!("{sr}\n{expiry}"));
    }

    #[test]
    fn register_topic_round_trips(rid in rid()) {
        let req = DeviceRequest::Register { rid };
        prop_assert_eq!(DeviceRequest::parse_topic(&req.to_string()).unwrap(), req);
    }

    #[test]
    fn poll_topic_round_trips(rid in rid(), operation_id in operation_id()) {
        let req = DeviceRequest::PollStatus { rid, operation_id: operation_id.to_string() };
        prop_assert_eq!(DeviceRequest::parse_topic(&req.to_string()).unwrap(), req);
    }

    #[test]
    fn python_url_quoted_operation_id_is_decoded(rid in rid(), operation_id in operation_id()) {
        let quoted: String = operation_id.as_str().bytes().map(|b| format!("%{b:02X}")).collect();
        let topic = format!("$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={quoted}");
        prop_assert_eq!(DeviceRequest::parse_topic(&topic).unwrap(), DeviceRequest::PollStatus { rid, operation_id: operation_id.to_string() });
    }

    #[test]
    fn response_topic_round_trips(status in 100u16..600, rid in rid(), retry_after in prop::option::of(0u32..=3600)) {
        let t = ResponseTopic { status, rid, retry_after };
        prop_assert_eq!(ResponseTopic::parse(&t.to_string()).unwrap(), t);
    }

    #[test]
    fn connect_username_round_trips(
        scope in id_scope(),
        id in valid_registration_id(),
        api_version in api_version(),
        client_version in prop::option::of(any::<String>()),
    ) {
        let u = ConnectUsername {
            id_scope: scope,
            registration_id: RegistrationId::new(id).unwrap(),
            api_version,
            client_version,
        };
        prop_assert_eq!(ConnectUsername::parse(&u.to_string()).unwrap(), u);
    }

    #[test]
    fn route_round_trips(route in route(), api_version in api_version(), force_registration in any::<bool>()) {
        let m = RouteMatch { route, api_version, force_registration };
        let target = m.target();
        prop_assert_eq!(RouteMatch::parse_target(m.route.method().as_str(), &target).unwrap(), m);
    }
}

/// Request lines close to real ones: a real route's method and path (maybe upper-cased, maybe
/// with a trailing slash), or DPS-looking segments, some percent-encoded, some garbage.
fn request_like() -> impl Strategy<Value = (String, String)> {
    let segment = prop_oneof![
        prop::sample::select(vec![
            "enrollments",
            "enrollmentGroups",
            "enrollmentgroups",
            "registrations",
            "register",
            "operations",
            "attestationmechanism",
            "query",
            "0ne00111111",
            "dev-1",
            "dev%3A1",
            "a%2Fb",
            "%ff",
            "",
        ])
        .prop_map(str::to_owned),
        "[ -~]{0,12}",
    ];
    let garbage = (
        prop::sample::select(vec!["GET", "PUT", "POST", "DELETE", "PATCH", "get"]),
        prop::collection::vec(segment, 0..6),
    )
        .prop_map(|(m, segs)| (m.to_owned(), format!("/{}", segs.join("/"))));
    let near_real = (route(), any::<bool>(), any::<bool>()).prop_map(|(r, upper, slash)| {
        let mut path = r.path();
        if upper {
            path = path.to_uppercase();
        }
        if slash {
            path.push('/');
        }
        (r.method().as_str().to_owned(), path)
    });
    prop_oneof![near_real, garbage]
}

proptest! {
    #[test]
    fn any_accepted_request_target_formats_back_to_the_same_match(
        (method, path) in request_like(),
        query in prop::option::of("(api-version=[0-9a-z-]{1,20})?(&forceRegistration=(true|false|TRUE))?"),
    ) {
        if let Ok(m) = RouteMatch::parse(&method, &path, query.as_deref()) {
            let again = RouteMatch::parse_target(m.route.method().as_str(), &m.target()).unwrap();
            prop_assert_eq!(again, m);
        }
    }

    #[test]
    fn any_accepted_device_topic_formats_back_to_the_same_request(topic in prop_oneof![
        "\\$dps/registrations/(PUT/iotdps-register|GET/iotdps-get-operationstatus)/?\\?(\\$rid=[ -~]{0,12})?(&operationId=([0-9a-z.-]|%2[dDeE]|%3[0-9]){1,20})?(&[ -~]{0,10})?",
        "[ -~]{0,80}",
    ]) {
        if let Ok(req) = DeviceRequest::parse_topic(&topic) {
            prop_assert_eq!(DeviceRequest::parse_topic(&req.to_string()).unwrap(), req);
        }
    }

    #[test]
    fn any_accepted_reply_topic_formats_back_to_the_same_reply(topic in prop_oneof![
        "\\$dps/registrations/res/[0-9]{1,6}/\\?(\\$rid=[ -~]{0,12})?(&retry-after=[0-9]{1,11})?(&[ -~]{0,10})?",
        "[ -~]{0,80}",
    ]) {
        if let Ok(t) = ResponseTopic::parse(&topic) {
            prop_assert_eq!(ResponseTopic::parse(&t.to_string()).unwrap(), t);
        }
    }

    #[test]
    fn any_accepted_username_formats_back_to_the_same_username(username in prop_oneof![
        "0ne[0-9A-F]{8}/registrations/[a-z0-9.:_-]{0,9}[a-z0-9]/\\??(api-version=[ -~]{0,20})?(&ClientVersion=[ -~]{0,20})?(&[ -~]{0,10})?",
        "[ -~]{0,80}",
    ]) {
        if let Ok(u) = ConnectUsername::parse(&username) {
            prop_assert_eq!(ConnectUsername::parse(&u.to_string()).unwrap(), u);
        }
    }
}

fn route() -> impl Strategy<Value = Route> {
    let rid = || valid_registration_id().prop_map(|s| RegistrationId::new(s).unwrap());
    let gid = || valid_registration_id().prop_map(|s| EnrollmentGroupId::new(s).unwrap());
    prop_oneof![
        (id_scope(), rid())
            .prop_map(|(id_scope, registration_id)| Route::Register { id_scope, registration_id }),
        (id_scope(), rid(), operation_id()).prop_map(|(id_scope, registration_id, operation_id)| {
            Route::OperationStatus { id_scope, registration_id, operation_id: operation_id.to_string() }
        }),
        (id_scope(), rid()).prop_map(|(id_scope, registration_id)| Route::RegistrationStatusLookup {
            id_scope,
            registration_id
        }),
        rid().prop_map(|registration_id| Route::GetEnrollment { registration_id }),
        rid().prop_map(|registration_id| Route::PutEnrollment { registration_id }),
        rid().prop_map(|registration_id| Route::DeleteEnrollment { registration_id }),
        rid().prop_map(|registration_id| Route::EnrollmentAttestation { registration_id }),
        Just(Route::QueryEnrollments),
        Just(Route::BulkEnrollments),
        gid().prop_map(|enrollment_group_id| Route::GetEnrollmentGroup { enrollment_group_id }),
        gid().prop_map(|enrollment_group_id| Route::PutEnrollmentGroup { enrollment_group_id }),
        gid().prop_map(|enrollment_group_id| Route::DeleteEnrollmentGroup { enrollment_group_id }),
        gid().prop_map(|enrollment_group_id| Route::EnrollmentGroupAttestation { enrollment_group_id }),
        Just(Route::QueryEnrollmentGroups),
        Just(Route::BulkEnrollmentGroups),
        rid().prop_map(|registration_id| Route::GetRegistration { registration_id }),
        rid().prop_map(|registration_id| Route::DeleteRegistration { registration_id }),
        gid().prop_map(|enrollment_group_id| Route::QueryRegistrations { enrollment_group_id }),
    ]
}

#[test]
fn empty_ids_are_rejected() {
    assert!(RegistrationId::new("").is_err());
    assert!(EnrollmentGroupId::new("").is_err());
    assert!(DeviceId::new("").is_err());
}
