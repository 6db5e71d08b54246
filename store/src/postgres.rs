//! The PostgreSQL backend: every engine store trait over one database shared by many instances.
//!
//! [`PgStore`] holds an r2d2 pool of synchronous `postgres` connections, so its methods block:
//! async callers run them on `tokio::task::spawn_blocking`. Every row is its JSON document plus
//! the key, etag and filter columns queries need. Conditional writes are single compare-and-swap
//! statements (`UPDATE … WHERE etag = $n`, `INSERT … ON CONFLICT DO NOTHING`, judged by rows
//! affected) or, where a write spans tables, a transaction that locks the row it checks, so two
//! instances on one database never lose an update. Nothing is cached in the process.
//!
//! Several embedded hubs share the database: every hub-side row (device, module, twin, job,
//! device job) carries its hub's host name, leading its key, and [`PgStore::hub`] views see one
//! hub's rows. A registration's unit ([`RegistrationStore::atomically`]) is one transaction
//! that the provisioning store and the hub views of the same pool all write through.
//!
//! [`PgStore::connect_read_only`] opens a database for reading only: it never migrates, its
//! sessions are read-only (PostgreSQL refuses every write), and its hub views record nothing.
//!
//! The SQL sticks to plain tables, text and jsonb columns, arrays, row locks and savepoints, so
//! it also suits PostgreSQL-compatible clusters (CockroachDB, Citus).

use std::ops::{ControlFlow, Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, GenericClient, NoTls, Row};
use r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use serde::de::DeserializeOwned;
use serde_json::Value;
use zerotouch_engine::jobs::{DeviceJobFilter, JobFilter, JobRecord, JobStore};
use zerotouch_engine::registry::{keep_device_activity, keep_module_activity, DeviceCounts, IdentityStore};
use zerotouch_engine::store::{
    CaCertificate, CaCertificateStore, EnrollmentGroupStore, EnrollmentStore, OperationRecord, Page,
    PageRequest, Precondition, RegistrationRecord, RegistrationStore,
};
use zerotouch_engine::twin::{StoredTwin, TwinDocument, TwinKey, TwinStore};
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::hub::{Device, Module};
use zerotouch_proto::jobs::{DeviceJob, JobId, JobResponse};
use zerotouch_proto::service::{EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, ModuleId, OperationId, RegistrationId, Timestamp};

use crate::codec::{
    ca_references, check, decode_token, device_connected, device_status_column, encode_token, etag_column,
    from_doc, job_etag, job_purge_time, job_status_column, job_type_column, registration_group, shared,
    signing_subjects, time_column, to_doc, twin_key, twin_module_column,
};

mod query;
mod schema;
mod unit;

pub use schema::{migration_sql, LATEST_SCHEMA_VERSION};

type Manager = PostgresConnectionManager<NoTls>;
type Conn = PooledConnection<Manager>;
type Param<'a> = &'a (dyn ToSql + Sync);

/// How long a caller waits for a pooled connection before the call fails. Short: when the
/// database is down, devices and shutdown wait this long for their error, and MQTT clients give
/// up on a CONNACK after 5 s (rumqttc's network timeout), which the CONNECT's credential check
/// must answer before.
const POOL_TIMEOUT: Duration = Duration::from_secs(3);

/// How long opening one connection to the database may take (an unreachable host).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long data sent to the database may stay unacknowledged before the connection counts as
/// broken (`TCP_USER_TIMEOUT`), and when an idle connection starts to probe: without them a
/// database behind a network partition holds a query for the kernel's ~15 min of retransmissions,
/// or for ever while waiting for its reply.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(15);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// `config` with this store's timeouts where the URL sets none: connect, keep-alive probes and
/// the TCP user timeout (see [`TCP_USER_TIMEOUT`]).
fn with_timeouts(mut config: postgres::Config) -> postgres::Config {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    // The library's default idle time is 2 h; a URL that asks for exactly that keeps it too.
    if config.get_keepalives() && config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(KEEPALIVE_IDLE);
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(KEEPALIVE_INTERVAL);
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(KEEPALIVE_RETRIES);
    }
    config
}

/// The startup option of a read-only store's sessions: every transaction read-only unless it
/// says otherwise, which no statement of the store does.
const READ_ONLY_SESSION: &str = "-cdefault_transaction_read_only=on";

/// The connection settings of `url`, with this store's timeouts and notice logging.
fn config(url: &str) -> Result<postgres::Config, StoreError> {
    let config: postgres::Config =
        url.parse().map_err(|e| StoreError::Backend(format!("bad PostgreSQL URL: {e}")))?;
    let mut config = with_timeouts(config);
    // The server's notices are its remarks on our own statements (the migrations' `IF NOT
    // EXISTS` on every start): not news to an operator. postgres logs them at info.
    config.notice_callback(|notice| {
        tracing::debug!(severity = notice.severity(), "PostgreSQL notice: {}", notice.message());
    });
    Ok(config)
}

/// One connection outside the pool: it fails fast with the server's own error, where the pool
/// would retry until its timeout.
fn connect_directly(config: &postgres::Config) -> Result<Client, StoreError> {
    config
        .connect(NoTls)
        .map_err(|e| StoreError::Backend(format!("cannot connect to PostgreSQL: {}", describe(&e))))
}

/// The database `config` connects to, for messages: its name and hosts (never the password).
fn database_name(config: &postgres::Config) -> String {
    let name = config.get_dbname().or(config.get_user()).unwrap_or("postgres");
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|host| match host {
            postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if hosts.is_empty() {
        format!("the PostgreSQL database {name:?}")
    } else {
        format!("the PostgreSQL database {name:?} on {}", hosts.join(","))
    }
}

/// Whether hub `hub` may take the unnamed hub's rows, given the `names` of every named hub:
/// it is the only one, and it holds nothing yet.
fn may_claim(c: &mut impl GenericClient, names: &[Row], hub: &str) -> Result<bool, StoreError> {
    let only_this = names.len() == 1 && names[0].try_get::<_, &str>(0).map_err(backend)? == hub;
    if !only_this {
        return Ok(false);
    }
    let occupied: bool = c
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM devices WHERE hub = $1) \
             OR EXISTS (SELECT 1 FROM twins WHERE hub = $1) \
             OR EXISTS (SELECT 1 FROM jobs WHERE hub = $1) \
             OR EXISTS (SELECT 1 FROM device_jobs WHERE hub = $1)",
            &[&hub],
        )
        .map_err(backend)?
        .try_get(0)
        .map_err(backend)?;
    Ok(!occupied)
}

/// Rows per statement of a bulk import (a multi-row `INSERT`); PostgreSQL allows 65535
/// parameters per statement, and a device row takes 5.
const IMPORT_ROWS_PER_STATEMENT: usize = 1000;

/// Every engine store over one PostgreSQL database, through a connection pool.
///
/// Cheap to clone (the pool is shared). Several `PgStore`s, in one process or in many, may use
/// the same database at once: all consistency is the database's.
///
/// The provisioning stores are one per database. The hub stores (identities, twins, jobs and
/// the query source) belong to one embedded hub: [`PgStore::connect`] gives the unnamed hub
/// `""`, [`PgStore::hub`] a view of a named one over the same pool, so several hubs share
/// one database and the same device id may exist in each.
///
/// [`RegistrationStore::atomically`] opens a transaction for the calling thread: until the unit
/// returns, every call on that thread through a store sharing this pool (clones and hub views)
/// joins it. Units are per thread; see [`RegistrationStore::atomically`] on [`PgStore`].
///
/// [`PgStore::connect_read_only`] opens a store for reading only: PostgreSQL refuses every
/// write of its connections.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool<Manager>,
    /// Identity of the pool, which keys the thread's open unit.
    key: u64,
    /// Host name of the hub the hub stores are scoped to (lower case; `""` unnamed).
    hub: Arc<str>,
    /// Opened with [`PgStore::connect_read_only`]: every connection of the pool is a read-only
    /// session, and the store writes nothing of its own accord (no hub name recorded).
    read_only: bool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: show only the pool state.
        let state = self.pool.state();
        f.debug_struct("PgStore")
            .field("hub", &self.hub)
            .field("read_only", &self.read_only)
            .field("connections", &state.connections)
            .field("idle", &state.idle_connections)
            .finish()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`, or the key=value
    /// form) with up to `pool_size` connections, and brings its schema up to date.
    ///
    /// Several instances may connect at once: migrations run in one transaction that locks the
    /// `zerotouch_schema` table's baseline row, so exactly one instance applies each version.
    ///
    /// # Errors
    /// [`StoreError::Backend`] when the URL is malformed, the server cannot be reached, a
    /// migration fails, or the database's schema is newer than this build knows.
    pub fn connect(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let config = config(url)?;
        // One direct connection first: it fails fast with the server's own error (the pool
        // would retry until its timeout), and it runs the migrations.
        let mut client = connect_directly(&config)?;
        schema::migrate(&mut client)?;
        drop(client);
        Self::with_pool(config, pool_size, false)
    }

    /// Connects to the database at `url` (as [`PgStore::connect`]) for reading only: nothing is
    /// created, migrated or written. Every connection of the pool is a read-only session
    /// (`default_transaction_read_only` set when it starts), so PostgreSQL itself refuses every
    /// write, which fails with [`StoreError::Backend`] saying the store was opened read-only;
    /// [`PgStore::hub`] records no hub, and [`PgStore::claim_unnamed_hub`] and
    /// [`PgStore::setting_or_insert`] refuse to write. Reads see every commit of the servers
    /// writing to the database, and block none of them.
    ///
    /// The database must have this binary's schema version ([`LATEST_SCHEMA_VERSION`]): an older
    /// one is not migrated (a server or a command that writes migrates it), a newer one needs a
    /// newer zerotouch.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when the database (in the schemas of its search path) holds no
    /// zerotouch schema; [`StoreError::Backend`] when the URL is malformed, the server cannot be
    /// reached, the session could not be made read-only, or the schema version is not
    /// [`LATEST_SCHEMA_VERSION`].
    pub fn connect_read_only(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        let mut config = config(url)?;
        // Set at the start of every session, after the URL's own options (the last setting of a
        // parameter wins), so no connection of the pool ever runs a transaction that may write.
        let options = match config.get_options() {
            Some(own) if !own.trim().is_empty() => format!("{own} {READ_ONLY_SESSION}"),
            _ => READ_ONLY_SESSION.to_owned(),
        };
        config.options(&options);
        let mut client = connect_directly(&config)?;
        // A connection pooler may drop startup options: then the sessions would write.
        let read_only: String = client
            .query_one("SHOW default_transaction_read_only", &[])
            .and_then(|row| row.try_get(0))
            .map_err(backend)?;
        if read_only != "on" {
            return Err(StoreError::Backend(format!(
                "PostgreSQL: the session was not made read-only (default_transaction_read_only is \
                 {read_only:?} although the connection asked for on; does a connection pooler drop \
                 startup options?), so the store is not opened for reading only"
            )));
        }
        let database = database_name(&config);
        match schema::applied_version(&mut client)? {
            None => return Err(StoreError::NotFound),
            Some(found) if found < LATEST_SCHEMA_VERSION => {
                return Err(StoreError::Backend(format!(
                    "{database} has schema version {found}, older than the {LATEST_SCHEMA_VERSION} of this \
                     zerotouch, and a read-only open does not migrate it: run `zerotouch serve` (or any \
                     command that writes to the store) on it once to migrate it"
                )));
            }
            Some(found) if found > LATEST_SCHEMA_VERSION => {
                return Err(StoreError::Backend(format!(
                    "{database} has schema version {found}, newer than the {LATEST_SCHEMA_VERSION} this \
                     zerotouch understands: upgrade zerotouch to read it"
                )));
            }
            Some(_) => {}
        }
        drop(client);
        Self::with_pool(config, pool_size, true)
    }

    /// The store over a new pool of up to `pool_size` connections made with `config`.
    fn with_pool(config: postgres::Config, pool_size: u32, read_only: bool) -> Result<Self, StoreError> {
        let manager = PostgresConnectionManager::new(config, NoTls);
        let pool = Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(POOL_TIMEOUT)
            .build(manager)
            .map_err(|e| StoreError::Backend(format!("cannot connect to PostgreSQL: {e}")))?;
        Ok(PgStore { pool, key: unit::next_pool_key(), hub: Arc::from(""), read_only })
    }

    /// Whether this store was opened with [`PgStore::connect_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The error of a write a read-only store refuses before asking the database.
    fn refusal(&self, what: &str) -> StoreError {
        StoreError::Backend(format!(
            "PostgreSQL: the store was opened read-only, and this call writes ({what})"
        ))
    }

    /// The stores of embedded hub `host_name` (compared case-insensitively) over this store's
    /// pool: its identities, twins, jobs and query source hold that hub's rows only, while the
    /// provisioning stores stay the database's. Records the name for [`PgStore::hub_names`],
    /// except on a read-only store (whose view of a hub never recorded reads as empty).
    ///
    /// # Errors
    /// [`StoreError::Backend`] for an empty name or when the name cannot be recorded.
    pub fn hub(&self, host_name: &str) -> Result<PgStore, StoreError> {
        let name = host_name.trim().to_ascii_lowercase();
        if name.is_empty() {
            return Err(StoreError::Backend("a hub needs a host name".to_owned()));
        }
        if !self.read_only {
            self.conn()?
                .execute("INSERT INTO hubs (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", &[&name])
                .map_err(backend)?;
        }
        Ok(PgStore {
            pool: self.pool.clone(),
            key: self.key,
            hub: Arc::from(name),
            read_only: self.read_only,
        })
    }

    /// Moves the rows of the unnamed hub — what a database written before hubs had names
    /// (schema version 1, one hub) holds after migrating — into this view's hub, in one
    /// transaction, provided this is the only named hub of the database and holds nothing yet:
    /// then it is the one hub that database served. Returns how many devices moved (0 when
    /// there was nothing to move or the conditions do not hold).
    ///
    /// # Errors
    /// Backend failures (then nothing moved); [`StoreError::Backend`] on a read-only store.
    pub fn claim_unnamed_hub(&self) -> Result<u64, StoreError> {
        if self.hub.is_empty() {
            return Ok(0);
        }
        if self.read_only {
            return Err(self.refusal("it moves the unnamed hub's rows into this hub"));
        }
        if !self.unnamed_hub_occupied()? {
            return Ok(0);
        }
        let hub: &str = &self.hub;
        self.transaction(|c| {
            // Locking the hub names keeps two instances from both claiming (and a new hub from
            // being named meanwhile).
            let names = c.query("SELECT name FROM hubs ORDER BY name FOR UPDATE", &[]).map_err(backend)?;
            if !may_claim(c, &names, hub)? {
                return Ok(0);
            }
            // Modules follow their devices (the foreign key cascades updates).
            let moved = c.execute("UPDATE devices SET hub = $1 WHERE hub = ''", &[&hub]).map_err(backend)?;
            for table in ["twins", "jobs", "device_jobs"] {
                c.execute(&format!("UPDATE {table} SET hub = $1 WHERE hub = ''"), &[&hub])
                    .map_err(backend)?;
            }
            Ok(moved)
        })
    }

    /// Whether [`PgStore::claim_unnamed_hub`] on this view would move rows now: the unnamed hub
    /// holds rows, this view's hub is the only named hub of the database, and it holds nothing
    /// yet. Only reads, so a read-only store can tell that its view of the hub misses the rows
    /// the first writer to open the hub takes.
    ///
    /// # Errors
    /// Backend failures.
    pub fn would_claim_unnamed_hub(&self) -> Result<bool, StoreError> {
        if self.hub.is_empty() || !self.unnamed_hub_occupied()? {
            return Ok(false);
        }
        let mut conn = self.conn()?;
        let names = conn.query("SELECT name FROM hubs ORDER BY name", &[]).map_err(backend)?;
        may_claim(&mut *conn, &names, &self.hub)
    }

    /// Whether the unnamed hub holds any row.
    fn unnamed_hub_occupied(&self) -> Result<bool, StoreError> {
        let unnamed = "SELECT EXISTS (SELECT 1 FROM devices WHERE hub = '') \
                        OR EXISTS (SELECT 1 FROM twins WHERE hub = '') \
                        OR EXISTS (SELECT 1 FROM jobs WHERE hub = '') \
                        OR EXISTS (SELECT 1 FROM device_jobs WHERE hub = '')";
        self.conn()?.query_one(unnamed, &[]).map_err(backend)?.try_get(0).map_err(backend)
    }

    /// Host names of the hubs opened with [`PgStore::hub`] on this database, sorted (the
    /// unnamed hub is not listed).
    ///
    /// # Errors
    /// Backend failures.
    pub fn hub_names(&self) -> Result<Vec<String>, StoreError> {
        let rows = self.conn()?.query("SELECT name FROM hubs ORDER BY name", &[]).map_err(backend)?;
        rows.iter().map(|r| r.try_get::<_, String>(0).map_err(backend)).collect()
    }

    /// The value of the shared setting `name`: the one stored, or `proposed` when none is, which
    /// is then stored. Instances starting together agree: the first to store wins.
    ///
    /// # Errors
    /// Backend failures; [`StoreError::Backend`] on a read-only store when none is stored.
    pub fn setting_or_insert(&self, name: &str, proposed: &str) -> Result<String, StoreError> {
        if self.read_only {
            return self
                .setting(name)?
                .ok_or_else(|| self.refusal(&format!("it stores the setting {name:?}")));
        }
        let mut conn = self.conn()?;
        conn.execute(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            &[&name, &proposed],
        )
        .map_err(backend)?;
        let row = conn.query_one("SELECT value FROM settings WHERE name = $1", &[&name]).map_err(backend)?;
        row.try_get(0).map_err(backend)
    }

    /// The value of the shared setting `name`, if one is stored.
    ///
    /// # Errors
    /// Backend failures.
    pub fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .conn()?
            .query_opt("SELECT value FROM settings WHERE name = $1", &[&name])
            .map_err(backend)?;
        row.map(|r| r.try_get(0).map_err(backend)).transpose()
    }

    /// Host name of the hub this store's hub stores are scoped to (`""` for the unnamed one).
    pub fn hub_name(&self) -> &str {
        &self.hub
    }

    /// The schema version the database is at (after [`PgStore::connect`], the latest).
    ///
    /// # Errors
    /// Backend failures.
    pub fn schema_version(&self) -> Result<i32, StoreError> {
        schema::current_version(&mut *self.conn()?)
    }

    /// The connection for one call: the open unit's on this thread, else one from the pool.
    fn conn(&self) -> Result<Lease, StoreError> {
        match unit::take(self.key) {
            unit::Ambient::Conn(c) => Ok(Lease::Unit(c)),
            unit::Ambient::None => self.pooled().map(Lease::Pooled),
            unit::Ambient::Busy => Err(StoreError::Backend(
                "PostgreSQL: re-entrant store call while the unit's connection is in use".to_owned(),
            )),
        }
    }

    fn pooled(&self) -> Result<Conn, StoreError> {
        self.pool.get().map_err(|e| StoreError::Backend(format!("no PostgreSQL connection: {e}")))
    }

    /// Runs `work` as one transaction, or as a savepoint of the thread's open unit, so that a
    /// failure undoes `work` alone and never commits or aborts the unit. A transaction of its
    /// own that conflicts with concurrent ones (deadlock, serialization failure) is rolled back
    /// and runs again (see [`unit::retrying`]), so `work` may run more than once; a savepoint
    /// fails instead, and the unit runs again.
    fn transaction<R>(
        &self,
        mut work: impl FnMut(&mut Client) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        match self.conn()? {
            lease @ Lease::Unit(_) => Self::transaction_once(lease, &mut work),
            lease @ Lease::Pooled(_) => {
                let mut lease = Some(lease);
                unit::retrying(|| {
                    let lease = match lease.take() {
                        Some(lease) => lease,
                        None => self.conn()?,
                    };
                    Self::transaction_once(lease, &mut work)
                })
            }
        }
    }

    /// One attempt of [`PgStore::transaction`] on `lease`.
    fn transaction_once<R>(
        mut lease: Lease,
        work: &mut impl FnMut(&mut Client) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let (begin, commit, rollback) = match lease {
            Lease::Unit(_) => (
                "SAVEPOINT zt_call",
                "RELEASE SAVEPOINT zt_call",
                "ROLLBACK TO SAVEPOINT zt_call; RELEASE SAVEPOINT zt_call",
            ),
            Lease::Pooled(_) => ("BEGIN", "COMMIT", "ROLLBACK"),
        };
        lease.batch_execute(begin).map_err(backend)?;
        let mut guard = Rollback { client: &mut lease, sql: rollback, armed: true };
        let result = work(guard.client);
        guard.armed = false;
        match result {
            Ok(r) => {
                guard.client.batch_execute(commit).map_err(backend)?;
                Ok(r)
            }
            Err(e) => {
                guard.client.batch_execute(rollback).map_err(backend)?;
                Err(e)
            }
        }
    }

    /// Writes (creates or replaces) many devices in one transaction, with multi-row `INSERT`s:
    /// the bulk path of an import (callers batch, e.g. 5000 per call). All or none are written.
    ///
    /// # Errors
    /// Backend failures.
    pub fn put_devices(&self, devices: &[Device]) -> Result<(), StoreError> {
        let rows =
            last_per_id(devices, |d| d).into_iter().map(DeviceRow::new).collect::<Result<Vec<_>, _>>()?;
        self.transaction(|c| {
            for chunk in rows.chunks(IMPORT_ROWS_PER_STATEMENT) {
                insert_devices(c, &self.hub, chunk.iter())?;
            }
            Ok(())
        })
    }

    /// Writes (creates or replaces) many devices and their device twins in one transaction, so
    /// an imported identity never exists without its twin. All or none are written.
    ///
    /// # Errors
    /// Backend failures.
    pub fn put_devices_with_twins(&self, devices: &[(Device, TwinDocument)]) -> Result<(), StoreError> {
        let rows = last_per_id(devices, |(d, _)| d)
            .into_iter()
            .map(|(d, t)| Ok((DeviceRow::new(d)?, TwinRow::new(t)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        self.transaction(|c| {
            for chunk in rows.chunks(IMPORT_ROWS_PER_STATEMENT) {
                insert_devices(c, &self.hub, chunk.iter().map(|(d, _)| d))?;
                let twins: Vec<(&str, &TwinRow)> = chunk.iter().map(|(d, t)| (d.id.as_str(), t)).collect();
                insert_twins(c, &self.hub, &twins)?;
            }
            Ok(())
        })
    }

    /// Streams every device in id order to `visit` from one consistent snapshot: a read-only
    /// repeatable-read transaction reads a server-side cursor `batch` rows at a time, so memory
    /// stays flat and concurrent writers are not blocked. Stops early when `visit` breaks;
    /// returns how many devices were visited.
    ///
    /// Inside a unit ([`RegistrationStore::atomically`]) the export reads the unit's own
    /// transaction instead, `batch` rows per statement, and so sees the unit's writes.
    ///
    /// # Errors
    /// Backend failures or a stored row that does not parse.
    pub fn export_devices(
        &self,
        batch: usize,
        mut visit: impl FnMut(Device) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let batch = i32::try_from(batch.max(1)).unwrap_or(i32::MAX);
        let mut conn = match self.conn()? {
            Lease::Pooled(conn) => conn,
            Lease::Unit(lease) => {
                drop(lease);
                return self.export_in_unit(i64::from(batch), visit);
            }
        };
        let mut tx = conn
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(backend)?;
        let hub: &str = &self.hub;
        let portal =
            tx.bind("SELECT doc FROM devices WHERE hub = $1 ORDER BY device_id", &[&hub]).map_err(backend)?;
        let mut visited = 0u64;
        loop {
            let rows = tx.query_portal(&portal, batch).map_err(backend)?;
            for row in &rows {
                visited += 1;
                if visit(doc(row)?).is_break() {
                    return Ok(visited);
                }
            }
            if rows.len() < usize::try_from(batch).unwrap_or(usize::MAX) {
                return Ok(visited);
            }
        }
    }

    /// [`PgStore::export_devices`] inside a unit: keyset pages on the unit's connection, which
    /// goes back to the unit between pages (`visit` may use the stores too).
    fn export_in_unit(
        &self,
        batch: i64,
        mut visit: impl FnMut(Device) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let hub: &str = &self.hub;
        let mut after = String::new();
        let mut visited = 0u64;
        loop {
            let rows = self
                .conn()?
                .query(
                    "SELECT doc, device_id FROM devices WHERE hub = $1 AND device_id > $2 \
                     ORDER BY device_id LIMIT $3",
                    &[&hub, &after, &batch],
                )
                .map_err(backend)?;
            for row in &rows {
                visited += 1;
                if visit(doc(row)?).is_break() {
                    return Ok(visited);
                }
            }
            match rows.last() {
                Some(last) if i64::try_from(rows.len()).unwrap_or(i64::MAX) >= batch => {
                    after = last.try_get(1).map_err(backend)?;
                }
                _ => return Ok(visited),
            }
        }
    }

    /// Number of stored device identities.
    ///
    /// # Errors
    /// Backend failures.
    pub fn device_count(&self) -> Result<u64, StoreError> {
        let hub: &str = &self.hub;
        let row = self
            .conn()?
            .query_one("SELECT count(*) FROM devices WHERE hub = $1", &[&hub])
            .map_err(backend)?;
        Ok(u64::try_from(row.try_get::<_, i64>(0).map_err(backend)?).unwrap_or_default())
    }
}

/// A connection lent to one call.
enum Lease {
    /// The connection of the unit open on this thread.
    Unit(unit::Borrowed),
    /// A connection of the pool, in autocommit.
    Pooled(Conn),
}

impl Deref for Lease {
    type Target = Client;
    fn deref(&self) -> &Client {
        match self {
            Lease::Unit(c) => c,
            Lease::Pooled(c) => c,
        }
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Client {
        match self {
            Lease::Unit(c) => c,
            Lease::Pooled(c) => c,
        }
    }
}

/// Rolls back a transaction or savepoint of [`PgStore::transaction`] if its work panics, so
/// no connection goes back to the pool mid-transaction.
struct Rollback<'a> {
    client: &'a mut Client,
    sql: &'static str,
    armed: bool,
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.client.batch_execute(self.sql);
        }
    }
}

// -------------------------------------------------------------------------------------------------
// Shared helpers

/// A failed statement.
///
/// A conflict with a concurrent transaction (serialization failure, deadlock) is noted for the
/// unit or transaction it happened in, which then runs again ([`unit::retrying`]). Inside a
/// unit it reads as [`StoreError::PreconditionFailed`] meanwhile, and that must stay: the
/// code a unit runs takes `PreconditionFailed` for "a concurrent write got in first: give
/// up this attempt and decide again", which is what a cancelled transaction calls for, while
/// it takes a backend error for a final failure — the provisioner, for one, turns a hub
/// conflict into a new round but records any other hub failure as the device's `failed`
/// registration. What a conflicted unit returns never reaches the caller of `atomically`:
/// it runs again, and when every attempt conflicted the caller gets [`StoreError::Conflict`]
/// naming the conflict, not an etag mismatch. Outside units a conflict is
/// [`StoreError::Conflict`] at once: a transaction of its own ([`PgStore::transaction`]) runs
/// again before it gives up with one, but a single statement is not run again.
///
/// A write refused because the transaction is read-only (SQLSTATE 25006) says so: the store
/// was opened with [`PgStore::connect_read_only`], or the database itself takes no writes (a
/// hot standby, or `default_transaction_read_only` set for the database or role).
fn backend(e: postgres::Error) -> StoreError {
    unit::note_conflict(&e);
    match (unit::retryable(&e), unit::active()) {
        (true, true) => StoreError::PreconditionFailed,
        (true, false) => StoreError::Conflict(format!("PostgreSQL: {}", describe(&e))),
        (false, _) if e.code() == Some(&SqlState::READ_ONLY_SQL_TRANSACTION) => StoreError::Backend(format!(
            "PostgreSQL: the store was opened read-only (or the database takes no writes: a standby, or \
             `default_transaction_read_only` set for it), and this call writes: {}",
            describe(&e)
        )),
        (false, _) => StoreError::Backend(format!("PostgreSQL: {}", describe(&e))),
    }
}

/// What went wrong, with the server's own message: the driver's `Display` says only "db error"
/// and leaves the server's message, SQLSTATE and detail to its source.
pub(crate) fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// Decodes the `doc` column (always the first) of a row.
fn doc<T: DeserializeOwned>(row: &Row) -> Result<T, StoreError> {
    from_doc(row.try_get::<_, &str>(0).map_err(backend)?)
}

fn limit_of(page: &PageRequest) -> (usize, i64) {
    let max = page.max_items.max(1);
    (max, i64::try_from(max).unwrap_or(i64::MAX - 1) + 1)
}

/// Cuts a `max + 1` row fetch to a page whose token is the key of its last item.
fn page_from<T>(mut items: Vec<T>, max: usize, token: impl Fn(&T) -> String) -> Page<T> {
    let continuation = if items.len() > max {
        items.truncate(max);
        items.last().map(token)
    } else {
        None
    };
    Page { items, continuation }
}

/// A table as the compare-and-swap helpers see it: key columns, then value columns, the first
/// of which is `etag`.
struct Table {
    name: &'static str,
    keys: &'static [&'static str],
    values: &'static [&'static str],
}

impl Table {
    fn key_clause(&self, first: usize) -> String {
        self.keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{k} = ${}", first + i))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn exists(&self, c: &mut impl GenericClient, keys: &[Param<'_>]) -> Result<bool, StoreError> {
        let sql = format!("SELECT 1 FROM {} WHERE {}", self.name, self.key_clause(1));
        Ok(!c.query(&sql, keys).map_err(backend)?.is_empty())
    }

    /// Writes one row if `pre` holds, in one statement. `params` are the key values followed
    /// by the value columns.
    fn put(
        &self,
        c: &mut impl GenericClient,
        params: &[Param<'_>],
        pre: &Precondition,
    ) -> Result<(), StoreError> {
        let cols: Vec<&str> = self.keys.iter().chain(self.values).copied().collect();
        let placeholders: Vec<String> = cols.iter().enumerate().map(|(i, c)| placeholder(c, i + 1)).collect();
        let insert =
            format!("INSERT INTO {} ({}) VALUES ({})", self.name, cols.join(", "), placeholders.join(", "));
        let set = || {
            self.values
                .iter()
                .enumerate()
                .map(|(i, v)| format!("{v} = {}", placeholder(v, self.keys.len() + i + 1)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let keys = &params[..self.keys.len()];
        match pre {
            Precondition::None => {
                let updates =
                    self.values.iter().map(|v| format!("{v} = EXCLUDED.{v}")).collect::<Vec<_>>().join(", ");
                let sql = format!("{insert} ON CONFLICT ({}) DO UPDATE SET {updates}", self.keys.join(", "));
                c.execute(&sql, params).map_err(write_error)?;
                Ok(())
            }
            Precondition::MustNotExist => {
                let sql = format!("{insert} ON CONFLICT ({}) DO NOTHING", self.keys.join(", "));
                match c.execute(&sql, params).map_err(write_error)? {
                    0 => Err(StoreError::AlreadyExists),
                    _ => Ok(()),
                }
            }
            Precondition::MustExist => {
                let sql = format!("UPDATE {} SET {} WHERE {}", self.name, set(), self.key_clause(1));
                match c.execute(&sql, params).map_err(write_error)? {
                    0 => Err(StoreError::NotFound),
                    _ => Ok(()),
                }
            }
            Precondition::Matches(tag) => {
                let n = params.len();
                let sql = format!(
                    "UPDATE {} SET {} WHERE {} AND etag = ${}",
                    self.name,
                    set(),
                    self.key_clause(1),
                    n + 1
                );
                let mut all: Vec<Param<'_>> = params.to_vec();
                all.push(tag);
                match c.execute(&sql, &all).map_err(write_error)? {
                    0 if self.exists(c, keys)? => Err(StoreError::PreconditionFailed),
                    0 => Err(StoreError::NotFound),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Deletes one row if `pre` holds, in one statement; returns its `doc`.
    fn delete(
        &self,
        c: &mut impl GenericClient,
        keys: &[Param<'_>],
        pre: &Precondition,
    ) -> Result<String, StoreError> {
        let base = format!("DELETE FROM {} WHERE {}", self.name, self.key_clause(1));
        let rows = match pre {
            Precondition::None | Precondition::MustExist => {
                c.query(&format!("{base} RETURNING doc"), keys).map_err(backend)?
            }
            Precondition::MustNotExist => {
                return Err(if self.exists(c, keys)? {
                    StoreError::AlreadyExists
                } else {
                    StoreError::NotFound
                });
            }
            Precondition::Matches(tag) => {
                let mut all: Vec<Param<'_>> = keys.to_vec();
                all.push(tag);
                let sql = format!("{base} AND etag = ${} RETURNING doc", keys.len() + 1);
                let rows = c.query(&sql, &all).map_err(backend)?;
                if rows.is_empty() && self.exists(c, keys)? {
                    return Err(StoreError::PreconditionFailed);
                }
                rows
            }
        };
        match rows.first() {
            Some(row) => row.try_get::<_, String>(0).map_err(backend),
            None => Err(StoreError::NotFound),
        }
    }

    fn get<T: DeserializeOwned>(
        &self,
        c: &mut impl GenericClient,
        keys: &[Param<'_>],
    ) -> Result<Option<T>, StoreError> {
        let sql = format!("SELECT doc FROM {} WHERE {}", self.name, self.key_clause(1));
        c.query_opt(&sql, keys).map_err(backend)?.map(|row| doc(&row)).transpose()
    }
}

/// Placeholder `$i` of a column; jsonb columns are sent as text and cast by the server, so
/// the client needs no JSON type support.
fn placeholder(column: &str, i: usize) -> String {
    if JSONB_COLUMNS.contains(&column) {
        format!("${i}::text::jsonb")
    } else {
        format!("${i}")
    }
}

/// Columns of type jsonb (the rest are text, boolean, bigint or text[]).
const JSONB_COLUMNS: &[&str] = &["tags_ci"];

/// A write that breaks a foreign key names a parent that does not exist.
fn write_error(e: postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::FOREIGN_KEY_VIOLATION) {
        StoreError::NotFound
    } else {
        backend(e)
    }
}

/// Lists one page of a table keyed by one text column, in byte order.
fn list_by_key<T: DeserializeOwned>(
    c: &mut impl GenericClient,
    table: &str,
    extra: Option<(&str, Param<'_>)>,
    page: &PageRequest,
) -> Result<Page<(String, T)>, StoreError> {
    let (max, limit) = limit_of(page);
    let after = page.continuation.clone().unwrap_or_default();
    let (filter, params): (String, Vec<Param<'_>>) = match extra {
        Some((col, value)) => (format!(" AND {col} = $3"), vec![&after, &limit, value]),
        None => (String::new(), vec![&after, &limit]),
    };
    // An empty token means "from the start": every key is longer than "".
    let sql = format!("SELECT doc, id FROM {table} WHERE id > $1{filter} ORDER BY id LIMIT $2");
    let rows = c.query(&sql, &params).map_err(backend)?;
    let items = rows
        .iter()
        .map(|r| Ok((r.try_get::<_, String>(1).map_err(backend)?, doc(r)?)))
        .collect::<Result<Vec<(String, T)>, StoreError>>()?;
    Ok(page_from(items, max, |(k, _)| k.clone()))
}

fn strip_keys<T>(page: Page<(String, T)>) -> Page<T> {
    Page { items: page.items.into_iter().map(|(_, t)| t).collect(), continuation: page.continuation }
}

// -------------------------------------------------------------------------------------------------
// Provisioning stores

const ENROLLMENTS: Table = Table { name: "enrollments", keys: &["id"], values: &["etag", "doc"] };
const GROUPS: Table = Table {
    name: "enrollment_groups",
    keys: &["id"],
    values: &["etag", "doc", "symmetric_key", "signing_subjects", "ca_refs"],
};
const CAS: Table = Table { name: "ca_certificates", keys: &["id"], values: &["etag", "doc", "subject_name"] };
const REGISTRATIONS: Table =
    Table { name: "registrations", keys: &["id"], values: &["etag", "doc", "group_key"] };

impl EnrollmentStore for PgStore {
    fn enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, StoreError> {
        ENROLLMENTS.get(&mut *self.conn()?, &[&id.key()])
    }

    fn put_enrollment(&self, e: &IndividualEnrollment, pre: &Precondition) -> Result<(), StoreError> {
        let (key, etag, doc) = (e.registration_id.key(), etag_column(e.etag.as_ref()), to_doc(e)?);
        ENROLLMENTS.put(&mut *self.conn()?, &[&key, &etag, &doc], pre)
    }

    fn delete_enrollment(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        ENROLLMENTS.delete(&mut *self.conn()?, &[&id.key()], pre).map(drop)
    }

    fn enrollments(&self, page: &PageRequest) -> Result<Page<IndividualEnrollment>, StoreError> {
        list_by_key(&mut *self.conn()?, ENROLLMENTS.name, None, page).map(strip_keys)
    }
}

fn docs<T: DeserializeOwned>(rows: &[Row]) -> Result<Vec<T>, StoreError> {
    rows.iter().map(doc).collect()
}

impl EnrollmentGroupStore for PgStore {
    fn enrollment_group(&self, id: &EnrollmentGroupId) -> Result<Option<EnrollmentGroup>, StoreError> {
        GROUPS.get(&mut *self.conn()?, &[&id.key()])
    }

    fn put_enrollment_group(&self, g: &EnrollmentGroup, pre: &Precondition) -> Result<(), StoreError> {
        let (key, etag, doc) = (g.enrollment_group_id.key(), etag_column(g.etag.as_ref()), to_doc(g)?);
        let symmetric = g.attestation.symmetric_key.is_some();
        let (subjects, refs) = (signing_subjects(g), ca_references(g));
        GROUPS.put(&mut *self.conn()?, &[&key, &etag, &doc, &symmetric, &subjects, &refs], pre)
    }

    fn delete_enrollment_group(&self, id: &EnrollmentGroupId, pre: &Precondition) -> Result<(), StoreError> {
        GROUPS.delete(&mut *self.conn()?, &[&id.key()], pre).map(drop)
    }

    fn enrollment_groups(&self, page: &PageRequest) -> Result<Page<EnrollmentGroup>, StoreError> {
        list_by_key(&mut *self.conn()?, GROUPS.name, None, page).map(strip_keys)
    }

    fn symmetric_key_groups(&self) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        let rows = self
            .conn()?
            .query("SELECT doc FROM enrollment_groups WHERE symmetric_key ORDER BY id", &[])
            .map_err(backend)?;
        docs(&rows).map(shared)
    }

    fn groups_by_ca_subject(&self, subject_name: &str) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        let rows = self
            .conn()?
            .query(
                "SELECT doc FROM enrollment_groups \
                 WHERE $1 = ANY (signing_subjects) \
                    OR ca_refs && ARRAY(SELECT id FROM ca_certificates WHERE subject_name = $1) \
                 ORDER BY id",
                &[&subject_name],
            )
            .map_err(backend)?;
        docs(&rows).map(shared)
    }
}

impl CaCertificateStore for PgStore {
    fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificate>, StoreError> {
        CAS.get(&mut *self.conn()?, &[&name])
    }

    fn put_ca_certificate(&self, cert: &CaCertificate, pre: &Precondition) -> Result<(), StoreError> {
        let (etag, doc) = (cert.etag.bare().to_owned(), to_doc(cert)?);
        CAS.put(&mut *self.conn()?, &[&cert.name, &etag, &doc, &cert.subject_name], pre)
    }

    fn delete_ca_certificate(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
        CAS.delete(&mut *self.conn()?, &[&name], pre).map(drop)
    }
}

fn put_operation(c: &mut impl GenericClient, op: &OperationRecord) -> Result<(), StoreError> {
    let (id, created, doc) = (op.operation_id.as_str(), time_column(op.created), to_doc(op)?);
    c.execute(
        "INSERT INTO operations (id, created, doc) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE SET created = EXCLUDED.created, doc = EXCLUDED.doc",
        &[&id, &created, &doc],
    )
    .map_err(backend)?;
    Ok(())
}

impl RegistrationStore for PgStore {
    fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationRecord>, StoreError> {
        REGISTRATIONS.get(&mut *self.conn()?, &[&id.key()])
    }

    fn commit_registration(
        &self,
        record: Arc<RegistrationRecord>,
        pre: &Precondition,
        operation: OperationRecord,
    ) -> Result<(), StoreError> {
        let key = record.registration_id.key();
        let etag = etag_column(record.etag().as_ref());
        let doc = to_doc(&*record)?;
        let group = registration_group(&record);
        self.transaction(|c| {
            REGISTRATIONS.put(c, &[&key, &etag, &doc, &group], pre)?;
            put_operation(c, &operation)
        })
    }

    fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        REGISTRATIONS.delete(&mut *self.conn()?, &[&id.key()], pre).map(drop)
    }

    fn registrations_by_group(
        &self,
        group: &EnrollmentGroupId,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        let key = group.key();
        list_by_key(&mut *self.conn()?, REGISTRATIONS.name, Some(("group_key", &key)), page).map(strip_keys)
    }

    fn put_operation(&self, operation: &OperationRecord) -> Result<(), StoreError> {
        put_operation(&mut *self.conn()?, operation)
    }

    fn operation(&self, id: &OperationId) -> Result<Option<OperationRecord>, StoreError> {
        let row = self
            .conn()?
            .query_opt("SELECT doc FROM operations WHERE id = $1", &[&id.as_str()])
            .map_err(backend)?;
        row.map(|r| doc(&r)).transpose()
    }

    fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let n = self
            .conn()?
            .execute("DELETE FROM operations WHERE created < $1", &[&time_column(cutoff)])
            .map_err(backend)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Runs `unit` in one PostgreSQL transaction on one pooled connection, which every call on
    /// this thread through a store sharing this pool (clones, [`PgStore::hub`] views) uses
    /// until `unit` returns; a unit inside a unit is a savepoint. Calls made on other threads
    /// meanwhile are not part of the unit (and may wait on its row locks): do not hand the
    /// unit's work to other threads. Writes that are a transaction of their own elsewhere
    /// (a record with its operation, a device with its modules) are savepoints inside a
    /// unit, so a refused one undoes only itself.
    ///
    /// When PostgreSQL cancels the transaction because it conflicts with concurrent ones
    /// (deadlock, SQLSTATE 40P01; serialization failure, 40001), it is rolled back and `unit`
    /// runs again from the start, up to 3 times in all with a short random pause in between:
    /// `unit` must be re-runnable, as [`RegistrationStore::atomically`] says. A unit inside a
    /// unit does not run again by itself; its outermost unit does.
    ///
    /// # Errors
    /// The error of `unit` (after rolling back); [`StoreError::Backend`] when the transaction
    /// cannot begin or commit; [`StoreError::Conflict`] when every attempt conflicted with
    /// concurrent transactions (naming the SQLSTATE and PostgreSQL's message).
    fn atomically(&self, unit: &mut dyn FnMut() -> Result<(), Error>) -> Result<(), Error> {
        unit::run(self.key, || self.pooled(), unit)
    }
}

// -------------------------------------------------------------------------------------------------
// Identities
//
// Every hub-side table leads its key with `hub`: the host name of the hub the row belongs to.

const DEVICES: Table =
    Table { name: "devices", keys: &["hub", "device_id"], values: &["etag", "doc", "status", "connected"] };
const MODULES: Table =
    Table { name: "modules", keys: &["hub", "device_id", "module_id"], values: &["etag", "doc"] };

/// The columns of one device row.
struct DeviceRow {
    id: String,
    etag: String,
    doc: String,
    status: String,
    connected: bool,
}

impl DeviceRow {
    fn new(d: &Device) -> Result<Self, StoreError> {
        Ok(DeviceRow {
            id: d.device_id.as_str().to_owned(),
            etag: etag_column(d.etag.as_ref()),
            doc: to_doc(d)?,
            status: device_status_column(d.status)?,
            connected: device_connected(d),
        })
    }
}

/// The items of a bulk write, the last one of each device id only: one multi-row upsert may
/// not touch a row twice, and a later line of an import replaces an earlier one.
fn last_per_id<T>(items: &[T], device: impl Fn(&T) -> &Device) -> Vec<&T> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<&T> = items.iter().rev().filter(|t| seen.insert(device(t).device_id.as_str())).collect();
    out.reverse();
    out
}

/// Multi-row upsert of devices of hub `hub` (one statement; `$1` is the hub).
fn insert_devices<'a>(
    c: &mut impl GenericClient,
    hub: &str,
    rows: impl Iterator<Item = &'a DeviceRow>,
) -> Result<(), StoreError> {
    let mut params: Vec<Param<'_>> = vec![&hub];
    let mut tuples = Vec::new();
    for r in rows {
        let n = params.len();
        tuples.push(format!("($1, ${}, ${}, ${}, ${}, ${})", n + 1, n + 2, n + 3, n + 4, n + 5));
        params.extend([&r.id as Param<'_>, &r.etag, &r.doc, &r.status, &r.connected]);
    }
    if tuples.is_empty() {
        return Ok(());
    }
    let sql = format!(
        "INSERT INTO devices (hub, device_id, etag, doc, status, connected) VALUES {} \
         ON CONFLICT (hub, device_id) DO UPDATE SET etag = EXCLUDED.etag, doc = EXCLUDED.doc, \
         status = EXCLUDED.status, connected = EXCLUDED.connected",
        tuples.join(", ")
    );
    c.execute(&sql, &params).map_err(backend)?;
    Ok(())
}

impl IdentityStore for PgStore {
    /// A unit of this pool is open on this thread: the hub's writes go through its connection.
    fn in_open_unit(&self) -> bool {
        unit::is_open(self.key)
    }

    fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        let hub: &str = &self.hub;
        DEVICES.get(&mut *self.conn()?, &[&hub, &id.as_str()])
    }

    fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        let r = DeviceRow::new(device)?;
        let hub: &str = &self.hub;
        DEVICES.put(&mut *self.conn()?, &[&hub, &r.id, &r.etag, &r.doc, &r.status, &r.connected], pre)
    }

    /// The row is locked (`FOR UPDATE`) from reading its activity to writing the update: a
    /// connection-state write waits, then finds the new etag and fails its precondition.
    fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        let hub: &str = &self.hub;
        let id = device.device_id.as_str();
        self.transaction(|tx| {
            let stored: Option<Device> = tx
                .query_opt(
                    "SELECT doc FROM devices WHERE hub = $1 AND device_id = $2 FOR UPDATE",
                    &[&hub, &id],
                )
                .map_err(backend)?
                .map(|row| doc(&row))
                .transpose()?;
            let r = match stored {
                Some(stored) => {
                    let mut device = device.clone();
                    keep_device_activity(&mut device, &stored);
                    DeviceRow::new(&device)?
                }
                None => DeviceRow::new(device)?,
            };
            DEVICES.put(tx, &[&hub, &r.id, &r.etag, &r.doc, &r.status, &r.connected], pre)
        })
    }

    fn delete_device(&self, id: &DeviceId, pre: &Precondition) -> Result<(Device, Vec<Module>), StoreError> {
        let hub: &str = &self.hub;
        let keys: [Param<'_>; 2] = [&hub, &id.as_str()];
        self.transaction(|tx| {
            // Locking the device row first keeps modules from being added between reading them
            // and deleting them (a module insert takes a key-share lock on its device through
            // the FK).
            let row = tx
                .query_opt("SELECT etag FROM devices WHERE hub = $1 AND device_id = $2 FOR UPDATE", &keys)
                .map_err(backend)?
                .ok_or(StoreError::NotFound)?;
            let etag: String = row.try_get(0).map_err(backend)?;
            check(pre, Some(&etag))?;
            let modules = tx
                .query(
                    "DELETE FROM modules WHERE hub = $1 AND device_id = $2 RETURNING doc, module_id",
                    &keys,
                )
                .map_err(backend)?;
            let mut modules = modules
                .iter()
                .map(|r| Ok((r.try_get::<_, String>(1).map_err(backend)?, doc::<Module>(r)?)))
                .collect::<Result<Vec<_>, StoreError>>()?;
            modules.sort_by(|a, b| a.0.cmp(&b.0));
            let device = tx
                .query_one("DELETE FROM devices WHERE hub = $1 AND device_id = $2 RETURNING doc", &keys)
                .map_err(backend)?;
            let device = doc(&device)?;
            Ok((device, modules.into_iter().map(|(_, m)| m).collect()))
        })
    }

    fn devices(&self, page: &PageRequest) -> Result<Page<Device>, StoreError> {
        let (max, limit) = limit_of(page);
        let after = page.continuation.clone().unwrap_or_default();
        let hub: &str = &self.hub;
        let rows = self
            .conn()?
            .query(
                "SELECT doc, device_id FROM devices WHERE hub = $1 AND device_id > $2 \
                 ORDER BY device_id LIMIT $3",
                &[&hub, &after, &limit],
            )
            .map_err(backend)?;
        let items = docs::<Device>(&rows)?;
        Ok(page_from(items, max, |d| d.device_id.as_str().to_owned()))
    }

    fn count_devices(&self) -> Result<DeviceCounts, StoreError> {
        let hub: &str = &self.hub;
        let row = self
            .conn()?
            .query_one(
                "SELECT count(*), \
                        coalesce(sum(CASE WHEN status = 'disabled' THEN 1 ELSE 0 END), 0)::bigint, \
                        coalesce(sum(CASE WHEN connected THEN 1 ELSE 0 END), 0)::bigint \
                 FROM devices WHERE hub = $1",
                &[&hub],
            )
            .map_err(backend)?;
        let n = |i: usize| -> Result<u64, StoreError> {
            Ok(u64::try_from(row.try_get::<_, i64>(i).map_err(backend)?).unwrap_or(0))
        };
        let (total, disabled, connected) = (n(0)?, n(1)?, n(2)?);
        Ok(DeviceCounts { total, enabled: total - disabled.min(total), disabled, connected })
    }

    fn module(&self, device: &DeviceId, module: &ModuleId) -> Result<Option<Module>, StoreError> {
        let hub: &str = &self.hub;
        MODULES.get(&mut *self.conn()?, &[&hub, &device.as_str(), &module.as_str()])
    }

    fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        let (etag, doc) = (etag_column(module.etag.as_ref()), to_doc(module)?);
        let (d, m) = (module.device_id.as_str(), module.module_id.as_str());
        let hub: &str = &self.hub;
        // A module of a missing device fails on the foreign key: in a unit that statement
        // error would abort the whole transaction, so it gets a savepoint of its own there.
        let put = |c: &mut Client| MODULES.put(c, &[&hub, &d, &m, &etag, &doc], pre);
        match self.conn()? {
            Lease::Pooled(mut c) => put(&mut c),
            Lease::Unit(lease) => {
                drop(lease);
                self.transaction(put)
            }
        }
    }

    /// As [`IdentityStore::put_device_keeping_activity`] of this store, with the module row.
    fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        let (d, m) = (module.device_id.as_str(), module.module_id.as_str());
        let hub: &str = &self.hub;
        self.transaction(|tx| {
            let stored: Option<Module> = tx
                .query_opt(
                    "SELECT doc FROM modules WHERE hub = $1 AND device_id = $2 AND module_id = $3 FOR UPDATE",
                    &[&hub, &d, &m],
                )
                .map_err(backend)?
                .map(|row| doc(&row))
                .transpose()?;
            let written = match stored {
                Some(stored) => {
                    let mut module = module.clone();
                    keep_module_activity(&mut module, &stored);
                    module
                }
                None => module.clone(),
            };
            let (etag, doc) = (etag_column(written.etag.as_ref()), to_doc(&written)?);
            MODULES.put(tx, &[&hub, &d, &m, &etag, &doc], pre)
        })
    }

    fn delete_module(
        &self,
        device: &DeviceId,
        module: &ModuleId,
        pre: &Precondition,
    ) -> Result<Module, StoreError> {
        let hub: &str = &self.hub;
        let doc = MODULES.delete(&mut *self.conn()?, &[&hub, &device.as_str(), &module.as_str()], pre)?;
        from_doc(&doc)
    }

    fn modules(&self, device: &DeviceId) -> Result<Vec<Module>, StoreError> {
        let hub: &str = &self.hub;
        let rows = self
            .conn()?
            .query(
                "SELECT doc FROM modules WHERE hub = $1 AND device_id = $2 ORDER BY module_id",
                &[&hub, &device.as_str()],
            )
            .map_err(backend)?;
        docs(&rows)
    }
}

// -------------------------------------------------------------------------------------------------
// Twins

const TWINS: Table =
    Table { name: "twins", keys: &["hub", "device_id", "module_id"], values: &["etag", "doc", "tags_ci"] };

/// The columns of one twin row; the etag column holds the revision, which preconditions compare.
struct TwinRow {
    revision: String,
    doc: String,
    tags: String,
}

impl TwinRow {
    fn new(twin: &TwinDocument) -> Result<Self, StoreError> {
        let value = serde_json::to_value(twin)
            .map_err(|e| StoreError::Backend(format!("cannot encode twin: {e}")))?;
        let tags = match value.get("tags") {
            Some(Value::Object(tags)) => to_doc(&query::tags_index(tags))?,
            _ => "{}".to_owned(),
        };
        Ok(TwinRow { revision: twin.revision().bare().to_owned(), doc: to_doc(&value)?, tags })
    }
}

/// Multi-row upsert of device twins of hub `hub` (one statement; `$1` is the hub).
fn insert_twins(c: &mut impl GenericClient, hub: &str, rows: &[(&str, &TwinRow)]) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut params: Vec<Param<'_>> = vec![&hub];
    let mut tuples = Vec::new();
    for (id, r) in rows {
        let n = params.len();
        tuples.push(format!("($1, ${}, '', ${}, ${}, ${}::text::jsonb)", n + 1, n + 2, n + 3, n + 4));
        params.extend([id as Param<'_>, &r.revision, &r.doc, &r.tags]);
    }
    let sql = format!(
        "INSERT INTO twins (hub, device_id, module_id, etag, doc, tags_ci) VALUES {} \
         ON CONFLICT (hub, device_id, module_id) DO UPDATE SET etag = EXCLUDED.etag, doc = EXCLUDED.doc, \
         tags_ci = EXCLUDED.tags_ci",
        tuples.join(", ")
    );
    c.execute(&sql, &params).map_err(backend)?;
    Ok(())
}

fn twin_token(key: &TwinKey) -> String {
    match &key.module_id {
        Some(m) => format!("{}/{}", key.device_id, m),
        None => key.device_id.to_string(),
    }
}

fn stored_twin(row: &Row) -> Result<StoredTwin, StoreError> {
    let device: &str = row.try_get(1).map_err(backend)?;
    let module: &str = row.try_get(2).map_err(backend)?;
    Ok(StoredTwin { key: twin_key(device, module)?, document: doc(row)? })
}

impl TwinStore for PgStore {
    /// As the identity side: a unit of this pool is open on this thread.
    fn in_open_unit(&self) -> bool {
        unit::is_open(self.key)
    }

    fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError> {
        let hub: &str = &self.hub;
        TWINS.get(&mut *self.conn()?, &[&hub, &key.device_id.as_str(), &twin_module_column(key)])
    }

    fn put_twin(&self, key: &TwinKey, twin: &TwinDocument, pre: &Precondition) -> Result<(), StoreError> {
        let r = TwinRow::new(twin)?;
        let (d, m) = (key.device_id.as_str(), twin_module_column(key));
        let hub: &str = &self.hub;
        TWINS.put(&mut *self.conn()?, &[&hub, &d, &m, &r.revision, &r.doc, &r.tags], pre)
    }

    fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError> {
        let hub: &str = &self.hub;
        TWINS
            .delete(&mut *self.conn()?, &[&hub, &key.device_id.as_str(), &twin_module_column(key)], pre)
            .map(drop)
    }

    fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError> {
        let (max, limit) = limit_of(page);
        let (device, module) = match &page.continuation {
            None => (String::new(), String::new()),
            Some(token) => match token.split_once('/') {
                Some((d, m)) => (d.to_owned(), m.to_owned()),
                None => (token.clone(), String::new()),
            },
        };
        let hub: &str = &self.hub;
        let rows = self
            .conn()?
            .query(
                "SELECT doc, device_id, module_id FROM twins WHERE hub = $1 AND (device_id, module_id) > ($2, $3) \
                 ORDER BY device_id, module_id LIMIT $4",
                &[&hub, &device, &module, &limit],
            )
            .map_err(backend)?;
        let items = rows.iter().map(stored_twin).collect::<Result<Vec<_>, _>>()?;
        Ok(page_from(items, max, |t| twin_token(&t.key)))
    }

    fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError> {
        let hub: &str = &self.hub;
        let rows = self
            .conn()?
            .query(
                "SELECT doc, device_id, module_id FROM twins WHERE hub = $1 AND device_id = $2 \
                 ORDER BY module_id",
                &[&hub, &device_id.as_str()],
            )
            .map_err(backend)?;
        rows.iter().map(stored_twin).collect()
    }
}

// -------------------------------------------------------------------------------------------------
// Jobs

const JOBS: Table = Table {
    name: "jobs",
    keys: &["hub", "job_id"],
    values: &["etag", "doc", "version", "job_type", "status", "purge_after"],
};

fn job_record(row: &Row) -> Result<JobRecord, StoreError> {
    let version: i64 = row.try_get(1).map_err(backend)?;
    Ok(JobRecord {
        job: doc(row)?,
        version: u64::try_from(version)
            .map_err(|_| StoreError::Backend("negative job version".to_owned()))?,
    })
}

impl JobStore for PgStore {
    fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let hub: &str = &self.hub;
        let row = self
            .conn()?
            .query_opt("SELECT doc, version FROM jobs WHERE hub = $1 AND job_id = $2", &[&hub, &id.as_str()])
            .map_err(backend)?;
        row.map(|r| job_record(&r)).transpose()
    }

    fn put_job(&self, record: &JobRecord, pre: &Precondition) -> Result<(), StoreError> {
        let job = &record.job;
        let id = job.job_id.as_str();
        let etag = job_etag(record);
        let doc = to_doc(job)?;
        let version = i64::try_from(record.version)
            .map_err(|_| StoreError::Backend("job version too large".to_owned()))?;
        let (job_type, status) = (job_type_column(job.job_type)?, job_status_column(job.status)?);
        let purge_after = job_purge_time(record);
        let hub: &str = &self.hub;
        JOBS.put(
            &mut *self.conn()?,
            &[&hub, &id, &etag, &doc, &version, &job_type, &status, &purge_after],
            pre,
        )
    }

    fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Result<Page<JobResponse>, StoreError> {
        let (max, limit) = limit_of(page);
        let after = match &page.continuation {
            Some(t) => decode_token(t, 1)?.into_iter().next().ok_or(StoreError::InvalidContinuation)?,
            None => String::new(),
        };
        let job_type = filter.job_type.map(job_type_column).transpose()?;
        let status = filter.status.map(job_status_column).transpose()?;
        let hub: &str = &self.hub;
        let rows = self
            .conn()?
            .query(
                "SELECT doc, job_id FROM jobs WHERE hub = $5 AND job_id > $1 \
                 AND ($2::text IS NULL OR job_type = $2) AND ($3::text IS NULL OR status = $3) \
                 ORDER BY job_id LIMIT $4",
                &[&after, &job_type, &status, &limit, &hub],
            )
            .map_err(backend)?;
        let items = docs::<JobResponse>(&rows)?;
        Ok(page_from(items, max, |j| encode_token(&[j.job_id.as_str()])))
    }

    fn put_device_job(&self, record: &DeviceJob) -> Result<(), StoreError> {
        let (job, device, doc) = (record.job_id.as_str(), record.device_id.as_str(), to_doc(record)?);
        let hub: &str = &self.hub;
        self.conn()?
            .execute(
                "INSERT INTO device_jobs (hub, job_id, device_id, doc) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (hub, job_id, device_id) DO UPDATE SET doc = EXCLUDED.doc",
                &[&hub, &job, &device, &doc],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn device_job(&self, job: &JobId, device_id: &str) -> Result<Option<DeviceJob>, StoreError> {
        let hub: &str = &self.hub;
        let row = self
            .conn()?
            .query_opt(
                "SELECT doc FROM device_jobs WHERE hub = $1 AND job_id = $2 AND device_id = $3",
                &[&hub, &job.as_str(), &device_id],
            )
            .map_err(backend)?;
        row.map(|r| doc(&r)).transpose()
    }

    fn device_jobs(
        &self,
        filter: &DeviceJobFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceJob>, StoreError> {
        let (max, limit) = limit_of(page);
        let (job, device) = match &page.continuation {
            Some(t) => match decode_token(t, 2)?.as_slice() {
                [j, d] => (j.clone(), d.clone()),
                _ => return Err(StoreError::InvalidContinuation),
            },
            None => (String::new(), String::new()),
        };
        let job_filter = filter.job_id.as_ref().map(|j| j.as_str().to_owned());
        let hub: &str = &self.hub;
        // With no token, ("", "") sorts before every real key, so `>=` would do as well; `>`
        // keeps a resumed page from repeating its last record.
        let rows = self
            .conn()?
            .query(
                "SELECT doc FROM device_jobs WHERE hub = $6 AND (job_id, device_id) > ($1, $2) \
                 AND ($3::text IS NULL OR job_id = $3) AND ($4::text IS NULL OR device_id = $4) \
                 ORDER BY job_id, device_id LIMIT $5",
                &[&job, &device, &job_filter, &filter.device_id, &limit, &hub],
            )
            .map_err(backend)?;
        let items = docs::<DeviceJob>(&rows)?;
        Ok(page_from(items, max, |r| encode_token(&[r.job_id.as_str(), r.device_id.as_str()])))
    }

    fn purge_jobs(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let hub: &str = &self.hub;
        self.transaction(|tx| {
            let purged = tx
                .query(
                    "DELETE FROM jobs WHERE hub = $1 AND purge_after < $2 RETURNING job_id",
                    &[&hub, &time_column(cutoff)],
                )
                .map_err(backend)?;
            let ids = purged
                .iter()
                .map(|r| r.try_get::<_, String>(0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(backend)?;
            if !ids.is_empty() {
                tx.execute("DELETE FROM device_jobs WHERE hub = $1 AND job_id = ANY ($2)", &[&hub, &ids])
                    .map_err(backend)?;
            }
            Ok(ids.len())
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_url_without_timeouts_gets_the_stores_and_its_own_are_kept() {
        let bare = with_timeouts("postgres://u@db.example/zt".parse().unwrap());
        assert_eq!(bare.get_connect_timeout(), Some(&CONNECT_TIMEOUT));
        assert_eq!(bare.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(bare.get_keepalives_idle(), KEEPALIVE_IDLE);
        assert_eq!(bare.get_keepalives_interval(), Some(KEEPALIVE_INTERVAL));
        assert_eq!(bare.get_keepalives_retries(), Some(KEEPALIVE_RETRIES));

        let own = with_timeouts(
            "host=db.example user=u connect_timeout=9 tcp_user_timeout=7 keepalives_idle=60 \
             keepalives_interval=2 keepalives_retries=9"
                .parse()
                .unwrap(),
        );
        assert_eq!(own.get_connect_timeout(), Some(&Duration::from_secs(9)));
        assert_eq!(own.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
        assert_eq!(own.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(own.get_keepalives_interval(), Some(Duration::from_secs(2)));
        assert_eq!(own.get_keepalives_retries(), Some(9));
    }
}
