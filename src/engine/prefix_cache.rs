//! The prefix cache: the decoder's keys and values for prompt beginnings seen before, so a
//! follow-up question about the same picture, or a long system prompt shared by many requests,
//! prefills only what is new.
//!
//! The cache holds blocks of [`BLOCK_TOKENS`] positions. A block's key is a SHA-256 chained
//! over the key of the block before it and the identities of its own tokens: a text token is its
//! id; an image token is its image's [`ImageId`] (the picture's pixels with everything that
//! shapes its tokens and features), never the placeholder id every image shares. Two pictures,
//! or one picture at two budgets, therefore never share a block, and equal keys mean equal
//! keys and values. Each block is stored once however many cached sequences begin with it, at
//! the layout's bytes per token. Bounded in bytes, least recently used out first; a block a
//! waiting sequence holds is never evicted. One cache serves all workers of a model version; a
//! reload starts a new one.

use std::sync::{Arc, Mutex, MutexGuard};

use half::f16;
use lru::LruCache;
use sha2::{Digest, Sha256};

/// Positions per block.
pub const BLOCK_TOKENS: usize = 32;

pub type BlockKey = [u8; 32];

/// What one image of a prompt stands for in block keys.
pub type ImageId = [u8; 32];

/// How a sequence's tokens are told apart: the image token, and each image of the prompt
/// with its number of image tokens, in prompt order.
#[derive(Debug, Clone)]
pub struct TokenIdentity {
    pub image_token: u32,
    pub images: Vec<(ImageId, usize)>,
}

impl TokenIdentity {
    /// The key of every full block of `tokens`. Image tokens beyond the prompt's images (a
    /// generated one) are text.
    pub fn keys(&self, tokens: &[u32]) -> Vec<BlockKey> {
        let mut keys = Vec::with_capacity(tokens.len() / BLOCK_TOKENS);
        let mut images = self.images.iter().flat_map(|(id, count)| std::iter::repeat_n(id, *count));
        let mut hash = Sha256::new();
        for (i, &token) in tokens.iter().enumerate() {
            match (token == self.image_token).then(|| images.next()).flatten() {
                Some(image) => {
                    hash.update([1]);
                    hash.update(image);
                }
                None => {
                    hash.update([0]);
                    hash.update(token.to_le_bytes());
                }
            }
            if (i + 1) % BLOCK_TOKENS == 0 {
                let key: BlockKey = std::mem::take(&mut hash).finalize().into();
                hash.update(key);
                keys.push(key);
            }
        }
        keys
    }
}

/// The keys and values of [`BLOCK_TOKENS`] positions: per cache tensor, `[kv_heads,
/// BLOCK_TOKENS, head_dim]`.
#[derive(Debug)]
pub struct Block {
    pub tensors: Vec<Columns>,
}

/// One cache tensor's part of a block, in the cache's element type.
#[derive(Debug)]
pub enum Columns {
    F32(Vec<f32>),
    F16(Vec<f16>),
}

impl Block {
    pub fn bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|c| match c {
                Columns::F32(v) => v.len() * 4,
                Columns::F16(v) => v.len() * 2,
            })
            .sum()
    }
}

/// A bounded LRU map from block keys to blocks.
#[derive(Debug)]
pub struct PrefixCache {
    capacity_bytes: usize,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    blocks: LruCache<BlockKey, Arc<Block>>,
    bytes: usize,
}

impl PrefixCache {
    /// `None` for a zero capacity: the cache is off.
    pub fn new(capacity_bytes: usize) -> Option<Self> {
        (capacity_bytes > 0)
            .then(|| Self { capacity_bytes, state: Mutex::new(State { blocks: LruCache::unbounded(), bytes: 0 }) })
    }

    /// The blocks of the longest cached beginning of `keys`. Holding them keeps them from
    /// eviction. The first block ends up the most recently used: a chain is evicted from its
    /// end, which no lookup can reach without its beginning.
    pub fn lookup(&self, keys: &[BlockKey]) -> Vec<Arc<Block>> {
        let mut state = self.lock();
        let found = keys.iter().take_while(|key| state.blocks.contains(*key)).count();
        let mut blocks: Vec<Arc<Block>> =
            keys[..found].iter().rev().filter_map(|key| state.blocks.get(key).cloned()).collect();
        blocks.reverse();
        blocks
    }

    /// Keep the blocks `keys` name, reading those not held yet with `read(i)` (outside the
    /// lock: reading copies the block); then drop least recently used blocks no one holds
    /// until the cache is within its capacity.
    pub fn insert<E>(&self, keys: &[BlockKey], mut read: impl FnMut(usize) -> Result<Block, E>) -> Result<(), E> {
        let missing: Vec<usize> = {
            let state = self.lock();
            (0..keys.len()).filter(|&i| !state.blocks.contains(&keys[i])).collect()
        };
        let mut read_blocks = Vec::with_capacity(missing.len());
        for i in missing {
            read_blocks.push((i, Arc::new(read(i)?)));
        }
        let mut state = self.lock();
        for (i, block) in read_blocks {
            state.bytes += block.bytes();
            if let Some(old) = state.blocks.put(keys[i], block) {
                state.bytes -= old.bytes();
            }
        }
        for key in keys.iter().rev() {
            state.blocks.promote(key);
        }
        let capacity = self.capacity_bytes;
        evict(&mut state, capacity);
        Ok(())
    }

    /// Make room for `needed` more bytes within `budget` by evicting blocks no one holds;
    /// whether they fit.
    pub fn make_room(&self, needed: usize, budget: usize) -> bool {
        let mut state = self.lock();
        let Some(room) = budget.checked_sub(needed) else { return false };
        evict(&mut state, room);
        state.bytes <= room
    }

    /// Bytes of blocks held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Drop least recently used blocks that only the cache holds until at most `room` bytes stay.
fn evict(state: &mut State, room: usize) {
    if state.bytes <= room {
        return;
    }
    let mut over = state.bytes - room;
    let mut victims = Vec::new();
    for (key, block) in state.blocks.iter().rev() {
        if over == 0 {
            break;
        }
        if Arc::strong_count(block) == 1 {
            over = over.saturating_sub(block.bytes());
            victims.push(*key);
        }
    }
    for key in victims {
        if let Some(block) = state.blocks.pop(&key) {
            state.bytes -= block.bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(bytes: usize) -> Block {
        Block { tensors: vec![Columns::F32(vec![0.0; bytes / 4])] }
    }

    fn identity(images: &[(u8, usize)]) -> TokenIdentity {
        TokenIdentity { image_token: 9, images: images.iter().map(|&(id, n)| ([id; 32], n)).collect() }
    }

    #[test]
    fn keys_chain_and_image_tokens_are_their_pictures() {
        let text: Vec<u32> = (0..70).collect();
        let keys = identity(&[]).keys(&text);
        assert_eq!(keys.len(), 2, "only full blocks have keys");
        let mut changed = text.clone();
        changed[3] = 1000;
        let other = identity(&[]).keys(&changed);
        assert!(keys[0] != other[0] && keys[1] != other[1], "a change reaches every later block");
        assert_eq!(identity(&[]).keys(&text[..64]), keys);

        // The same placeholder ids standing for two pictures, or a picture at two budgets
        // (another id), share no block; the same picture does. `(text, image, text)` tokens,
        // once with more text before the picture than it has tokens.
        let picture_keys = |(before, image, after): (usize, usize, usize)| {
            let prompt: Vec<u32> = [(1, before), (9, image), (2, after)]
                .iter()
                .flat_map(|&(token, n)| std::iter::repeat_n(token, n))
                .collect();
            let (a, b) = (identity(&[(1, image)]).keys(&prompt), identity(&[(2, image)]).keys(&prompt));
            assert!(a[0] != b[0] && a[1] != b[1]);
            assert_eq!(a, identity(&[(1, image)]).keys(&prompt));
            (prompt, a)
        };
        picture_keys((20, 12, 32));
        let (prompt, a) = picture_keys((8, 40, 16));
        // An image token past the prompt's images is text: differs from one standing for an image.
        let mut generated = prompt.clone();
        generated[60] = 9;
        assert_ne!(identity(&[(1, 40)]).keys(&generated)[1], a[1]);
    }

    #[test]
    fn lookup_takes_the_longest_cached_beginning_and_eviction_spares_held_blocks() {
        let cache = PrefixCache::new(3 * 128).unwrap();
        let keys: Vec<BlockKey> = (0..4u8).map(|i| [i; 32]).collect();
        cache.insert(&keys[..3], |_| Ok::<_, ()>(block(128))).unwrap();
        assert_eq!(cache.bytes(), 3 * 128);
        assert_eq!(cache.lookup(&keys).len(), 3);
        assert_eq!(cache.lookup(&[[9; 32], keys[1]]).len(), 0, "a chain is found from its beginning");

        // A fourth block evicts from the least recently used end: the chain's tail.
        let held = cache.lookup(&keys[..1]);
        let mut read = 0;
        cache
            .insert(&[keys[0], [7; 32]], |_| {
                read += 1;
                Ok::<_, ()>(block(128))
            })
            .unwrap();
        assert_eq!(read, 1, "a block held already is not read again");
        assert_eq!(cache.bytes(), 3 * 128);
        assert_eq!(cache.lookup(&keys).len(), 2, "block 2 was least recently used");

        // Room for more rows: blocks someone holds stay.
        assert!(!cache.make_room(1000, 1000));
        assert_eq!(cache.bytes(), 128);
        assert_eq!(cache.lookup(&keys[..1]).len(), 1);
        drop(held);
        assert!(cache.make_room(1000, 1000));
        assert_eq!(cache.bytes(), 0);
        assert!(PrefixCache::new(0).is_none());
    }
}
