//! Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p,
//! min-p and a repetition penalty, in the order transformers applies them.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::EngineError;

/// How to pick tokens. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the penalty (transformers' definition: divide positive logits, multiply
    /// negative ones, for every token already in the prompt or the output).
    pub repetition_penalty: f32,
    /// Same seed, same output; `None` draws one from the OS.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Reject values no sampler could honour.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: &str| Err(EngineError::InvalidParameter(what.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p must be in [0, 1]");
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad("repetition_penalty must be a finite number > 0");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A sampler holds its random state so a seeded generation is reproducible.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    /// A sampler for sample `sample` of one request: seeded `seed + sample` (distinct and
    /// reproducible), or from the OS when no seed was given.
    pub fn fork(&self, sample: usize) -> Self {
        let seed = self.params.seed.map(|seed| seed.wrapping_add(sample as u64));
        Self::new(SamplingParams { seed, ..self.params.clone() })
    }

    /// Pick the next token. `history` is every token so far (prompt and output), for the
    /// repetition penalty. `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.apply_repetition_penalty(logits, history);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let candidates = self.candidates(logits);
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.random::<f32>() * total;
        for &(id, p) in &candidates {
            draw -= p;
            if draw <= 0.0 {
                return id;
            }
        }
        candidates.last().map(|c| c.0).unwrap_or(0)
    }

    fn apply_repetition_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 {
            return;
        }
        let mut seen = vec![false; logits.len()];
        for &id in history {
            let id = id as usize;
            if id < logits.len() && !seen[id] {
                seen[id] = true;
                let l = &mut logits[id];
                *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
            }
        }
    }

    /// Tokens that survive temperature, top-k, top-p and min-p, with unnormalized probabilities,
    /// most probable first.
    fn candidates(&self, logits: &[f32]) -> Vec<(u32, f32)> {
        let p = &self.params;
        let mut ranked: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / p.temperature)).collect();
        ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 {
            ranked.truncate(p.top_k);
        }
        let max = ranked.first().map(|c| c.1).unwrap_or(0.0);
        for c in &mut ranked {
            c.1 = (c.1 - max).exp();
        }
        let total: f32 = ranked.iter().map(|c| c.1).sum();
        if p.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut mass = 0.0;
            let keep = ranked
                .iter()
                .position(|c| {
                    mass += c.1 / total;
                    mass >= p.top_p
                })
                .map_or(ranked.len(), |i| i + 1);
            ranked.truncate(keep);
        }
        if p.min_p > 0.0 {
            // Probabilities relative to the top token: exp(l - max) is exactly p / p_max.
            ranked.retain(|c| c.1 >= p.min_p);
        }
        ranked
    }
}

/// Log-probabilities of a sampled token and of the most probable tokens, by id.
#[derive(Debug, Clone, PartialEq)]
pub struct RawLogprobs {
    pub token: (u32, f32),
    /// Most probable first (the lower id first on ties).
    pub top: Vec<(u32, f32)>,
}

impl Sampler {
    /// The log-probabilities of the distribution `sample` drew `token` from: `logits` as it
    /// left them (repetition penalty and any constraint's mask applied), over the temperature
    /// (1 when greedy), before top-k, top-p and min-p cut it; with the `top` most probable.
    pub fn logprobs(&self, logits: &[f32], token: u32, top: usize) -> RawLogprobs {
        let temperature = if self.params.is_greedy() { 1.0 } else { self.params.temperature };
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total: f64 = logits.iter().map(|&l| f64::from((l - max) / temperature).exp()).sum();
        let log_total = total.ln() as f32;
        let logprob = |id: u32| (logits[id as usize] - max) / temperature - log_total;
        let descending = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let top = top.min(ids.len());
        if top > 0 && top < ids.len() {
            ids.select_nth_unstable_by(top - 1, descending);
        }
        ids.truncate(top);
        ids.sort_unstable_by(descending);
        RawLogprobs { token: (token, logprob(token)), top: ids.into_iter().map(|id| (id, logprob(id))).collect() }
    }
}

/// Index of the largest logit; the first one on ties, as `torch.argmax` does.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(SamplingParams { seed: Some(7), ..params })
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = sampler(SamplingParams::greedy());
        assert_eq!(s.sample(&mut [0.1, 2.0, 2.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        // Token 1 (2.0) is penalized to 1.0, token 3 (-1.0) to -2.0: token 2 (1.5) wins.
        let mut s = sampler(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy() });
        let mut logits = [0.1, 2.0, 1.5, -1.0];
        assert_eq!(s.sample(&mut logits, &[1, 3, 1]), 2);
        assert_eq!(logits, [0.1, 1.0, 1.5, -2.0]);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let mut s = sampler(SamplingParams { temperature: 5.0, top_k: 1, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 3.0, 2.9, 1.0], &[]), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_prefix() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps the first two.
        let s = sampler(SamplingParams { temperature: 1.0, top_p: 0.8, ..Default::default() });
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let ids: Vec<u32> = s.candidates(&logits).iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![0, 1]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_best() {
        // exp(-1) = 0.37 and exp(-3) = 0.05 relative to the best: min_p 0.1 keeps two.
        let s = sampler(SamplingParams { temperature: 1.0, min_p: 0.1, ..Default::default() });
        let ids: Vec<u32> = s.candidates(&[5.0, 4.0, 2.0]).iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![0, 1]);
    }

    #[test]
    fn same_seed_same_tokens_and_sampling_spreads() {
        let params = SamplingParams { temperature: 1.0, seed: Some(42), ..Default::default() };
        let draw = |params: &SamplingParams| {
            let mut s = Sampler::new(params.clone());
            (0..200).map(|_| s.sample(&mut [1.0, 1.0, 1.0, 1.0], &[])).collect::<Vec<_>>()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params));
        assert_ne!(a, draw(&SamplingParams { seed: Some(43), ..params.clone() }));
        for id in 0..4 {
            let n = a.iter().filter(|&&t| t == id).count();
            assert!((25..=75).contains(&n), "token {id} drawn {n} times of 200");
        }
    }

    #[test]
    fn logprobs_are_of_the_tempered_distribution_most_probable_first() {
        let s = sampler(SamplingParams { temperature: 2.0, ..Default::default() });
        let logits = [1.0f32, 3.0, f32::NEG_INFINITY, 3.0, 0.0];
        let lp = s.logprobs(&logits, 0, 3);
        // Over the temperature: exp(0.5), exp(1.5), 0, exp(1.5), exp(0).
        let z = (0.5f32.exp() + 2.0 * 1.5f32.exp() + 1.0).ln();
        assert!((lp.token.1 - (0.5 - z)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 3, 0]);
        let mass: f32 = (0..5).map(|id| s.logprobs(&logits, id, 0).token.1.exp()).sum();
        assert!((mass - 1.0).abs() < 1e-6);
        assert_eq!(s.logprobs(&logits, 2, 0).token.1, f32::NEG_INFINITY);
        // Greedy: the logits as they are.
        let greedy = sampler(SamplingParams::greedy());
        let lp = greedy.logprobs(&[0.0, 0.0], 1, 5);
        assert!((lp.token.1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top.len(), 2);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let bad = [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { min_p: 1.5, ..Default::default() },
            SamplingParams { repetition_penalty: 0.0, ..Default::default() },
        ];
        for p in bad {
            assert!(matches!(p.validate(), Err(EngineError::InvalidParameter(_))), "{p:?}");
        }
        assert!(SamplingParams::default().validate().is_ok());
    }
}
