//! Registration cost through the real `Provisioner` + in-memory store, next to the raw crypto the
//! registration cannot avoid, measured in the same run (machines here are noisy: compare ratios,
//! not absolute times).
//!
//! - symmetric-key group registration vs two HMAC-SHA256 (derive the device key, verify the SAS);
//! - X.509 group registration (leaf + intermediate presented, group on the intermediate) vs one
//!   chain verification (the leaf's ECDSA P-256 signature checked against the intermediate).
//!
//! Beside them, the symmetric-key group measures `registration_floor` (see [`floor`]): the steps
//! no registration can skip, written flat, so every run shows what a goal stated as a ratio to
//! the crypto leaves for everything else on the machine at hand.

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
    let keys = g.attestation.symmetric_key.unwrap();
    let group_key = STANDARD.decode(keys.primary_key.unwrap()).unwrap();
    let g_secondary_key = keys.secondary_key.unwrap();

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
    // The floor: the same fleet and tokens through the flat registration of `floor`.
    let secondary_key = STANDARD.decode(g_secondary_key).unwrap();
    let flat = floor::Floor::new(SCOPE, &group_key, &secondary_key);
    // The floor checks what the engine checks: a token signed with another key is refused.
    let (id, _) = &fleet[0];
    let foreign = registration_token(&crypto, &[1; 32], SCOPE, id, now.unix_secs() + 3600).to_string();
    assert!(flat.register(now.unix_secs(), request(id, Credential::Sas(foreign))).is_none());
    let mut j = 0usize;
    grp.bench_function("registration_floor", |b| {
        b.iter_batched(
            || {
                j += 1;
                if j == FLEET {
                    j = 0;
                    flat.purge_operations(now.unix_secs() + 1);
                }
                let (id, token) = &fleet[j];
                request(id, Credential::Sas(token.clone()))
            },
            |req| flat.register(now.unix_secs(), req).expect("the floor accepts the fleet's tokens"),
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

/// The least work a steady-state symmetric-key group registration needs, written flat for this
/// bench and used nowhere else: the floor any design of the engine could reach on the machine
/// that runs it.
///
/// Each step is one the engine cannot skip, done the cheapest way we know: check the scope and
/// the id, parse the SAS token and decode its signature, check the resource and the expiry, find
/// no individual enrollment, take the group's prepared keys, derive the device key, verify the
/// signature, derive the secondary key and base64 both for the hub, draw the operation id and
/// etag, read the previous record, hash-allocate between two hubs, write the new record over the
/// previous one (its etag checked) and the operation, answer with the operation id. What the
/// engine does beyond this (enrollment records and references, the reprovisioning plan, hub
/// actions and their unit, preconditions as values, error replies, observers, the store trait) is
/// left out, so the engine measures above it by exactly that.
mod floor {
    use std::borrow::Borrow;
    use std::collections::{HashMap, HashSet};
    use std::hash::{BuildHasher, Hash, Hasher};
    use std::hint::black_box;
    use std::sync::{Arc, Mutex, RwLock};

    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use ring::hmac;
    use zerotouch_engine::attestation::Credential;
    use zerotouch_engine::crypto::constant_time_eq;
    use zerotouch_engine::provisioner::RegisterRequest;

    /// A registration record: what a poll and the next registration read.
    struct Record {
        registration_id: Arc<str>,
        hub: Arc<str>,
        device_id: Arc<str>,
        etag: String,
        created: i64,
        /// Written as a poll would read it.
        #[allow(dead_code)]
        updated: i64,
    }

    /// An operation, keyed by its own id.
    struct Operation {
        id: String,
        /// What a poll answers from.
        #[allow(dead_code)]
        record: Arc<Record>,
        created: i64,
    }

    impl Borrow<str> for Operation {
        fn borrow(&self) -> &str {
            &self.id
        }
    }

    impl Hash for Operation {
        fn hash<H: Hasher>(&self, state: &mut H) {
            self.id.as_str().hash(state);
        }
    }

    impl PartialEq for Operation {
        fn eq(&self, other: &Self) -> bool {
            self.id == other.id
        }
    }

    impl Eq for Operation {}

    /// The group keys, prepared once.
    struct GroupKeys {
        primary: hmac::Key,
        secondary: hmac::Key,
    }

    pub struct Floor {
        scope: &'static str,
        individual: RwLock<HashMap<String, ()>>,
        groups: RwLock<Vec<Arc<GroupKeys>>>,
        records: RwLock<HashMap<Arc<str>, Arc<Record>>>,
        operations: RwLock<HashSet<Operation, foldhash::fast::FixedState>>,
        random: Mutex<ChaCha20Rng>,
        hubs: [Arc<str>; 2],
    }

    impl Floor {
        pub fn new(scope: &'static str, primary: &[u8], secondary: &[u8]) -> Self {
            let keys = GroupKeys {
                primary: hmac::Key::new(hmac::HMAC_SHA256, primary),
                secondary: hmac::Key::new(hmac::HMAC_SHA256, secondary),
            };
            Self {
                scope,
                individual: RwLock::new(HashMap::new()),
                groups: RwLock::new(vec![Arc::new(keys)]),
                records: RwLock::new(HashMap::new()),
                operations: RwLock::new(HashSet::default()),
                random: Mutex::new(ChaCha20Rng::from_seed([7; 32])),
                hubs: [Arc::from("hub-1.example.net"), Arc::from("hub-2.example.net")],
            }
        }

        /// Forgets the operations, as the engine's bench sweeps its own.
        pub fn purge_operations(&self, before: i64) {
            self.operations.write().unwrap().retain(|op| op.created >= before);
        }

        /// Registers; `None` when the request is refused (the floor does not say why).
        pub fn register(&self, now: i64, req: RegisterRequest) -> Option<String> {
            let id = req.registration_id.as_str();
            let valid = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || b"-._:".contains(&c);
            if !req.id_scope.eq_ignore_ascii_case(self.scope)
                || id.is_empty()
                || id.len() > 128
                || !id.bytes().all(valid)
                || req.body.registration_id != id
            {
                return None;
            }
            let Credential::Sas(token) = &req.credential else { return None };
            let fields = token.strip_prefix("SharedAccessSignature ")?.as_bytes();
            let (mut sr, mut sig, mut se): (Option<&[u8]>, _, _) = (None, None, None);
            for field in fields.split(|&b| b == b'&') {
                let eq = field.iter().position(|&b| b == b'=')?;
                let value = Some(&field[eq + 1..]);
                match &field[..eq] {
                    b"sr" => sr = value,
                    b"sig" => sig = value,
                    b"se" => se = value,
                    _ => {}
                }
            }
            let (sr, sig, se) = (sr?, sig?, se?);
            // The resource names this scope and id (URL-encoded as the Python SDK sends it).
            let scope = self.scope.as_bytes();
            let named = sr
                .get(..scope.len())
                .filter(|s| s.eq_ignore_ascii_case(scope))
                .and_then(|_| sr[scope.len()..].strip_prefix(b"%2Fregistrations%2F"))
                .is_some_and(|rest| rest.eq_ignore_ascii_case(id.as_bytes()));
            let expiry = se.iter().try_fold(0i64, |n, &b| {
                b.is_ascii_digit().then(|| n.checked_mul(10)?.checked_add(i64::from(b - b'0'))).flatten()
            });
            if !named || se.is_empty() || expiry? <= now {
                return None;
            }
            let mut tag = [0u8; 32];
            STANDARD.decode_slice(percent_decoded(sig)?.as_slice(), &mut tag).ok()?;

            if self.individual.read().unwrap().contains_key(id) {
                return None;
            }
            let group = Arc::clone(self.groups.read().unwrap().first()?);
            let primary = hmac::sign(&group.primary, id.as_bytes());
            let device_key = hmac::Key::new(hmac::HMAC_SHA256, primary.as_ref());
            let mut mac = hmac::Context::with_key(&device_key);
            mac.update(sr);
            mac.update(b"\n");
            mac.update(se);
            if !constant_time_eq(mac.sign().as_ref(), &tag) {
                return None;
            }
            let secondary = hmac::sign(&group.secondary, id.as_bytes());
            let keys = (STANDARD.encode(primary.as_ref()), STANDARD.encode(secondary.as_ref()));

            let mut random = [0u8; 32];
            self.random.lock().unwrap().fill_bytes(&mut random);
            // "4." and 32 hex digits, one allocation.
            let mut text = [0u8; 34];
            text[..2].copy_from_slice(b"4.");
            for (pair, byte) in text[2..].chunks_exact_mut(2).zip(&random[..16]) {
                pair[0] = HEX[usize::from(byte >> 4)];
                pair[1] = HEX[usize::from(byte & 15)];
            }
            let operation_id = String::from_utf8(text.to_vec()).ok()?;
            let etag = STANDARD.encode(&random[16..]);

            let previous = self.records.read().unwrap().get(id).cloned();
            let hashes =
                self.hubs.each_ref().map(|hub| foldhash::fast::FixedState::with_seed(1).hash_one((id, hub)));
            let hub = Arc::clone(&self.hubs[usize::from(hashes[1] > hashes[0])]);
            let (registration_id, device_id, created) = match &previous {
                Some(p) if p.hub.eq_ignore_ascii_case(&hub) => {
                    (Arc::clone(&p.registration_id), Arc::clone(&p.device_id), p.created)
                }
                _ => (Arc::from(id), Arc::from(id), now),
            };
            // What the hub would be handed.
            black_box((&keys, &device_id));
            let record = Arc::new(Record {
                registration_id: Arc::clone(&registration_id),
                hub,
                device_id,
                etag,
                created,
                updated: now,
            });
            {
                let mut records = self.records.write().unwrap();
                let current = records.get(id).map(|r| r.etag.as_str());
                if current != previous.as_ref().map(|p| p.etag.as_str()) {
                    return None;
                }
                records.insert(registration_id, Arc::clone(&record));
            }
            self.operations.write().unwrap().insert(Operation {
                id: operation_id.clone(),
                record,
                created: now,
            });
            Some(operation_id)
        }
    }

    const HEX: &[u8; 16] = b"0123456789abcdef";

    /// The percent-decoded bytes of a base64 signature (at most 64), on the stack.
    fn percent_decoded(text: &[u8]) -> Option<SignatureBytes> {
        let digit = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
        let mut out = SignatureBytes::default();
        let mut bytes = text.iter().copied();
        while let Some(b) = bytes.next() {
            let b = if b == b'%' { digit(bytes.next()?)? << 4 | digit(bytes.next()?)? } else { b };
            out.push(b)?;
        }
        Some(out)
    }

    /// Up to 64 bytes on the stack.
    struct SignatureBytes {
        buf: [u8; 64],
        len: usize,
    }

    impl Default for SignatureBytes {
        fn default() -> Self {
            Self { buf: [0; 64], len: 0 }
        }
    }

    impl SignatureBytes {
        fn push(&mut self, b: u8) -> Option<()> {
            *self.buf.get_mut(self.len)? = b;
            self.len += 1;
            Some(())
        }

        fn as_slice(&self) -> &[u8] {
            &self.buf[..self.len]
        }
    }
}

criterion_group!(benches, symmetric_key, x509);
criterion_main!(benches);
