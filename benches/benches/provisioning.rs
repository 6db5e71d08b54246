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

/// The requests of a steady-state run: the fleet's devices in turn, calling `sweep` after each
/// pass over it (outside the timed part, as a server's retention sweep keeps operations bounded).
fn fleet_requests<'a>(
    fleet: &'a [(String, String)],
    sweep: impl Fn() + 'a,
) -> impl FnMut() -> RegisterRequest + 'a {
    let mut i = 0usize;
    move || {
        i += 1;
        if i == fleet.len() {
            i = 0;
            sweep();
        }
        let (id, token) = &fleet[i];
        request(id, Credential::Sas(token.clone()))
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
    let token_expiring = |id: &str, expiry: i64| {
        let key = derive_device_key(&crypto, &group_key, id);
        registration_token(&crypto, &key, SCOPE, id, expiry).to_string()
    };
    let token_for = |id: &str| token_expiring(id, now.unix_secs() + 3600);
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
    let mut next = fleet_requests(&fleet, || {
        p.store().purge_operations(Timestamp::from_unix_secs(now.unix_secs() + 1)).unwrap();
    });
    grp.bench_function("provisioner_register", |b| {
        b.iter_batched(
            &mut next,
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
    // The floor checks what the engine checks: a token signed with another key, one for another
    // id and one expired beyond the clock skew are refused; one signed with the device's
    // secondary key is accepted.
    let (id, _) = &fleet[0];
    let refused = [
        registration_token(&crypto, &[1; 32], SCOPE, id, now.unix_secs() + 3600).to_string(),
        fleet[1].1.clone(),
        token_expiring(id, now.unix_secs() - 301),
    ];
    for token in refused {
        assert!(flat.register(now.unix_secs(), request(id, Credential::Sas(token))).is_none());
    }
    let by_secondary = derive_device_key(&crypto, &secondary_key, id);
    let by_secondary = registration_token(&crypto, &by_secondary, SCOPE, id, now.unix_secs() + 3600);
    assert!(flat.register(now.unix_secs(), request(id, Credential::Sas(by_secondary.to_string()))).is_some());
    let mut next = fleet_requests(&fleet, || flat.purge_operations(now.unix_secs() + 1));
    grp.bench_function("registration_floor", |b| {
        b.iter_batched(
            &mut next,
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
    // The MACs a registration runs, as the engine and the floor run them: both device keys from
    // the group keys prepared once, the signature under the primary one. The same nine SHA-256
    // compressions as the two HMACs above, in three calls instead of two.
    let prepared = (
        crypto.prepare_hmac_sha256(&group_key).unwrap(),
        crypto.prepare_hmac_sha256(&secondary_key).unwrap(),
    );
    grp.bench_function("three_macs_of_a_registration", |b| {
        b.iter(|| {
            let primary = prepared.0.sign(black_box(b"sensor-00000001"));
            let secondary = prepared.1.sign(black_box(b"sensor-00000001"));
            (crypto.hmac_sha256(&primary, black_box(string_to_sign.as_bytes())), secondary)
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
/// bench and used nowhere else: what the engine would cost if its structure cost nothing.
///
/// It makes every check the engine makes on this path, each the cheapest way we know:
/// - the scope, and the id by the registration-id rules (case kept, compared without case), and
///   the body's id;
/// - the SAS token: `sr`, `sig`, `se` and `skn` once each; `sr` percent-decoded in any spelling
///   and naming this scope and id; `skn` `registration` when present; expiry with the engine's
///   five-minute clock skew; a 32-byte signature;
/// - no individual enrollment for the id;
/// - the group's prepared keys, its enabled state, and the three MACs: the device key, the
///   signature (in constant time), the secondary key, with the secondary-key fallback;
/// - the two keys in base64, for the hub.
///
/// Then it draws the operation id and etag, reads the previous record, and allocates by weighted
/// rendezvous hashing between two hubs (weights 1 and 2, as the engine's bench links them). Last,
/// under one lock, it writes the record over the previous one (its etag checked) and the
/// operation, and answers with the operation id.
///
/// It leaves out what makes the engine an engine: enrollment records and references, the
/// reprovisioning plan, hub actions and their unit, the store trait, error replies, observers,
/// several groups and the lower-cased second spelling. The engine therefore measures above it
/// by what its structure costs.
mod floor {
    use std::borrow::Borrow;
    use std::collections::{HashMap, HashSet};
    use std::hash::{Hash, Hasher};
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

    /// The engine's default clock skew, in seconds.
    const CLOCK_SKEW_SECS: i64 = 300;
    /// The registration id's characters besides ASCII letters and digits.
    const ID_SPECIALS: &[u8] = b"-._:";

    /// A registration record: what a poll and the next registration read.
    struct Record {
        registration_id: Arc<str>,
        hub: Arc<str>,
        device_id: Arc<str>,
        etag: String,
        created: i64,
        /// Written as a poll would read it.
        #[expect(dead_code, reason = "the floor answers no polls")]
        updated: i64,
    }

    /// An operation, keyed by its own id (no second copy of the id as the key).
    struct Operation {
        id: Arc<str>,
        #[expect(dead_code, reason = "the floor answers no polls")]
        record: Arc<Record>,
        created: i64,
    }

    /// The operations table finds an operation by its id.
    impl Borrow<str> for Operation {
        fn borrow(&self) -> &str {
            &self.id
        }
    }

    /// Hashes as its id, as `Borrow<str>` requires.
    impl Hash for Operation {
        fn hash<H: Hasher>(&self, state: &mut H) {
            self.id.hash(state);
        }
    }

    impl PartialEq for Operation {
        fn eq(&self, other: &Self) -> bool {
            self.id == other.id
        }
    }

    impl Eq for Operation {}

    /// The group's keys, prepared once, and its state.
    struct Group {
        primary: hmac::Key,
        secondary: hmac::Key,
        enabled: bool,
    }

    /// A linked hub: its name, the hash of its lower-cased name, its allocation weight.
    struct Hub {
        name: Arc<str>,
        hash: u64,
        weight: f64,
    }

    /// Records and operations behind one lock, as the engine's memory store keeps its tables.
    struct Tables {
        records: HashMap<Arc<str>, Arc<Record>>,
        operations: HashSet<Operation, foldhash::fast::FixedState>,
    }

    pub struct Floor {
        scope: &'static str,
        individual: RwLock<HashMap<String, ()>>,
        groups: RwLock<Vec<Arc<Group>>>,
        tables: RwLock<Tables>,
        random: Mutex<ChaCha20Rng>,
        hubs: [Hub; 2],
    }

    impl Floor {
        pub fn new(scope: &'static str, primary: &[u8], secondary: &[u8]) -> Self {
            let group = Group {
                primary: hmac::Key::new(hmac::HMAC_SHA256, primary),
                secondary: hmac::Key::new(hmac::HMAC_SHA256, secondary),
                enabled: true,
            };
            let hub = |name: &str, weight: f64| Hub { name: Arc::from(name), hash: lower_hash(name), weight };
            Self {
                scope,
                individual: RwLock::new(HashMap::new()),
                groups: RwLock::new(vec![Arc::new(group)]),
                tables: RwLock::new(Tables { records: HashMap::new(), operations: HashSet::default() }),
                random: Mutex::new(ChaCha20Rng::from_seed([7; 32])),
                hubs: [hub("hub-1.example.net", 1.0), hub("hub-2.example.net", 2.0)],
            }
        }

        /// Forgets the operations created before `before`, as the engine's bench sweeps its own.
        pub fn purge_operations(&self, before: i64) {
            self.tables.write().unwrap().operations.retain(|op| op.created >= before);
        }

        /// Registers; `None` when the request is refused (the floor does not say why).
        pub fn register(&self, now: i64, req: RegisterRequest) -> Option<Arc<str>> {
            let id = req.registration_id.as_str();
            let bytes = id.as_bytes();
            let last = *bytes.last()?;
            if !req.id_scope.eq_ignore_ascii_case(self.scope)
                || bytes.len() > 128
                || !bytes.iter().all(|b| b.is_ascii_alphanumeric() || ID_SPECIALS.contains(b))
                || !(last.is_ascii_alphanumeric() || last == b'-')
                || req.body.registration_id != id
            {
                return None;
            }
            let Credential::Sas(token) = &req.credential else { return None };
            let fields = token.strip_prefix("SharedAccessSignature ")?.as_bytes();
            let (mut sr, mut sig, mut se, mut skn): (Option<&[u8]>, _, _, _) = (None, None, None, None);
            for field in fields.split(|&b| b == b'&') {
                let eq = field.iter().position(|&b| b == b'=')?;
                let slot = match &field[..eq] {
                    b"sr" => &mut sr,
                    b"sig" => &mut sig,
                    b"se" => &mut se,
                    b"skn" => &mut skn,
                    _ => continue,
                };
                if slot.replace(&field[eq + 1..]).is_some() {
                    return None;
                }
            }
            let (sr, sig, se) = (sr?, sig?, se?);
            // `sr` decoded names "{scope}/registrations/{id}", without case.
            let resource = percent_decoded(sr)?;
            let resource = resource.as_slice();
            let scope = self.scope.as_bytes();
            let named = resource
                .get(..scope.len())
                .filter(|s| s.eq_ignore_ascii_case(scope))
                .and_then(|_| resource[scope.len()..].strip_prefix(b"/registrations/"))
                .is_some_and(|rest| rest.eq_ignore_ascii_case(bytes));
            let expiry = se.iter().try_fold(0i64, |n, &b| {
                b.is_ascii_digit().then(|| n.checked_mul(10)?.checked_add(i64::from(b - b'0'))).flatten()
            });
            if !named
                || skn.is_some_and(|k| k != b"registration")
                || se.is_empty()
                || expiry? + CLOCK_SKEW_SECS < now
            {
                return None;
            }
            let mut tag = [0u8; 32];
            if STANDARD.decode_slice(percent_decoded(sig)?.as_slice(), &mut tag) != Ok(32) {
                return None;
            }

            if self.individual.read().unwrap().contains_key(id) {
                return None;
            }
            let group = Arc::clone(self.groups.read().unwrap().first()?);
            let signed_with = |key: &[u8]| {
                let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, key));
                mac.update(sr);
                mac.update(b"\n");
                mac.update(se);
                constant_time_eq(mac.sign().as_ref(), &tag)
            };
            let primary = hmac::sign(&group.primary, bytes);
            let secondary = hmac::sign(&group.secondary, bytes);
            if !(signed_with(primary.as_ref()) || signed_with(secondary.as_ref())) || !group.enabled {
                return None;
            }
            let keys = (base64_text(primary.as_ref()), base64_text(secondary.as_ref()));

            let mut random = [0u8; 32];
            self.random.lock().unwrap().fill_bytes(&mut random);
            // "4." and 32 hex digits.
            let mut text = [0u8; 34];
            text[..2].copy_from_slice(b"4.");
            for (pair, byte) in text[2..].chunks_exact_mut(2).zip(&random[..16]) {
                pair[0] = HEX[usize::from(byte >> 4)];
                pair[1] = HEX[usize::from(byte & 15)];
            }
            let operation_id: Arc<str> = Arc::from(std::str::from_utf8(&text).ok()?);
            let etag = base64_text(&random[16..]);

            let previous = self.tables.read().unwrap().records.get(id).cloned();
            let id_hash = lower_hash(id);
            let score = |hub: &Hub| {
                // Weighted rendezvous: weight / -ln(u), u uniform in (0, 1) from the two hashes.
                let x = (id_hash ^ hub.hash).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let u = ((x >> 12) as f64 + 0.5) / 4_503_599_627_370_496.0;
                hub.weight / -u.ln()
            };
            let hub = &self.hubs[usize::from(score(&self.hubs[1]) > score(&self.hubs[0]))];
            let (registration_id, device_id, created) = match &previous {
                Some(p) if p.hub.eq_ignore_ascii_case(&hub.name) => {
                    (Arc::clone(&p.registration_id), Arc::clone(&p.device_id), p.created)
                }
                _ => (Arc::from(id), Arc::from(id), now),
            };
            // What the hub would be handed.
            black_box((&keys, &device_id));
            let record = Arc::new(Record {
                registration_id: Arc::clone(&registration_id),
                hub: Arc::clone(&hub.name),
                device_id,
                etag,
                created,
                updated: now,
            });
            let operation =
                Operation { id: Arc::clone(&operation_id), record: Arc::clone(&record), created: now };
            let mut tables = self.tables.write().unwrap();
            match (tables.records.get_mut(id), &previous) {
                (Some(slot), Some(p)) if slot.etag == p.etag => *slot = record,
                (None, None) => {
                    tables.records.insert(registration_id, record);
                }
                _ => return None,
            }
            tables.operations.insert(operation);
            Some(operation_id)
        }
    }

    const HEX: &[u8; 16] = b"0123456789abcdef";

    /// FNV-1a over the lower-cased bytes: ids and hub names compare without case.
    fn lower_hash(text: &str) -> u64 {
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// Base64 into a string of the right size, written once.
    fn base64_text(bytes: &[u8]) -> String {
        let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
        STANDARD.encode_string(bytes, &mut text);
        text
    }

    /// The percent-decoded bytes of a token field (at most 192), on the stack.
    fn percent_decoded(text: &[u8]) -> Option<Decoded> {
        let digit = |b: u8| char::from(b).to_digit(16).and_then(|d| u8::try_from(d).ok());
        let mut out = Decoded { buf: [0; 192], len: 0 };
        let mut bytes = text.iter().copied();
        while let Some(b) = bytes.next() {
            let b = if b == b'%' { digit(bytes.next()?)? << 4 | digit(bytes.next()?)? } else { b };
            *out.buf.get_mut(out.len)? = b;
            out.len += 1;
        }
        Some(out)
    }

    /// Up to 192 decoded bytes.
    struct Decoded {
        buf: [u8; 192],
        len: usize,
    }

    impl Decoded {
        fn as_slice(&self) -> &[u8] {
            &self.buf[..self.len]
        }
    }
}

criterion_group!(benches, symmetric_key, x509);
criterion_main!(benches);
