//! Hub stores on SQLite: device and module identities, twins, jobs and device job records, plus
//! the bulk import and streaming export of identities.

use std::ops::ControlFlow;

use rusqlite::{params, Connection};
use zerotouch_engine::jobs::{DeviceJobFilter, JobFilter, JobRecord, JobStore};
use zerotouch_engine::registry::{keep_device_activity, keep_module_activity, DeviceCounts, IdentityStore};
use zerotouch_engine::store::{Page, PageRequest, Precondition};
use zerotouch_engine::twin::{StoredTwin, TwinDocument, TwinKey, TwinStore};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::{Device, DeviceStatus, Module};
use zerotouch_proto::jobs::{DeviceJob, JobId, JobResponse};
use zerotouch_proto::{DeviceId, ModuleId, Timestamp};

use super::provisioning::{all_docs, one_doc, page_by_key, stored_etag};
use super::{limit_plus_one, Db, SqliteStore};
use crate::codec::{self, check, decode_token, encode_token, etag_column, from_doc, to_doc};

/// A device row ready to be written.
struct DeviceRow {
    etag: String,
    status: String,
    connected: bool,
    doc: String,
}

impl DeviceRow {
    fn of(device: &Device) -> Result<Self, StoreError> {
        Ok(Self {
            etag: etag_column(device.etag.as_ref()),
            status: codec::device_status_column(device.status)?,
            connected: codec::device_connected(device),
            doc: to_doc(device)?,
        })
    }

    fn upsert(&self, conn: &Connection, hub: &str, id: &str) -> Result<(), StoreError> {
        conn.prepare_cached(
            "INSERT INTO devices (id, etag, status, connected, doc, hub) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (hub, id) DO UPDATE SET etag = excluded.etag, status = excluded.status,
             connected = excluded.connected, doc = excluded.doc",
        )
        .db()?
        .execute(params![id, self.etag, self.status, self.connected, self.doc, hub])
        .db()?;
        Ok(())
    }
}

impl SqliteStore {
    /// Writes (creates or replaces) many devices in one transaction: the bulk path of an import.
    /// Either all are written or none.
    ///
    /// # Errors
    /// Backend failures.
    pub fn put_devices(&self, devices: &[Device]) -> Result<(), StoreError> {
        let rows = devices.iter().map(DeviceRow::of).collect::<Result<Vec<_>, _>>()?;
        let hub = &*self.hub;
        self.write(|tx| {
            for (device, row) in devices.iter().zip(&rows) {
                row.upsert(tx, hub, device.device_id.as_str())?;
            }
            Ok(())
        })
    }

    /// Writes (creates or replaces) many devices and their twins in one transaction, so an
    /// imported identity never exists without its twin. Either all are written or none.
    ///
    /// # Errors
    /// Backend failures.
    pub fn put_devices_with_twins(&self, devices: &[(Device, TwinDocument)]) -> Result<(), StoreError> {
        let rows = devices
            .iter()
            .map(|(d, t)| Ok((DeviceRow::of(d)?, to_doc(t)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        let hub = &*self.hub;
        self.write(|tx| {
            for ((device, twin), (row, twin_doc)) in devices.iter().zip(&rows) {
                let id = device.device_id.as_str();
                row.upsert(tx, hub, id)?;
                upsert_twin(tx, hub, id, "", twin, twin_doc, false)?;
            }
            Ok(())
        })
    }

    /// Streams every device in id order to `visit`, reading `batch` rows per read transaction so
    /// an export of millions of identities neither holds them in memory nor blocks writers.
    /// Stops early when `visit` breaks; returns how many devices were visited.
    ///
    /// # Errors
    /// Backend failures (a device written during the export is seen or not, depending on
    /// where the export stands).
    pub fn export_devices(
        &self,
        batch: usize,
        mut visit: impl FnMut(Device) -> ControlFlow<()>,
    ) -> Result<u64, StoreError> {
        let mut request = PageRequest { continuation: None, max_items: batch.max(1) };
        let mut visited = 0;
        loop {
            let page = self.devices(&request)?;
            for device in page.items {
                visited += 1;
                if visit(device).is_break() {
                    return Ok(visited);
                }
            }
            match page.continuation {
                Some(token) => request.continuation = Some(token),
                None => return Ok(visited),
            }
        }
    }

    /// Number of stored device identities.
    ///
    /// # Errors
    /// Backend failures.
    pub fn device_count(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let n: i64 = c
                .query_row("SELECT count(*) FROM devices WHERE hub = ?1", [&*self.hub], |r| r.get(0))
                .db()?;
            Ok(u64::try_from(n).unwrap_or_default())
        })
    }
}

impl SqliteStore {
    /// `put_module`, keeping the stored activity fields when `keep_activity`.
    fn put_module_with(
        &self,
        module: &Module,
        pre: &Precondition,
        keep_activity: bool,
    ) -> Result<(), StoreError> {
        let (device, id) = (module.device_id.as_str(), module.module_id.as_str());
        let etag = etag_column(module.etag.as_ref());
        let hub = &*self.hub;
        self.write(|tx| {
            if !device_exists(tx, hub, device)? {
                return Err(StoreError::NotFound);
            }
            let current = stored_etag(
                tx,
                "SELECT etag FROM modules WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                &[&device, &id, &hub],
            )?;
            check(pre, current.as_deref())?;
            let stored: Option<Module> = match (keep_activity, &current) {
                (true, Some(_)) => one_doc(
                    tx,
                    "SELECT doc FROM modules WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                    &[&device, &id, &hub],
                )?,
                _ => None,
            };
            let doc = match stored {
                Some(stored) => {
                    let mut module = module.clone();
                    keep_module_activity(&mut module, &stored);
                    to_doc(&module)?
                }
                None => to_doc(module)?,
            };
            tx.prepare_cached(
                "INSERT INTO modules (device_id, module_id, etag, doc, hub) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (hub, device_id, module_id) DO UPDATE SET etag = excluded.etag, doc = excluded.doc",
            )
            .db()?
            .execute(params![device, id, etag, doc, hub])
            .db()?;
            Ok(())
        })
    }
}

fn device_exists(conn: &Connection, hub: &str, id: &str) -> Result<bool, StoreError> {
    Ok(stored_etag(conn, "SELECT etag FROM devices WHERE id = ?1 AND hub = ?2", &[&id, &hub])?.is_some())
}

impl IdentityStore for SqliteStore {
    /// A unit of this database is open on this thread when the thread holds its writer: every
    /// hub view of the database writes through that writer, in the unit.
    fn in_open_unit(&self) -> bool {
        self.inner.writer.is_owned_by_current_thread()
    }

    fn device(&self, id: &DeviceId) -> Result<Option<Device>, StoreError> {
        self.read_one(|c| {
            one_doc(c, "SELECT doc FROM devices WHERE id = ?1 AND hub = ?2", &[&id.as_str(), &&*self.hub])
        })
    }

    fn put_device(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        let id = device.device_id.as_str();
        let row = DeviceRow::of(device)?;
        let hub = &*self.hub;
        self.write(|tx| {
            let current =
                stored_etag(tx, "SELECT etag FROM devices WHERE id = ?1 AND hub = ?2", &[&id, &hub])?;
            check(pre, current.as_deref())?;
            row.upsert(tx, hub, id)
        })
    }

    /// The stored activity is read in the write transaction (one writer at a time), so no
    /// connection-state write lands between reading it and writing the update.
    fn put_device_keeping_activity(&self, device: &Device, pre: &Precondition) -> Result<(), StoreError> {
        let id = device.device_id.as_str();
        let hub = &*self.hub;
        self.write(|tx| {
            let current =
                stored_etag(tx, "SELECT etag FROM devices WHERE id = ?1 AND hub = ?2", &[&id, &hub])?;
            check(pre, current.as_deref())?;
            let stored: Option<Device> =
                one_doc(tx, "SELECT doc FROM devices WHERE id = ?1 AND hub = ?2", &[&id, &hub])?;
            let row = match stored {
                Some(stored) => {
                    let mut device = device.clone();
                    keep_device_activity(&mut device, &stored);
                    DeviceRow::of(&device)?
                }
                None => DeviceRow::of(device)?,
            };
            row.upsert(tx, hub, id)
        })
    }

    fn delete_device(&self, id: &DeviceId, pre: &Precondition) -> Result<(Device, Vec<Module>), StoreError> {
        let id = id.as_str();
        let hub = &*self.hub;
        self.write(|tx| {
            let current =
                stored_etag(tx, "SELECT etag FROM devices WHERE id = ?1 AND hub = ?2", &[&id, &hub])?;
            check(pre, Some(current.as_deref().ok_or(StoreError::NotFound)?))?;
            let device: Device =
                one_doc(tx, "SELECT doc FROM devices WHERE id = ?1 AND hub = ?2", &[&id, &hub])?
                    .ok_or(StoreError::NotFound)?;
            let modules = all_docs(
                tx,
                "SELECT doc FROM modules WHERE device_id = ?1 AND hub = ?2 ORDER BY module_id",
                &[&id, &hub],
            )?;
            tx.execute("DELETE FROM modules WHERE device_id = ?1 AND hub = ?2", [id, hub]).db()?;
            tx.execute("DELETE FROM devices WHERE id = ?1 AND hub = ?2", [id, hub]).db()?;
            Ok((device, modules))
        })
    }

    fn devices(&self, page: &PageRequest) -> Result<Page<Device>, StoreError> {
        self.read(|c| {
            page_by_key(
                c,
                "SELECT id, doc FROM devices WHERE hub = ?3 AND id > ?1 ORDER BY id LIMIT ?2",
                page,
                &[&&*self.hub],
            )
        })
    }

    fn count_devices(&self) -> Result<DeviceCounts, StoreError> {
        let disabled = codec::device_status_column(DeviceStatus::Disabled)?;
        self.read(|c| {
            let (total, disabled, connected): (i64, i64, i64) = c
                .query_row(
                    "SELECT count(*), coalesce(sum(status = ?1), 0), coalesce(sum(connected), 0) FROM devices
                     WHERE hub = ?2",
                    [&*disabled, &*self.hub],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .db()?;
            let n = |v: i64| u64::try_from(v).unwrap_or_default();
            Ok(DeviceCounts {
                total: n(total),
                enabled: n(total - disabled),
                disabled: n(disabled),
                connected: n(connected),
            })
        })
    }

    fn module(&self, device: &DeviceId, module: &ModuleId) -> Result<Option<Module>, StoreError> {
        self.read(|c| {
            one_doc(
                c,
                "SELECT doc FROM modules WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                &[&device.as_str(), &module.as_str(), &&*self.hub],
            )
        })
    }

    fn put_module(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.put_module_with(module, pre, false)
    }

    /// As [`IdentityStore::put_device_keeping_activity`] of this store.
    fn put_module_keeping_activity(&self, module: &Module, pre: &Precondition) -> Result<(), StoreError> {
        self.put_module_with(module, pre, true)
    }

    fn delete_module(
        &self,
        device: &DeviceId,
        module: &ModuleId,
        pre: &Precondition,
    ) -> Result<Module, StoreError> {
        let (device, id) = (device.as_str(), module.as_str());
        let hub = &*self.hub;
        self.write(|tx| {
            let current = stored_etag(
                tx,
                "SELECT etag FROM modules WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                &[&device, &id, &hub],
            )?;
            check(pre, Some(current.as_deref().ok_or(StoreError::NotFound)?))?;
            let module: Module = one_doc(
                tx,
                "SELECT doc FROM modules WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                &[&device, &id, &hub],
            )?
            .ok_or(StoreError::NotFound)?;
            tx.execute(
                "DELETE FROM modules WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                [device, id, hub],
            )
            .db()?;
            Ok(module)
        })
    }

    fn modules(&self, device: &DeviceId) -> Result<Vec<Module>, StoreError> {
        self.read(|c| {
            all_docs(
                c,
                "SELECT doc FROM modules WHERE device_id = ?1 AND hub = ?2 ORDER BY module_id",
                &[&device.as_str(), &&*self.hub],
            )
        })
    }
}

/// Writes a twin and its `twin_tags` rows (`fresh`: the twin did not exist, so has no rows).
fn upsert_twin(
    conn: &Connection,
    hub: &str,
    device: &str,
    module: &str,
    twin: &TwinDocument,
    doc: &str,
    fresh: bool,
) -> Result<(), StoreError> {
    let version =
        i64::try_from(twin.version()).map_err(|_| StoreError::Backend("twin version overflow".to_owned()))?;
    conn.prepare_cached(
        "INSERT INTO twins (device_id, module_id, version, doc, hub) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (hub, device_id, module_id) DO UPDATE SET version = excluded.version, doc = excluded.doc",
    )
    .db()?
    .execute(params![device, module, version, doc, hub])
    .db()?;
    if !fresh {
        conn.prepare_cached("DELETE FROM twin_tags WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3")
            .db()?
            .execute([device, module, hub])
            .db()?;
    }
    for (path, value) in codec::tag_rows(twin) {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO twin_tags (device_id, module_id, path, value, hub) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .db()?
        .execute([device, module, &path, &value, hub])
        .db()?;
    }
    Ok(())
}

/// The revision of the stored twin (its version as text), `None` when there is none.
fn stored_revision(
    conn: &Connection,
    hub: &str,
    device: &str,
    module: &str,
) -> Result<Option<String>, StoreError> {
    let version: Option<i64> = rusqlite::OptionalExtension::optional(
        conn.prepare_cached("SELECT version FROM twins WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3")
            .db()?
            .query_row([device, module, hub], |r| r.get(0)),
    )
    .db()?;
    Ok(version.map(|v| v.to_string()))
}

/// Twin continuation tokens name the last key: `deviceId` or `deviceId/moduleId`, as the
/// in-memory store writes them (`/` cannot occur in ids).
fn twin_token(key: &TwinKey) -> String {
    match &key.module_id {
        Some(m) => format!("{}/{}", key.device_id, m),
        None => key.device_id.to_string(),
    }
}

fn stored_twins(
    conn: &Connection,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<StoredTwin>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).db()?;
    let rows = stmt
        .query_map(args, |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
        .db()?;
    rows.map(|row| {
        let (device, module, doc) = row.db()?;
        Ok(StoredTwin { key: codec::twin_key(&device, &module)?, document: from_doc(&doc)? })
    })
    .collect()
}

impl TwinStore for SqliteStore {
    /// As the identity side: a unit is open on this thread when it holds the writer.
    fn in_open_unit(&self) -> bool {
        self.inner.writer.is_owned_by_current_thread()
    }

    fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError> {
        let module = codec::twin_module_column(key);
        self.read_one(|c| {
            one_doc(
                c,
                "SELECT doc FROM twins WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                &[&key.device_id.as_str(), &module, &&*self.hub],
            )
        })
    }

    fn put_twin(&self, key: &TwinKey, twin: &TwinDocument, pre: &Precondition) -> Result<(), StoreError> {
        let (device, module) = (key.device_id.as_str(), codec::twin_module_column(key));
        let doc = to_doc(twin)?;
        let hub = &*self.hub;
        self.write(|tx| {
            let current = stored_revision(tx, hub, device, module)?;
            check(pre, current.as_deref())?;
            upsert_twin(tx, hub, device, module, twin, &doc, current.is_none())
        })
    }

    fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError> {
        let (device, module) = (key.device_id.as_str(), codec::twin_module_column(key));
        let hub = &*self.hub;
        self.write(|tx| {
            let current = stored_revision(tx, hub, device, module)?;
            check(pre, Some(current.as_deref().ok_or(StoreError::NotFound)?))?;
            tx.execute(
                "DELETE FROM twins WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                [device, module, hub],
            )
            .db()?;
            tx.execute(
                "DELETE FROM twin_tags WHERE device_id = ?1 AND module_id = ?2 AND hub = ?3",
                [device, module, hub],
            )
            .db()?;
            Ok(())
        })
    }

    fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError> {
        let (after_device, after_module) = match page.continuation.as_deref() {
            None => (String::new(), String::new()),
            Some(token) => {
                let (d, m) = token.split_once('/').unwrap_or((token, ""));
                // Parsed so a foreign token fails like it does on the in-memory store.
                codec::twin_key(d, m)
                    .map_err(|_| StoreError::Backend(format!("bad continuation token {token:?}")))?;
                (d.to_owned(), m.to_owned())
            }
        };
        let limit = limit_plus_one(page.max_items);
        let max = page.max_items.max(1);
        self.read(|c| {
            let mut items = stored_twins(
                c,
                "SELECT device_id, module_id, doc FROM twins WHERE hub = ?4 AND (device_id, module_id) > (?1, ?2)
                 ORDER BY device_id, module_id LIMIT ?3",
                &[&after_device, &after_module, &limit, &&*self.hub],
            )?;
            let continuation = if items.len() > max {
                items.truncate(max);
                items.last().map(|t| twin_token(&t.key))
            } else {
                None
            };
            Ok(Page { items, continuation })
        })
    }

    fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError> {
        self.read(|c| {
            stored_twins(
                c,
                "SELECT device_id, module_id, doc FROM twins WHERE device_id = ?1 AND hub = ?2 ORDER BY module_id",
                &[&device_id.as_str(), &&*self.hub],
            )
        })
    }
}

fn job_record(version: i64, doc: &str) -> Result<JobRecord, StoreError> {
    let version =
        u64::try_from(version).map_err(|_| StoreError::Backend("negative job version".to_owned()))?;
    Ok(JobRecord { job: from_doc(doc)?, version })
}

impl JobStore for SqliteStore {
    fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        self.read(|c| {
            let row: Option<(i64, String)> = rusqlite::OptionalExtension::optional(
                c.prepare_cached("SELECT version, doc FROM jobs WHERE id = ?1 AND hub = ?2")
                    .db()?
                    .query_row([id.as_str(), &self.hub], |r| Ok((r.get(0)?, r.get(1)?))),
            )
            .db()?;
            row.map(|(v, doc)| job_record(v, &doc)).transpose()
        })
    }

    fn put_job(&self, record: &JobRecord, pre: &Precondition) -> Result<(), StoreError> {
        let id = record.job.job_id.as_str();
        let version = i64::try_from(record.version)
            .map_err(|_| StoreError::Backend("job version overflow".to_owned()))?;
        let job_type = codec::job_type_column(record.job.job_type)?;
        let status = codec::job_status_column(record.job.status)?;
        let purge = codec::job_purge_time(record);
        let doc = to_doc(&record.job)?;
        let hub = &*self.hub;
        self.write(|tx| {
            let current: Option<i64> = rusqlite::OptionalExtension::optional(
                tx.prepare_cached("SELECT version FROM jobs WHERE id = ?1 AND hub = ?2")
                    .db()?
                    .query_row([id, hub], |r| r.get(0)),
            )
            .db()?;
            check(pre, current.map(|v| v.to_string()).as_deref())?;
            tx.prepare_cached(
                "INSERT INTO jobs (id, version, job_type, status, purge_time, doc, hub)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (hub, id) DO UPDATE SET version = excluded.version, job_type = excluded.job_type,
                 status = excluded.status, purge_time = excluded.purge_time, doc = excluded.doc",
            )
            .db()?
            .execute(params![id, version, job_type, status, purge, doc, hub])
            .db()?;
            Ok(())
        })
    }

    fn jobs(&self, filter: &JobFilter, page: &PageRequest) -> Result<Page<JobResponse>, StoreError> {
        let after = match &page.continuation {
            None => String::new(),
            Some(token) => decode_token(token, 1)?.remove(0),
        };
        let job_type = filter.job_type.map(codec::job_type_column).transpose()?;
        let status = filter.status.map(codec::job_status_column).transpose()?;
        let request = PageRequest { continuation: Some(after), max_items: page.max_items };
        let mut out: Page<JobResponse> = self.read(|c| {
            page_by_key(
                c,
                "SELECT id, doc FROM jobs WHERE hub = ?5 AND id > ?1 AND (?3 IS NULL OR job_type = ?3)
                 AND (?4 IS NULL OR status = ?4) ORDER BY id LIMIT ?2",
                &request,
                &[&job_type, &status, &&*self.hub],
            )
        })?;
        out.continuation = out.continuation.map(|last| encode_token(&[&last]));
        Ok(out)
    }

    fn put_device_job(&self, record: &DeviceJob) -> Result<(), StoreError> {
        let doc = to_doc(record)?;
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO device_jobs (job_id, device_id, doc, hub) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (hub, job_id, device_id) DO UPDATE SET doc = excluded.doc",
            )
            .db()?
            .execute(params![record.job_id.as_str(), record.device_id, doc, &*self.hub])
            .db()?;
            Ok(())
        })
    }

    fn device_job(&self, job: &JobId, device_id: &str) -> Result<Option<DeviceJob>, StoreError> {
        self.read(|c| {
            one_doc(
                c,
                "SELECT doc FROM device_jobs WHERE job_id = ?1 AND device_id = ?2 AND hub = ?3",
                &[&job.as_str(), &device_id, &&*self.hub],
            )
        })
    }

    fn device_jobs(
        &self,
        filter: &DeviceJobFilter,
        page: &PageRequest,
    ) -> Result<Page<DeviceJob>, StoreError> {
        let (after_job, after_device) = match &page.continuation {
            None => (String::new(), String::new()),
            Some(token) => {
                let mut parts = decode_token(token, 2)?;
                let device = parts.pop().unwrap_or_default();
                (parts.pop().unwrap_or_default(), device)
            }
        };
        let job = filter.job_id.as_ref().map(|j| j.as_str().to_owned());
        let device = filter.device_id.clone();
        let limit = limit_plus_one(page.max_items);
        let max = page.max_items.max(1);
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT job_id, device_id, doc FROM device_jobs WHERE hub = ?6 AND (job_id, device_id) > (?1, ?2)
                     AND (?3 IS NULL OR job_id = ?3) AND (?4 IS NULL OR device_id = ?4)
                     ORDER BY job_id, device_id LIMIT ?5",
                )
                .db()?;
            let rows = stmt
                .query_map(params![after_job, after_device, job, device, limit, &*self.hub], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
                })
                .db()?;
            let mut items = Vec::new();
            let mut last = None;
            let mut more = false;
            for row in rows {
                let (j, d, doc) = row.db()?;
                if items.len() == max {
                    more = true;
                    break;
                }
                items.push(from_doc(&doc)?);
                last = Some((j, d));
            }
            let continuation = if more { last.map(|(j, d)| encode_token(&[&j, &d])) } else { None };
            Ok(Page { items, continuation })
        })
    }

    fn purge_jobs(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        let cutoff = codec::time_column(cutoff);
        let hub = &*self.hub;
        self.write(|tx| {
            tx.execute(
                "DELETE FROM device_jobs WHERE hub = ?2
                 AND job_id IN (SELECT id FROM jobs WHERE hub = ?2 AND purge_time < ?1)",
                params![cutoff, hub],
            )
            .db()?;
            tx.execute("DELETE FROM jobs WHERE hub = ?2 AND purge_time < ?1", params![cutoff, hub]).db()
        })
    }
}
