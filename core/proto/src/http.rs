//! DPS HTTP route grammar (device API §1.1, service API §7.2), query parameters, header names and
//! the api-versions seen on the wire.

use std::fmt;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::error::ProtoError;
use crate::ids::{EnrollmentGroupId, IdScope, RegistrationId};

/// Every api-version seen on the wire or in the swagger (spec §1.1), oldest first.
pub const KNOWN_API_VERSIONS: &[&str] = &[
    "2018-04-01",
    "2018-09-01-preview",
    "2018-11-01",
    "2019-03-31",
    "2021-06-01",
    "2021-10-01",
    "2025-07-01-preview",
    "2026-04-01",
    "2026-11-02-preview",
];

/// api-version the Python and Node device SDKs send (and the MQTT docs use).
pub const DEVICE_API_VERSION: &str = "2019-03-31";

/// api-version of the current stable service swagger, sent by the Node service client.
pub const SERVICE_API_VERSION: &str = "2021-10-01";

/// Whether `version` is one of [`KNOWN_API_VERSIONS`].
pub fn is_known_api_version(version: &str) -> bool {
    KNOWN_API_VERSIONS.contains(&version)
}

/// The `YYYY-MM-DD` an api-version starts with, if it starts with one.
fn version_date(api_version: &str) -> Option<&str> {
    let date = api_version.get(..10)?;
    date.bytes()
        .enumerate()
        .all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() })
        .then_some(date)
}

/// Whether `api_version` may carry a certificate signing request (`csr`) and receive an issued
/// certificate chain: `2025-07-01-preview` and later (spec §1.3, §1.5).
pub fn supports_certificate_issuance(api_version: &str) -> bool {
    version_date(api_version).is_some_and(|date| date >= "2025-07-01")
}

/// Whether a device speaking `api_version` predates reprovisioning policies (`2018-04-01` and
/// earlier): DPS then keeps it on its hub when its enrollment sets no `reprovisionPolicy`
/// (spec §8.3, the legacy "sticky" rule). A policy the enrollment does set applies as to anyone.
pub fn predates_reprovisioning(api_version: &str) -> bool {
    version_date(api_version).is_some_and(|date| date <= "2018-04-01")
}

/// Continuation token of a query page; present only when more pages exist.
pub const HEADER_CONTINUATION: &str = "x-ms-continuation";
/// Kind of the items in a query page, one of [`QueryItemType`].
pub const HEADER_ITEM_TYPE: &str = "x-ms-item-type";
/// Page size of a query, request and response.
pub const HEADER_MAX_ITEM_COUNT: &str = "x-ms-max-item-count";
/// Six-digit DPS error code, on every error reply.
pub const HEADER_ERROR_CODE: &str = "x-ms-error-code";
/// Request id real DPS puts on every reply.
pub const HEADER_REQUEST_ID: &str = "x-ms-request-id";
/// Seconds to wait before the next request (on 202 and 429).
pub const HEADER_RETRY_AFTER: &str = "Retry-After";
/// SAS token of a device (absent for X.509 and the first TPM call) or of a service policy.
pub const HEADER_AUTHORIZATION: &str = "Authorization";
/// Conditional-write header of the service API.
pub const HEADER_IF_MATCH: &str = "If-Match";
/// Content type of every JSON body; Node only parses bodies whose type contains `application/json`.
pub const CONTENT_TYPE_JSON: &str = "application/json; charset=utf-8";

/// Query parameter carrying the api-version.
pub const QUERY_API_VERSION: &str = "api-version";
/// Optional query parameter of register (Node HTTP).
pub const QUERY_FORCE_REGISTRATION: &str = "forceRegistration";

wire_enum! {
    /// Value of the `x-ms-item-type` header of a query reply (the C service client
    /// string-compares it).
    QueryItemType {
        /// Individual enrollments.
        Enrollment => "Enrollment",
        /// Enrollment groups.
        EnrollmentGroup => "EnrollmentGroup",
        /// Registration states.
        DeviceRegistration => "DeviceRegistration",
    }
}

/// Python's `quote(s, safe="")`: all but `A-Z a-z 0-9 _ . - ~` encoded, upper-case hex.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'.').remove(b'-').remove(b'~');

/// Percent-encodes one path segment or query value.
pub(crate) fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

fn decode_component(s: &str) -> Result<String, String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{s:?} is not UTF-8 after percent-decoding"))
}

/// Splits `k=v&k2=v2` into percent-decoded pairs; `+` stays `+` (ids and signatures contain it).
pub(crate) fn query_pairs(query: &str) -> Result<Vec<(String, String)>, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|part| {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            Ok((decode_component(k)?, decode_component(v)?))
        })
        .collect()
}

/// An HTTP method used by DPS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
    /// `POST`.
    Post,
    /// `DELETE`.
    Delete,
}

impl Method {
    /// Parses a method name (ASCII case-insensitive).
    ///
    /// # Errors
    /// [`ProtoError::InvalidRoute`] for any other method.
    pub fn parse(method: &str) -> Result<Self, ProtoError> {
        [Method::Get, Method::Put, Method::Post, Method::Delete]
            .into_iter()
            .find(|m| m.as_str().eq_ignore_ascii_case(method))
            .ok_or_else(|| ProtoError::InvalidRoute(format!("method {method:?} is not used by DPS")))
    }

    /// The method name in upper case.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One operation of the DPS device or service API, with its path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `PUT /{idScope}/registrations/{registrationId}/register`.
    Register {
        /// ID scope.
        id_scope: IdScope,
        /// Registration id.
        registration_id: RegistrationId,
    },
    /// `GET /{idScope}/registrations/{registrationId}/operations/{operationId}`.
    OperationStatus {
        /// ID scope.
        id_scope: IdScope,
        /// Registration id.
        registration_id: RegistrationId,
        /// Operation id from the register reply, percent-decoded, as sent: an id that breaks
        /// the rules of [`OperationId`](crate::OperationId) names no operation and is answered 404 `404202` like any
        /// unknown one (spec §11), so it is not refused here.
        operation_id: String,
    },
    /// `POST /{idScope}/registrations/{registrationId}`: registration status lookup.
    RegistrationStatusLookup {
        /// ID scope.
        id_scope: IdScope,
        /// Registration id.
        registration_id: RegistrationId,
    },
    /// `GET /enrollments/{id}`.
    GetEnrollment {
        /// Registration id of the enrollment.
        registration_id: RegistrationId,
    },
    /// `PUT /enrollments/{id}`.
    PutEnrollment {
        /// Registration id of the enrollment.
        registration_id: RegistrationId,
    },
    /// `DELETE /enrollments/{id}`.
    DeleteEnrollment {
        /// Registration id of the enrollment.
        registration_id: RegistrationId,
    },
    /// `POST /enrollments/{id}/attestationmechanism`.
    EnrollmentAttestation {
        /// Registration id of the enrollment.
        registration_id: RegistrationId,
    },
    /// `POST /enrollments/query`.
    QueryEnrollments,
    /// `POST /enrollments`: bulk operation.
    BulkEnrollments,
    /// `GET /enrollmentGroups/{id}`.
    GetEnrollmentGroup {
        /// Group id.
        enrollment_group_id: EnrollmentGroupId,
    },
    /// `PUT /enrollmentGroups/{id}`.
    PutEnrollmentGroup {
        /// Group id.
        enrollment_group_id: EnrollmentGroupId,
    },
    /// `DELETE /enrollmentGroups/{id}`.
    DeleteEnrollmentGroup {
        /// Group id.
        enrollment_group_id: EnrollmentGroupId,
    },
    /// `POST /enrollmentGroups/{id}/attestationmechanism`.
    EnrollmentGroupAttestation {
        /// Group id.
        enrollment_group_id: EnrollmentGroupId,
    },
    /// `POST /enrollmentGroups/query`.
    QueryEnrollmentGroups,
    /// `POST /enrollmentGroups`: bulk operation.
    BulkEnrollmentGroups,
    /// `GET /registrations/{registrationId}`.
    GetRegistration {
        /// Registration id.
        registration_id: RegistrationId,
    },
    /// `DELETE /registrations/{registrationId}`.
    DeleteRegistration {
        /// Registration id.
        registration_id: RegistrationId,
    },
    /// `POST /registrations/{enrollmentGroupId}/query`.
    QueryRegistrations {
        /// Group whose registrations are listed.
        enrollment_group_id: EnrollmentGroupId,
    },
}

const ENROLLMENTS: &str = "enrollments";
const ENROLLMENT_GROUPS: &str = "enrollmentGroups";
const REGISTRATIONS: &str = "registrations";
const REGISTER: &str = "register";
const OPERATIONS: &str = "operations";
const ATTESTATION: &str = "attestationmechanism";
const QUERY: &str = "query";

impl Route {
    /// The method of this operation.
    pub fn method(&self) -> Method {
        match self {
            Route::Register { .. } | Route::PutEnrollment { .. } | Route::PutEnrollmentGroup { .. } => {
                Method::Put
            }
            Route::OperationStatus { .. }
            | Route::GetEnrollment { .. }
            | Route::GetEnrollmentGroup { .. }
            | Route::GetRegistration { .. } => Method::Get,
            Route::DeleteEnrollment { .. }
            | Route::DeleteEnrollmentGroup { .. }
            | Route::DeleteRegistration { .. } => Method::Delete,
            Route::RegistrationStatusLookup { .. }
            | Route::EnrollmentAttestation { .. }
            | Route::QueryEnrollments
            | Route::BulkEnrollments
            | Route::EnrollmentGroupAttestation { .. }
            | Route::QueryEnrollmentGroups
            | Route::BulkEnrollmentGroups
            | Route::QueryRegistrations { .. } => Method::Post,
        }
    }

    /// Whether this is a device (runtime) API operation rather than a service API one.
    pub fn is_device_api(&self) -> bool {
        matches!(
            self,
            Route::Register { .. } | Route::OperationStatus { .. } | Route::RegistrationStatusLookup { .. }
        )
    }

    /// The `x-ms-item-type` of the reply, for query operations.
    pub fn query_item_type(&self) -> Option<QueryItemType> {
        match self {
            Route::QueryEnrollments => Some(QueryItemType::Enrollment),
            Route::QueryEnrollmentGroups => Some(QueryItemType::EnrollmentGroup),
            Route::QueryRegistrations { .. } => Some(QueryItemType::DeviceRegistration),
            _ => None,
        }
    }

    /// The path, with every parameter percent-encoded.
    pub fn path(&self) -> String {
        let e = |s: &str| encode_component(s);
        match self {
            Route::Register { id_scope, registration_id } => {
                format!(
                    "/{}/{REGISTRATIONS}/{}/{REGISTER}",
                    e(id_scope.as_str()),
                    e(registration_id.as_str())
                )
            }
            Route::OperationStatus { id_scope, registration_id, operation_id } => format!(
                "/{}/{REGISTRATIONS}/{}/{OPERATIONS}/{}",
                e(id_scope.as_str()),
                e(registration_id.as_str()),
                e(operation_id.as_str())
            ),
            Route::RegistrationStatusLookup { id_scope, registration_id } => {
                format!("/{}/{REGISTRATIONS}/{}", e(id_scope.as_str()), e(registration_id.as_str()))
            }
            Route::GetEnrollment { registration_id }
            | Route::PutEnrollment { registration_id }
            | Route::DeleteEnrollment { registration_id } => {
                format!("/{ENROLLMENTS}/{}", e(registration_id.as_str()))
            }
            Route::EnrollmentAttestation { registration_id } => {
                format!("/{ENROLLMENTS}/{}/{ATTESTATION}", e(registration_id.as_str()))
            }
            Route::QueryEnrollments => format!("/{ENROLLMENTS}/{QUERY}"),
            Route::BulkEnrollments => format!("/{ENROLLMENTS}"),
            Route::GetEnrollmentGroup { enrollment_group_id }
            | Route::PutEnrollmentGroup { enrollment_group_id }
            | Route::DeleteEnrollmentGroup { enrollment_group_id } => {
                format!("/{ENROLLMENT_GROUPS}/{}", e(enrollment_group_id.as_str()))
            }
            Route::EnrollmentGroupAttestation { enrollment_group_id } => {
                format!("/{ENROLLMENT_GROUPS}/{}/{ATTESTATION}", e(enrollment_group_id.as_str()))
            }
            Route::QueryEnrollmentGroups => format!("/{ENROLLMENT_GROUPS}/{QUERY}"),
            Route::BulkEnrollmentGroups => format!("/{ENROLLMENT_GROUPS}"),
            Route::GetRegistration { registration_id } | Route::DeleteRegistration { registration_id } => {
                format!("/{REGISTRATIONS}/{}", e(registration_id.as_str()))
            }
            Route::QueryRegistrations { enrollment_group_id } => {
                format!("/{REGISTRATIONS}/{}/{QUERY}", e(enrollment_group_id.as_str()))
            }
        }
    }

    /// Matches a method and a path (without query string). Literal segments are matched ASCII
    /// case-insensitively (Node writes both `enrollmentGroups` and `enrollmentgroups`);
    /// parameters are percent-decoded (`+` stays `+`) and validated.
    ///
    /// # Errors
    /// [`ProtoError::InvalidRoute`] when no operation has this method and path;
    /// [`ProtoError::InvalidId`] when a path parameter breaks its rules.
    pub fn parse(method: &str, path: &str) -> Result<Self, ProtoError> {
        let method = Method::parse(method)?;
        let not_found = || ProtoError::InvalidRoute(format!("no DPS operation for {method} {path:?}"));
        let trimmed = path.strip_prefix('/').ok_or_else(not_found)?;
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let raw: Vec<&str> = trimmed.split('/').collect();
        if raw.iter().any(|s| s.is_empty()) {
            return Err(not_found());
        }
        let segs = raw
            .iter()
            .map(|s| decode_component(s).map_err(ProtoError::InvalidRoute))
            .collect::<Result<Vec<String>, ProtoError>>()?;
        let is = |i: usize, lit: &str| segs.get(i).is_some_and(|s| s.eq_ignore_ascii_case(lit));
        let rid = |i: usize| RegistrationId::new(segs[i].as_str());
        let gid = |i: usize| EnrollmentGroupId::new(segs[i].as_str());
        use Method::{Delete, Get, Post, Put};
        let route = if is(0, ENROLLMENTS) {
            match (method, segs.len()) {
                (Post, 1) => Route::BulkEnrollments,
                (Post, 2) if is(1, QUERY) => Route::QueryEnrollments,
                (Get, 2) => Route::GetEnrollment { registration_id: rid(1)? },
                (Put, 2) => Route::PutEnrollment { registration_id: rid(1)? },
                (Delete, 2) => Route::DeleteEnrollment { registration_id: rid(1)? },
                (Post, 3) if is(2, ATTESTATION) => Route::EnrollmentAttestation { registration_id: rid(1)? },
                _ => return Err(not_found()),
            }
        } else if is(0, ENROLLMENT_GROUPS) {
            match (method, segs.len()) {
                (Post, 1) => Route::BulkEnrollmentGroups,
                (Post, 2) if is(1, QUERY) => Route::QueryEnrollmentGroups,
                (Get, 2) => Route::GetEnrollmentGroup { enrollment_group_id: gid(1)? },
                (Put, 2) => Route::PutEnrollmentGroup { enrollment_group_id: gid(1)? },
                (Delete, 2) => Route::DeleteEnrollmentGroup { enrollment_group_id: gid(1)? },
                (Post, 3) if is(2, ATTESTATION) => {
                    Route::EnrollmentGroupAttestation { enrollment_group_id: gid(1)? }
                }
                _ => return Err(not_found()),
            }
        } else if is(0, REGISTRATIONS) {
            match (method, segs.len()) {
                (Get, 2) => Route::GetRegistration { registration_id: rid(1)? },
                (Delete, 2) => Route::DeleteRegistration { registration_id: rid(1)? },
                (Post, 3) if is(2, QUERY) => Route::QueryRegistrations { enrollment_group_id: gid(1)? },
                _ => return Err(not_found()),
            }
        } else if is(1, REGISTRATIONS) {
            let scope = || IdScope::new(segs[0].as_str());
            match (method, segs.len()) {
                (Put, 4) if is(3, REGISTER) => {
                    Route::Register { id_scope: scope()?, registration_id: rid(2)? }
                }
                (Get, 5) if is(3, OPERATIONS) => Route::OperationStatus {
                    id_scope: scope()?,
                    registration_id: rid(2)?,
                    operation_id: segs[4].clone(),
                },
                (Post, 3) => Route::RegistrationStatusLookup { id_scope: scope()?, registration_id: rid(2)? },
                _ => return Err(not_found()),
            }
        } else {
            return Err(not_found());
        };
        Ok(route)
    }
}

/// A matched request: the operation plus the query parameters DPS interprets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// The operation.
    pub route: Route,
    /// `api-version` (required on every DPS request; not checked against
    /// [`KNOWN_API_VERSIONS`] here).
    pub api_version: String,
    /// `forceRegistration=true` (Node HTTP register); accepted and otherwise ignored.
    pub force_registration: bool,
}

impl RouteMatch {
    /// Matches a method, a path and an optional query string (without the `?`). Query values are
    /// percent-decoded with `+` kept; unknown parameters are ignored.
    ///
    /// # Errors
    /// [`ProtoError::InvalidRoute`] when no operation matches; [`ProtoError::InvalidId`] when a
    /// path parameter is invalid or `api-version` is missing, empty or repeated.
    pub fn parse(method: &str, path: &str, query: Option<&str>) -> Result<Self, ProtoError> {
        let route = Route::parse(method, path)?;
        let bad_version = |reason: String| ProtoError::InvalidId { kind: "api-version", reason };
        let pairs = query_pairs(query.unwrap_or("")).map_err(ProtoError::InvalidRoute)?;
        let mut api_version = None;
        let mut force_registration = false;
        for (key, value) in pairs {
            if key.eq_ignore_ascii_case(QUERY_API_VERSION) {
                if api_version.replace(value).is_some() {
                    return Err(bad_version("api-version appears twice".into()));
                }
            } else if key.eq_ignore_ascii_case(QUERY_FORCE_REGISTRATION) {
                force_registration = value.eq_ignore_ascii_case("true");
            }
        }
        let api_version = api_version
            .filter(|v| !v.is_empty())
            .ok_or_else(|| bad_version("the api-version query parameter is required".into()))?;
        Ok(Self { route, api_version, force_registration })
    }

    /// Matches a request target `path[?query]`.
    ///
    /// # Errors
    /// As [`RouteMatch::parse`].
    pub fn parse_target(method: &str, target: &str) -> Result<Self, ProtoError> {
        match target.split_once('?') {
            Some((path, query)) => Self::parse(method, path, Some(query)),
            None => Self::parse(method, target, None),
        }
    }

    /// The request target `path?api-version=…[&forceRegistration=true]`.
    pub fn target(&self) -> String {
        let mut s =
            format!("{}?{QUERY_API_VERSION}={}", self.route.path(), encode_component(&self.api_version));
        if self.force_registration {
            s.push_str(&format!("&{QUERY_FORCE_REGISTRATION}=true"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_routes() {
        let m = RouteMatch::parse_target(
            "PUT",
            "/0ne00111111/registrations/my-device/register?api-version=2021-06-01&forceRegistration=true",
        )
        .unwrap();
        assert!(matches!(m.route, Route::Register { .. }));
        assert!(m.force_registration);
        assert_eq!(m.api_version, "2021-06-01");
        let m = RouteMatch::parse_target(
            "GET",
            "/0ne00111111/registrations/dev%3a1/operations/5.316aac5bdc130deb.b1e02da8-c3a0-4ff2-a121-7ea7a6b7f550?api-version=2019-03-31",
        )
        .unwrap();
        match m.route {
            Route::OperationStatus { registration_id, .. } => assert_eq!(registration_id.as_str(), "dev:1"),
            other => panic!("{other:?}"),
        }
        let m =
            RouteMatch::parse_target("POST", "/0ne00111111/registrations/d1?api-version=2019-03-31").unwrap();
        assert!(matches!(m.route, Route::RegistrationStatusLookup { .. }));
    }

    #[test]
    fn node_mixed_case_group_paths() {
        for p in ["/enrollmentGroups/g1", "/enrollmentgroups/g1", "/EnrollmentGroups/g1/"] {
            let r = Route::parse("GET", p).unwrap();
            assert!(matches!(r, Route::GetEnrollmentGroup { .. }), "{p}");
        }
        assert_eq!(Route::parse("POST", "/enrollmentgroups/query").unwrap(), Route::QueryEnrollmentGroups);
    }

    #[test]
    fn missing_api_version_and_unknown_routes() {
        assert!(matches!(
            RouteMatch::parse_target("GET", "/enrollments/e1"),
            Err(ProtoError::InvalidId { kind: "api-version", .. })
        ));
        assert!(matches!(Route::parse("PATCH", "/enrollments/e1"), Err(ProtoError::InvalidRoute(_))));
        assert!(matches!(Route::parse("POST", "/enrollments/e1"), Err(ProtoError::InvalidRoute(_))));
        assert!(matches!(Route::parse("GET", "/devices/d1"), Err(ProtoError::InvalidRoute(_))));
        assert!(matches!(Route::parse("GET", "/enrollments/bad%2Fid"), Err(ProtoError::InvalidId { .. })));
    }

    #[test]
    fn certificate_issuance_starts_with_2025_07_01_preview() {
        assert!(!supports_certificate_issuance("2021-10-01"));
        assert!(!supports_certificate_issuance("2019-03-31"));
        assert!(supports_certificate_issuance("2025-07-01-preview"));
        assert!(supports_certificate_issuance("2026-04-01"));
        assert!(!supports_certificate_issuance("garbage"));
        assert!(!supports_certificate_issuance("zzzz-zz-zz-preview"));
    }

    #[test]
    fn only_2018_04_01_and_before_predate_reprovisioning() {
        assert!(predates_reprovisioning("2018-04-01"));
        assert!(predates_reprovisioning("2017-11-15"));
        assert!(!predates_reprovisioning("2018-09-01-preview"));
        assert!(!predates_reprovisioning("2018-11-01"));
        assert!(!predates_reprovisioning("2019-03-31"));
        assert!(!predates_reprovisioning("garbage"));
        assert!(!predates_reprovisioning(""));
    }

    #[test]
    fn query_paths_take_precedence_only_for_post() {
        assert_eq!(Route::parse("POST", "/enrollments/query").unwrap(), Route::QueryEnrollments);
        assert!(matches!(Route::parse("GET", "/enrollments/query").unwrap(), Route::GetEnrollment { .. }));
        assert_eq!(Route::QueryEnrollments.query_item_type(), Some(QueryItemType::Enrollment));
    }
}
