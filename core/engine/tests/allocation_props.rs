//! Properties of hashed allocation: determinism, weighted shares, and minimal movement when a hub is added.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use zerotouch_engine::allocation::{hashed, HashedPool};
use zerotouch_engine::hub::LinkedHub;
use zerotouch_proto::RegistrationId;

const IDS: usize = 100_000;

fn ids(prefix: &str) -> Vec<RegistrationId> {
    (0..IDS).map(|n| RegistrationId::new(format!("{prefix}-{n}")).unwrap()).collect()
}

/// Between `min` and `max` distinct hub host names.
fn hub_names(min: usize, max: usize) -> impl Strategy<Value = Vec<String>> {
    prop::collection::btree_set("[a-z][a-z0-9-]{0,12}", min..=max)
        .prop_map(|set| set.into_iter().map(|name| format!("{name}.azure-devices.net")).collect())
}

proptest! {
    /// The same id and hubs always give the same hub, whatever the id's case and the order of the
    /// hub list, and the precomputed pool agrees with the one-shot function.
    #[test]
    fn hashed_allocation_is_deterministic(
        names in hub_names(1, 8),
        weights in prop::collection::vec(1u32..=1000, 8),
        registration_id in "[A-Za-z0-9][A-Za-z0-9._:-]{0,40}[A-Za-z0-9]",
    ) {
        let hubs: Vec<LinkedHub> =
            names.iter().zip(&weights).map(|(n, w)| LinkedHub::new(n.clone()).with_weight(*w)).collect();
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        let rid = RegistrationId::new(registration_id.clone()).unwrap();
        let upper = RegistrationId::new(registration_id.to_ascii_uppercase()).unwrap();
        let first = hashed(&rid, &refs).unwrap();
        prop_assert_eq!(hashed(&rid, &refs).unwrap(), first);
        prop_assert_eq!(hashed(&upper, &refs).unwrap(), first);
        prop_assert_eq!(HashedPool::new(&refs).pick(&rid).unwrap(), first);
        let reversed: Vec<&LinkedHub> = hubs.iter().rev().collect();
        prop_assert_eq!(hashed(&rid, &reversed).unwrap(), first);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// Weights 1/2/7 give shares of 10 %, 20 % and 70 % of 100 000 ids, each within ±2 percentage
    /// points (the binomial standard deviation is at most 0.15 points, so only a biased algorithm
    /// can miss).
    #[test]
    fn hashed_allocation_respects_weights(
        names in prop::collection::btree_set("[a-z]{1,10}", 3..=3),
        prefix in "[a-z]{1,8}",
    ) {
        let weights = [1u32, 2, 7];
        let hubs: Vec<LinkedHub> = names
            .iter()
            .zip(weights)
            .map(|(n, w)| LinkedHub::new(format!("{n}.azure-devices.net")).with_weight(w))
            .collect();
        let refs: Vec<&LinkedHub> = hubs.iter().collect();
        let pool = HashedPool::new(&refs);
        let mut counts = [0usize; 3];
        for rid in ids(&prefix) {
            let hub = pool.pick(&rid).unwrap();
            counts[hubs.iter().position(|h| h.name == hub.name).unwrap()] += 1;
        }
        for (count, weight) in counts.iter().zip(weights) {
            let share = *count as f64 / IDS as f64 * 100.0;
            let expected = f64::from(weight) * 10.0;
            prop_assert!(
                (share - expected).abs() <= 2.0,
                "weight {} got {:.2} % (counts {:?})", weight, share, counts
            );
        }
    }

    /// Adding one hub to n equally weighted hubs (n = 1..8) moves at most 1.1/(n+1) of 100 000 ids
    /// (and at least 0.9/(n+1): the expected fraction is 1/(n+1)), and every id that moves goes
    /// to the new hub.
    #[test]
    fn adding_a_hub_only_moves_devices_to_it(names in hub_names(2, 9), prefix in "[a-z]{1,8}") {
        let hubs: Vec<LinkedHub> = names.iter().map(|n| LinkedHub::new(n.clone())).collect();
        let (new_hub, old_hubs) = hubs.split_last().unwrap();
        let before_refs: Vec<&LinkedHub> = old_hubs.iter().collect();
        let after_refs: Vec<&LinkedHub> = hubs.iter().collect();
        let before = HashedPool::new(&before_refs);
        let after = HashedPool::new(&after_refs);
        let mut moved = 0usize;
        for rid in ids(&prefix) {
            let old = before.pick(&rid).unwrap();
            let new = after.pick(&rid).unwrap();
            if old != new {
                moved += 1;
                prop_assert_eq!(&new.name, &new_hub.name, "{} moved between old hubs", rid);
            }
        }
        let n = old_hubs.len() as f64;
        let fraction = moved as f64 / IDS as f64;
        prop_assert!(fraction <= 1.1 / (n + 1.0), "{} hubs + 1: moved {}", n, moved);
        prop_assert!(fraction >= 0.9 / (n + 1.0), "{} hubs + 1: moved only {}", n, moved);
    }
}

/// With the service's maximum of 50 equally weighted hubs, every hub receives devices.
#[test]
fn every_one_of_fifty_linked_hubs_receives_devices() {
    let hubs: Vec<LinkedHub> =
        (0..50).map(|n| LinkedHub::new(format!("hub-{n}.azure-devices.net"))).collect();
    let refs: Vec<&LinkedHub> = hubs.iter().collect();
    let pool = HashedPool::new(&refs);
    let used: BTreeSet<&str> = (0..20_000)
        .map(|n| pool.pick(&RegistrationId::new(format!("dev-{n}")).unwrap()).unwrap().name.as_str())
        .collect();
    assert_eq!(used.len(), 50);
}
