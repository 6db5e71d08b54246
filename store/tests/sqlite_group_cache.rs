//! The symmetric-key groups every authentication reads are kept decoded between changes: a
//! change made through another handle of the same file (another process, the CLI beside a
//! running server) is seen at once, and a change that rolls back never is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use zerotouch_engine::store::{EnrollmentGroupStore, EnrollmentStore, Precondition, RegistrationStore};
use zerotouch_engine::Error;
use zerotouch_proto::service::{AttestationMechanism, EnrollmentGroup, SymmetricKeyAttestation};
use zerotouch_proto::{EnrollmentGroupId, RegistrationId};
use zerotouch_store::sqlite::SqliteStore;

fn group(id: &str, key: &str) -> EnrollmentGroup {
    let mut attestation = AttestationMechanism::symmetric_key();
    attestation.symmetric_key = Some(SymmetricKeyAttestation {
        primary_key: Some(key.to_owned()),
        secondary_key: Some(key.to_owned()),
    });
    EnrollmentGroup::new(EnrollmentGroupId::new(id).unwrap(), attestation)
}

/// (group id, primary key) of every symmetric-key group, as the provisioner sees them.
fn seen(store: &SqliteStore) -> Vec<(String, String)> {
    store
        .symmetric_key_groups()
        .unwrap()
        .iter()
        .map(|g| {
            let key = g.attestation.symmetric_key.as_ref().and_then(|k| k.primary_key.clone()).unwrap();
            (g.enrollment_group_id.as_str().to_owned(), key)
        })
        .collect()
}

/// Two handles on one database file, as a running server and an admin command have them (the
/// directory lives as long as the returned guard).
fn server_and_cli() -> (tempfile::TempDir, SqliteStore, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zerotouch.sqlite");
    let server = SqliteStore::open(&path).unwrap();
    let cli = SqliteStore::open(&path).unwrap();
    (dir, server, cli)
}

fn pair(id: &str, key: &str) -> (String, String) {
    (id.to_owned(), key.to_owned())
}

#[test]
fn a_group_changed_through_another_handle_of_the_file_is_seen_by_the_next_authentication() {
    let (_dir, server, cli) = server_and_cli();

    cli.put_enrollment_group(&group("g1", "a2V5LW9uZQ=="), &Precondition::None).unwrap();
    assert_eq!(seen(&server), [pair("g1", "a2V5LW9uZQ==")]);
    assert_eq!(seen(&server), [pair("g1", "a2V5LW9uZQ==")], "read again, unchanged");

    cli.put_enrollment_group(&group("g1", "a2V5LXR3bw=="), &Precondition::None).unwrap();
    assert_eq!(seen(&server), [pair("g1", "a2V5LXR3bw==")], "an updated key is seen");

    cli.put_enrollment_group(&group("g2", "a2V5LXRocmVl"), &Precondition::None).unwrap();
    assert_eq!(seen(&server), [pair("g1", "a2V5LXR3bw=="), pair("g2", "a2V5LXRocmVl")]);

    cli.delete_enrollment_group(&EnrollmentGroupId::new("g1").unwrap(), &Precondition::None).unwrap();
    assert_eq!(seen(&server), [pair("g2", "a2V5LXRocmVl")], "a deleted group is gone");
}

#[test]
fn a_group_change_that_rolls_back_is_never_seen() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("zerotouch.sqlite")).unwrap();
    store.put_enrollment_group(&group("g1", "a2V5LW9uZQ=="), &Precondition::None).unwrap();
    assert_eq!(seen(&store), [pair("g1", "a2V5LW9uZQ==")]);

    let roll_back = |key: &str| {
        let result = store.atomically(&mut || {
            store.put_enrollment_group(&group("g1", key), &Precondition::None)?;
            // Inside the unit its own write is visible...
            assert_eq!(seen(&store), [pair("g1", key)]);
            Err(Error::BadRequest("give up".into()))
        });
        assert!(result.is_err());
    };
    roll_back("cm9sbGVkLWJhY2s=");
    // ...and after the rollback it is not.
    assert_eq!(seen(&store), [pair("g1", "a2V5LW9uZQ==")]);

    // A committed change right after a rolled-back one brings the change counter to the value
    // the rolled-back unit had seen: what that unit read must not be what is found now.
    roll_back("cm9sbGVkLWJhY2s=");
    store.put_enrollment_group(&group("g1", "a2V5LXR3bw=="), &Precondition::None).unwrap();
    assert_eq!(seen(&store), [pair("g1", "a2V5LXR3bw==")], "the committed change is seen");
}

#[test]
fn a_group_changed_between_two_authentications_is_seen_by_the_second() {
    let (_dir, server, cli) = server_and_cli();
    let device = RegistrationId::new("meter-1").unwrap();
    cli.put_enrollment_group(&group("g1", "a2V5LW9uZQ=="), &Precondition::None).unwrap();

    // An authentication looks the individual enrollment up, then reads the groups: the
    // lookup reads the groups' change counter too, and the groups read uses it.
    assert!(server.enrollment(&device).unwrap().is_none());
    assert_eq!(seen(&server), [pair("g1", "a2V5LW9uZQ==")]);

    cli.put_enrollment_group(&group("g1", "a2V5LXR3bw=="), &Precondition::None).unwrap();
    assert!(server.enrollment(&device).unwrap().is_none());
    assert_eq!(seen(&server), [pair("g1", "a2V5LXR3bw==")], "the next authentication sees the new key");

    // A deletion made through the other handle right after a lookup of its own is seen too.
    assert!(cli.enrollment(&device).unwrap().is_none());
    cli.delete_enrollment_group(&EnrollmentGroupId::new("g1").unwrap(), &Precondition::None).unwrap();
    assert!(server.enrollment(&device).unwrap().is_none());
    assert_eq!(seen(&server), [], "a deleted group is gone");
}
