//! The image-feature cache: the vision encoder's output for image inputs seen before, so a
//! repeated image (a follow-up question about the same picture, a popular image) skips the
//! encoder, usually most of the time to first token.
//!
//! Keyed by the request's images' identities (`ImageId`: decoded pixels, budget, processor
//! settings), not by the encoded files: two encodings of the same pixels share an entry, any
//! change in preprocessing misses, and a hit is found before the pixels are processed, which
//! it then skips. Bounded in bytes, least recently used out first. One cache serves all workers of a
//! model version; a reload starts a new one (the features depend on the weights).

use std::sync::{Arc, Mutex};

use lru::LruCache;
use ndarray::{Array2, ArrayD};
use sha2::{Digest, Sha256};

use super::prefix_cache::ImageId;
use crate::family::{NamedTensor, TensorData};

pub type FeatureKey = [u8; 32];

/// A bounded LRU map from processed image inputs to their features.
#[derive(Debug)]
pub struct FeatureCache {
    capacity_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    entries: LruCache<FeatureKey, Arc<Array2<f32>>>,
    bytes: usize,
}

/// Shape and values, in buffered chunks (a large image is tens of MB of pixel values).
fn hash_array<T: Copy, const N: usize>(hash: &mut Sha256, tag: u8, array: &ArrayD<T>, bytes: fn(T) -> [u8; N]) {
    const CHUNK: usize = 1 << 16;
    hash.update([tag]);
    for dim in array.shape() {
        hash.update((*dim as u64).to_le_bytes());
    }
    let mut buffer = Vec::with_capacity(CHUNK + N);
    for &value in array.iter() {
        buffer.extend_from_slice(&bytes(value));
        if buffer.len() >= CHUNK {
            hash.update(&buffer);
            buffer.clear();
        }
    }
    hash.update(&buffer);
}

fn size_of(features: &Array2<f32>) -> usize {
    features.len() * std::mem::size_of::<f32>()
}

impl FeatureCache {
    /// `None` for a zero capacity: the cache is off.
    pub fn new(capacity_bytes: usize) -> Option<Self> {
        (capacity_bytes > 0)
            .then(|| Self { capacity_bytes, state: Mutex::new(State { entries: LruCache::unbounded(), bytes: 0 }) })
    }

    /// The key of a prompt's images, by their identities in prompt order.
    pub fn key(image_ids: &[ImageId]) -> FeatureKey {
        image_ids.iter().fold(Sha256::new(), |hash, id| hash.chain_update(id)).finalize().into()
    }

    /// An identity of processed inputs (names, shapes and values), for images known only by
    /// them.
    pub fn inputs_id(inputs: &[NamedTensor]) -> ImageId {
        let mut hash = Sha256::new();
        for input in inputs {
            hash.update((input.name.len() as u64).to_le_bytes());
            hash.update(input.name.as_bytes());
            match &input.data {
                TensorData::F32(a) => hash_array(&mut hash, 0, a, f32::to_le_bytes),
                TensorData::I64(a) => hash_array(&mut hash, 1, a, i64::to_le_bytes),
                TensorData::Bool(a) => hash_array(&mut hash, 2, a, |v| [u8::from(v)]),
            }
        }
        hash.finalize().into()
    }

    pub fn get(&self, key: &FeatureKey) -> Option<Arc<Array2<f32>>> {
        self.lock().entries.get(key).cloned()
    }

    /// Keep `features`, dropping the least recently used entries to stay within the capacity.
    /// Features larger than the whole capacity are not kept.
    pub fn insert(&self, key: FeatureKey, features: Arc<Array2<f32>>) {
        let size = size_of(&features);
        if size > self.capacity_bytes {
            return;
        }
        let mut state = self.lock();
        if let Some(old) = state.entries.put(key, features) {
            state.bytes -= size_of(&old);
        }
        state.bytes += size;
        while state.bytes > self.capacity_bytes {
            let Some((_, evicted)) = state.entries.pop_lru() else { break };
            state.bytes -= size_of(&evicted);
        }
    }

    /// Bytes of features held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use ndarray::IxDyn;

    use super::*;

    fn inputs(value: f32) -> Vec<NamedTensor> {
        vec![NamedTensor {
            name: "pixel_values".into(),
            data: TensorData::F32(ArrayD::from_elem(IxDyn(&[1, 2]), value)),
        }]
    }

    fn features(rows: usize) -> Arc<Array2<f32>> {
        Arc::new(Array2::from_elem((rows, 4), 1.0))
    }

    #[test]
    fn keys_follow_the_values_names_and_shapes() {
        assert_eq!(FeatureCache::inputs_id(&inputs(0.5)), FeatureCache::inputs_id(&inputs(0.5)));
        assert_ne!(FeatureCache::inputs_id(&inputs(0.5)), FeatureCache::inputs_id(&inputs(0.25)));
        let mut renamed = inputs(0.5);
        renamed[0].name = "pixel_attention_mask".into();
        assert_ne!(FeatureCache::inputs_id(&renamed), FeatureCache::inputs_id(&inputs(0.5)));
        let reshaped = vec![NamedTensor {
            name: "pixel_values".into(),
            data: TensorData::F32(ArrayD::from_elem(IxDyn(&[2, 1]), 0.5)),
        }];
        assert_ne!(FeatureCache::inputs_id(&reshaped), FeatureCache::inputs_id(&inputs(0.5)));
    }

    #[test]
    fn evicts_least_recently_used_within_the_byte_budget() {
        // Each entry is 2 rows x 4 f32 = 32 bytes; room for two.
        let cache = FeatureCache::new(64).unwrap();
        let (a, b, c) = ([1; 32], [2; 32], [3; 32]);
        cache.insert(a, features(2));
        cache.insert(b, features(2));
        assert!(cache.get(&a).is_some()); // a is now the most recently used
        cache.insert(c, features(2));
        assert!(cache.get(&b).is_none(), "b was least recently used");
        assert!(cache.get(&a).is_some() && cache.get(&c).is_some());
        assert_eq!(cache.bytes(), 64);
        cache.insert(a, features(2)); // replacing an entry does not count it twice
        assert_eq!(cache.bytes(), 64);
    }

    #[test]
    fn features_over_the_capacity_are_not_kept_and_zero_is_off() {
        let cache = FeatureCache::new(16).unwrap();
        cache.insert([1; 32], features(2));
        assert!(cache.get(&[1; 32]).is_none());
        assert_eq!(cache.bytes(), 0);
        assert!(FeatureCache::new(0).is_none());
    }
}
