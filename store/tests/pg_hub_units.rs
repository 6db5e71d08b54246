//! Lifecycle events of hub writes made inside a PostgreSQL unit: a unit that is rolled back
//! takes the identity it created and the event with it; a committed one announces it once.
#![cfg(feature = "postgres")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod pg_support;

use std::sync::Arc;

use zerotouch_engine::crypto::RingCrypto;
use zerotouch_engine::hub::{DeviceAuth, HubAction, HubRegistry, ProvisionedDevice, TwinSetup};
use zerotouch_engine::hub_engine::EmbeddedHub;
use zerotouch_engine::registry::events::LifecycleOperation;
use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::RegistrationStore;
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::{DeviceId, Timestamp};
use zerotouch_store::postgres::PgStore;

use pg_support::TestDb;

const HUB: &str = "plant.example.net";

/// The embedded hub `HUB` over `store`'s hub view, its clock at a fixed time.
fn hub_over(store: &PgStore) -> EmbeddedHub<PgStore, PgStore, PgStore> {
    let mut hub = EmbeddedHub::over(HUB, store.hub(HUB).unwrap(), Arc::new(RingCrypto::new())).unwrap();
    hub.set_now(Timestamp::from_unix_secs(1_767_225_600));
    hub
}

#[test]
fn an_identity_created_in_a_rolled_back_postgres_unit_is_never_announced() {
    let db = TestDb::new();
    let store = db.store();
    let mut hub = hub_over(&store);
    let lathe = DeviceId::new("lathe-1").unwrap();
    let provision = HubAction::Provision {
        hub: HUB.into(),
        device: ProvisionedDevice {
            device_id: lathe.clone(),
            auth: DeviceAuth::CertificateAuthority,
            iot_edge: false,
        },
        twin: TwinSetup::KeepOrInitial(Default::default()),
    };

    hub.begin_unit();
    let result = store.atomically(&mut || {
        hub.apply(&provision).map_err(|e| Error::BadRequest(e.message))?;
        Err(Error::Store(StoreError::Backend("the unit fails after the hub wrote".into())))
    });
    hub.end_unit(result.is_ok());
    assert!(result.is_err());
    assert!(hub.core().registry().store().device(&lathe).unwrap().is_none());
    assert!(hub.take_lifecycle_events().is_empty());

    hub.begin_unit();
    let result = store.atomically(&mut || hub.apply(&provision).map_err(|e| Error::BadRequest(e.message)));
    hub.end_unit(result.is_ok());
    assert!(result.is_ok());
    assert!(hub.core().registry().store().device(&lathe).unwrap().is_some());
    let events = hub.take_lifecycle_events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].op_type, LifecycleOperation::CreateDeviceIdentity);
}

#[test]
fn a_twin_reset_rolled_back_with_its_postgres_unit_pushes_nothing() {
    let db = TestDb::new();
    let store = db.store();
    let mut hub = hub_over(&store);
    let provision =
        |mode: &str, reset: bool| zerotouch_testkit::hubs::provision_desiring(HUB, "lathe-2", mode, reset);
    hub.apply(&provision("a", false)).unwrap();
    assert!(hub.take_twin_events().is_empty());

    let reset = provision("b", true);
    hub.begin_unit();
    let result = store.atomically(&mut || {
        hub.apply(&reset).map_err(|e| Error::BadRequest(e.message))?;
        Err(Error::Store(StoreError::Backend("the unit fails after the hub wrote".into())))
    });
    hub.end_unit(result.is_ok());
    assert!(result.is_err());
    let twin = hub.device_twin(&DeviceId::new("lathe-2").unwrap()).unwrap();
    assert_eq!(twin["properties"]["desired"]["mode"], "a", "the rollback undid the reset");
    assert!(hub.take_twin_events().is_empty(), "no push of a reset that did not happen");

    hub.begin_unit();
    let result = store.atomically(&mut || hub.apply(&reset).map_err(|e| Error::BadRequest(e.message)));
    hub.end_unit(result.is_ok());
    assert!(result.is_ok());
    assert!(!hub.take_twin_events().is_empty());
}
