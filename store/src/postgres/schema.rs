//! Versioned schema migrations of the PostgreSQL backend, applied at connect.

use std::thread;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::GenericClient;
use zerotouch_engine::StoreError;

use super::backend;

/// One schema version: what it adds and the SQL that adds it (run in one transaction).
struct Migration {
    version: i32,
    description: &'static str,
    sql: &'static str,
}

/// Every migration, oldest first. Never edit a released one: add the next version.
///
/// Keys are `COLLATE "C"` so listings come in byte order, as the store traits require.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "provisioning, identity, twin and job tables",
        sql: r#"
CREATE TABLE enrollments (
    id text COLLATE "C" PRIMARY KEY,
    etag text NOT NULL,
    doc text NOT NULL
);
CREATE TABLE enrollment_groups (
    id text COLLATE "C" PRIMARY KEY,
    etag text NOT NULL,
    doc text NOT NULL,
    symmetric_key boolean NOT NULL,
    signing_subjects text[] NOT NULL,
    ca_refs text[] NOT NULL
);
CREATE INDEX enrollment_groups_symmetric_key ON enrollment_groups (id) WHERE symmetric_key;
CREATE TABLE ca_certificates (
    id text COLLATE "C" PRIMARY KEY,
    etag text NOT NULL,
    doc text NOT NULL,
    subject_name text NOT NULL
);
CREATE INDEX ca_certificates_subject ON ca_certificates (subject_name);
CREATE TABLE registrations (
    id text COLLATE "C" PRIMARY KEY,
    etag text NOT NULL,
    doc text NOT NULL,
    group_key text COLLATE "C"
);
CREATE INDEX registrations_by_group ON registrations (group_key, id);
CREATE TABLE operations (
    id text COLLATE "C" PRIMARY KEY,
    created bigint NOT NULL,
    doc text NOT NULL
);
CREATE INDEX operations_created ON operations (created);
CREATE TABLE devices (
    device_id text COLLATE "C" PRIMARY KEY,
    etag text NOT NULL,
    doc text NOT NULL,
    status text NOT NULL,
    connected boolean NOT NULL
);
CREATE INDEX devices_status ON devices (status, device_id);
CREATE TABLE modules (
    device_id text COLLATE "C" NOT NULL REFERENCES devices (device_id) ON DELETE CASCADE,
    module_id text COLLATE "C" NOT NULL,
    etag text NOT NULL,
    doc text NOT NULL,
    PRIMARY KEY (device_id, module_id)
);
CREATE TABLE twins (
    device_id text COLLATE "C" NOT NULL,
    module_id text COLLATE "C" NOT NULL,
    etag text NOT NULL,
    doc text NOT NULL,
    tags_ci jsonb NOT NULL,
    PRIMARY KEY (device_id, module_id)
);
CREATE INDEX twins_tags ON twins USING gin (tags_ci jsonb_path_ops);
CREATE TABLE jobs (
    job_id text COLLATE "C" PRIMARY KEY,
    etag text NOT NULL,
    doc text NOT NULL,
    version bigint NOT NULL,
    job_type text NOT NULL,
    status text NOT NULL,
    purge_after bigint
);
CREATE INDEX jobs_purge_after ON jobs (purge_after);
CREATE TABLE device_jobs (
    job_id text COLLATE "C" NOT NULL,
    device_id text COLLATE "C" NOT NULL,
    doc text NOT NULL,
    PRIMARY KEY (job_id, device_id)
);
CREATE INDEX device_jobs_by_device ON device_jobs (device_id, job_id);
"#,
    },
    Migration {
        version: 2,
        description: "several embedded hubs: a hub column leading every hub-side key",
        // Rows written before hubs had names stay in the unnamed hub ''.
        sql: r#"
CREATE TABLE hubs (
    name text COLLATE "C" PRIMARY KEY
);
ALTER TABLE modules DROP CONSTRAINT modules_device_id_fkey;
ALTER TABLE devices ADD COLUMN hub text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE devices DROP CONSTRAINT devices_pkey;
ALTER TABLE devices ADD PRIMARY KEY (hub, device_id);
DROP INDEX devices_status;
CREATE INDEX devices_status ON devices (hub, status, device_id);
ALTER TABLE modules ADD COLUMN hub text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE modules DROP CONSTRAINT modules_pkey;
ALTER TABLE modules ADD PRIMARY KEY (hub, device_id, module_id);
ALTER TABLE modules ADD FOREIGN KEY (hub, device_id) REFERENCES devices (hub, device_id)
    ON DELETE CASCADE ON UPDATE CASCADE;
ALTER TABLE twins ADD COLUMN hub text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE twins DROP CONSTRAINT twins_pkey;
ALTER TABLE twins ADD PRIMARY KEY (hub, device_id, module_id);
ALTER TABLE jobs ADD COLUMN hub text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE jobs DROP CONSTRAINT jobs_pkey;
ALTER TABLE jobs ADD PRIMARY KEY (hub, job_id);
DROP INDEX jobs_purge_after;
CREATE INDEX jobs_purge_after ON jobs (hub, purge_after);
ALTER TABLE device_jobs ADD COLUMN hub text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE device_jobs DROP CONSTRAINT device_jobs_pkey;
ALTER TABLE device_jobs ADD PRIMARY KEY (hub, job_id, device_id);
DROP INDEX device_jobs_by_device;
CREATE INDEX device_jobs_by_device ON device_jobs (hub, device_id, job_id);
"#,
    },
    Migration {
        version: 3,
        description: "service settings every instance on the database shares (the ID scope)",
        sql: r#"
CREATE TABLE settings (
    name text COLLATE "C" PRIMARY KEY,
    value text NOT NULL
);
"#,
    },
];

/// The schema version this build creates and understands.
pub const LATEST_SCHEMA_VERSION: i32 = 3;

/// The SQL that migration `version` runs (`None` for a version this build does not have): what
/// a database at an earlier version is made of, for tests and tools that need one.
pub fn migration_sql(version: i32) -> Option<&'static str> {
    MIGRATIONS.iter().find(|m| m.version == version).map(|m| m.sql)
}

/// Attempts at migrating when a concurrent session still gets in the way (a catalog race on a
/// backend without advisory locks, a deadlock or serialization failure under load).
const MIGRATE_ATTEMPTS: u32 = 5;

/// The advisory lock every migrating instance takes first ("zt" + "schema" as a number).
const MIGRATION_LOCK: i64 = 0x7a74_7363_6865_6d61;

/// Brings the database to [`LATEST_SCHEMA_VERSION`].
///
/// Everything runs in one transaction that first takes a transaction-scoped advisory lock, so
/// instances starting together queue up: the first creates the version table and applies each
/// migration once, the others then find nothing left to do. The version table also has a
/// baseline row 0 that every migrating instance locks, which keeps the same guarantee on
/// PostgreSQL-compatible databases whose advisory locks are no-ops. A transient conflict with a
/// concurrent session rolls the attempt back and tries again.
pub(super) fn migrate(client: &mut postgres::Client) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        match migrate_once(client) {
            Ok(outcome) => return outcome,
            Err(e) if attempt + 1 < MIGRATE_ATTEMPTS && transient(&e) => {
                attempt += 1;
                thread::sleep(Duration::from_millis(20 * u64::from(attempt)));
            }
            Err(e) => return Err(backend(e)),
        }
    }
}

/// A conflict with another session doing the same thing: worth another attempt.
fn transient(e: &postgres::Error) -> bool {
    matches!(e.code(), Some(c) if *c == SqlState::UNIQUE_VIOLATION
        || *c == SqlState::DUPLICATE_TABLE
        || *c == SqlState::T_R_DEADLOCK_DETECTED
        || *c == SqlState::T_R_SERIALIZATION_FAILURE)
}

/// One attempt: the outer error is a failed statement (maybe transient), the inner one a
/// database this build must not touch or a migration whose SQL failed.
fn migrate_once(client: &mut postgres::Client) -> Result<Result<(), StoreError>, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS zerotouch_schema (
            version integer PRIMARY KEY,
            description text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )?;
    tx.execute(
        "INSERT INTO zerotouch_schema (version, description) VALUES (0, 'baseline') \
         ON CONFLICT (version) DO NOTHING",
        &[],
    )?;
    tx.execute("SELECT version FROM zerotouch_schema WHERE version = 0 FOR UPDATE", &[])?;
    let current = max_version(&mut tx)?;
    if current > LATEST_SCHEMA_VERSION {
        return Ok(Err(StoreError::Backend(format!(
            "the database schema is at version {current}, newer than this zerotouch build understands \
             (up to {LATEST_SCHEMA_VERSION}); run a newer zerotouch against this database"
        ))));
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > current) {
        if let Err(e) = tx.batch_execute(m.sql) {
            if transient(&e) {
                return Err(e);
            }
            return Ok(Err(StoreError::Backend(format!(
                "schema migration {} ({}) failed: {}",
                m.version,
                m.description,
                super::describe(&e)
            ))));
        }
        tx.execute(
            "INSERT INTO zerotouch_schema (version, description) VALUES ($1, $2)",
            &[&m.version, &m.description],
        )?;
    }
    tx.commit()?;
    Ok(Ok(()))
}

/// The highest applied version, without creating or changing anything: `None` when the
/// database has no version table (no zerotouch schema in the schemas of its search path).
pub(super) fn applied_version(client: &mut impl GenericClient) -> Result<Option<i32>, StoreError> {
    match max_version(client) {
        Ok(version) => Ok(Some(version)),
        Err(e) if e.code() == Some(&SqlState::UNDEFINED_TABLE) => Ok(None),
        Err(e) => Err(backend(e)),
    }
}

/// The highest applied version (0 for an empty database).
pub(super) fn current_version(client: &mut impl GenericClient) -> Result<i32, StoreError> {
    max_version(client).map_err(backend)
}

fn max_version(client: &mut impl GenericClient) -> Result<i32, postgres::Error> {
    client.query_one("SELECT coalesce(max(version), 0) FROM zerotouch_schema", &[])?.try_get(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_one_by_one_up_to_the_latest() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let expected: Vec<i32> = (1..=LATEST_SCHEMA_VERSION).collect();
        assert_eq!(versions, expected);
    }
}
