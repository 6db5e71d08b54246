//! A SQLite store opened read-only: it reads what writers committed (a stopped store, a copy, a
//! store a server is writing), refuses every write with an error that says why, never migrates,
//! and leaves the files as it found them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{EnrollmentGroupStore, PageRequest, Precondition, RegistrationStore};
use zerotouch_engine::StoreError;
use zerotouch_proto::hub::Device;
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup};
use zerotouch_proto::{DeviceId, EnrollmentGroupId, Timestamp};
use zerotouch_store::sqlite::{SqliteStore, SCHEMA_VERSION};

fn group(id: &str) -> EnrollmentGroup {
    EnrollmentGroup::new(EnrollmentGroupId::new(id).unwrap(), AttestationMechanism::symmetric_key())
}

fn group_ids(store: &SqliteStore) -> Vec<String> {
    let page = store.enrollment_groups(&PageRequest::default()).unwrap();
    page.items.iter().map(|g| g.enrollment_group_id.as_str().to_owned()).collect()
}

/// A database at `path` holding the group `line-1` and the device `pump-1` of hub
/// `north.localhost`, written by a store that has closed since (as a stopped server leaves it).
fn stopped_store(path: &Path) {
    let store = SqliteStore::open(path).unwrap();
    store.put_enrollment_group(&group("line-1"), &Precondition::MustNotExist).unwrap();
    let north = store.hub("north.localhost").unwrap();
    north.put_device(&Device::new(DeviceId::new("pump-1").unwrap()), &Precondition::MustNotExist).unwrap();
}

/// Asserts that `store` shows what [`stopped_store`] wrote: the group and the hub's device.
fn shows_the_stopped_store(store: &SqliteStore) {
    assert_eq!(group_ids(store), ["line-1"]);
    let north = store.hub("north.localhost").unwrap();
    assert!(north.device(&DeviceId::new("pump-1").unwrap()).unwrap().is_some());
}

/// Every file under `dir` with its size and modification time.
fn files(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            out.extend(files(&entry.path()));
        } else {
            out.insert(entry.path(), (meta.len(), meta.modified().unwrap()));
        }
    }
    out
}

fn backend_message(result: Result<impl std::fmt::Debug, StoreError>) -> String {
    match result {
        Err(StoreError::Backend(message)) => message,
        other => panic!("expected a backend error, got {other:?}"),
    }
}

/// The schema version in the file at `path`, read without creating a log beside it.
fn user_version(path: &Path) -> u32 {
    use rusqlite::OpenFlags;
    let uri = format!("file:{}?immutable=1", path.display());
    let conn = rusqlite::Connection::open_with_flags(
        uri,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .unwrap();
    conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
}

#[test]
fn a_read_only_store_reads_what_was_committed_and_refuses_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    stopped_store(&path);

    let store = SqliteStore::open_read_only(&path).unwrap();
    assert!(store.is_read_only());
    assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(group_ids(&store), ["line-1"]);
    assert_eq!(store.hub_names().unwrap(), ["north.localhost"]);
    let north = store.hub("north.localhost").unwrap();
    let pump = DeviceId::new("pump-1").unwrap();
    assert!(north.device(&pump).unwrap().is_some());
    // A hub view of a hub never recorded reads as empty, and opening it records nothing.
    let south = store.hub("south.localhost").unwrap();
    assert!(south.device(&pump).unwrap().is_none());
    assert_eq!(store.hub_names().unwrap(), ["north.localhost"]);

    let refusals = [
        backend_message(store.put_enrollment_group(&group("line-2"), &Precondition::None)),
        backend_message(
            store.delete_enrollment_group(&EnrollmentGroupId::new("line-1").unwrap(), &Precondition::None),
        ),
        backend_message(
            north.put_device(&Device::new(DeviceId::new("pump-2").unwrap()), &Precondition::None),
        ),
        backend_message(north.delete_device(&pump, &Precondition::None)),
        backend_message(store.purge_operations(Timestamp::from_unix_secs(2_000_000_000))),
        backend_message(store.checkpoint()),
        backend_message(store.import_hub_file(dir.path().join("other.sqlite"), "west.localhost")),
    ];
    for message in &refusals {
        assert!(message.contains("read-only"), "{message}");
        assert!(message.contains(&path.display().to_string()), "the error names the file: {message}");
    }
    let unit = store.atomically(&mut || Ok(())).unwrap_err().to_string();
    assert!(unit.contains("read-only"), "{unit}");
    assert!(!dir.path().join("other.sqlite").exists(), "the refused import opened its file");

    // Nothing changed.
    assert_eq!(group_ids(&store), ["line-1"]);
    assert!(north.device(&pump).unwrap().is_some());
}

#[test]
fn opening_a_stopped_store_read_only_changes_no_file() {
    let root = tempfile::tempdir().unwrap();
    // Characters a SQLite URI gives a meaning to, so the file opened is the one named.
    let dir = root.path().join("a b?c#d%e&f=g");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("zerotouch.sqlite");
    stopped_store(&path);
    let before = files(&dir);
    assert_eq!(before.len(), 1, "a closed store is one file: {before:?}");
    // Modification times of files written a moment ago could hide a write in the same tick.
    std::thread::sleep(Duration::from_millis(20));

    let store = SqliteStore::open_read_only(&path).unwrap();
    shows_the_stopped_store(&store);
    assert!(store.put_enrollment_group(&group("line-2"), &Precondition::None).is_err());
    drop(store);

    assert_eq!(files(&dir), before, "no -wal, no -shm, nothing written");
}

#[test]
fn a_store_of_an_older_schema_is_refused_not_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    stopped_store(&path);
    let older = SCHEMA_VERSION - 1;
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", older).unwrap();
    let before = files(dir.path());

    let message = backend_message(SqliteStore::open_read_only(&path));
    assert!(message.contains(&format!("schema version {older}")), "{message}");
    assert!(message.contains("older"), "{message}");
    assert!(message.contains("not migrate"), "{message}");
    assert!(message.contains("zerotouch serve"), "the error says how to migrate it: {message}");
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert_eq!(user_version(&path), older, "migrated anyway");
    assert_eq!(files(dir.path()), before);
}

#[test]
fn an_empty_file_is_refused_as_holding_no_zerotouch_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    std::fs::write(&path, b"").unwrap();
    let message = backend_message(SqliteStore::open_read_only(&path));
    assert!(message.contains("schema version 0"), "{message}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0, "the empty file was written");
    assert_eq!(files(dir.path()).len(), 1);
}

#[test]
fn a_store_of_a_newer_schema_is_refused_with_upgrade_advice() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    stopped_store(&path);
    let newer = SCHEMA_VERSION + 1;
    rusqlite::Connection::open(&path).unwrap().pragma_update(None, "user_version", newer).unwrap();
    let message = backend_message(SqliteStore::open_read_only(&path));
    assert!(message.contains(&format!("schema version {newer}")), "{message}");
    assert!(message.contains("newer") && message.contains("upgrade"), "{message}");
}

#[test]
fn a_missing_file_is_not_found_and_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    assert_eq!(SqliteStore::open_read_only(&path).unwrap_err(), StoreError::NotFound);
    assert_eq!(files(dir.path()).len(), 0);
}

#[test]
fn a_read_only_store_beside_a_writer_sees_its_commits_and_does_not_block_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    let writer = SqliteStore::open(&path).unwrap();
    writer.put_enrollment_group(&group("line-1"), &Precondition::MustNotExist).unwrap();

    let reader = SqliteStore::open_read_only(&path).unwrap();
    assert_eq!(group_ids(&reader), ["line-1"]);
    let asked = Instant::now();
    writer.put_enrollment_group(&group("line-2"), &Precondition::MustNotExist).unwrap();
    assert!(asked.elapsed() < Duration::from_secs(2), "the write waited: {:?}", asked.elapsed());
    assert_eq!(group_ids(&reader), ["line-1", "line-2"], "a read after a commit sees it");
    // Checkpoints go on too: the reader holds no snapshot between reads.
    writer.put_enrollment_group(&group("line-3"), &Precondition::MustNotExist).unwrap();
    writer.checkpoint().unwrap();
    assert_eq!(group_ids(&reader), ["line-1", "line-2", "line-3"]);
    drop(writer);
    // With the writer gone, what it committed stays readable.
    assert_eq!(group_ids(&reader), ["line-1", "line-2", "line-3"]);
}

#[cfg(unix)]
#[test]
fn a_store_opened_through_a_symbolic_link_sees_the_log_beside_the_real_file() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("volume");
    std::fs::create_dir(&real).unwrap();
    let path = real.join("zerotouch.sqlite");
    let writer = SqliteStore::open(&path).unwrap();
    writer.put_enrollment_group(&group("line-1"), &Precondition::MustNotExist).unwrap();
    // SQLite keeps the log beside the file the link points at, not beside the link.
    let link = dir.path().join("zerotouch.sqlite");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert!(real.join("zerotouch.sqlite-wal").exists());

    let reader = SqliteStore::open_read_only(&link).unwrap();
    assert_eq!(group_ids(&reader), ["line-1"], "a commit still in the log is seen");
    writer.put_enrollment_group(&group("line-2"), &Precondition::MustNotExist).unwrap();
    assert_eq!(group_ids(&reader), ["line-1", "line-2"]);
}

#[test]
fn a_stopped_store_changed_under_a_read_only_store_fails_its_reads_rather_than_mix_versions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    stopped_store(&path);
    let reader = SqliteStore::open_read_only(&path).unwrap();
    assert_eq!(group_ids(&reader), ["line-1"]);

    // A writer starts on the file, commits and moves its commit into the file.
    std::thread::sleep(Duration::from_millis(20));
    let writer = SqliteStore::open(&path).unwrap();
    writer.put_enrollment_group(&group("line-2"), &Precondition::MustNotExist).unwrap();
    writer.checkpoint().unwrap();

    let message = backend_message(reader.enrollment_groups(&PageRequest::default()));
    assert!(message.contains("changed") && message.contains("again"), "{message}");
    // Opened again, it reads the new state.
    assert_eq!(group_ids(&SqliteStore::open_read_only(&path).unwrap()), ["line-1", "line-2"]);
}

#[test]
fn a_rollback_journal_copy_is_read_with_locks_and_sees_later_writes() {
    // `VACUUM INTO` makes copies in rollback-journal mode.
    let dir = tempfile::tempdir().unwrap();
    let original = dir.path().join("zerotouch.sqlite");
    stopped_store(&original);
    let copy = dir.path().join("copy.sqlite");
    rusqlite::Connection::open(&original)
        .unwrap()
        .execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
        .unwrap();
    let before = files(dir.path());

    let reader = SqliteStore::open_read_only(&copy).unwrap();
    assert_eq!(group_ids(&reader), ["line-1"]);
    assert_eq!(files(dir.path()), before, "a reader of a rollback-journal database creates no file");
    // A writer of that file (which switches it to WAL mode) is seen, not reported as a change.
    let writer = SqliteStore::open(&copy).unwrap();
    writer.put_enrollment_group(&group("line-2"), &Precondition::MustNotExist).unwrap();
    assert_eq!(group_ids(&reader), ["line-1", "line-2"]);
}

/// `chattr +i` on paths, undone when dropped (also when a test fails). Tests run as root, for
/// whom permissions do not make a file read-only; an immutable file or directory is read-only
/// to root too.
struct Immutable(Vec<PathBuf>);

impl Immutable {
    /// Makes `paths` immutable, or says why that cannot be done here.
    fn set(paths: &[PathBuf]) -> Result<Self, String> {
        let mut done = Immutable(Vec::new());
        for path in paths {
            let out = std::process::Command::new("chattr")
                .arg("+i")
                .arg(path)
                .output()
                .map_err(|e| format!("chattr: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "chattr +i {}: {}",
                    path.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            done.0.push(path.clone());
        }
        // Root may write anything else: check the attribute holds.
        if paths.iter().any(|p| p.is_dir() && std::fs::write(p.join("probe"), b"").is_ok()) {
            return Err("an immutable directory still took a new file".into());
        }
        Ok(done)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = std::process::Command::new("chattr").arg("-i").arg(path).status();
        }
    }
}

/// Makes `dir` and the files in it immutable, or prints why the test is skipped.
fn immutable(dir: &Path) -> Option<Immutable> {
    let mut paths: Vec<PathBuf> = files(dir).into_keys().collect();
    paths.push(dir.to_owned());
    match Immutable::set(&paths) {
        Ok(guard) => Some(guard),
        Err(why) => {
            eprintln!("skipped: a read-only directory cannot be made here ({why})");
            None
        }
    }
}

#[test]
fn a_stopped_store_in_a_read_only_directory_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    stopped_store(&path);
    let Some(_guard) = immutable(dir.path()) else { return };
    let store = SqliteStore::open_read_only(&path).unwrap();
    shows_the_stopped_store(&store);
}

/// A copy of a store taken while a writer had it open: the database, its log and its index.
fn live_copy(root: &Path, with_index: bool) -> PathBuf {
    let live = root.join("live");
    std::fs::create_dir(&live).unwrap();
    let path = live.join("zerotouch.sqlite");
    stopped_store(&path);
    let writer = SqliteStore::open(&path).unwrap();
    writer.put_enrollment_group(&group("line-2"), &Precondition::MustNotExist).unwrap();
    let copy = root.join("copy");
    std::fs::create_dir(&copy).unwrap();
    let mut names = vec!["zerotouch.sqlite", "zerotouch.sqlite-wal"];
    if with_index {
        names.push("zerotouch.sqlite-shm");
    }
    for name in names {
        std::fs::copy(live.join(name), copy.join(name)).unwrap();
    }
    drop(writer);
    copy
}

#[test]
fn a_copy_with_its_log_in_a_read_only_directory_shows_the_logged_commits() {
    let root = tempfile::tempdir().unwrap();
    let copy = live_copy(root.path(), true);
    let Some(_guard) = immutable(&copy) else { return };
    let store = SqliteStore::open_read_only(copy.join("zerotouch.sqlite")).unwrap();
    assert_eq!(group_ids(&store), ["line-1", "line-2"], "the commit in the log is read");
}

#[test]
fn a_log_without_its_index_in_a_read_only_directory_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    let copy = live_copy(root.path(), false);
    let Some(_guard) = immutable(&copy) else { return };
    let message = backend_message(SqliteStore::open_read_only(copy.join("zerotouch.sqlite")));
    assert!(message.contains("zerotouch.sqlite-shm") && message.contains("writable"), "{message}");
}

#[test]
fn a_log_without_its_index_in_a_writable_directory_is_read() {
    let root = tempfile::tempdir().unwrap();
    let copy = live_copy(root.path(), false);
    let store = SqliteStore::open_read_only(copy.join("zerotouch.sqlite")).unwrap();
    assert_eq!(group_ids(&store), ["line-1", "line-2"], "the commit in the log is read");
}
