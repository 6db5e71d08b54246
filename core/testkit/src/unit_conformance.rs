//! Atomic-unit conformance: what a store that implements [`RegistrationStore::atomically`] over
//! one database (registrations, identities and twins together) must do.
//!
//! The in-memory store keeps the trait's default (the unit runs directly, there is nothing a
//! crash could half-write), so only durable backends run this suite.

use std::sync::Arc;

use zerotouch_engine::registry::IdentityStore;
use zerotouch_engine::store::{Precondition, RegistrationStore};
use zerotouch_engine::twin::{TwinKey, TwinStore};
use zerotouch_engine::{Error, StoreError};
use zerotouch_proto::{DeviceId, RegistrationId};

use crate::conformance::{operation, record};
use crate::hub_conformance::{device, twin};

/// What one case returns: `Err` says what went wrong.
type Outcome = Result<(), String>;

/// Units over a registration store `P` and the identity and twin stores `I`, `T` of one hub
/// sharing its database: a failed unit leaves none of its writes, a good one leaves all, reads
/// inside a unit see its writes, and 8 threads running units at once (which a backend may
/// commit together) keep exactly the units that succeeded.
///
/// # Panics
/// On the first case the stores fail, naming the case.
pub fn atomic_units<P, I, T>(make: impl Fn() -> (P, I, T))
where
    P: RegistrationStore,
    I: IdentityStore,
    T: TwinStore,
{
    run("units: a unit keeps all its writes and reads them back inside", &make, unit_commits);
    run("units: a failing unit leaves none of its writes", &make, unit_rolls_back);
    run("units: a refused precondition inside a unit undoes the unit", &make, unit_precondition);
    run("units: 8 threads of units keep exactly the units that succeeded", &make, concurrent_units);
}

fn run<S>(name: &str, make: &impl Fn() -> S, case: impl FnOnce(&S) -> Outcome) {
    let stores = make();
    if let Err(why) = case(&stores) {
        panic!("store conformance case `{name}` failed: {why}");
    }
}

fn id(s: &str) -> Result<(DeviceId, RegistrationId), String> {
    let d = DeviceId::new(s).map_err(|e| format!("bad sample device id {s:?}: {e}"))?;
    let r = RegistrationId::new(s).map_err(|e| format!("bad sample registration id {s:?}: {e}"))?;
    Ok((d, r))
}

/// The writes of one provisioning: identity, twin, then the record with its operation.
fn provision<P: RegistrationStore, I: IdentityStore, T: TwinStore>(
    (p, i, t): &(P, I, T),
    name: &str,
    op: &str,
) -> Result<(), Error> {
    let sample = |e: String| Error::BadRequest(e);
    let (device_id, _) = id(name).map_err(sample)?;
    i.put_device(&device(name, "e1", 1).map_err(sample)?, &Precondition::MustNotExist)?;
    t.put_twin(&TwinKey::device(device_id), &twin(0).map_err(sample)?, &Precondition::MustNotExist)?;
    let operation = operation(op, name, crate_time()).map_err(sample)?;
    p.commit_registration(
        Arc::new(record(name, None, "r1", 0).map_err(sample)?),
        &Precondition::MustNotExist,
        operation.clone(),
    )?;
    Ok(())
}

fn crate_time() -> zerotouch_proto::Timestamp {
    zerotouch_proto::Timestamp::from_unix_nanos(1_700_000_000_000_000_000)
}

/// Whether the identity, twin and record of `name` are stored: all three or none, else `Err`.
fn stored<P: RegistrationStore, I: IdentityStore, T: TwinStore>(
    (p, i, t): &(P, I, T),
    name: &str,
) -> Result<bool, String> {
    let (device_id, registration_id) = id(name)?;
    let d = i.device(&device_id).map_err(|e| format!("read device {name}: {e:?}"))?.is_some();
    let tw = t.twin(&TwinKey::device(device_id)).map_err(|e| format!("read twin {name}: {e:?}"))?.is_some();
    let r = p.registration(&registration_id).map_err(|e| format!("read record {name}: {e:?}"))?.is_some();
    if d == tw && tw == r {
        Ok(d)
    } else {
        Err(format!("{name} is half-written: device {d}, twin {tw}, record {r}"))
    }
}

fn unit_commits<P: RegistrationStore, I: IdentityStore, T: TwinStore>(stores: &(P, I, T)) -> Outcome {
    let mut seen_inside = None;
    stores
        .0
        .atomically(&mut || {
            provision(stores, "unit-good", "op-good")?;
            seen_inside = Some(stored(stores, "unit-good").map_err(Error::BadRequest)?);
            Ok(())
        })
        .map_err(|e| format!("a good unit failed: {e:?}"))?;
    if seen_inside != Some(true) {
        return Err(format!("reads inside the unit did not see its writes: {seen_inside:?}"));
    }
    if !stored(stores, "unit-good")? {
        return Err("a committed unit's writes are missing".to_owned());
    }
    Ok(())
}

fn unit_rolls_back<P: RegistrationStore, I: IdentityStore, T: TwinStore>(stores: &(P, I, T)) -> Outcome {
    let result = stores.0.atomically(&mut || {
        provision(stores, "unit-bad", "op-bad")?;
        Err(Error::Hub { code: 409_001, message: "refused after the writes".to_owned() })
    });
    match result {
        Err(Error::Hub { code: 409_001, .. }) => {}
        other => return Err(format!("expected the unit's own error back, got {other:?}")),
    }
    if stored(stores, "unit-bad")? {
        return Err("a failed unit's writes were kept".to_owned());
    }
    Ok(())
}

fn unit_precondition<P: RegistrationStore, I: IdentityStore, T: TwinStore>(stores: &(P, I, T)) -> Outcome {
    stores.0.atomically(&mut || provision(stores, "unit-first", "op-first")).map_err(|e| format!("{e:?}"))?;
    // The second unit writes a fresh device, then its record write is refused (the record exists).
    let result = stores.0.atomically(&mut || {
        let (device_id, _) = id("unit-second").map_err(Error::BadRequest)?;
        let d = device("unit-second", "e1", 1).map_err(Error::BadRequest)?;
        stores.1.put_device(&d, &Precondition::MustNotExist)?;
        let t = twin(0).map_err(Error::BadRequest)?;
        stores.2.put_twin(&TwinKey::device(device_id), &t, &Precondition::MustNotExist)?;
        let op = operation("op-second", "unit-first", crate_time()).map_err(Error::BadRequest)?;
        let r = record("unit-first", None, "r2", 1).map_err(Error::BadRequest)?;
        stores.0.commit_registration(Arc::new(r.clone()), &Precondition::MustNotExist, op.clone())?;
        Ok(())
    });
    match result {
        Err(Error::Store(StoreError::AlreadyExists)) => {}
        other => return Err(format!("expected AlreadyExists from the record write, got {other:?}")),
    }
    let (device_id, _) = id("unit-second")?;
    if stores.1.device(&device_id).map_err(|e| format!("{e:?}"))?.is_some() {
        return Err("the device written before the refused record write was kept".to_owned());
    }
    if !stored(stores, "unit-first")? {
        return Err("the earlier committed unit was lost".to_owned());
    }
    Ok(())
}

fn concurrent_units<P: RegistrationStore, I: IdentityStore, T: TwinStore>(stores: &(P, I, T)) -> Outcome {
    const THREADS: usize = 8;
    const UNITS: usize = 25;
    let results: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || -> Outcome {
                    for u in 0..UNITS {
                        let name = format!("unit-{t}-{u}");
                        let fail = u % 3 == 0;
                        let result = stores.0.atomically(&mut || {
                            provision(stores, &name, &format!("op-{t}-{u}"))?;
                            if fail {
                                return Err(Error::Hub { code: 500_000, message: "planned".to_owned() });
                            }
                            Ok(())
                        });
                        match (fail, result) {
                            (false, Ok(())) | (true, Err(Error::Hub { code: 500_000, .. })) => {}
                            (_, other) => return Err(format!("unit {name}: unexpected outcome {other:?}")),
                        }
                        // Once `atomically` returns, the unit is visible to every reader.
                        if stored(stores, &name)? == fail {
                            return Err(format!("unit {name} (failing: {fail}) not as its outcome said"));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a thread panicked".to_owned())))
            .collect()
    });
    results.into_iter().collect::<Result<Vec<()>, String>>()?;
    for t in 0..THREADS {
        for u in 0..UNITS {
            let name = format!("unit-{t}-{u}");
            if stored(stores, &name)? == (u % 3 == 0) {
                return Err(format!("after all threads, unit {name} is not as its outcome said"));
            }
        }
    }
    Ok(())
}

/// The suite must reject stores that break the contract, or a passing backend proves nothing.
#[cfg(test)]
mod tests {
    use std::panic::{catch_unwind, AssertUnwindSafe};

    use zerotouch_engine::memory::MemoryStore;
    use zerotouch_engine::registry::MemoryIdentityStore;
    use zerotouch_engine::twin::MemoryTwinStore;

    use super::*;

    #[test]
    fn stores_without_atomic_units_fail_the_suite() {
        // The in-memory stores run a unit directly: a failing unit keeps its writes.
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            atomic_units(|| (MemoryStore::new(), MemoryIdentityStore::new(), MemoryTwinStore::new()));
        }));
        let message = outcome.err().and_then(|p| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        assert!(message.contains("a failing unit leaves none of its writes"), "{message}");
    }
}
