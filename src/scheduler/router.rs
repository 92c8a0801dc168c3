//! Which version of a model answers a request: weighted rendezvous hashing of the request's
//! session key. A key lands on the same version for given weights (on every replica, since the
//! hash is fixed), and a change of weights moves only the keys it must: raising one version's
//! weight moves keys to it and nowhere else. Requests without a key draw at random, by weight.

use sha2::{Digest, Sha256};

/// The candidate that serves `key` among `(label, weight)`, by index; `None` when every weight
/// is 0. Each candidate's draw is an exponential race with rate `weight`, so a candidate wins
/// with probability `weight / total`.
pub fn choose(key: Option<&str>, candidates: &[(&str, u32)]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, (_, weight))| *weight > 0)
        .map(|(i, (label, weight))| (i, -uniform(key, label).ln() / f64::from(*weight)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(i, _)| i)
}

/// In (0, 1): from the key and the label, or at random without a key.
fn uniform(key: Option<&str>, label: &str) -> f64 {
    let bits = match key {
        Some(key) => {
            let digest = Sha256::new().chain_update(key.as_bytes()).chain_update([0]).chain_update(label).finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            u64::from_le_bytes(first)
        }
        None => rand::random::<u64>(),
    };
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> impl Iterator<Item = String> {
        (0..20_000).map(|i| format!("user-{i}"))
    }

    #[test]
    fn shares_follow_the_weights_with_and_without_keys() {
        let versions = [("stable", 90), ("candidate", 10)];
        let keyed = keys().filter(|k| choose(Some(k), &versions) == Some(1)).count();
        let random = (0..20_000).filter(|_| choose(None, &versions) == Some(1)).count();
        // 2,000 expected; 99.9% binomial bounds are about +-139.
        for n in [keyed, random] {
            assert!((1_861..=2_139).contains(&n), "{n}");
        }
    }

    #[test]
    fn a_key_stays_and_a_weight_change_moves_only_what_it_must() {
        let before = [("stable", 90), ("candidate", 10)];
        let after = [("stable", 80), ("candidate", 20)];
        let mut moved = 0;
        for key in keys() {
            let (was, is) = (choose(Some(&key), &before), choose(Some(&key), &after));
            assert_eq!(was, choose(Some(&key), &before), "the same key, the same version");
            assert!(was == is || (was, is) == (Some(0), Some(1)), "{key}: {was:?} -> {is:?}");
            moved += usize::from(was != is);
        }
        // 10% of keys should move to the candidate (from 10% to 20%).
        assert!((1_700..=2_300).contains(&moved), "{moved}");
        // Adding a version takes keys only from the others, in proportion.
        let three = [("stable", 80), ("candidate", 20), ("next", 25)];
        for key in keys().take(2_000) {
            let (was, is) = (choose(Some(&key), &after), choose(Some(&key), &three));
            assert!(was == is || is == Some(2), "{key}: {was:?} -> {is:?}");
        }
    }

    #[test]
    fn zero_weights_take_nothing() {
        assert_eq!(choose(Some("a"), &[("stable", 0), ("candidate", 5)]), Some(1));
        assert_eq!(choose(None, &[("stable", 0)]), None);
        assert_eq!(choose(None, &[]), None);
    }
}
