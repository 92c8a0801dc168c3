//! Whole answers to deterministic requests (greedy, or sampled with a `seed`), kept so that an
//! identical request is answered by replaying the first one's events: the endpoints render them
//! as they render a live generation, so a replayed stream has the same chunks.
//!
//! A key is a SHA-256 of the model, its loaded version (a reload misses), the prompt's token
//! ids with each image's identity (its pixels and budget: two pictures never share an answer),
//! every generation parameter and the output constraint. Only answers whose every sample
//! finished (`stop` or `length`) are stored: never errors, cancelled or timed-out ones. Bounded
//! in bytes (least recently used out first) and by age.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::engine::{Completion, Constraint, FinishReason, GenerationParams, Logprobs, Prompt};
use crate::scheduler::JobEvent;

pub type ResponseKey = [u8; 32];

/// Length-prefixed, so that neighbouring fields cannot trade bytes.
fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_le_bytes());
    hash.update(bytes);
}

/// One event of a stored answer.
#[derive(Debug, Clone)]
pub enum Recorded {
    Token { sample: usize, token_id: u32, text: String, logprobs: Option<Logprobs> },
    Done(Completion),
}

impl From<Recorded> for JobEvent {
    fn from(event: Recorded) -> Self {
        match event {
            Recorded::Token { sample, token_id, text, logprobs } => {
                JobEvent::Token { sample, token_id, text, logprobs }
            }
            Recorded::Done(completion) => JobEvent::Done(completion),
        }
    }
}

impl Recorded {
    /// What the event holds on the heap, about.
    fn bytes(&self) -> usize {
        let logprobs = |l: &Logprobs| {
            (1 + l.top.len()) * 32 + l.token.text.len() + l.top.iter().map(|t| t.text.len()).sum::<usize>()
        };
        std::mem::size_of::<Self>()
            + match self {
                Recorded::Token { text, logprobs: l, .. } => text.len() + l.as_ref().map_or(0, logprobs),
                Recorded::Done(c) => {
                    c.text.len() + c.token_ids.len() * 4 + c.logprobs.iter().flatten().map(logprobs).sum::<usize>()
                }
            }
    }
}

/// A stored answer, shared by the replays under way.
pub type Answer = Arc<[Recorded]>;

#[derive(Debug)]
struct Entry {
    answer: Answer,
    bytes: usize,
    stored: Instant,
}

#[derive(Debug)]
struct State {
    entries: LruCache<ResponseKey, Entry>,
    bytes: usize,
}

/// The server's cache of answers (`server.response_cache_mb`, `server.response_cache_ttl_s`).
#[derive(Debug)]
pub struct ResponseCache {
    capacity_bytes: usize,
    ttl: Duration,
    state: Mutex<State>,
}

impl ResponseCache {
    /// `None` for a zero capacity: the cache is off.
    pub fn new(capacity_bytes: usize, ttl: Duration) -> Option<Self> {
        (capacity_bytes > 0).then(|| Self {
            capacity_bytes,
            ttl,
            state: Mutex::new(State { entries: LruCache::unbounded(), bytes: 0 }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // An entry is inserted or removed with its bytes under one lock: a panic elsewhere
        // leaves the state whole.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key of a request, or `None` when its answer is not reproducible (sampled without
    /// a seed).
    pub fn key(
        model: &str,
        version: u64,
        prompt: &Prompt,
        params: &GenerationParams,
        constraint: Option<&Constraint>,
    ) -> Option<ResponseKey> {
        let sampling = &params.sampling;
        if sampling.temperature > 0.0 && sampling.seed.is_none() {
            return None;
        }
        let mut hash = Sha256::new();
        field(&mut hash, model.as_bytes());
        hash.update(version.to_le_bytes());
        let ids: Vec<u8> = prompt.input_ids.iter().flat_map(|id| id.to_le_bytes()).collect();
        field(&mut hash, &ids);
        field(&mut hash, &prompt.image_ids.concat());
        for float in [sampling.temperature, sampling.top_p, sampling.min_p, sampling.repetition_penalty] {
            hash.update(float.to_bits().to_le_bytes());
        }
        let seed = sampling.seed.map_or(0, |s| u128::from(s) + 1);
        hash.update(seed.to_le_bytes());
        let logprobs = params.logprobs.map_or(0, |n| n + 1);
        for count in [sampling.top_k, params.max_new_tokens, params.samples, logprobs, usize::from(params.ignore_eos)] {
            hash.update((count as u64).to_le_bytes());
        }
        hash.update((params.stop.len() as u64).to_le_bytes());
        for stop in &params.stop {
            field(&mut hash, stop.as_bytes());
        }
        // The constraint's own description: a schema's keys are sorted (serde_json's map).
        field(&mut hash, constraint.map_or(String::new(), |c| format!("{c:?}")).as_bytes());
        Some(hash.finalize().into())
    }

    /// The answer stored under `key`, if it is younger than the TTL.
    pub fn get(&self, key: &ResponseKey) -> Option<Answer> {
        let mut state = self.lock();
        let fresh = state.entries.get(key).map(|e| e.stored.elapsed() < self.ttl)?;
        if fresh {
            return state.entries.get(key).map(|e| e.answer.clone());
        }
        if let Some(stale) = state.entries.pop(key) {
            state.bytes -= stale.bytes;
        }
        None
    }

    /// Store an answer, evicting the least recently used ones to make room; one larger than
    /// the whole cache is not stored.
    pub fn insert(&self, key: ResponseKey, answer: Vec<Recorded>) {
        let bytes = answer.iter().map(Recorded::bytes).sum::<usize>();
        if bytes > self.capacity_bytes {
            return;
        }
        let mut state = self.lock();
        if let Some(old) = state.entries.pop(&key) {
            state.bytes -= old.bytes;
        }
        while state.bytes + bytes > self.capacity_bytes {
            match state.entries.pop_lru() {
                Some((_, old)) => state.bytes -= old.bytes,
                None => break,
            }
        }
        state.bytes += bytes;
        state.entries.put(key, Entry { answer: answer.into(), bytes, stored: Instant::now() });
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// The events of a live generation, kept as they pass until every sample is done.
pub struct Recording {
    cache: Arc<ResponseCache>,
    key: ResponseKey,
    samples: usize,
    done: usize,
    events: Vec<Recorded>,
}

impl Recording {
    pub fn new(cache: Arc<ResponseCache>, key: ResponseKey, samples: usize) -> Self {
        Self { cache, key, samples, done: 0, events: Vec::new() }
    }

    /// Keep `event`; `false` once the answer cannot be stored (a failure, a cancelled sample).
    /// Stores the answer when the last sample is done.
    pub fn record(&mut self, event: &JobEvent) -> bool {
        match event {
            JobEvent::Token { sample, token_id, text, logprobs } => self.events.push(Recorded::Token {
                sample: *sample,
                token_id: *token_id,
                text: text.clone(),
                logprobs: logprobs.clone(),
            }),
            JobEvent::Done(completion) if completion.finish_reason != FinishReason::Cancelled => {
                self.events.push(Recorded::Done(completion.clone()));
                self.done += 1;
                if self.done == self.samples {
                    self.cache.insert(self.key, std::mem::take(&mut self.events));
                }
            }
            JobEvent::Done(_) | JobEvent::Failed(_) => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{SamplingParams, Timings};

    fn params(temperature: f32, seed: Option<u64>) -> GenerationParams {
        GenerationParams {
            sampling: SamplingParams { temperature, seed, ..SamplingParams::default() },
            max_new_tokens: 8,
            stop: Vec::new(),
            ignore_eos: false,
            guide: None,
            logprobs: None,
            samples: 1,
        }
    }

    fn prompt(ids: Vec<u32>, image_ids: Vec<[u8; 32]>) -> Prompt {
        Prompt {
            input_ids: ids,
            images: None,
            positions: crate::family::Positions { prompt: ndarray::ArrayD::zeros(vec![1, 3]), next: 3 },
            image_ids,
            preprocess_time: Duration::ZERO,
        }
    }

    fn done(text: &str) -> Recorded {
        Recorded::Done(Completion {
            sample: 0,
            token_ids: vec![1, 2, 3],
            text: text.into(),
            prompt_tokens: 3,
            image_tokens: 0,
            finish_reason: FinishReason::Stop,
            timings: Timings::default(),
            logprobs: None,
        })
    }

    #[test]
    fn keys_differ_by_every_input_and_exist_only_for_reproducible_answers() {
        let p = prompt(vec![1, 2, 3], vec![[7; 32]]);
        let greedy = params(0.0, None);
        let key = |model, version, prompt: &Prompt, params: &GenerationParams, constraint: Option<&Constraint>| {
            ResponseCache::key(model, version, prompt, params, constraint)
        };
        let base = key("m", 1, &p, &greedy, None).unwrap();
        assert_eq!(key("m", 1, &p, &greedy, None), Some(base));
        assert!(key("m", 1, &p, &params(0.7, None), None).is_none());
        let mut variants = vec![
            key("n", 1, &p, &greedy, None),
            key("m", 2, &p, &greedy, None),
            key("m", 1, &prompt(vec![1, 2, 4], vec![[7; 32]]), &greedy, None),
            key("m", 1, &prompt(vec![1, 2, 3], vec![[8; 32]]), &greedy, None),
            key("m", 1, &p, &params(0.7, Some(1)), None),
            key("m", 1, &p, &params(0.7, Some(2)), None),
            key("m", 1, &p, &GenerationParams { max_new_tokens: 9, ..greedy.clone() }, None),
            key("m", 1, &p, &GenerationParams { stop: vec!["x".into()], ..greedy.clone() }, None),
            key("m", 1, &p, &GenerationParams { logprobs: Some(0), ..greedy.clone() }, None),
            key("m", 1, &p, &GenerationParams { samples: 2, ..greedy.clone() }, None),
            key("m", 1, &p, &greedy, Some(&Constraint::JsonObject)),
            key("m", 1, &p, &greedy, Some(&Constraint::Regex("a+".into()))),
        ];
        variants.push(Some(base));
        let distinct: std::collections::HashSet<_> = variants.iter().map(|k| k.unwrap()).collect();
        assert_eq!(distinct.len(), variants.len());
    }

    #[test]
    fn answers_expire_and_the_least_recently_used_leave_first() {
        let one = done("a").bytes();
        let cache = ResponseCache::new(2 * one, Duration::from_secs(60)).unwrap();
        cache.insert([1; 32], vec![done("a")]);
        cache.insert([2; 32], vec![done("b")]);
        assert!(cache.get(&[1; 32]).is_some());
        cache.insert([3; 32], vec![done("c")]);
        assert!(cache.get(&[2; 32]).is_none(), "2 was the least recently used");
        assert!(cache.get(&[1; 32]).is_some() && cache.get(&[3; 32]).is_some());
        assert_eq!(cache.bytes(), 2 * one);
        cache.insert([4; 32], vec![done("d"); 3]);
        assert!(cache.get(&[4; 32]).is_none(), "larger than the whole cache");

        let expiring = ResponseCache::new(1 << 20, Duration::ZERO).unwrap();
        expiring.insert([1; 32], vec![done("a")]);
        assert!(expiring.get(&[1; 32]).is_none());
        assert_eq!(expiring.bytes(), 0);
    }

    #[test]
    fn only_answers_whose_every_sample_finished_are_stored() {
        let cache = Arc::new(ResponseCache::new(1 << 20, Duration::from_secs(60)).unwrap());
        let token = JobEvent::Token { sample: 0, token_id: 5, text: "a".into(), logprobs: None };
        let Recorded::Done(completion) = done("a") else { unreachable!() };

        let mut two_samples = Recording::new(cache.clone(), [1; 32], 2);
        assert!(two_samples.record(&token));
        assert!(two_samples.record(&JobEvent::Done(completion.clone())));
        assert!(cache.get(&[1; 32]).is_none(), "one of two samples is done");
        assert!(two_samples.record(&JobEvent::Done(Completion { sample: 1, ..completion.clone() })));
        let answer = cache.get(&[1; 32]).unwrap();
        assert_eq!(answer.len(), 3);
        assert!(matches!(&answer[0], Recorded::Token { token_id: 5, text, .. } if text == "a"));

        let mut cancelled = Recording::new(cache.clone(), [2; 32], 1);
        let cancel = Completion { finish_reason: FinishReason::Cancelled, ..completion };
        assert!(!cancelled.record(&JobEvent::Done(cancel)));
        let mut failed = Recording::new(cache.clone(), [3; 32], 1);
        assert!(!failed.record(&JobEvent::Failed(crate::scheduler::SchedulerError::WorkerGone)));
        assert!(cache.get(&[2; 32]).is_none() && cache.get(&[3; 32]).is_none());
    }
}
