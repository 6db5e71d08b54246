//! The service side of provisioning: authenticate a registration, find its enrollment, allocate a
//! hub, apply the reprovision policy, carry the hub actions out and answer in the DPS shapes.
//!
//! Call order for one device (any transport): [`Provisioner::handle_register`] → the transport
//! sends the `202 assigning` reply → [`Provisioner::handle_operation_status`] for each poll. The
//! assignment is decided inside `handle_register` (spec §0 trap 1: every official client needs the
//! 202 first), so the first poll normally finds it `assigned` or `failed`. A device that moves
//! between hubs is recorded as `assigning` while its hub actions run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand_chacha::rand_core::{RngCore as _, SeedableRng as _};
use rand_chacha::ChaCha20Rng;
use serde::Serialize;
use serde_json::{json, Value};
use zerotouch_proto::device::{
    DeviceRegistration, DeviceRegistrationResult, ErrorDetails, RegistrationOperationStatus,
    RegistrationStatus, Substatus, TpmChallenge,
};
use zerotouch_proto::http::predates_reprovisioning;
use zerotouch_proto::ids::{uuid_from_bytes, uuid_text};
use zerotouch_proto::sas::SasToken;
use zerotouch_proto::service::{
    AllocationPolicy, CustomAllocationRequest, DeviceCapabilities, DeviceRegistrationState,
    DeviceRuntimeContext, EnrollmentGroup, IndividualEnrollment, InitialTwin, ProvisioningStatus,
    ReprovisionPolicy,
};
use zerotouch_proto::{DeviceId, IdScope, OperationId, RegistrationId, Text, Timestamp};

use crate::allocation::{AllocationRequest, Allocator};
use crate::attestation::symmetric::{self, check_registration_token, derive_device_key};
use crate::attestation::x509::{check_may_issue, Certificate, PresentedChain};
use crate::attestation::Credential;
use crate::crypto::{constant_time_eq, CryptoProvider};
use crate::enrollments::strip_enrollment_secrets;
use crate::error::{AllocationError, AuthError, Error, StoreError};
use crate::hub::{DeviceAuth, HubAction, HubRegistry, ProvisionedDevice, TwinSetup};
use crate::store::{
    AttestedVia, EnrollmentRef, OperationRecord, OperationStatus, Precondition, ProvisioningStore,
    RegistrationRecord,
};

/// Settings of a provisioning service instance.
#[derive(Debug, Clone)]
pub struct ProvisionerConfig {
    /// The ID scope devices must name.
    pub id_scope: IdScope,
    /// Seconds sent in `retry-after` with every `assigning` reply (real DPS sends 3).
    pub retry_after_secs: u32,
    /// Allowed clock skew when checking SAS expiry and certificate validity (both ends of every
    /// presented and enrolled certificate's window).
    pub clock_skew: Duration,
    /// How long operations stay pollable after creation (at least an hour, spec §11).
    pub operation_retention: Duration,
}

impl ProvisionerConfig {
    /// Defaults for `id_scope`: retry-after 3 s, 5 min skew, 1 h operation retention.
    pub fn new(id_scope: IdScope) -> Self {
        Self {
            id_scope,
            retry_after_secs: 3,
            clock_skew: Duration::from_secs(300),
            operation_retention: Duration::from_secs(3600),
        }
    }
}

/// A register request as any transport decoded it.
#[derive(Debug, Clone)]
pub struct RegisterRequest {
    /// ID scope from the path or MQTT username.
    pub id_scope: String,
    /// Registration id from the path or MQTT username.
    pub registration_id: String,
    /// The JSON body. Its payload stays text until the device is authenticated; one serde_json
    /// makes no tree of (see [`DeviceRegistration::parse_payload`]) is then refused 400 `400000`.
    pub body: DeviceRegistration,
    /// Credential from the TLS handshake, `Authorization` header or MQTT password.
    pub credential: Credential,
    /// The api-version of the query string or MQTT username; `None` is taken as a current one.
    /// Devices on `2018-04-01` or before stay on their hub when the enrollment sets no
    /// reprovision policy (spec §8.3).
    pub api_version: Option<String>,
}

/// An operation-status poll.
#[derive(Debug, Clone)]
pub struct OperationStatusRequest {
    /// ID scope from the path or MQTT username.
    pub id_scope: String,
    /// Registration id from the path or MQTT username.
    pub registration_id: String,
    /// Operation id from the path or topic.
    pub operation_id: String,
    /// Credential.
    pub credential: Credential,
}

/// A registration-status lookup (`POST /{idScope}/registrations/{registrationId}`).
#[derive(Debug, Clone)]
pub struct StatusLookupRequest {
    /// ID scope from the path.
    pub id_scope: String,
    /// Registration id from the path.
    pub registration_id: String,
    /// The body, when one was sent: it must name the path's registration and carry no `csr`.
    pub body: Option<DeviceRegistration>,
    /// Credential.
    pub credential: Credential,
}

/// The body of a reply.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ResponseBody {
    /// `RegistrationOperationStatus` (register and polls).
    Operation(RegistrationOperationStatus),
    /// `DeviceRegistrationResult` (status lookup).
    Registration(DeviceRegistrationResult),
    /// `ProvisioningServiceErrorDetails`.
    Error(ErrorDetails),
    /// The TPM 401 challenge.
    TpmChallenge(TpmChallenge),
}

/// A reply, transport-neutral: HTTP status (also the MQTT `res/{status}` segment), optional
/// `Retry-After` seconds, and the JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// `Retry-After` / `retry-after=` seconds.
    pub retry_after: Option<u32>,
    /// Body.
    pub body: ResponseBody,
}

impl Response {
    /// The body as JSON bytes.
    pub fn body_json(&self) -> Vec<u8> {
        // Serializing these plain data types cannot fail; fall back to an empty object anyway.
        serde_json::to_vec(&self.body).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// The DPS error code when this is an error reply.
    pub fn error_code(&self) -> Option<u32> {
        match &self.body {
            ResponseBody::Error(e) => Some(e.error_code),
            _ => None,
        }
    }
}

/// The enrollment a device was authenticated against, with what allocation needs from it.
#[derive(Debug, Clone)]
enum Enrollment {
    Individual(Arc<IndividualEnrollment>),
    Group(Arc<EnrollmentGroup>),
}

impl Enrollment {
    fn reference(&self) -> EnrollmentRef {
        match self {
            Enrollment::Individual(e) => EnrollmentRef::Individual(e.registration_id.clone()),
            Enrollment::Group(g) => EnrollmentRef::Group(g.enrollment_group_id.clone()),
        }
    }

    fn status(&self) -> Option<ProvisioningStatus> {
        match self {
            Enrollment::Individual(e) => e.provisioning_status,
            Enrollment::Group(g) => g.provisioning_status,
        }
    }

    /// The enrollment's reprovision policy; without one, the default (re-provision and migrate)
    /// or, for a device older than reprovision policies, never re-provision (spec §8.3).
    fn reprovision_policy(&self, predates_reprovisioning: bool) -> ReprovisionPolicy {
        let set = match self {
            Enrollment::Individual(e) => e.reprovision_policy,
            Enrollment::Group(g) => g.reprovision_policy,
        };
        match set {
            Some(policy) => policy,
            None if predates_reprovisioning => {
                ReprovisionPolicy { update_hub_assignment: false, migrate_device_data: true }
            }
            None => ReprovisionPolicy::default(),
        }
    }

    fn allocation_policy(&self) -> Option<AllocationPolicy> {
        match self {
            Enrollment::Individual(e) => e.allocation_policy,
            Enrollment::Group(g) => g.allocation_policy,
        }
    }

    fn iot_hubs(&self) -> Option<&[String]> {
        match self {
            Enrollment::Individual(e) => e.iot_hubs.as_deref(),
            Enrollment::Group(g) => g.iot_hubs.as_deref(),
        }
    }

    fn iot_hub_host_name(&self) -> Option<&str> {
        match self {
            Enrollment::Individual(e) => e.iot_hub_host_name.as_deref(),
            Enrollment::Group(g) => g.iot_hub_host_name.as_deref(),
        }
    }

    fn initial_twin(&self) -> InitialTwin {
        match self {
            Enrollment::Individual(e) => e.initial_twin.clone(),
            Enrollment::Group(g) => g.initial_twin.clone(),
        }
        .unwrap_or_default()
    }

    fn capabilities(&self) -> DeviceCapabilities {
        match self {
            Enrollment::Individual(e) => e.capabilities,
            Enrollment::Group(g) => g.capabilities,
        }
        .unwrap_or_default()
    }
}

/// What authentication established about the device.
#[derive(Debug, Clone)]
struct Attested {
    enrollment: Enrollment,
    auth: DeviceAuth,
    kind: AttestedKind,
}

impl Attested {
    fn via(&self) -> AttestedVia {
        match self.kind {
            AttestedKind::SymmetricKey => AttestedVia::SymmetricKey,
            AttestedKind::X509 { .. } => AttestedVia::X509,
        }
    }
}

#[derive(Debug, Clone)]
enum AttestedKind {
    SymmetricKey,
    X509 { leaf_der: Vec<u8> },
}

/// The outcome of the assignment decision.
struct Plan {
    hub: Text,
    device_id: DeviceId,
    substatus: Substatus,
    actions: Actions,
    moves: bool,
    payload: Option<Value>,
}

/// The hub actions of a plan: one or two, kept inline (a registration makes one plan, and most
/// have a single action). Lives on the stack for one registration: boxing the larger variant
/// would bring back the allocation this saves.
#[allow(clippy::large_enum_variant)]
enum Actions {
    One([HubAction; 1]),
    Two([HubAction; 2]),
}

impl Actions {
    fn as_slice(&self) -> &[HubAction] {
        match self {
            Actions::One(actions) => actions,
            Actions::Two(actions) => actions,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [HubAction] {
        match self {
            Actions::One(actions) => actions,
            Actions::Two(actions) => actions,
        }
    }
}

/// What every step of one registration round works under: its time, the device and the
/// operation it answers.
#[derive(Clone, Copy)]
struct Round<'a> {
    now: Timestamp,
    id: &'a RegistrationId,
    operation_id: &'a OperationId,
    /// The random bytes of the final record's etag, drawn with the operation id's (one draw
    /// from the pool a registration). A round that loses to a concurrent registration commits
    /// nothing, so the next round may use them again.
    etag_random: &'a [u8; 16],
    /// The device speaks an api-version older than reprovision policies.
    predates_reprovisioning: bool,
}

impl Plan {
    /// The credentials the plan gives the device, taken back out of its hub action.
    fn take_auth(&mut self) -> Option<DeviceAuth> {
        self.actions.as_mut_slice().iter_mut().find_map(|action| match action {
            HubAction::Provision { device, .. } | HubAction::Migrate { device, .. } => {
                Some(std::mem::replace(&mut device.auth, DeviceAuth::CertificateAuthority))
            }
            HubAction::Remove { .. } => None,
        })
    }
}

/// The service-side provisioning engine. Thread-safe: every request method takes `&self` (only
/// the builder methods [`Provisioner::on_internal_error`] and [`Provisioner::on_registration`]
/// take `self`, before it is shared), and all registration state is in the store; the caches it
/// keeps (parsed group anchors, prepared group keys) are keyed by the stored text they come from.
pub struct Provisioner<S> {
    config: ProvisionerConfig,
    store: S,
    crypto: Arc<dyn CryptoProvider>,
    allocator: Allocator,
    random: Mutex<RandomPool>,
    /// Group anchors parsed from their stored text, keyed by that text: parsing dominates a
    /// group lookup, and a changed group or CA certificate has new text, so an entry never goes
    /// stale.
    anchors: Mutex<HashMap<String, Certificate>>,
    /// Presented CA certificates (everything above the leaf) parsed from their DER, keyed by
    /// it: a fleet presents the same few intermediates with every registration.
    issuers: Mutex<HashMap<Vec<u8>, Certificate>>,
    /// Symmetric-key group keys decoded and prepared for HMAC, keyed by the primary key's text
    /// (the entry keeps the secondary's text too, and is rebuilt when it differs): every device
    /// of a group derives its keys from the same two.
    /// Hashed fast with a fixed seed (no clock or RNG in the core): the keys are an
    /// administrator's, not a client's, to choose.
    group_keys: Mutex<HashMap<String, Arc<GroupKeys>, foldhash::fast::FixedState>>,
    /// Told of every failure answered 5xx, whose cause the reply leaves out (see
    /// [`Provisioner::on_internal_error`]).
    on_internal_error: Option<InternalErrorObserver>,
    /// Told how every accepted registration ended (see [`Provisioner::on_registration`]).
    on_registration: Option<RegistrationObserver>,
}

/// A callback told of failures that the wire answer hides (store, crypto).
type InternalErrorObserver = Arc<dyn Fn(&Error) + Send + Sync>;

/// A callback told how each accepted registration ended.
type RegistrationObserver = Arc<dyn Fn(&RegistrationOutcome<'_>) + Send + Sync>;

/// What a registration round found: the record it began from, and the precondition that finds
/// the record as the round last left it (that record, or the round's own `assigning` record).
#[derive(Default)]
struct Seen {
    previous: Option<Arc<RegistrationRecord>>,
    pre: Precondition,
    /// The round's own `assigning` record, once the round made its move visible.
    moved: Option<Arc<RegistrationRecord>>,
}

/// How a registration the provisioner accepted (answered `202` with an operation id) ended, as
/// its first poll will report it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum RegistrationOutcome<'a> {
    /// The device was assigned: its record as stored (hub, device id, substatus, enrollment).
    Assigned(&'a RegistrationRecord),
    /// The registration failed after its credential was accepted (no hub to allocate, a custom
    /// allocation that failed, a hub that refused the identity): what the device's poll reads.
    Failed {
        /// The device's registration id.
        registration_id: &'a RegistrationId,
        /// The DPS error code of the failure.
        error_code: u32,
        /// The error message the device reads.
        message: &'a str,
    },
}

/// A group's two keys, ready to derive device keys.
struct GroupKeys {
    secondary_text: String,
    primary: DerivingKey,
    secondary: DerivingKey,
}

/// A decoded group key, prepared when the crypto provider can.
enum DerivingKey {
    Prepared(Box<dyn crate::crypto::HmacKey>),
    Raw(Vec<u8>),
}

impl DerivingKey {
    fn new(crypto: &dyn CryptoProvider, text: &str) -> Result<Self, Error> {
        let raw = symmetric::decode_key(text)?;
        Ok(match crypto.prepare_hmac_sha256(&raw) {
            Some(prepared) => DerivingKey::Prepared(prepared),
            None => DerivingKey::Raw(raw),
        })
    }

    /// The device key of `registration_id` (see [`derive_device_key`]).
    fn derive(&self, crypto: &dyn CryptoProvider, registration_id: &str) -> [u8; 32] {
        match self {
            DerivingKey::Prepared(key) => key.sign(registration_id.as_bytes()),
            DerivingKey::Raw(key) => derive_device_key(crypto, key, registration_id),
        }
    }
}

/// Parsed anchors kept at most; the cache starts over when full (DPS allows a few hundred
/// groups, so this is only reached when certificates are rotated often).
const ANCHOR_CACHE: usize = 256;

/// Bytes a [`RandomPool`] hands out before it reseeds from the [`CryptoProvider`].
const RESEED_AFTER: usize = 1 << 20;

/// The random bytes of operation ids, etags and tracking ids: values that must be unique and
/// unguessable, never keys. Every registration needs 48, and the provider's source (the OS's,
/// for [`crate::crypto::RingCrypto`]) costs far more per byte than a ChaCha20 stream in this
/// process (the kernel's generator took ~5 % of a registration), so the pool runs ChaCha20 keyed
/// with 32 bytes from the provider and rekeys every [`RESEED_AFTER`] bytes.
struct RandomPool {
    stream: Option<ChaCha20Rng>,
    handed_out: usize,
}

impl RandomPool {
    fn empty() -> Self {
        Self { stream: None, handed_out: 0 }
    }

    fn take<const N: usize>(&mut self, crypto: &dyn CryptoProvider) -> Result<[u8; N], Error> {
        let stream = match &mut self.stream {
            Some(stream) if self.handed_out < RESEED_AFTER => stream,
            stale => {
                let mut seed = [0u8; 32];
                crypto.fill_random(&mut seed).map_err(|e| Error::Crypto(e.to_string()))?;
                self.handed_out = 0;
                stale.insert(ChaCha20Rng::from_seed(seed))
            }
        };
        let mut out = [0u8; N];
        stream.fill_bytes(&mut out);
        self.handed_out += N;
        Ok(out)
    }
}

impl<S: ProvisioningStore> Provisioner<S> {
    /// A provisioner over `store`, allocating with `allocator`.
    pub fn new(
        config: ProvisionerConfig,
        store: S,
        crypto: Arc<dyn CryptoProvider>,
        allocator: Allocator,
    ) -> Self {
        Self {
            config,
            store,
            crypto,
            allocator,
            random: Mutex::new(RandomPool::empty()),
            anchors: Mutex::new(HashMap::new()),
            issuers: Mutex::new(HashMap::new()),
            group_keys: Mutex::new(HashMap::default()),
            on_internal_error: None,
            on_registration: None,
        }
    }

    /// Calls `observer` with every failure answered 5xx. The reply says only "Internal server
    /// error", as DPS does; the host logs the cause (a store that is down, a full disk) here.
    #[must_use]
    pub fn on_internal_error(mut self, observer: impl Fn(&Error) + Send + Sync + 'static) -> Self {
        self.on_internal_error = Some(Arc::new(observer));
        self
    }

    /// Calls `observer` once for every registration the provisioner accepted, with how it
    /// ended: what an operator's log shows per device. Refused requests (bad credentials,
    /// unknown ids, throttling) are answered with an error and never reach it.
    #[must_use]
    pub fn on_registration(
        mut self,
        observer: impl Fn(&RegistrationOutcome<'_>) + Send + Sync + 'static,
    ) -> Self {
        self.on_registration = Some(Arc::new(observer));
        self
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &ProvisionerConfig {
        &self.config
    }

    /// The allocator.
    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Handles `PUT …/register` (or the MQTT `iotdps-register` publish).
    ///
    /// Answers `202 assigning` with an operation id when the device is authenticated (the
    /// assignment, or its failure, is recorded under that operation), or an error reply when it
    /// is not: 401, 400 or 404 for the device's credential and request, 429 with `retry-after`
    /// when registrations of the same id race or the store's writes keep conflicting with
    /// concurrent ones ([`StoreError::Conflict`]), 500 when the store fails.
    pub fn handle_register(
        &self,
        now: Timestamp,
        req: RegisterRequest,
        hub: &mut dyn HubRegistry,
    ) -> Response {
        match self.register(now, req, hub) {
            Ok(op) => Response {
                status: 202,
                retry_after: Some(self.config.retry_after_secs),
                body: ResponseBody::Operation(RegistrationOperationStatus {
                    operation_id: op.into(),
                    status: RegistrationStatus::Assigning,
                    registration_state: None,
                }),
            },
            Err(e) => self.error_response(now, &e),
        }
    }

    /// Handles an operation-status poll: `202 assigning` while a move is in progress, `200` with
    /// the final `assigned` / `failed` status otherwise.
    pub fn handle_operation_status(&self, now: Timestamp, req: OperationStatusRequest) -> Response {
        let status = self.operation_status(now, &req, |op_id| Ok(self.store.operation(op_id)?));
        self.poll_response(now, status)
    }

    /// The reply to a poll: `202` with `retry-after` while assigning, `200` once decided, or the
    /// error.
    fn poll_response(&self, now: Timestamp, status: Result<RegistrationOperationStatus, Error>) -> Response {
        match status {
            Ok(status) => {
                let assigning = status.status == RegistrationStatus::Assigning;
                Response {
                    status: if assigning { 202 } else { 200 },
                    retry_after: assigning.then_some(self.config.retry_after_secs),
                    body: ResponseBody::Operation(status),
                }
            }
            Err(e) => self.error_response(now, &e),
        }
    }

    /// Handles a registration-status lookup: `200` with the device's registration result.
    pub fn handle_status_lookup(&self, now: Timestamp, req: StatusLookupRequest) -> Response {
        let result = (|| {
            let (scope, id) = self.check_ids(&req.id_scope, &req.registration_id)?;
            if let Some(body) = &req.body {
                check_body_names(body, &id)?;
                if body.csr.is_some() {
                    return Err(Error::BadRequest(
                        "A registration status lookup takes no csr: certificates are requested by \
                         register."
                            .into(),
                    ));
                }
            }
            self.authenticate(now, scope, &id, &req.credential)?;
            let record =
                self.store.registration(&id)?.ok_or_else(|| Error::RegistrationNotFound(id.to_string()))?;
            Ok::<_, Error>(record.result(None))
        })();
        match result {
            Ok(r) => Response { status: 200, retry_after: None, body: ResponseBody::Registration(r) },
            Err(e) => self.error_response(now, &e),
        }
    }

    /// Authenticates `credential` for `registration_id` in `id_scope` and nothing more: what an
    /// endpoint that authenticates before any request (MQTT CONNECT) needs, without the record
    /// lookup of [`Provisioner::handle_status_lookup`].
    ///
    /// # Errors
    /// As the attestation of a registration: [`Error::Auth`] when the credential is refused,
    /// not-found and invalid-id errors, store failures.
    pub fn check_credential(
        &self,
        now: Timestamp,
        id_scope: &str,
        registration_id: &str,
        credential: &Credential,
    ) -> Result<(), Error> {
        let (scope, id) = self.check_ids(id_scope, registration_id)?;
        self.authenticate(now, scope, &id, credential).map(drop)
    }

    /// Removes operations older than the retention period; returns how many.
    ///
    /// # Errors
    /// Store failures.
    pub fn purge_operations(&self, now: Timestamp) -> Result<usize, Error> {
        Ok(self.store.purge_operations(now - self.config.operation_retention)?)
    }

    /// The error reply for `e`, in the DPS error body shape.
    pub fn error_response(&self, now: Timestamp, e: &Error) -> Response {
        let wire = e.to_wire();
        if wire.http_status >= 500 {
            if let Some(observer) = &self.on_internal_error {
                observer(e);
            }
        }
        // A failed random source only costs the tracking id its uniqueness.
        let random: [u8; 16] = self.random_bytes().unwrap_or_default();
        Response {
            status: wire.http_status,
            retry_after: match e {
                Error::Throttled { retry_after_secs } => Some(*retry_after_secs),
                // Also 429: the device is to come back after the configured pause.
                Error::Store(StoreError::Conflict(_)) => Some(self.config.retry_after_secs),
                _ => None,
            },
            body: ResponseBody::Error(ErrorDetails {
                error_code: wire.error_code,
                tracking_id: uuid_from_bytes(&random),
                message: wire.message,
                timestamp_utc: Some(now),
                // Real DPS sends `"info": null` (spec §1.6).
                info: Some(serde_json::Value::Null),
            }),
        }
    }

    /// Validates the scope and the registration id (taking the id's text over when it is owned).
    fn check_ids(
        &self,
        scope: &str,
        registration_id: impl Into<Text>,
    ) -> Result<(&IdScope, RegistrationId), Error> {
        if !self.config.id_scope.matches(scope) {
            return Err(Error::NotFound(format!("ID scope {scope:?}")));
        }
        let id =
            RegistrationId::new(registration_id).map_err(|e| Error::InvalidRegistrationId(e.to_string()))?;
        Ok((&self.config.id_scope, id))
    }

    fn random_bytes<const N: usize>(&self) -> Result<[u8; N], Error> {
        self.random.lock().unwrap_or_else(PoisonError::into_inner).take(self.crypto.as_ref())
    }

    fn new_etag(&self) -> Result<Text, Error> {
        Ok(etag_from(&self.random_bytes()?))
    }

    fn register(
        &self,
        now: Timestamp,
        req: RegisterRequest,
        hub: &mut dyn HubRegistry,
    ) -> Result<OperationId, Error> {
        // The body names the same id as the path (or topic), usually spelled the same: then it is
        // valid as that one is, and needs no validated copy of its own.
        if req.body.registration_id != req.registration_id {
            let (_, id) = self.check_ids(&req.id_scope, req.registration_id.as_str())?;
            check_body_names(&req.body, &id)?;
        }
        let (scope, id) = self.check_ids(&req.id_scope, req.registration_id)?;
        let predates_reprovisioning = req.api_version.as_deref().is_some_and(predates_reprovisioning);
        if req.body.tpm.is_some() && matches!(req.credential, Credential::None) {
            return Err(Error::BadRequest(
                "TPM attestation is not supported by this version of zerotouch".into(),
            ));
        }
        // DPS refuses a csr before api-version 2025-07-01-preview and issues a certificate for
        // it from then on. This server issues none, and a device that asked for one cannot
        // connect to its hub without it: refused at every api-version, not assigned without it.
        if req.body.csr.is_some() {
            return Err(Error::BadRequest(
                "Certificate issuance (csr) is not supported by this server; register without a csr \
                 and authenticate with a symmetric key or an X.509 certificate."
                    .into(),
            ));
        }
        let mut attested = self.authenticate(now, scope, &id, &req.credential)?;
        if attested.enrollment.status() == Some(ProvisioningStatus::Disabled) {
            return Err(AuthError::EnrollmentDisabled.into());
        }
        // Only now, for a device that proved who it is, does the payload become a tree: one
        // takes tens of times the bytes of its text, which the transport kept as it came.
        let payload = req.body.parse_payload().map_err(|e| {
            Error::BadRequest(format!("The request body is not a valid DeviceRegistration: payload: {e}"))
        })?;
        let random: [u8; 48] = self.random_bytes()?;
        let (op_random, etag_random) = random.split_at(32);
        let operation_id = OperationId::from_random(op_random.try_into().unwrap_or(&[0; 32]));
        let etag_random = etag_random.try_into().unwrap_or(&[0; 16]);
        // A concurrent registration of the same id (another instance) makes the compare-and-swap
        // fail; re-read and decide again. Hub actions are upserts, so a lost round only repeats
        // work (except for hubs outside the store's unit, where a twin reset is applied again,
        // and a move or removal finds the old identity gone: see `HubRegistry`). So does a write the database cancelled, each time the store ran it, for
        // conflicting with concurrent ones (`StoreError::Conflict`): nothing of it was kept.
        // The `assigning` record of the last round that made a move visible: a registration
        // that ends in an error reply does not leave it standing (see `release_move`).
        let mut moved = None;
        for _ in 0..3 {
            let round =
                Round { now, id: &id, operation_id: &operation_id, etag_random, predates_reprovisioning };
            let mut seen = Seen::default();
            let result = self.assign(round, &mut attested, payload.as_ref(), hub, &mut seen);
            if let Some(record) = seen.moved.take() {
                moved = Some(record);
            }
            match result {
                // The record changed, or was deleted, under the round: decide again.
                Err(Error::Store(
                    StoreError::PreconditionFailed
                    | StoreError::AlreadyExists
                    | StoreError::NotFound
                    | StoreError::Conflict(_),
                )) => continue,
                Err(e @ (Error::Allocation(_) | Error::Hub { .. })) => {
                    match self.commit_failed(now, &id, &operation_id, &attested, &e, &seen) {
                        // The failure could not be recorded: decide again, as for a lost round.
                        Err(Error::Store(StoreError::Conflict(_))) => continue,
                        other => other?,
                    }
                    if let Some(observer) = &self.on_registration {
                        let wire = e.to_wire();
                        observer(&RegistrationOutcome::Failed {
                            registration_id: &id,
                            error_code: wire.error_code,
                            message: &wire.message,
                        });
                    }
                    return Ok(operation_id);
                }
                Err(e) => {
                    self.release_move(now, &id, &operation_id, &attested, &e, moved);
                    return Err(e);
                }
                Ok(record) => {
                    if let Some(observer) = &self.on_registration {
                        observer(&RegistrationOutcome::Assigned(&record));
                    }
                    return Ok(operation_id);
                }
            }
        }
        // Registrations of the same id racing each other, or writes the database kept cancelling
        // for conflicts with concurrent ones: the device is to try again shortly. 409 would end
        // it (the SDKs treat every status from 300 to 428 as final, spec §1.7); 429 with
        // retry-after is what every one of them retries.
        let e = Error::Throttled { retry_after_secs: self.config.retry_after_secs };
        self.release_move(now, &id, &operation_id, &attested, &e, moved);
        Err(e)
    }

    /// A registration answered with an error after one of its rounds made a move visible:
    /// records it `failed` with that error over the round's `assigning` record, keeping the hub
    /// and device id of the last assignment (where the identity still is when the hub's writes
    /// are part of the store's unit, which undid the move's; see [`HubRegistry`] for hubs whose
    /// writes stand), so the record does not say `assigning` until the device's next
    /// registration. Best effort: the
    /// device gets the error whatever this write does, and a record another registration wrote
    /// since stands.
    fn release_move(
        &self,
        now: Timestamp,
        id: &RegistrationId,
        operation_id: &OperationId,
        attested: &Attested,
        e: &Error,
        moved: Option<Arc<RegistrationRecord>>,
    ) {
        let Some(record) = moved else { return };
        let pre = Precondition::Matches(record.etag_bare().unwrap_or_default().to_owned());
        let seen = Seen { previous: Some(record), pre, moved: None };
        // Ignored: the reply already carries the error, and a failing store has told the host
        // through it (`on_internal_error`).
        let _ = self.commit_failed(now, id, operation_id, attested, e, &seen);
    }

    fn assign(
        &self,
        round: Round<'_>,
        attested: &mut Attested,
        payload: Option<&Value>,
        hub: &mut dyn HubRegistry,
        seen: &mut Seen,
    ) -> Result<Arc<RegistrationRecord>, Error> {
        let id = round.id;
        let previous = self.store.registration_shared(id)?;
        seen.pre = match previous.as_deref().map(|r| r.etag_bare().unwrap_or_default()) {
            Some(etag) => Precondition::Matches(etag.to_owned()),
            None => Precondition::MustNotExist,
        };
        seen.previous.clone_from(&previous);
        let previous = previous.as_deref();
        // The credentials move into the hub action; a round lost to a concurrent registration
        // hands them back for the next one (below).
        let auth = std::mem::replace(&mut attested.auth, DeviceAuth::CertificateAuthority);
        let mut plan = self.plan(id, attested, auth, payload, previous, round.predates_reprovisioning)?;
        let result = self.carry_out(round, attested, &plan, previous, hub, seen);
        if result.is_err() {
            if let Some(auth) = plan.take_auth() {
                attested.auth = auth;
            }
        }
        result
    }

    /// Makes `plan` happen: the move made visible first when there is one, then the hub actions
    /// and the final record as one unit.
    fn carry_out(
        &self,
        round: Round<'_>,
        attested: &Attested,
        plan: &Plan,
        previous: Option<&RegistrationRecord>,
        hub: &mut dyn HubRegistry,
        seen: &mut Seen,
    ) -> Result<Arc<RegistrationRecord>, Error> {
        let Round { now, id, operation_id, .. } = round;
        let created = previous.and_then(|r| r.state.created_date_time_utc).unwrap_or(now);
        let initial_hub = previous.and_then(|r| r.initial_hub.as_ref()).unwrap_or(&plan.hub);

        if plan.moves {
            // Make the move visible (and recoverable) before touching the hubs.
            let etag = self.new_etag()?;
            let mut record = previous.cloned().unwrap_or_else(|| RegistrationRecord {
                registration_id: id.clone(),
                state: DeviceRegistrationState { registration_id: id.into(), ..Default::default() },
                enrollment: attested.enrollment.reference(),
                initial_hub: Some(initial_hub.clone()),
            });
            record.state.status = Some(RegistrationStatus::Assigning);
            record.state.last_updated_date_time_utc = Some(now);
            record.state.etag = Some(etag.clone());
            let op = OperationRecord {
                operation_id: operation_id.clone(),
                registration_id: id.clone(),
                created: now,
                status: RegistrationOperationStatus {
                    operation_id: operation_id.into(),
                    status: RegistrationStatus::Assigning,
                    registration_state: Some(DeviceRegistrationResult {
                        registration_id: id.into(),
                        status: Some(RegistrationStatus::Assigning),
                        ..Default::default()
                    }),
                }
                .into(),
            };
            let record = Arc::new(record);
            self.store.commit_registration(Arc::clone(&record), &seen.pre, op)?;
            seen.pre = Precondition::Matches(etag.to_string());
            seen.moved = Some(record);
        }

        // The hub actions and the record are one unit: a crash or a failure in between leaves
        // neither the device without its record nor a record naming a device never created.
        // The hub learns how the unit ended, so it announces only identities that stayed.
        let mut unit = crate::hub::HubUnit::begin(hub);
        let mut committed = None;
        let mut runs = 0u32;
        let result = self.store.atomically(&mut || {
            // A store may roll the unit back and run it again (a transaction conflict): the
            // hub's unit then starts afresh too, so the undone attempt announces nothing.
            if runs > 0 {
                unit.restart();
            }
            runs += 1;
            unit.hub().apply_all(plan.actions.as_slice()).map_err(|e| {
                if e.is_conflict() {
                    // The hub's state changed under the round (a concurrent registration, a
                    // transaction conflict in a shared database): decide again, as for a record
                    // that changed, instead of failing the device.
                    Error::Store(StoreError::PreconditionFailed)
                } else {
                    Error::Hub { code: e.code, message: e.message }
                }
            })?;
            committed = Some(self.commit_assigned(round, attested, plan, created, initial_hub, &seen.pre)?);
            Ok(())
        });
        unit.end(result.is_ok());
        result?;
        committed.ok_or_else(|| {
            Error::Store(StoreError::Backend("the store reported a unit done that it never ran".into()))
        })
    }

    /// Records a registration that failed after its credential was accepted: the record says
    /// `failed` with the error (as DPS's registration state does), keeping what the record the
    /// round began from says of the device's last assignment (hub, device id, substatus,
    /// payload: its identity is still there, since the failed unit applied none of its hub
    /// actions), so the next registration moves it from there; the operation answers with the
    /// record's times and etag. Written only over the record the round began from (or its own
    /// `assigning` record): one that a concurrent registration has written since, or that was
    /// deleted since, stands, and only the operation is stored.
    fn commit_failed(
        &self,
        now: Timestamp,
        id: &RegistrationId,
        operation_id: &OperationId,
        attested: &Attested,
        e: &Error,
        seen: &Seen,
    ) -> Result<(), Error> {
        let wire = e.to_wire();
        let previous = seen.previous.as_deref();
        let created = previous.and_then(|r| r.state.created_date_time_utc).unwrap_or(now);
        let etag = self.new_etag()?;
        let last = previous.map(|r| &r.state);
        let record = RegistrationRecord {
            registration_id: id.clone(),
            state: DeviceRegistrationState {
                registration_id: id.into(),
                created_date_time_utc: Some(created),
                assigned_hub: last.and_then(|s| s.assigned_hub.clone()),
                device_id: last.and_then(|s| s.device_id.clone()),
                status: Some(RegistrationStatus::Failed),
                substatus: last.and_then(|s| s.substatus),
                error_code: Some(wire.error_code),
                error_message: Some(wire.message.clone()),
                last_updated_date_time_utc: Some(now),
                etag: Some(etag.clone()),
                payload: last.and_then(|s| s.payload.clone()),
            },
            enrollment: attested.enrollment.reference(),
            initial_hub: previous.and_then(|r| r.initial_hub.clone()),
        };
        let mut op = failed_operation(operation_id, id, now, e);
        if let OperationStatus::Fixed(status) = &mut op.status {
            if let Some(state) = &mut status.registration_state {
                state.created_date_time_utc = Some(created);
                state.etag = Some(etag);
            }
        }
        match self.store.commit_registration(Arc::new(record), &seen.pre, op) {
            Err(StoreError::PreconditionFailed | StoreError::AlreadyExists | StoreError::NotFound) => {
                self.store.put_operation(&failed_operation(operation_id, id, now, e))?;
                Ok(())
            }
            other => Ok(other?),
        }
    }

    /// Writes the final `assigned` record and its operation; returns the record.
    fn commit_assigned(
        &self,
        round: Round<'_>,
        attested: &Attested,
        plan: &Plan,
        created: Timestamp,
        initial_hub: &Text,
        pre: &Precondition,
    ) -> Result<Arc<RegistrationRecord>, Error> {
        let Round { now, id, operation_id, etag_random, .. } = round;
        let record = RegistrationRecord {
            registration_id: id.clone(),
            state: DeviceRegistrationState {
                registration_id: id.into(),
                created_date_time_utc: Some(created),
                assigned_hub: Some(plan.hub.clone()),
                device_id: Some(plan.device_id.as_text().clone()),
                status: Some(RegistrationStatus::Assigned),
                substatus: Some(plan.substatus),
                error_code: None,
                error_message: None,
                last_updated_date_time_utc: Some(now),
                etag: Some(etag_from(etag_random)),
                payload: plan.payload.clone(),
            },
            enrollment: attested.enrollment.reference(),
            initial_hub: Some(initial_hub.clone()),
        };
        // The operation answers from the record itself: one copy of its strings, not two.
        let record = Arc::new(record);
        let op = OperationRecord {
            operation_id: operation_id.clone(),
            registration_id: id.clone(),
            created: now,
            status: OperationStatus::Registered { record: Arc::clone(&record), via: Some(attested.via()) },
        };
        self.store.commit_registration(Arc::clone(&record), pre, op)?;
        Ok(record)
    }

    /// Decides hub, device id, substatus and hub actions from the enrollment, the reprovision
    /// policy and the previous registration (spec §8.3).
    fn plan(
        &self,
        id: &RegistrationId,
        attested: &Attested,
        auth: DeviceAuth,
        payload: Option<&Value>,
        previous: Option<&RegistrationRecord>,
        predates_reprovisioning: bool,
    ) -> Result<Plan, Error> {
        let enrollment = &attested.enrollment;
        // The device id a new identity gets: the enrollment's, or the registration id. Made only
        // by the branches that create an identity (a device that keeps its identity keeps its id).
        let new_device_id = || match enrollment {
            Enrollment::Individual(e) => e.device_id.clone().unwrap_or_else(|| DeviceId::from(id)),
            Enrollment::Group(_) => DeviceId::from(id),
        };
        // The identity the hub gets, under the device id each branch settles on.
        let iot_edge = enrollment.capabilities().iot_edge;
        let device = |device_id: DeviceId| ProvisionedDevice { device_id, auth, iot_edge };
        // Where the device's identity is: an assignment, a move in progress, or a failed
        // registration that kept the identity of an earlier one (see `commit_failed`).
        let current = previous.and_then(|r| {
            let assigned = matches!(
                r.state.status,
                Some(
                    RegistrationStatus::Assigned | RegistrationStatus::Assigning | RegistrationStatus::Failed
                )
            );
            match (assigned, &r.state.assigned_hub, &r.state.device_id) {
                (true, Some(h), Some(d)) => DeviceId::new(d.clone()).ok().map(|d| (h, d)),
                _ => None,
            }
        });
        // The legacy rule keeps a device on its hub, which a hub taken out of the linked hubs
        // cannot do: then the enrollment's policy, or the default, decides.
        let may_stay = current.as_ref().is_none_or(|(hub, _)| self.allocator.is_linked(hub));
        let policy = enrollment.reprovision_policy(predates_reprovisioning && may_stay);

        // Never re-provision: keep the current hub and device, refresh its credentials.
        if let (Some((hub, old_device)), false) = (&current, policy.update_hub_assignment) {
            // Its hub taken out of the linked hubs, the device has nowhere it may go: the same
            // refusal as an enrollment naming a hub that is not linked.
            if !self.allocator.is_linked(hub) {
                return Err(AllocationError::UnknownHub(hub.to_string()).into());
            }
            let substatus = previous.and_then(|r| r.state.substatus).unwrap_or(Substatus::InitialAssignment);
            return Ok(Plan {
                hub: (*hub).to_owned(),
                device_id: old_device.clone(),
                substatus,
                actions: Actions::One([HubAction::Provision {
                    hub: (*hub).to_owned(),
                    device: device(old_device.clone()),
                    twin: TwinSetup::KeepOrInitial(enrollment.initial_twin()),
                }]),
                moves: false,
                payload: previous.and_then(|r| r.state.payload.clone()),
            });
        }

        let effective = self.allocator.effective_policy(enrollment.allocation_policy());
        let custom_request = (effective == AllocationPolicy::Custom)
            .then(|| Box::new(self.custom_request(id, attested, payload, current.as_ref())));
        let mut decision = self.allocator.allocate(AllocationRequest {
            registration_id: id,
            policy: enrollment.allocation_policy(),
            iot_hubs: enrollment.iot_hubs(),
            iot_hub_host_name: enrollment.iot_hub_host_name(),
            custom_request,
        })?;
        let webhook_twin = decision.initial_twin.take();
        // A webhook that returns an initial twin overrides migration (spec §8.2, §8.3).
        let migrate = policy.migrate_device_data && webhook_twin.is_none();
        let initial_twin = webhook_twin.unwrap_or_else(|| enrollment.initial_twin());
        let new_hub = decision.hub;

        let back_to_initial =
            previous.and_then(|r| r.initial_hub.as_deref()).is_some_and(|h| h.eq_ignore_ascii_case(&new_hub));
        // The substatus of a device that moves to another hub without its data.
        let reset_elsewhere = if back_to_initial {
            Substatus::ReprovisionedToInitialAssignment
        } else {
            Substatus::DeviceDataReset
        };

        // A hub no longer linked (taken out of the service's hubs) can be neither read nor
        // written: the device is provisioned afresh where allocation puts it, with the initial
        // twin, and the old hub is left alone (its identity there is the operator's to remove).
        if current.as_ref().is_some_and(|(hub, _)| !self.allocator.is_linked(hub)) {
            let device_id = new_device_id();
            return Ok(Plan {
                hub: new_hub.clone(),
                device_id: device_id.clone(),
                substatus: reset_elsewhere,
                actions: Actions::One([HubAction::Provision {
                    hub: new_hub,
                    device: device(device_id),
                    twin: TwinSetup::Reset(initial_twin),
                }]),
                moves: false,
                payload: decision.payload,
            });
        }
        let Some((old_hub, old_device)) = current else {
            let device_id = new_device_id();
            return Ok(Plan {
                hub: new_hub.clone(),
                device_id: device_id.clone(),
                substatus: Substatus::InitialAssignment,
                actions: Actions::One([HubAction::Provision {
                    hub: new_hub,
                    device: device(device_id),
                    twin: TwinSetup::KeepOrInitial(initial_twin),
                }]),
                moves: false,
                payload: decision.payload,
            });
        };

        let same_hub = old_hub.eq_ignore_ascii_case(&new_hub);
        let (device_id, substatus, actions, moves) = if same_hub && migrate {
            // The device stays where it is, under its id, with its data.
            let substatus = previous.and_then(|r| r.state.substatus).unwrap_or(Substatus::InitialAssignment);
            let action = HubAction::Provision {
                hub: old_hub.to_owned(),
                device: device(old_device.clone()),
                twin: TwinSetup::KeepOrInitial(initial_twin),
            };
            (old_device, substatus, Actions::One([action]), false)
        } else if same_hub {
            let device_id = new_device_id();
            let provision = HubAction::Provision {
                hub: old_hub.to_owned(),
                device: device(device_id.clone()),
                twin: TwinSetup::Reset(initial_twin),
            };
            let actions = if old_device != device_id {
                let remove = HubAction::Remove { hub: old_hub.to_owned(), device_id: old_device };
                Actions::Two([remove, provision])
            } else {
                Actions::One([provision])
            };
            (device_id, Substatus::DeviceDataReset, actions, false)
        } else if migrate {
            let substatus = if back_to_initial {
                Substatus::ReprovisionedToInitialAssignment
            } else {
                Substatus::DeviceDataMigrated
            };
            let device_id = new_device_id();
            let action = HubAction::Migrate {
                from_hub: old_hub.to_owned(),
                from_device_id: old_device,
                to_hub: new_hub.clone(),
                device: device(device_id.clone()),
                initial_twin,
            };
            (device_id, substatus, Actions::One([action]), true)
        } else {
            let substatus = reset_elsewhere;
            let device_id = new_device_id();
            let actions = Actions::Two([
                HubAction::Provision {
                    hub: new_hub.clone(),
                    device: device(device_id.clone()),
                    twin: TwinSetup::Reset(initial_twin),
                },
                HubAction::Remove { hub: old_hub.to_owned(), device_id: old_device },
            ]);
            (device_id, substatus, actions, true)
        };
        Ok(Plan { hub: new_hub, device_id, substatus, actions, moves, payload: decision.payload })
    }

    fn custom_request(
        &self,
        id: &RegistrationId,
        attested: &Attested,
        payload: Option<&Value>,
        current: Option<&(&Text, DeviceId)>,
    ) -> CustomAllocationRequest {
        let (individual_enrollment, enrollment_group) = match &attested.enrollment {
            Enrollment::Individual(e) => (Some(strip_enrollment_secrets((**e).clone())), None),
            Enrollment::Group(g) => (None, Some(crate::enrollments::strip_group_secrets((**g).clone()))),
        };
        let (symmetric_key, x509) = match &attested.kind {
            AttestedKind::SymmetricKey => (Some(json!({})), None),
            AttestedKind::X509 { leaf_der } => {
                (None, Some(json!({ "clientCertificate": STANDARD.encode(leaf_der) })))
            }
        };
        CustomAllocationRequest {
            individual_enrollment,
            enrollment_group,
            device_runtime_context: DeviceRuntimeContext {
                registration_id: id.to_string(),
                current_iot_hub_host_name: current.map(|(h, _)| h.to_string()),
                current_device_id: current.map(|(_, d)| d.to_string()),
                symmetric_key,
                x509,
                tpm: None,
                payload: payload.cloned(),
            },
            linked_hubs: Vec::new(),
        }
    }

    /// The status a poll answers, with the operation found by `find`: the device is
    /// authenticated first (spec §11), and an operation of another registration, or past its
    /// retention, is not found.
    fn operation_status(
        &self,
        now: Timestamp,
        req: &OperationStatusRequest,
        find: impl FnOnce(&OperationId) -> Result<Option<OperationRecord>, Error>,
    ) -> Result<RegistrationOperationStatus, Error> {
        let (scope, id) = self.check_ids(&req.id_scope, req.registration_id.as_str())?;
        let op = match OperationId::new(req.operation_id.as_str()) {
            Ok(op_id) => find(&op_id)?,
            Err(_) => None,
        };
        // Only this registration's operations, within their retention, exist for the poll.
        let op = op.filter(|op| {
            op.registration_id.same_registration(&id) && op.created + self.config.operation_retention >= now
        });
        // Signatures are checked on every request, but a token is not expired mid-poll (spec
        // §11): a token valid when its operation began may poll it to the end (the Rust
        // identity service's tokens live 30 s and are reused for every poll). The signature and
        // the enrollment's state are checked as they are now; only the expiry and certificate
        // validity are judged at the operation's start. Nothing about the operation is told
        // before the device is authenticated.
        let checked_at = op.as_ref().map_or(now, |op| op.created.min(now));
        self.authenticate(checked_at, scope, &id, &req.credential)?;
        let op = op.ok_or_else(|| Error::OperationNotFound(req.operation_id.clone()))?;
        Ok(op.into_status())
    }

    /// Authenticates a credential for `id` and finds the enrollment that admits it.
    fn authenticate(
        &self,
        now: Timestamp,
        scope: &IdScope,
        id: &RegistrationId,
        credential: &Credential,
    ) -> Result<Attested, Error> {
        match credential {
            Credential::None => Err(AuthError::MissingCredential.into()),
            Credential::Sas(token) => self.authenticate_sas(now, scope, id, token),
            Credential::X509(chain) => self.authenticate_x509(now, id, chain),
        }
    }

    fn authenticate_sas(
        &self,
        now: Timestamp,
        scope: &IdScope,
        id: &RegistrationId,
        token: &str,
    ) -> Result<Attested, Error> {
        let token = SasToken::parse(token).map_err(|_| AuthError::SignatureMismatch)?;
        check_registration_token(&token, scope, id, now, self.config.clock_skew)?;
        let signature = token.signature_sha256().ok_or(AuthError::SignatureMismatch)?;
        let crypto = self.crypto.as_ref();
        let signed_parts = token.signed_parts();
        let signed_with =
            |key: &[u8]| constant_time_eq(&crypto.hmac_sha256_parts(key, &signed_parts), &signature);

        // An individual enrollment for this id always wins over groups (spec §5.2).
        if let Some(enrollment) = self.store.enrollment_shared(id)? {
            let keys = enrollment
                .attestation
                .symmetric_key
                .as_ref()
                .filter(|_| {
                    enrollment.attestation.kind == zerotouch_proto::service::AttestationType::SymmetricKey
                })
                .ok_or(AuthError::AttestationMismatch)?;
            let primary = symmetric::decode_key(keys.primary_key.as_deref().unwrap_or_default())?;
            let secondary = symmetric::decode_key(keys.secondary_key.as_deref().unwrap_or_default())?;
            // The signature first: only a device holding the key learns that it is disabled.
            if !(signed_with(&primary) || signed_with(&secondary)) {
                return Err(AuthError::SignatureMismatch.into());
            }
            if enrollment.provisioning_status == Some(ProvisioningStatus::Disabled) {
                return Err(AuthError::EnrollmentDisabled.into());
            }
            return Ok(Attested {
                auth: DeviceAuth::SymmetricKey {
                    primary_key: keys.primary_key.clone().unwrap_or_default(),
                    secondary_key: keys.secondary_key.clone().unwrap_or_default(),
                },
                enrollment: Enrollment::Individual(enrollment),
                kind: AttestedKind::SymmetricKey,
            });
        }

        let mut groups = self.store.symmetric_key_groups()?;
        if groups.is_empty() {
            return Err(Error::EnrollmentNotFound(id.to_string()));
        }
        // With several groups, try the one this device registered through last time first.
        let previous = if groups.len() > 1 { self.store.registration(id)? } else { None };
        if let Some(RegistrationRecord { enrollment: EnrollmentRef::Group(last), .. }) = previous {
            if let Some(pos) = groups.iter().position(|g| g.enrollment_group_id.key() == last.key()) {
                groups.swap(0, pos);
            }
        }
        // Derive from the id as sent; devices that lower-cased their id get a second chance.
        // Only an id with upper-case letters has a second spelling (and needs the copy).
        let lower =
            id.as_str().bytes().any(|b| b.is_ascii_uppercase()).then(|| id.as_str().to_ascii_lowercase());
        let spellings: &[&str] = match &lower {
            Some(lower) => &[id.as_str(), lower],
            None => &[id.as_str()],
        };
        for group in groups {
            let Some(keys) = group.attestation.symmetric_key.as_ref() else { continue };
            let (Some(p), Some(s)) = (keys.primary_key.as_deref(), keys.secondary_key.as_deref()) else {
                continue;
            };
            let Some(keys) = self.group_keys(p, s) else { continue };
            for spelling in spellings {
                let dp = keys.primary.derive(crypto, spelling);
                let ds = keys.secondary.derive(crypto, spelling);
                if signed_with(&dp) || signed_with(&ds) {
                    if group.provisioning_status == Some(ProvisioningStatus::Disabled) {
                        return Err(AuthError::EnrollmentDisabled.into());
                    }
                    return Ok(Attested {
                        auth: DeviceAuth::SymmetricKey {
                            primary_key: base64_text(&dp),
                            secondary_key: base64_text(&ds),
                        },
                        enrollment: Enrollment::Group(group),
                        kind: AttestedKind::SymmetricKey,
                    });
                }
            }
        }
        Err(AuthError::SignatureMismatch.into())
    }

    fn authenticate_x509(
        &self,
        now: Timestamp,
        id: &RegistrationId,
        chain: &[Vec<u8>],
    ) -> Result<Attested, Error> {
        let crypto = self.crypto.as_ref();
        let chain = self.presented_chain(chain)?;
        chain.verify_internal_within(now, self.config.clock_skew, crypto)?;
        let leaf = chain.leaf();
        let cn = leaf.common_name().unwrap_or_default();
        if !cn.eq_ignore_ascii_case(id.as_str()) || cn.len() > 64 {
            return Err(AuthError::CommonNameMismatch { cn: cn.to_owned() }.into());
        }
        let thumbprint = leaf.sha1_thumbprint(crypto);
        let auth = DeviceAuth::SelfSigned {
            primary_thumbprint: thumbprint.clone(),
            secondary_thumbprint: thumbprint,
        };
        let leaf_der = leaf.der().to_vec();

        // 1. An individual enrollment for the leaf wins, enabled or not.
        if let Some(enrollment) = self.store.enrollment_shared(id)? {
            let certs = enrollment
                .attestation
                .x509
                .as_ref()
                .and_then(|x| x.client_certificates.as_ref())
                .ok_or(AuthError::AttestationMismatch)?;
            let leaf_sha256 = leaf.sha256_thumbprint(crypto);
            let enrolled = [&certs.primary, &certs.secondary].into_iter().flatten().any(|c| {
                match (&c.info, &c.certificate) {
                    (Some(info), _) => info.sha256_thumbprint.eq_ignore_ascii_case(&leaf_sha256),
                    (None, Some(text)) => Certificate::from_text(text).is_ok_and(|c| c.der() == leaf.der()),
                    (None, None) => false,
                }
            });
            if !enrolled {
                return Err(AuthError::UntrustedChain.into());
            }
            if enrollment.provisioning_status == Some(ProvisioningStatus::Disabled) {
                return Err(AuthError::EnrollmentDisabled.into());
            }
            return Ok(Attested {
                enrollment: Enrollment::Individual(enrollment),
                auth,
                kind: AttestedKind::X509 { leaf_der },
            });
        }

        // 2. Groups, from the leaf's issuer upwards; the first level with a group that signed
        // decides. Several groups there (one CA enrolled twice, e.g. an old batch's group
        // disabled beside a new one): an enabled group admits the device, the first by id; the
        // device is refused as disabled only when every one of them is.
        let presented = chain.certificates();
        for (i, cert) in presented.iter().enumerate() {
            let mut groups = self.store.groups_by_ca_subject(cert.issuer_name())?;
            groups.sort_by_key(|g| g.enrollment_group_id.key());
            let mut disabled = false;
            'groups: for group in groups {
                for anchor in self.group_anchors(&group)? {
                    // A presented anchor was checked with the chain; an enrolled one that was not
                    // sent must be a CA allowed to sign the `i` intermediates below it all the same.
                    let already_verified = presented.get(i + 1).is_some_and(|p| p.der() == anchor.der());
                    let issued = already_verified
                        || (cert.verify_issued_by(&anchor, crypto).is_ok()
                            && check_may_issue(&anchor, i).is_ok());
                    if !issued || anchor.check_validity_within(now, self.config.clock_skew).is_err() {
                        continue;
                    }
                    if group.provisioning_status == Some(ProvisioningStatus::Disabled) {
                        disabled = true;
                        continue 'groups;
                    }
                    return Ok(Attested {
                        enrollment: Enrollment::Group(group),
                        auth,
                        kind: AttestedKind::X509 { leaf_der },
                    });
                }
            }
            if disabled {
                return Err(AuthError::EnrollmentDisabled.into());
            }
        }
        Err(AuthError::UntrustedChain.into())
    }

    /// A group's keys from their stored text, decoded and prepared once; `None` when either is
    /// not a valid key (that group cannot admit anyone). Bounded like the anchor cache.
    fn group_keys(&self, primary: &str, secondary: &str) -> Option<Arc<GroupKeys>> {
        let lock = || self.group_keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(keys) = lock().get(primary).filter(|k| k.secondary_text == secondary) {
            return Some(Arc::clone(keys));
        }
        let crypto = self.crypto.as_ref();
        let keys = Arc::new(GroupKeys {
            secondary_text: secondary.to_owned(),
            primary: DerivingKey::new(crypto, primary).ok()?,
            secondary: DerivingKey::new(crypto, secondary).ok()?,
        });
        let mut cache = lock();
        if cache.len() >= ANCHOR_CACHE {
            cache.clear();
        }
        cache.insert(primary.to_owned(), Arc::clone(&keys));
        Some(keys)
    }

    /// The certificates that anchor a group: its signing certificates, and the verified CA
    /// certificates it references.
    fn group_anchors(&self, group: &EnrollmentGroup) -> Result<Vec<Certificate>, Error> {
        let mut anchors = Vec::new();
        let Some(x509) = &group.attestation.x509 else { return Ok(anchors) };
        if let Some(certs) = &x509.signing_certificates {
            for text in [&certs.primary, &certs.secondary]
                .into_iter()
                .flatten()
                .filter_map(|c| c.certificate.as_ref())
            {
                if let Some(cert) = self.anchor(text) {
                    anchors.push(cert);
                }
            }
        }
        if let Some(refs) = &x509.ca_references {
            for name in [&refs.primary, &refs.secondary].into_iter().flatten() {
                if let Some(ca) = self.store.ca_certificate(name)?.filter(|ca| ca.is_verified) {
                    if let Some(cert) = self.anchor(&ca.certificate_der) {
                        anchors.push(cert);
                    }
                }
            }
        }
        Ok(anchors)
    }

    /// The presented chain, parsed: the leaf every time, the certificates above it once.
    fn presented_chain(&self, chain: &[Vec<u8>]) -> Result<PresentedChain, Error> {
        let mut certificates = Vec::with_capacity(chain.len());
        for (i, der) in chain.iter().enumerate() {
            certificates.push(if i == 0 { Certificate::from_der(der)? } else { self.issuer(der)? });
        }
        Ok(PresentedChain::from_certificates(certificates)?)
    }

    /// A presented CA certificate, parsed once. Only parsed certificates are kept, and the
    /// cache starts over when full, so junk chains cannot grow it.
    fn issuer(&self, der: &[u8]) -> Result<Certificate, Error> {
        let lock = || self.issuers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cert) = lock().get(der) {
            return Ok(cert.clone());
        }
        let cert = Certificate::from_der(der)?;
        let mut cache = lock();
        if cache.len() >= ANCHOR_CACHE {
            cache.clear();
        }
        cache.insert(der.to_vec(), cert.clone());
        Ok(cert)
    }

    /// The certificate of a stored PEM or base64 text, parsed once.
    fn anchor(&self, text: &str) -> Option<Certificate> {
        let lock = || self.anchors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cert) = lock().get(text) {
            return Some(cert.clone());
        }
        // Parsed outside the lock; a text that does not parse is not cached (it is rare, and
        // its group is unusable until fixed anyway).
        let cert = Certificate::from_text(text).ok()?;
        let mut cache = lock();
        if cache.len() >= ANCHOR_CACHE {
            cache.clear();
        }
        cache.insert(text.to_owned(), cert.clone());
        Some(cert)
    }

    /// Answers an operation-status poll as [`Provisioner::handle_operation_status`] does, but
    /// only when the store holds the operation in memory
    /// ([`crate::store::RegistrationStore::operation_in_memory`]); `None`, before any other
    /// work, when it does not. An endpoint can then answer most polls without handing them to
    /// a blocking thread for the operation read; the credential is still checked (spec §11).
    pub fn operation_status_in_memory(
        &self,
        now: Timestamp,
        req: &OperationStatusRequest,
    ) -> Option<Response> {
        let op = self.store.operation_in_memory(&OperationId::new(req.operation_id.as_str()).ok()?)?;
        Some(self.poll_response(now, self.operation_status(now, req, |_| Ok(Some(op)))))
    }
}

/// Checks that a request body names the registration of its path (or MQTT username), in any
/// spelling of it: DPS answers another one 400 `400004` (spec §11).
fn check_body_names(body: &DeviceRegistration, id: &RegistrationId) -> Result<(), Error> {
    let body_id = RegistrationId::new(body.registration_id.as_str())
        .map_err(|e| Error::InvalidRegistrationId(e.to_string()))?;
    if body_id.same_registration(id) {
        return Ok(());
    }
    Err(Error::InvalidRegistrationId(format!(
        "body registrationId {:?} differs from {:?}",
        body_id.as_str(),
        id.as_str()
    )))
}

/// Standard base64 of `bytes` in a string of exactly its size. (`Engine::encode` zeroes a
/// buffer with `calloc` first, which costs more than the encoding for the few dozen bytes of a key
/// or an etag, on every registration.)
fn base64_text(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(base64::encoded_len(bytes.len(), true).unwrap_or_default());
    STANDARD.encode_string(bytes, &mut text);
    text
}

/// A registration etag from 16 random bytes.
fn etag_from(random: &[u8; 16]) -> Text {
    // Real DPS registration etags are base64 of a quoted GUID-like string (spec §1.4).
    let mut quoted = [b'"'; 38];
    quoted[1..37].copy_from_slice(&uuid_text(random));
    let mut text = [0u8; 52];
    let len = STANDARD.encode_slice(quoted, &mut text).unwrap_or_default();
    // Base64 is ASCII: always UTF-8.
    Text::from(std::str::from_utf8(&text[..len]).unwrap_or_default())
}

fn failed_operation(op: &OperationId, id: &RegistrationId, now: Timestamp, e: &Error) -> OperationRecord {
    let wire = e.to_wire();
    OperationRecord {
        operation_id: op.clone(),
        registration_id: id.clone(),
        created: now,
        status: RegistrationOperationStatus {
            operation_id: op.into(),
            status: RegistrationStatus::Failed,
            registration_state: Some(DeviceRegistrationResult {
                registration_id: id.into(),
                status: Some(RegistrationStatus::Failed),
                error_code: Some(wire.error_code),
                error_message: Some(wire.message),
                last_updated_date_time_utc: Some(now),
                ..Default::default()
            }),
        }
        .into(),
    }
}

#[cfg(all(test, feature = "ring"))]
mod tests {
    use super::*;
    use crate::crypto::RingCrypto;

    #[test]
    fn group_keys_derive_the_published_device_keys_prepared_or_not() {
        // The published derivation vector (also checked in attestation::symmetric).
        let group =
            "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw==";
        let id = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6";
        let ring = RingCrypto::new();
        let prepared = DerivingKey::new(&ring, group).unwrap();
        assert!(matches!(prepared, DerivingKey::Prepared(_)), "ring prepares its keys");
        // What a provider without prepared keys gets.
        let raw = DerivingKey::Raw(symmetric::decode_key(group).unwrap());
        let expected = STANDARD.decode("Jsm0lyGpjaVYVP2g3FnmnmG9dI/9qU24wNoykUmermc=").unwrap();
        assert_eq!(prepared.derive(&ring, id).to_vec(), expected);
        assert_eq!(raw.derive(&ring, id).to_vec(), expected);
        assert!(DerivingKey::new(&ring, "not base64!").is_err());
    }

    #[test]
    fn the_cause_of_an_internal_error_reaches_the_host_and_not_the_device() {
        use crate::error::StoreError;
        use std::sync::Mutex as StdMutex;

        let seen = Arc::new(StdMutex::new(Vec::<String>::new()));
        let heard = Arc::clone(&seen);
        let provisioner = Provisioner::new(
            ProvisionerConfig::new(IdScope::new("0ne00000001").unwrap()),
            crate::memory::MemoryStore::new(),
            Arc::new(RingCrypto::new()),
            Allocator::new(Vec::new()),
        )
        .on_internal_error(move |e| heard.lock().unwrap().push(e.to_string()));
        let now = Timestamp::from_unix_secs(1_767_225_600);

        let down = Error::Store(StoreError::Backend("sqlite: database or disk is full".to_owned()));
        let reply = provisioner.error_response(now, &down);
        assert_eq!((reply.status, reply.error_code()), (500, Some(500_000)));
        assert!(!String::from_utf8(reply.body_json()).unwrap().contains("disk is full"));
        // A refusal the device caused is its own business, not the host's.
        provisioner.error_response(now, &Error::BadRequest("no".to_owned()));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].contains("database or disk is full"), "{seen:?}");
    }

    #[test]
    fn writes_that_keep_conflicting_tell_the_device_to_retry_later_and_are_no_internal_error() {
        use crate::error::StoreError;
        use std::sync::atomic::{AtomicU32, Ordering};

        let internal = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&internal);
        let mut config = ProvisionerConfig::new(IdScope::new("0ne00000001").unwrap());
        config.retry_after_secs = 9;
        let provisioner = Provisioner::new(
            config,
            crate::memory::MemoryStore::new(),
            Arc::new(RingCrypto::new()),
            Allocator::new(Vec::new()),
        )
        .on_internal_error(move |_| {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let now = Timestamp::from_unix_secs(1_767_225_600);
        let conflict =
            Error::Store(StoreError::Conflict("PostgreSQL: deadlock detected (SQLSTATE 40P01)".to_owned()));
        assert!(conflict.to_string().contains("SQLSTATE 40P01"), "the cause stays in the text for logs");
        let reply = provisioner.error_response(now, &conflict);
        assert_eq!((reply.status, reply.error_code(), reply.retry_after), (429, Some(429_001), Some(9)));
        assert!(!String::from_utf8(reply.body_json()).unwrap().contains("40P01"));
        assert_eq!(internal.load(Ordering::Relaxed), 0);
    }
}
