//! Provisioning stores on SQLite: enrollments, groups, CA certificates, registrations, operations.

use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, ToSql};
use serde::de::DeserializeOwned;
use zerotouch_engine::store::{
    CaCertificate, CaCertificateStore, EnrollmentGroupStore, EnrollmentStore, OperationRecord, Page,
    PageRequest, Precondition, RegistrationRecord, RegistrationStore,
};
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::service::{EnrollmentGroup, IndividualEnrollment};
use zerotouch_proto::{EnrollmentGroupId, OperationId, RegistrationId, Timestamp};

use super::{limit_plus_one, Db, SqliteStore};
use crate::codec::{self, check, etag_column, from_doc, shared, to_doc};

/// The etag column of the row `sql` selects (one `?1` parameter), `None` when there is no row.
pub(super) fn stored_etag(
    conn: &Connection,
    sql: &str,
    key: &[&dyn ToSql],
) -> Result<Option<String>, StoreError> {
    conn.prepare_cached(sql).db()?.query_row(key, |r| r.get::<_, String>(0)).optional().db()
}

/// The document of the row `sql` selects, if any.
pub(super) fn one_doc<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    key: &[&dyn ToSql],
) -> Result<Option<T>, StoreError> {
    let text: Option<String> = conn.prepare_cached(sql).db()?.query_row(key, |r| r.get(0)).optional().db()?;
    text.as_deref().map(from_doc).transpose()
}

/// Every document `sql` selects, in its order.
pub(super) fn all_docs<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    args: &[&dyn ToSql],
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).db()?;
    let rows = stmt.query_map(args, |r| r.get::<_, String>(0)).db()?;
    rows.map(|text| from_doc(&text.db()?)).collect()
}

/// One page of a key-ordered table. `sql` selects `(key, doc)` with `?1` = the key after which
/// to start, `?2` = the row limit, and `extra` bound from `?3` on; the token is the last key.
pub(super) fn page_by_key<T: DeserializeOwned>(
    conn: &Connection,
    sql: &str,
    page: &PageRequest,
    extra: &[&dyn ToSql],
) -> Result<Page<T>, StoreError> {
    let after = page.continuation.as_deref().unwrap_or("");
    let limit = limit_plus_one(page.max_items);
    let mut args: Vec<&dyn ToSql> = vec![&after, &limit];
    args.extend_from_slice(extra);
    let mut stmt = conn.prepare_cached(sql).db()?;
    let rows =
        stmt.query_map(args.as_slice(), |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))).db()?;
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for row in rows {
        let (key, doc) = row.db()?;
        if items.len() == page.max_items.max(1) {
            more = true;
            break;
        }
        items.push(from_doc(&doc)?);
        last = Some(key);
    }
    Ok(Page { items, continuation: if more { last } else { None } })
}

impl EnrollmentStore for SqliteStore {
    /// Reads the enrollment-group change counter in the same statement (one snapshot, one read
    /// transaction instead of two), for the [`EnrollmentGroupStore::symmetric_key_groups`] call
    /// that a symmetric-key authentication makes right after looking up the individual
    /// enrollment.
    fn enrollment(&self, id: &RegistrationId) -> Result<Option<IndividualEnrollment>, StoreError> {
        let (doc, groups_version) = self.read_on(false, |c, in_unit| {
            let (doc, version): (Option<String>, i64) = c
                .prepare_cached(
                    "SELECT (SELECT doc FROM enrollments WHERE key = ?1),
                            (SELECT value FROM change_counters WHERE name = 'enrollment_groups')",
                )
                .db()?
                .query_row([id.key()], |r| Ok((r.get(0)?, r.get(1)?)))
                .db()?;
            Ok((doc, (!in_unit).then_some(version)))
        })?;
        if let Some(version) = groups_version {
            self.saw_groups_version(version);
        }
        doc.as_deref().map(from_doc).transpose()
    }

    fn put_enrollment(
        &self,
        enrollment: &IndividualEnrollment,
        pre: &Precondition,
    ) -> Result<(), StoreError> {
        let key = enrollment.registration_id.key();
        let doc = to_doc(enrollment)?;
        let etag = etag_column(enrollment.etag.as_ref());
        self.write(|tx| {
            check(pre, stored_etag(tx, "SELECT etag FROM enrollments WHERE key = ?1", &[&key])?.as_deref())?;
            tx.prepare_cached(
                "INSERT INTO enrollments (key, etag, doc) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, doc = excluded.doc",
            )
            .db()?
            .execute(params![key, etag, doc])
            .db()?;
            Ok(())
        })
    }

    fn delete_enrollment(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        let key = id.key();
        self.write(|tx| {
            let current = stored_etag(tx, "SELECT etag FROM enrollments WHERE key = ?1", &[&key])?;
            check(pre, Some(current.as_deref().ok_or(StoreError::NotFound)?))?;
            tx.execute("DELETE FROM enrollments WHERE key = ?1", [&key]).db()?;
            Ok(())
        })
    }

    fn enrollments(&self, page: &PageRequest) -> Result<Page<IndividualEnrollment>, StoreError> {
        self.read(|c| {
            page_by_key(c, "SELECT key, doc FROM enrollments WHERE key > ?1 ORDER BY key LIMIT ?2", page, &[])
        })
    }
}

impl EnrollmentGroupStore for SqliteStore {
    fn enrollment_group(&self, id: &EnrollmentGroupId) -> Result<Option<EnrollmentGroup>, StoreError> {
        self.read_one(|c| one_doc(c, "SELECT doc FROM enrollment_groups WHERE key = ?1", &[&id.key()]))
    }

    fn put_enrollment_group(&self, group: &EnrollmentGroup, pre: &Precondition) -> Result<(), StoreError> {
        let key = group.enrollment_group_id.key();
        let doc = to_doc(group)?;
        let etag = etag_column(group.etag.as_ref());
        let symmetric = codec::is_symmetric_group(group);
        let subjects = codec::signing_subjects(group);
        let refs = codec::ca_references(group);
        self.write(|tx| {
            check(
                pre,
                stored_etag(tx, "SELECT etag FROM enrollment_groups WHERE key = ?1", &[&key])?.as_deref(),
            )?;
            tx.prepare_cached(
                "INSERT INTO enrollment_groups (key, etag, symmetric, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, symmetric = excluded.symmetric,
                 doc = excluded.doc",
            )
            .db()?
            .execute(params![key, etag, symmetric, doc])
            .db()?;
            tx.execute("DELETE FROM group_subjects WHERE group_key = ?1", [&key]).db()?;
            tx.execute("DELETE FROM group_ca_refs WHERE group_key = ?1", [&key]).db()?;
            for subject in &subjects {
                tx.prepare_cached("INSERT INTO group_subjects (subject, group_key) VALUES (?1, ?2)")
                    .db()?
                    .execute([subject, &key])
                    .db()?;
            }
            for name in &refs {
                tx.prepare_cached("INSERT INTO group_ca_refs (ca_name, group_key) VALUES (?1, ?2)")
                    .db()?
                    .execute([name, &key])
                    .db()?;
            }
            Ok(())
        })
    }

    fn delete_enrollment_group(&self, id: &EnrollmentGroupId, pre: &Precondition) -> Result<(), StoreError> {
        let key = id.key();
        self.write(|tx| {
            let current = stored_etag(tx, "SELECT etag FROM enrollment_groups WHERE key = ?1", &[&key])?;
            check(pre, Some(current.as_deref().ok_or(StoreError::NotFound)?))?;
            // The subject and reference rows go with it (ON DELETE CASCADE).
            tx.execute("DELETE FROM enrollment_groups WHERE key = ?1", [&key]).db()?;
            Ok(())
        })
    }

    fn enrollment_groups(&self, page: &PageRequest) -> Result<Page<EnrollmentGroup>, StoreError> {
        self.read(|c| {
            page_by_key(
                c,
                "SELECT key, doc FROM enrollment_groups WHERE key > ?1 ORDER BY key LIMIT ?2",
                page,
                &[],
            )
        })
    }

    /// Every authentication of a symmetric-key device reads these: decoded once per change of
    /// the groups (by any process), checked against the change counter on every call.
    ///
    /// The counter comes from the individual-enrollment lookup made just before on this thread
    /// when there was one (see [`EnrollmentStore::enrollment`]), else from its own read.
    fn symmetric_key_groups(&self) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        let cache = &self.inner.symmetric_groups;
        if let Some(version) = self.take_groups_version() {
            if let Some((cached, groups)) = cache.lock().as_ref() {
                if *cached == version {
                    return Ok(groups.to_vec());
                }
            }
        }
        self.read_tracked(|c, in_unit| {
            let version: i64 = c
                .prepare_cached("SELECT value FROM change_counters WHERE name = 'enrollment_groups'")
                .db()?
                .query_row([], |r| r.get(0))
                .db()?;
            if !in_unit {
                if let Some((cached, groups)) = cache.lock().as_ref() {
                    if *cached == version {
                        return Ok(groups.to_vec());
                    }
                }
            }
            let groups = shared(all_docs(
                c,
                "SELECT doc FROM enrollment_groups WHERE symmetric = 1 ORDER BY key",
                &[],
            )?);
            if !in_unit {
                *cache.lock() = Some((version, Arc::from(groups.as_slice())));
            }
            Ok(groups)
        })
    }

    fn groups_by_ca_subject(&self, subject_name: &str) -> Result<Vec<Arc<EnrollmentGroup>>, StoreError> {
        self.read(|c| {
            all_docs(
                c,
                "SELECT doc FROM enrollment_groups WHERE key IN (
                     SELECT group_key FROM group_subjects WHERE subject = ?1
                     UNION
                     SELECT r.group_key FROM group_ca_refs r JOIN ca_certificates ca ON ca.name = r.ca_name
                     WHERE ca.subject = ?1
                 ) ORDER BY key",
                &[&subject_name],
            )
        })
        .map(shared)
    }
}

impl CaCertificateStore for SqliteStore {
    fn ca_certificate(&self, name: &str) -> Result<Option<CaCertificate>, StoreError> {
        self.read_one(|c| one_doc(c, "SELECT doc FROM ca_certificates WHERE name = ?1", &[&name]))
    }

    fn put_ca_certificate(&self, cert: &CaCertificate, pre: &Precondition) -> Result<(), StoreError> {
        let doc = to_doc(cert)?;
        let etag = etag_column(Some(&cert.etag));
        self.write(|tx| {
            check(
                pre,
                stored_etag(tx, "SELECT etag FROM ca_certificates WHERE name = ?1", &[&cert.name])?
                    .as_deref(),
            )?;
            tx.prepare_cached(
                "INSERT INTO ca_certificates (name, etag, subject, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET etag = excluded.etag, subject = excluded.subject,
                 doc = excluded.doc",
            )
            .db()?
            .execute(params![cert.name, etag, cert.subject_name, doc])
            .db()?;
            Ok(())
        })
    }

    fn delete_ca_certificate(&self, name: &str, pre: &Precondition) -> Result<(), StoreError> {
        self.write(|tx| {
            let current = stored_etag(tx, "SELECT etag FROM ca_certificates WHERE name = ?1", &[&name])?;
            check(pre, Some(current.as_deref().ok_or(StoreError::NotFound)?))?;
            tx.execute("DELETE FROM ca_certificates WHERE name = ?1", [name]).db()?;
            Ok(())
        })
    }
}

fn insert_operation(conn: &Connection, operation: &OperationRecord) -> Result<(), StoreError> {
    let doc = to_doc(operation)?;
    conn.prepare_cached(
        "INSERT INTO operations (id, created, doc) VALUES (?1, ?2, ?3)
         ON CONFLICT (id) DO UPDATE SET created = excluded.created, doc = excluded.doc",
    )
    .db()?
    .execute(params![operation.operation_id.as_str(), codec::time_column(operation.created), doc])
    .db()?;
    Ok(())
}

impl RegistrationStore for SqliteStore {
    fn registration(&self, id: &RegistrationId) -> Result<Option<RegistrationRecord>, StoreError> {
        self.read_one(|c| one_doc(c, "SELECT doc FROM registrations WHERE key = ?1", &[&id.key()]))
    }

    fn commit_registration(
        &self,
        record: Arc<RegistrationRecord>,
        pre: &Precondition,
        operation: OperationRecord,
    ) -> Result<(), StoreError> {
        let key = record.registration_id.key();
        let doc = to_doc(&*record)?;
        let etag = etag_column(record.etag().as_ref());
        let group = codec::registration_group(&record);
        self.write(|tx| {
            check(
                pre,
                stored_etag(tx, "SELECT etag FROM registrations WHERE key = ?1", &[&key])?.as_deref(),
            )?;
            tx.prepare_cached(
                "INSERT INTO registrations (key, etag, group_key, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET etag = excluded.etag, group_key = excluded.group_key,
                 doc = excluded.doc",
            )
            .db()?
            .execute(params![key, etag, group, doc])
            .db()?;
            insert_operation(tx, &operation)?;
            self.stage_operation(operation);
            Ok(())
        })
    }

    fn delete_registration(&self, id: &RegistrationId, pre: &Precondition) -> Result<(), StoreError> {
        let key = id.key();
        self.write(|tx| {
            let current = stored_etag(tx, "SELECT etag FROM registrations WHERE key = ?1", &[&key])?;
            check(pre, Some(current.as_deref().ok_or(StoreError::NotFound)?))?;
            tx.execute("DELETE FROM registrations WHERE key = ?1", [&key]).db()?;
            Ok(())
        })
    }

    fn registrations_by_group(
        &self,
        group: &EnrollmentGroupId,
        page: &PageRequest,
    ) -> Result<Page<RegistrationRecord>, StoreError> {
        let group = group.key();
        self.read(|c| {
            page_by_key(
                c,
                "SELECT key, doc FROM registrations WHERE group_key = ?3 AND key > ?1 ORDER BY key LIMIT ?2",
                page,
                &[&group],
            )
        })
    }

    fn put_operation(&self, operation: &OperationRecord) -> Result<(), StoreError> {
        self.write(|tx| {
            insert_operation(tx, operation)?;
            self.stage_operation(operation.clone());
            Ok(())
        })
    }

    /// Operations this process committed lately come from memory (outside a unit of this
    /// thread, whose own writes are not committed yet).
    fn operation(&self, id: &OperationId) -> Result<Option<OperationRecord>, StoreError> {
        if !self.inner.writer.is_owned_by_current_thread() {
            if let Some(op) = self.cached_operation(id.as_str()) {
                return Ok(Some((*op).clone()));
            }
        }
        self.read_one(|c| one_doc(c, "SELECT doc FROM operations WHERE id = ?1", &[&id.as_str()]))
    }

    /// The operations this process committed lately (not inside a unit of this thread, as
    /// [`RegistrationStore::operation`]).
    fn operation_in_memory(&self, id: &OperationId) -> Option<OperationRecord> {
        if self.inner.writer.is_owned_by_current_thread() {
            return None;
        }
        self.cached_operation(id.as_str()).map(|op| (*op).clone())
    }

    fn purge_operations(&self, cutoff: Timestamp) -> Result<usize, StoreError> {
        self.write(|tx| {
            self.forget_operations(cutoff);
            tx.execute("DELETE FROM operations WHERE created < ?1", [codec::time_column(cutoff)]).db()
        })
    }
    /// One unit of the writer (see [`SqliteStore`]): the hub stores of every
    /// [`SqliteStore::hub`] view of this database write into it too.
    fn atomically(&self, unit: &mut dyn FnMut() -> Result<(), Error>) -> Result<(), Error> {
        self.unit(|_| unit())
    }
}
