//! The device client end to end against our own endpoints (`serve_mqtt`, and `serve_https` with
//! its MQTT-over-WebSocket bridge) over `EngineService` with a memory store and an embedded hub,
//! on ephemeral ports: every transport × symmetric key (individual, group) and X.509 group.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod client_support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::LinkedHub;
use zerotouch_engine::hub_engine::{EmbeddedHub, EmbeddedHubs};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig};
use zerotouch_proto::service::{
    AttestationMechanism, EnrollmentGroup, IndividualEnrollment, ProvisioningStatus,
};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, IdScope, IfMatch, RegistrationId};
use zerotouch_testkit::certs::{x509_v1, TestCa};
use zerotouch_transport::client::{ClientError, FailureKind, ProvisioningClient, Transport};
use zerotouch_transport::limits::Limits;
use zerotouch_transport::service::{now, DpsService, EngineService};

use client_support::ServerCert;

const SCOPE: &str = "0ne00E2E001";
const HUB: &str = "plant.example.net";

/// A running DPS with an individual symmetric-key enrollment, a symmetric-key group and an
/// X.509 group anchored on an intermediate CA.
struct World {
    cert: ServerCert,
    hubs: Arc<Mutex<EmbeddedHubs>>,
    individual_key: String,
    retired_key: String,
    group_key: String,
    line_ca: TestCa,
    mqtt_host: String,
    https_host: String,
    _stop: oneshot::Sender<()>,
    _stop_https: oneshot::Sender<()>,
}

async fn world() -> World {
    let crypto = Arc::new(RingCrypto::new());
    let store = Arc::new(MemoryStore::new());
    let at = now();
    let individual = enrollments::put_enrollment(
        store.as_ref(),
        crypto.as_ref(),
        at,
        IndividualEnrollment::new(
            RegistrationId::new("gateway-1").unwrap(),
            AttestationMechanism::symmetric_key(),
        ),
        &IfMatch::Absent,
    )
    .unwrap();
    let mut retired = IndividualEnrollment::new(
        RegistrationId::new("retired-1").unwrap(),
        AttestationMechanism::symmetric_key(),
    );
    retired.provisioning_status = Some(ProvisioningStatus::Disabled);
    let retired =
        enrollments::put_enrollment(store.as_ref(), crypto.as_ref(), at, retired, &IfMatch::Absent).unwrap();
    let group = enrollments::put_enrollment_group(
        store.as_ref(),
        crypto.as_ref(),
        at,
        EnrollmentGroup::new(
            EnrollmentGroupId::new("thermostats").unwrap(),
            AttestationMechanism::symmetric_key(),
        ),
        &IfMatch::Absent,
    )
    .unwrap();
    let line_ca = TestCa::root("e2e root").intermediate("e2e line CA");
    enrollments::put_enrollment_group(
        store.as_ref(),
        crypto.as_ref(),
        at,
        EnrollmentGroup::new(
            EnrollmentGroupId::new("cameras").unwrap(),
            AttestationMechanism::x509_signing_certificate(line_ca.pem()),
        ),
        &IfMatch::Absent,
    )
    .unwrap();
    // Devices whose certificates are version 1 (OpenSSL up to 3.1 makes them by default).
    enrollments::put_enrollment_group(
        store.as_ref(),
        crypto.as_ref(),
        at,
        EnrollmentGroup::new(
            EnrollmentGroupId::new("legacy-cameras").unwrap(),
            AttestationMechanism::x509_signing_certificate(x509_v1::ROOT_PEM),
        ),
        &IfMatch::Absent,
    )
    .unwrap();
    let provisioner = Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        store,
        crypto.clone(),
        Allocator::new(vec![LinkedHub::new(HUB)]),
    );
    let mut hubs = EmbeddedHubs::new();
    hubs.insert(EmbeddedHub::in_memory(HUB, crypto).unwrap());
    let hubs = Arc::new(Mutex::new(hubs));
    let service: Arc<dyn DpsService> = Arc::new(EngineService::new(provisioner, hubs.clone()));

    let cert = ServerCert::new();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.clone()));
    let tls = zerotouch_transport::tls::server_config(cert.chain.clone(), key).unwrap();
    let mut https_tls = tls.clone();
    https_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let limits = Limits::default();
    let (stop, stopped) = oneshot::channel::<()>();
    let mqtt = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mqtt_host = mqtt.local_addr().unwrap().to_string();
    tokio::spawn(zerotouch_transport::mqtt::serve_mqtt(
        mqtt,
        Arc::new(tls),
        service.clone(),
        limits.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let (stop_https, stopped_https) = oneshot::channel::<()>();
    let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_host = https.local_addr().unwrap().to_string();
    tokio::spawn(zerotouch_transport::http::serve_https(
        https,
        Arc::new(https_tls),
        service,
        limits,
        async move {
            let _ = stopped_https.await;
        },
    ));
    let primary = |k: &Option<zerotouch_proto::service::SymmetricKeyAttestation>| {
        k.as_ref().and_then(|k| k.primary_key.clone()).unwrap()
    };
    World {
        individual_key: primary(&individual.attestation.symmetric_key),
        retired_key: primary(&retired.attestation.symmetric_key),
        group_key: primary(&group.attestation.symmetric_key),
        cert,
        hubs,
        line_ca,
        mqtt_host,
        https_host,
        _stop: stop,
        _stop_https: stop_https,
    }
}

impl World {
    fn host(&self, transport: Transport) -> String {
        match transport {
            Transport::Mqtt => self.mqtt_host.clone(),
            Transport::MqttWs | Transport::Https => self.https_host.clone(),
        }
    }

    fn client(
        &self,
        transport: Transport,
        registration_id: &str,
    ) -> zerotouch_transport::client::ProvisioningClientBuilder {
        ProvisioningClient::builder(SCOPE, registration_id)
            .provisioning_host(self.host(transport))
            .transport(transport)
            .ca_pem(self.cert.ca_pem.clone())
            .request_timeout(Duration::from_secs(10))
    }

    fn identity_exists(&self, device_id: &str) -> bool {
        let hubs = self.hubs.lock().unwrap();
        hubs.hub(HUB).unwrap().registry().device(&DeviceId::new(device_id).unwrap()).is_ok()
    }
}

/// Every attestation over one transport: assigned to the hub, identity created there.
async fn every_attestation_provisions_over(transport: Transport) {
    let w = world().await;

    let a = w
        .client(transport, "gateway-1")
        .symmetric_key(w.individual_key.clone())
        .build()
        .unwrap()
        .register()
        .await
        .unwrap();
    assert_eq!((a.assigned_hub.as_str(), a.device_id.as_str()), (HUB, "gateway-1"), "{transport}");
    assert!(w.identity_exists("gateway-1"));

    let a = w
        .client(transport, "thermostat-7")
        .group_key(w.group_key.clone())
        .build()
        .unwrap()
        .register()
        .await
        .unwrap();
    assert_eq!((a.assigned_hub.as_str(), a.device_id.as_str()), (HUB, "thermostat-7"), "{transport}");
    assert!(w.identity_exists("thermostat-7"));

    let camera = w.line_ca.device("camera-3");
    let a = w
        .client(transport, "camera-3")
        .x509_pem(camera.chain_pem(), camera.key_pem())
        .build()
        .unwrap()
        .register()
        .await
        .unwrap();
    assert_eq!((a.assigned_hub.as_str(), a.device_id.as_str()), (HUB, "camera-3"), "{transport}");
    assert!(w.identity_exists("camera-3"));

    // A version 1 certificate gets through TLS, both ours and the server's, to the engine.
    let a = w
        .client(transport, x509_v1::REGISTRATION_ID)
        .x509_pem(x509_v1::DEVICE_PEM, x509_v1::DEVICE_KEY_PEM)
        .build()
        .unwrap()
        .register()
        .await
        .unwrap();
    assert_eq!(a.device_id, x509_v1::REGISTRATION_ID, "{transport}");
    assert!(w.identity_exists(x509_v1::REGISTRATION_ID));
}

/// A group member that signs with the group key itself instead of its derived key is refused.
async fn group_key_used_directly_is_refused_over(transport: Transport) {
    let w = world().await;
    let result = w
        .client(transport, "thermostat-8")
        .symmetric_key(w.group_key.clone())
        .build()
        .unwrap()
        .register()
        .await;
    let e = result.unwrap_err();
    assert!(e.is_unauthorized(), "{transport}: {e}");
    assert!(!w.identity_exists("thermostat-8"));
}

/// A certificate from an unenrolled CA reaches the app as 401 with a DPS error code.
async fn unenrolled_certificate_is_refused_over(transport: Transport) {
    let w = world().await;
    let stranger = TestCa::root("somebody else").device("camera-9");
    let e = w
        .client(transport, "camera-9")
        .x509_pem(stranger.chain_pem(), stranger.key_pem())
        .build()
        .unwrap()
        .register()
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{transport}: {e}");
    if let ClientError::Registration(f) = &e {
        assert_eq!(f.kind, FailureKind::Unauthorized);
        assert_eq!(f.error_code.map(|c| c / 1000), Some(401), "{e}");
    }
}

/// The refusal a device sees, whatever the transport: `(status, error code)` of the reply, or
/// `(401, None)` for an MQTT CONNACK "not authorized" (the spec's choice for a bad SAS).
fn refusal(e: &ClientError) -> (Option<u16>, Option<u32>) {
    match e {
        ClientError::ConnectRefused { return_code: 4 | 5, .. } => (Some(401), None),
        other => (other.status(), other.error_code()),
    }
}

#[tokio::test]
async fn bad_credentials_reach_the_device_as_the_same_refusal_on_every_transport() {
    let w = world().await;
    let wrong_key = base64::engine::general_purpose::STANDARD.encode([42u8; 32]);
    for transport in [Transport::Mqtt, Transport::MqttWs, Transport::Https] {
        // A bad SAS is refused at CONNACK on MQTT (no reply body) and with 401 401002 on HTTPS.
        let wrong = w.client(transport, "gateway-1").symmetric_key(wrong_key.clone()).build().unwrap();
        let e = wrong.register().await.unwrap_err();
        assert!(e.is_unauthorized(), "{transport}: wrong key: {e}");
        if transport == Transport::Https {
            assert_eq!(refusal(&e), (Some(401), Some(401_002)), "{transport}: wrong key: {e}");
        } else {
            assert!(matches!(e, ClientError::ConnectRefused { return_code: 5, .. }), "{transport}: {e}");
        }

        // A disabled enrollment is not a bad token: MQTT accepts the CONNECT, and the register
        // reply says 401 on every transport (spec §2.1).
        let disabled = w.client(transport, "retired-1").symmetric_key(w.retired_key.clone()).build().unwrap();
        let e = disabled.register().await.unwrap_err();
        assert_eq!(refusal(&e), (Some(401), Some(401_002)), "{transport}: disabled enrollment: {e}");
        assert!(!matches!(e, ClientError::ConnectRefused { .. }), "{transport}: {e}");
        assert!(!w.identity_exists("retired-1"));

        let other_scope = ProvisioningClient::builder("0ne00E2E0FF", "gateway-1")
            .provisioning_host(w.host(transport))
            .transport(transport)
            .ca_pem(w.cert.ca_pem.clone())
            .symmetric_key(w.individual_key.clone())
            .build()
            .unwrap();
        let e = other_scope.register().await.unwrap_err();
        let (status, code) = refusal(&e);
        assert_eq!(status, Some(404), "{transport}: unknown scope: {e}");
        assert_eq!(code.map(|c| c / 1000), Some(404), "{transport}: unknown scope: {e}");
    }
}

#[tokio::test]
async fn sym_individual_sym_group_and_x509_group_devices_provision_over_mqtt() {
    every_attestation_provisions_over(Transport::Mqtt).await;
}

#[tokio::test]
async fn group_key_used_directly_is_refused_over_mqtt() {
    group_key_used_directly_is_refused_over(Transport::Mqtt).await;
}

#[tokio::test]
async fn unenrolled_certificate_is_refused_over_mqtt() {
    unenrolled_certificate_is_refused_over(Transport::Mqtt).await;
}

#[tokio::test]
async fn sym_individual_sym_group_and_x509_group_devices_provision_over_https() {
    every_attestation_provisions_over(Transport::Https).await;
}

#[tokio::test]
async fn group_key_used_directly_is_refused_over_https() {
    group_key_used_directly_is_refused_over(Transport::Https).await;
}

#[tokio::test]
async fn unenrolled_certificate_is_refused_over_https() {
    unenrolled_certificate_is_refused_over(Transport::Https).await;
}

#[tokio::test]
async fn sym_individual_sym_group_and_x509_group_devices_provision_over_mqtt_websockets() {
    every_attestation_provisions_over(Transport::MqttWs).await;
}

#[tokio::test]
async fn group_key_used_directly_is_refused_over_mqtt_websockets() {
    group_key_used_directly_is_refused_over(Transport::MqttWs).await;
}

#[tokio::test]
async fn unenrolled_certificate_is_refused_over_mqtt_websockets() {
    unenrolled_certificate_is_refused_over(Transport::MqttWs).await;
}

#[tokio::test]
async fn many_devices_of_a_group_register_concurrently_over_mqtt() {
    let w = Arc::new(world().await);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..40 {
        let w = w.clone();
        tasks.spawn(async move {
            let id = format!("sensor-{i:03}");
            let a = w
                .client(Transport::Mqtt, &id)
                .group_key(w.group_key.clone())
                .build()
                .unwrap()
                .register()
                .await
                .unwrap();
            assert_eq!(a.device_id, id);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let hubs = w.hubs.lock().unwrap();
    assert_eq!(hubs.hub(HUB).unwrap().registry().statistics().unwrap().total_device_count, 40);
}
