//! Registration cost through the real `Provisioner` + in-memory store, next to the raw crypto the
//! registration cannot avoid, measured in the same run (machines here are noisy: compare ratios,
//! not absolute times).
//!
//! - symmetric-key group registration vs two HMAC-SHA256 (derive the device key, verify the SAS);
//! - X.509 group registration (leaf + intermediate presented, group on the intermediate) vs one
//!   chain verification (the leaf's ECDSA P-256 signature checked against the intermediate).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use zerotouch_engine::allocation::Allocator;
use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
use zerotouch_engine::attestation::x509::Certificate;
use zerotouch_engine::attestation::Credential;
use zerotouch_engine::crypto::{CryptoProvider, RingCrypto};
use zerotouch_engine::enrollments;
use zerotouch_engine::hub::{HubAction, HubError, HubRegistry, LinkedHub};
use zerotouch_engine::memory::MemoryStore;
use zerotouch_engine::provisioner::{Provisioner, ProvisionerConfig, RegisterRequest};
use zerotouch_engine::store::RegistrationStore;
use zerotouch_proto::device::DeviceRegistration;
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup};
use zerotouch_proto::{EnrollmentGroupId, IdScope, IfMatch, Timestamp};
use zerotouch_testkit::certs::TestCa;

const SCOPE: &str = "0ne00BE4C00";

/// Devices of the steady-state registration benches.
const FLEET: usize = 1024;

/// A hub that accepts every action and keeps nothing (the hub side is not what is measured).
struct NullHub;

impl HubRegistry for NullHub {
    fn apply(&mut self, action: &HubAction) -> Result<(), HubError> {
        black_box(action);
        Ok(())
    }
}

fn group(id: &str, attestation: AttestationMechanism) -> EnrollmentGroup {
    EnrollmentGroup::new(EnrollmentGroupId::new(id).unwrap(), attestation)
}

fn provisioner() -> Provisioner<MemoryStore> {
    let hubs = vec![LinkedHub::new("hub-1.example.net"), LinkedHub::new("hub-2.example.net").with_weight(2)];
    Provisioner::new(
        ProvisionerConfig::new(IdScope::new(SCOPE).unwrap()),
        MemoryStore::new(),
        Arc::new(RingCrypto::new()),
        Allocator::new(hubs),
    )
}

fn request(id: &str, credential: Credential) -> RegisterRequest {
    RegisterRequest {
        id_scope: SCOPE.into(),
        registration_id: id.into(),
        body: DeviceRegistration { payload: None, registration_id: id.into(), tpm: None, csr: None },
        credential,
        api_version: None,
    }
}

fn symmetric_key(c: &mut Criterion) {
    let crypto = RingCrypto::new();
    let now = Timestamp::from_unix_secs(1_767_225_600);
    let p = provisioner();
    let g = enrollments::put_enrollment_group(
        p.store(),
        &crypto,
        now,
        group("bench", AttestationMechanism::symmetric_key()),
        &IfMatch::Absent,
    )
    .unwrap();
    let group_key = STANDARD.decode(g.attestation.symmetric_key.unwrap().primary_key.unwrap()).unwrap();

    let mut grp = c.benchmark_group("symmetric_key_group_registration");
    let token_for = |id: &str| {
        let key = derive_device_key(&crypto, &group_key, id);
        registration_token(&crypto, &key, SCOPE, id, now.unix_secs() + 3600).to_string()
    };
    // Steady state: a fixed fleet registering again and again, as devices do when they
    // reconnect, with the operation table swept outside the timed part the way a server's
    // retention sweep keeps it bounded. Every registration still authenticates, allocates,
    // writes its record and operation and answers.
    let fleet: Vec<(String, String)> = (0..FLEET)
        .map(|i| {
            let id = format!("sensor-{i:08}");
            let token = token_for(&id);
            (id, token)
        })
        .collect();
    let mut i = 0usize;
    grp.bench_function("provisioner_register", |b| {
        b.iter_batched(
            || {
                i += 1;
                if i == FLEET {
                    i = 0;
                    p.store().purge_operations(Timestamp::from_unix_secs(now.unix_secs() + 1)).unwrap();
                }
                let (id, token) = &fleet[i];
                request(id, Credential::Sas(token.clone()))
            },
            |req| {
                let r = p.handle_register(now, req, &mut NullHub);
                assert_eq!(r.status, 202);
                r
            },
            BatchSize::SmallInput,
        )
    });
    // The first registration of ever new devices: the store grows without bound during the run.
    let mut n = 0u64;
    grp.bench_function("provisioner_register_new_devices", |b| {
        b.iter_batched(
            || {
                n += 1;
                let id = format!("new-{n:08}");
                let token = token_for(&id);
                request(&id, Credential::Sas(token))
            },
            |req| {
                let r = p.handle_register(now, req, &mut NullHub);
                assert_eq!(r.status, 202);
                r
            },
            BatchSize::SmallInput,
        )
    });
    // The crypto a registration cannot avoid: derive the device key, then HMAC the token.
    let string_to_sign = format!("{SCOPE}%2Fregistrations%2Fsensor-00000001\n{}", now.unix_secs() + 3600);
    grp.bench_function("two_hmac_sha256", |b| {
        b.iter(|| {
            let key = crypto.hmac_sha256(black_box(&group_key), black_box(b"sensor-00000001"));
            crypto.hmac_sha256(&key, black_box(string_to_sign.as_bytes()))
        })
    });
    grp.finish();
}

fn x509(c: &mut Criterion) {
    let crypto = RingCrypto::new();
    let now = Timestamp::from_unix_secs(1_767_225_600);
    let p = provisioner();
    let line = TestCa::root("Bench Root").intermediate("Bench Line");
    enrollments::put_enrollment_group(
        p.store(),
        &crypto,
        now,
        group("bench-x509", AttestationMechanism::x509_signing_certificate(line.pem())),
        &IfMatch::Absent,
    )
    .unwrap();
    let devices: Vec<(String, Vec<Vec<u8>>)> = (0..64)
        .map(|i| {
            let id = format!("camera-{i:04}");
            let chain = line.device(&id).chain_der();
            (id, chain)
        })
        .collect();

    let mut grp = c.benchmark_group("x509_group_registration");
    let mut i = 0usize;
    grp.bench_function("provisioner_register", |b| {
        b.iter_batched(
            || {
                i += 1;
                let (id, chain) = &devices[i % devices.len()];
                request(id, Credential::X509(chain.clone()))
            },
            |req| {
                let r = p.handle_register(now, req, &mut NullHub);
                assert_eq!(r.status, 202);
                r
            },
            BatchSize::SmallInput,
        )
    });
    let leaf = Certificate::from_der(&devices[0].1[0]).unwrap();
    let issuer = Certificate::from_der(&devices[0].1[1]).unwrap();
    grp.bench_function("one_chain_verification", |b| {
        b.iter(|| black_box(&leaf).verify_issued_by(black_box(&issuer), &crypto).unwrap())
    });
    grp.finish();
}

criterion_group!(benches, symmetric_key, x509);
criterion_main!(benches);
