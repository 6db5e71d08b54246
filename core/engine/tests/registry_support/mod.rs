//! Shared fixtures for the registry tests: a deterministic crypto provider and an in-test twin sink.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;
use zerotouch_engine::crypto::{CryptoProvider, RandomFailure, RingCrypto};
use zerotouch_engine::registry::{MemoryIdentityStore, Registry, RegistryConfig, TwinSink};
use zerotouch_engine::Error;
use zerotouch_proto::hub::ExportImportProperties;
use zerotouch_proto::{DeviceId, ETag, IfMatch, ModuleId, Timestamp};
use zerotouch_testkit::crypto::RingWithRandom;

/// Ring for digests, a counter for randomness, so runs are reproducible.
pub type CountingCrypto = RingWithRandom<Box<dyn Fn(&mut [u8]) -> Result<(), RandomFailure> + Send + Sync>>;

/// A [`CountingCrypto`] whose counter starts at zero.
pub fn counting_crypto() -> CountingCrypto {
    let counter = AtomicU64::new(0);
    let ring = RingCrypto::new();
    RingWithRandom::new(Box::new(move |out: &mut [u8]| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        let digest = ring.sha256(&n.to_be_bytes());
        for (i, b) in out.iter_mut().enumerate() {
            *b = digest[i % 32];
        }
        Ok(())
    }))
}

pub const HUB: &str = "contoso-hub.azure-devices.net";

pub fn registry() -> Registry<MemoryIdentityStore> {
    Registry::new(MemoryIdentityStore::new(), Arc::new(counting_crypto()), RegistryConfig::new(HUB))
}

pub fn now() -> Timestamp {
    Timestamp::parse("2026-11-23T10:00:00.1234567Z").unwrap()
}

pub fn later(secs: u64) -> Timestamp {
    now() + std::time::Duration::from_secs(secs)
}

pub fn id(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

pub fn mid(s: &str) -> ModuleId {
    ModuleId::new(s).unwrap()
}

/// A twin written by an import.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTwin {
    pub etag: u64,
    pub tags: Option<Value>,
    pub properties: ExportImportProperties,
}

/// A minimal twin store: etag is base64 of a big-endian u64 counter, as the hub does.
#[derive(Debug, Default)]
pub struct TestTwins {
    pub twins: Mutex<HashMap<(String, Option<String>), StoredTwin>>,
}

pub fn twin_etag(n: u64) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(n.to_be_bytes())
}

impl TestTwins {
    pub fn twin(&self, device: &str, module: Option<&str>) -> Option<StoredTwin> {
        self.twins.lock().unwrap().get(&(device.to_owned(), module.map(str::to_owned))).cloned()
    }
}

impl TwinSink for TestTwins {
    fn update_twin(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
        tags: Option<&Value>,
        properties: Option<&ExportImportProperties>,
        if_match: &IfMatch,
        _now: Timestamp,
    ) -> Result<(), Error> {
        let mut map = self.twins.lock().unwrap();
        let key = (device_id.to_string(), module_id.map(ToString::to_string));
        let twin = map.entry(key).or_insert(StoredTwin {
            etag: 1,
            tags: None,
            properties: ExportImportProperties::default(),
        });
        if !if_match.allows(&ETag::new(twin_etag(twin.etag))) {
            return Err(Error::PreconditionFailed);
        }
        if let Some(t) = tags {
            twin.tags = Some(t.clone());
        }
        if let Some(p) = properties {
            if p.desired.is_some() {
                twin.properties.desired = p.desired.clone();
            }
            if p.reported.is_some() {
                twin.properties.reported = p.reported.clone();
            }
        }
        twin.etag += 1;
        Ok(())
    }

    fn twin_for_export(
        &self,
        device_id: &DeviceId,
        module_id: Option<&ModuleId>,
    ) -> Result<Option<(ETag, Option<Value>, ExportImportProperties)>, Error> {
        Ok(self
            .twin(device_id.as_str(), module_id.map(ModuleId::as_str))
            .map(|t| (ETag::new(twin_etag(t.etag)), t.tags, t.properties)))
    }
}
