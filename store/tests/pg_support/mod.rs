//! Shared setup of the PostgreSQL tests: the server comes from `ZEROTOUCH_TEST_DATABASE_URL`,
//! and every store lives in a schema of its own, so tests run in parallel on one server.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use zerotouch_store::postgres::PgStore;

/// Environment variable naming the test server.
pub const URL_VAR: &str = "ZEROTOUCH_TEST_DATABASE_URL";

/// The server's URL.
///
/// # Panics
/// When the variable is unset: a PostgreSQL test must fail, not pass, without a server.
pub fn server_url() -> String {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "{URL_VAR} is not set, so the PostgreSQL tests have no server. Start a throwaway one with \
             `scripts/pg start` (it prints the URL) and run \
             `{URL_VAR}=$(scripts/pg url) cargo test -p zerotouch-store --features postgres`, \
             or run `scripts/test`, which does both"
        ),
    }
}

/// `url` with the search path set to `schema`, in the URL or the key=value form.
pub fn url_in_schema(url: &str, schema: &str) -> String {
    url_with_settings(url, &[("search_path", schema)])
}

/// `url` with each `(parameter, value)` set when a session starts (`options=-cNAME=VALUE …`),
/// in the URL or the key=value form. Values must need no quoting (identifiers).
pub fn url_with_settings(url: &str, settings: &[(&str, &str)]) -> String {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let sep = if url.contains('?') { '&' } else { '?' };
        let options: Vec<String> =
            settings.iter().map(|(name, value)| format!("-c{name}%3D{value}")).collect();
        format!("{url}{sep}options={}", options.join("%20"))
    } else {
        let options: Vec<String> = settings.iter().map(|(name, value)| format!("-c{name}={value}")).collect();
        format!("{url} options='{}'", options.join(" "))
    }
}

/// Schemas created by one test, dropped with it.
pub struct TestDb {
    url: String,
    schemas: Mutex<Vec<String>>,
    reused: Mutex<Option<String>>,
}

impl TestDb {
    /// A handle on the test server (panics with instructions when there is none).
    pub fn new() -> Self {
        TestDb { url: server_url(), schemas: Mutex::new(Vec::new()), reused: Mutex::new(None) }
    }

    /// Creates an empty schema and returns a URL whose connections use it.
    pub fn fresh_url(&self) -> String {
        url_in_schema(&self.url, &self.fresh_schema())
    }

    /// Creates an empty schema, dropped with this handle, and returns its name.
    pub fn fresh_schema(&self) -> String {
        let schema = format!("t_{:016x}", rand::random::<u64>());
        self.admin().batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
        self.schemas.lock().unwrap().push(schema.clone());
        schema
    }

    /// A client of the test server's own URL (its user, its search path).
    pub fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR} ({}): {e}", self.url))
    }

    /// The test server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A store over a fresh schema with a pool of `pool_size`.
    pub fn store_with(&self, pool_size: u32) -> PgStore {
        PgStore::connect(&self.fresh_url(), pool_size).unwrap()
    }

    /// A store over a fresh schema (pool of 8, enough for the suites' 8 contending threads).
    pub fn store(&self) -> PgStore {
        self.store_with(8)
    }

    /// A store over an empty schema of this test: the first call creates and migrates it, later
    /// calls empty its tables (much cheaper than migrating a new schema for every suite case).
    /// The previous store of this schema must be dropped by then.
    pub fn empty_store(&self) -> PgStore {
        let mut reused = self.reused.lock().unwrap();
        match reused.as_ref() {
            None => {
                let url = self.fresh_url();
                *reused = Some(url.clone());
                PgStore::connect(&url, 8).unwrap()
            }
            Some(url) => {
                // Children before parents (modules reference devices).
                Self::client(url)
                    .batch_execute(
                        "DELETE FROM modules; DELETE FROM devices; DELETE FROM twins; DELETE FROM enrollments; \
                         DELETE FROM enrollment_groups; DELETE FROM ca_certificates; DELETE FROM registrations; \
                         DELETE FROM operations; DELETE FROM jobs; DELETE FROM device_jobs; DELETE FROM hubs",
                    )
                    .unwrap();
                PgStore::connect(url, 8).unwrap()
            }
        }
    }

    /// A plain client in the schema of `url`.
    pub fn client(url: &str) -> postgres::Client {
        postgres::Client::connect(url, postgres::NoTls).unwrap()
    }

    /// A fresh schema migrated by this zerotouch, then marked as migrated by a newer one; its
    /// URL and the newer version.
    #[allow(dead_code)] // not every test binary that includes this module uses it
    pub fn newer_schema_url(&self) -> (String, i32) {
        let url = self.fresh_url();
        drop(PgStore::connect(&url, 1).unwrap());
        let newer = zerotouch_store::postgres::LATEST_SCHEMA_VERSION + 1;
        Self::client(&url)
            .execute(
                "INSERT INTO zerotouch_schema (version, description) VALUES ($1, 'from a newer zerotouch')",
                &[&newer],
            )
            .unwrap();
        (url, newer)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let schemas = std::mem::take(&mut *self.schemas.lock().unwrap_or_else(|e| e.into_inner()));
        if schemas.is_empty() {
            return;
        }
        if let Ok(mut client) = postgres::Client::connect(&self.url, postgres::NoTls) {
            for schema in schemas {
                let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
    }
}

/// A register request of `id` in `scope`, signed (valid for an hour from `now`) with the key
/// derived for `id` from the all-zero group key, carrying `payload`.
pub fn register_request(
    scope: &str,
    id: &str,
    now: zerotouch_proto::Timestamp,
    payload: Option<Box<serde_json::value::RawValue>>,
) -> zerotouch_engine::provisioner::RegisterRequest {
    use zerotouch_engine::attestation::symmetric::{derive_device_key, registration_token};
    let crypto = zerotouch_engine::crypto::RingCrypto::new();
    let key = derive_device_key(&crypto, &[0u8; 32], id);
    let token = registration_token(&crypto, &key, scope, id, now.unix_secs() + 3600);
    zerotouch_engine::provisioner::RegisterRequest {
        id_scope: scope.into(),
        registration_id: id.into(),
        body: zerotouch_proto::device::DeviceRegistration {
            payload,
            registration_id: id.into(),
            tpm: None,
            csr: None,
        },
        credential: zerotouch_engine::attestation::Credential::Sas(token.to_string()),
        api_version: None,
    }
}
