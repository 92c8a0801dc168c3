//! Continuous batching in the engine: sequences of different lengths, with and without images,
//! joining at different steps, prefilled in small chunks and leaving at different times, each
//! produce exactly the tokens PyTorch's `generate` produced for them alone.

mod common;

use std::sync::Arc;

use common::{Case, Reference, agreement, references};
use vlmserve::engine::{
    BLOCK_TOKENS, Batch, Completion, Constraint, EngineError, FeatureCache, FinishReason, Flow, Fork, GenerationParams,
    ImageFeatures, Limits, Model, PrefixCache, Prompt, PromptImages, SamplingParams,
};
use vlmserve::family::{Detail, ImageBudget};
use vlmserve::package::Precision;
use vlmserve::preprocess::chat_template::ChatMessage;

struct Tagged {
    case: usize,
    max_new: usize,
    events: usize,
    streamed: String,
    /// Stop (as a client that went away) after this many tokens.
    stop_after: Option<usize>,
}

/// A further sample of a request streams into a tag of its own.
impl Fork for Tagged {
    fn fork(&self) -> Self {
        Tagged { events: 0, streamed: String::new(), ..*self }
    }
}

fn params(max_new_tokens: usize) -> GenerationParams {
    GenerationParams { max_new_tokens, ..GenerationParams::default() }
}

fn admit(
    batch: &mut Batch<Tagged>,
    model: &Model,
    reference: &Reference,
    case: usize,
    max_new: usize,
    stop: Option<usize>,
) {
    admit_with(batch, model, reference, case, &params(max_new), stop);
}

fn admit_with(
    batch: &mut Batch<Tagged>,
    model: &Model,
    reference: &Reference,
    case: usize,
    params: &GenerationParams,
    stop: Option<usize>,
) {
    let prompt = prompt(model, reference, case);
    let tag = Tagged { case, max_new: params.max_new_tokens, events: 0, streamed: String::new(), stop_after: stop };
    batch.add(model, tag, prompt, params).map_err(|(_, e)| e).unwrap();
}

fn prompt(model: &Model, reference: &Reference, case: usize) -> Prompt {
    let c: &Case = &reference.cases[case];
    model.codec.prepare(&c.chat_messages(), &c.decoded_images(&reference.dir), &[], &[]).unwrap()
}

/// Step until the batch is empty; admits `later` (case, max_new_tokens) one per step meanwhile.
fn drain(
    batch: &mut Batch<Tagged>,
    model: &mut Model,
    reference: &Reference,
    mut later: Vec<(usize, usize)>,
    min_widest: usize,
) -> Vec<(Tagged, Result<Completion, EngineError>)> {
    let mut done = Vec::new();
    let mut widest = 0;
    while !batch.is_empty() || !later.is_empty() {
        if let Some((case, max_new)) = later.pop() {
            admit(batch, model, reference, case, max_new, None);
        }
        let step = batch.step(model, &mut |tag, event| {
            tag.events += 1;
            tag.streamed.push_str(event.text);
            match tag.stop_after {
                Some(n) if tag.events >= n => Flow::Stop,
                _ => Flow::Continue,
            }
        });
        widest = widest.max(step.decode_rows);
        done.extend(step.finished);
    }
    assert!(widest >= min_widest, "too few sequences shared a decode step (widest {widest})");
    assert_eq!(batch.kv_bytes(model.kv_layout()), 0, "an empty batch holds no cache");
    done
}

#[test]
fn concurrent_sequences_give_their_single_stream_tokens() {
    // Every family: Qwen2-VL's three-axis positions stack and chunk like 1-D ones.
    for reference in references() {
        concurrent_sequences_of(&reference);
    }
}

fn concurrent_sequences_of(reference: &Reference) {
    let mut model = reference.load(Precision::Fp32);
    // Chunks of 64 tokens and 3 tiles: long prompts and multi-tile images are encoded and
    // prefilled over several steps while others decode, tiles of different requests together.
    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: 64, vision_tiles: 3 });
    let n = reference.cases.len();
    let full = reference.max_new_tokens;
    // Half the cases at once with different token budgets, the rest joining one per step.
    for case in 0..n / 2 {
        admit(&mut batch, &model, reference, case, full - 3 * case, None);
    }
    let later: Vec<(usize, usize)> = (n / 2..n).map(|case| (case, full - case)).collect();
    // How many overlap depends on the vision thread's timing; what must hold is the tokens.
    let done = drain(&mut batch, &mut model, reference, later, 1);
    assert_eq!(done.len(), n);
    for (tag, result) in done {
        let case = &reference.cases[tag.case];
        let completion = result.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected = &case.generated_ids[..completion.token_ids.len()];
        assert_eq!(completion.token_ids, expected, "{}: batched tokens differ from PyTorch's", case.name);
        // The reference ran to its full length without an end of sequence.
        assert_eq!(completion.token_ids.len(), tag.max_new, "{}: length", case.name);
        assert_eq!(tag.streamed, completion.text, "{}: streamed text", case.name);
        assert_eq!(completion.prompt_tokens, case.input_ids.len());
        assert!(completion.timings.decode_steps + 1 >= completion.token_ids.len());
    }
}

/// The decoders exported with fused attention: rows joining and leaving gather their buffers,
/// buffers grow as answers lengthen, and the prefix cache reads and restores their blocks; the
/// tokens stay PyTorch's.
#[test]
fn fused_attention_decoders_batch_and_reuse_prefixes_like_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    for reference in Reference::all_fused(dir.path()) {
        concurrent_sequences_of(&reference);
        follow_up_turns_of(&reference);
        sequences_joining_of(&reference);
    }
}

#[test]
fn a_sequence_that_stops_mid_batch_leaves_the_others_unchanged() {
    let reference = references().remove(0);
    let mut model = reference.load(Precision::Fp32);
    // Every image in the first vision call, every prompt in the first step: all start together.
    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: usize::MAX, vision_tiles: 64 });
    let full = reference.max_new_tokens;
    let cases: Vec<usize> = (0..reference.cases.len()).take(4).collect();
    for &case in &cases {
        // The second sequence's client goes away after 5 tokens.
        admit(&mut batch, &model, &reference, case, full, (case == cases[1]).then_some(5));
    }
    let done = drain(&mut batch, &mut model, &reference, Vec::new(), 4);
    for (tag, result) in done {
        let case = &reference.cases[tag.case];
        let completion = result.unwrap();
        if tag.stop_after.is_some() {
            assert_eq!(completion.finish_reason, vlmserve::engine::FinishReason::Cancelled);
            assert_eq!(completion.token_ids, case.generated_ids[..5]);
        } else {
            assert_eq!(completion.token_ids, case.generated_ids, "{}", case.name);
        }
    }
}

/// The fp16 graphs keep their cache in fp16 (grouped blocks, or the fused decoder's buffers
/// written in place): batched rows give each row's single-stream tokens.
#[test]
fn fp16_batches_match_fp16_single_streams() {
    fp16_batches_match_single_streams_of(&references().remove(0));
    let dir = tempfile::tempdir().unwrap();
    for reference in Reference::all_fused(dir.path()) {
        fp16_batches_match_single_streams_of(&reference);
    }
}

fn fp16_batches_match_single_streams_of(reference: &Reference) {
    let mut model = reference.load(Precision::Fp16);
    let alone: Vec<Vec<u32>> = reference
        .cases
        .iter()
        .map(|c| {
            let prompt = model.codec.prepare(&c.chat_messages(), &c.decoded_images(&reference.dir), &[], &[]).unwrap();
            model.generate(prompt, &params(reference.max_new_tokens), &mut |_| Flow::Continue).unwrap().token_ids
        })
        .collect();
    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: 600, vision_tiles: 64 });
    for case in 0..reference.cases.len() {
        admit(&mut batch, &model, reference, case, reference.max_new_tokens, None);
    }
    let (mut agreed, mut total) = (0, 0);
    for (tag, result) in drain(&mut batch, &mut model, reference, Vec::new(), 3) {
        let case = &reference.cases[tag.case];
        let tokens = result.unwrap().token_ids;
        assert_eq!(tokens, alone[tag.case], "{} {}", reference.family, case.name);
        agreed += common::agreement(&tokens, &case.generated_ids);
        total += case.generated_ids.len();
    }
    // Anchored to PyTorch's FP32 tokens with the bound tests/parity.rs holds fp16 to.
    let share = agreed as f64 / total as f64;
    assert!(share >= common::FP16_MIN_AGREEMENT, "{}: fp16 agreement with PyTorch fp32 {share:.2}", reference.family);
}

#[test]
fn a_bad_prompt_is_refused_at_admission_without_touching_the_batch() {
    let reference = references().remove(0);
    let model = reference.load(Precision::Fp32);
    let mut batch: Batch<u32> = Batch::new(model.kv_layout(), Limits::ALONE);
    let case = &reference.cases[0];
    let prompt = model.codec.prepare(&case.chat_messages(), &case.decoded_images(&reference.dir), &[], &[]).unwrap();
    let context = model.codec.info.context_length;
    let (tag, error) = batch.add(&model, 7, prompt, &params(context)).unwrap_err();
    assert_eq!(tag, 7);
    assert!(matches!(error, EngineError::PromptTooLong { .. }), "{error}");
    assert!(batch.is_empty());
}

#[test]
fn a_sequence_withdrawn_before_its_first_token_leaves_the_batch_and_the_others_unchanged() {
    let reference = references().remove(0);
    let mut model = reference.load(Precision::Fp32);
    // One tile per vision call and 32-token prefill chunks: every prompt takes several steps.
    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: 32, vision_tiles: 1 });
    let with_images: Vec<usize> =
        (0..reference.cases.len()).filter(|&c| !reference.cases[c].images.is_empty()).collect();
    let (kept, leaving) = (with_images[0], with_images[1]);
    admit(&mut batch, &model, &reference, kept, reference.max_new_tokens, None);
    admit(&mut batch, &model, &reference, leaving, reference.max_new_tokens, None);
    assert!(batch.withdraw(|_| false).is_empty());
    // Its client leaves after the first step: it goes as soon as no tile of it is in the
    // encoder, before any token of its own. How many steps that takes depends on the encoder's
    // speed beside the other sequence (on a busy machine the other may even finish first).
    let mut withdrawn = Vec::new();
    let mut done = Vec::new();
    for _ in 0..1000 {
        let step = batch.step(&mut model, &mut |tag, _| {
            tag.events += 1;
            Flow::Continue
        });
        done.extend(step.finished);
        withdrawn.extend(batch.withdraw(|tag| tag.case == leaving));
        if !withdrawn.is_empty() {
            break;
        }
    }
    let withdrawn: Vec<(usize, usize)> = withdrawn.iter().map(|t| (t.case, t.events)).collect();
    assert_eq!(withdrawn, [(leaving, 0)], "withdrawn once, before any token");
    assert_eq!(batch.len() + done.len(), 1);
    done.extend(drain(&mut batch, &mut model, &reference, Vec::new(), 0));
    assert_eq!(done.len(), 1);
    let (tag, result) = done.into_iter().next().unwrap();
    assert_eq!(tag.case, kept);
    assert_eq!(result.unwrap().token_ids, reference.cases[kept].generated_ids);
}

/// A sequence constrained by a regex decodes beside unconstrained ones (its mask computed while
/// their decoder call runs): theirs stay PyTorch's tokens, it matches its regex, and its tokens
/// are those it makes alone.
#[test]
fn a_constrained_sequence_follows_its_regex_and_leaves_its_neighbours_unchanged() {
    let reference = references().remove(0);
    let mut model = reference.load(Precision::Fp32);
    let pattern = "[a-z]{2,5}( [a-z]{2,5}){1,3}\\.";
    let constrained = GenerationParams {
        max_new_tokens: 40,
        guide: Some(model.codec.guide(&Constraint::Regex(pattern.into())).unwrap()),
        ..GenerationParams::default()
    };
    let alone = model.generate(prompt(&model, &reference, 0), &constrained, &mut |_| Flow::Continue).unwrap();
    assert_eq!(alone.finish_reason, FinishReason::Stop, "{:?}", alone.text);
    let words: Vec<&str> = alone.text.trim_end_matches('.').split(' ').collect();
    assert!(alone.text.ends_with('.') && (2..=4).contains(&words.len()), "{:?}", alone.text);
    assert!(words.iter().all(|w| (2..=5).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase())));

    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: usize::MAX, vision_tiles: 64 });
    let full = reference.max_new_tokens;
    admit_with(&mut batch, &model, &reference, 0, &constrained, None);
    for case in 1..3 {
        admit(&mut batch, &model, &reference, case, full, None);
    }
    for (tag, result) in drain(&mut batch, &mut model, &reference, Vec::new(), 3) {
        let completion = result.unwrap();
        if tag.case == 0 {
            assert_eq!(completion.token_ids, alone.token_ids, "batched constrained tokens");
            assert_eq!(completion.text, alone.text);
        } else {
            assert_eq!(completion.token_ids, reference.cases[tag.case].generated_ids);
        }
    }
}

/// Samples of one prompt (OpenAI's `n`) are forked from one image encoding and one prefill:
/// each decodes exactly what the prompt decodes alone with that sample's seed, greedy samples
/// are PyTorch's tokens, and a neighbour in the batch is unchanged.
#[test]
fn samples_of_one_prompt_share_its_prefill_and_each_equals_its_seed_alone() {
    let reference = references().remove(0);
    let mut model = reference.load(Precision::Fp32);
    let case = (0..reference.cases.len()).find(|&c| !reference.cases[c].images.is_empty()).unwrap();
    let sampling = |seed| SamplingParams { temperature: 1.0, seed: Some(seed), ..SamplingParams::default() };
    let one = |seed| GenerationParams { max_new_tokens: 12, ignore_eos: true, sampling: sampling(seed), ..params(0) };
    let alone: Vec<Vec<u32>> = (0..3)
        .map(|i| model.generate(prompt(&model, &reference, case), &one(11 + i), &mut |_| Flow::Continue).unwrap())
        .map(|c| c.token_ids)
        .collect();
    assert!(alone[0] != alone[1] || alone[1] != alone[2], "three seeds drew the same tokens");
    let greedy = GenerationParams { samples: 2, ..params(reference.max_new_tokens) };

    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: 64, vision_tiles: 2 });
    admit_with(&mut batch, &model, &reference, case, &GenerationParams { samples: 3, ..one(11) }, None);
    let neighbour = usize::from(case == 0);
    admit_with(&mut batch, &model, &reference, neighbour, &greedy, None);
    assert_eq!(batch.len(), 2);
    assert_eq!(batch.rows().count(), 5, "rows to come count every sample");
    let done = drain(&mut batch, &mut model, &reference, Vec::new(), 3);
    let mut sampled: Vec<(usize, Completion)> = Vec::new();
    let mut greedy_done = Vec::new();
    for (tag, result) in done {
        let completion = result.unwrap();
        assert_eq!(tag.streamed, completion.text, "each sample streams its own text");
        if tag.case == case {
            sampled.push((completion.sample, completion));
        } else {
            greedy_done.push(completion);
        }
    }
    sampled.sort_by_key(|(sample, _)| *sample);
    let samples: Vec<usize> = sampled.iter().map(|(sample, _)| *sample).collect();
    assert_eq!(samples, [0, 1, 2]);
    for (sample, completion) in &sampled {
        assert_eq!(completion.token_ids, alone[*sample], "sample {sample} differs from seed {} alone", 11 + sample);
        // One encoding and one prefill, shared: the forks carry the first's timings.
        assert_eq!(completion.timings.prefill_s, sampled[0].1.timings.prefill_s);
    }
    assert_eq!(greedy_done.len(), 2);
    for completion in greedy_done {
        let expected = &reference.cases[neighbour].generated_ids;
        assert_eq!(&completion.token_ids, expected, "greedy sample {}", completion.sample);
    }
}

/// A model of `reference` with a prefix cache of `bytes`.
fn with_prefix_cache(reference: &Reference, bytes: usize) -> (Model, Arc<PrefixCache>) {
    let cache = Arc::new(PrefixCache::new(bytes).unwrap());
    (reference.load(Precision::Fp32).with_prefix_cache(Some(cache.clone())), cache)
}

fn prepare(model: &Model, reference: &Reference, case: &Case) -> Prompt {
    model.codec.prepare(&case.chat_messages(), &case.decoded_images(&reference.dir), &[], &[]).unwrap()
}

/// The rows the prefix cache has seen: each one's images and the tokens it fed the decoder.
#[derive(Default)]
struct CachedRows(Vec<(Vec<String>, Vec<u32>)>);

impl CachedRows {
    /// A finished sequence's row: its prompt and every generated token but the last (never fed).
    fn add(&mut self, case: &Case, generated: &[u32]) {
        let mut row = case.input_ids.clone();
        row.extend_from_slice(&generated[..generated.len().saturating_sub(1)]);
        self.0.push((case.images.clone(), row));
    }

    /// The tokens `case` may reuse: the full blocks a row shares with its prompt short of the
    /// last token, and never past its first image token unless the row showed the same images.
    fn reusable(&self, case: &Case, image_token: u32) -> usize {
        let prompt = &case.input_ids[..case.input_ids.len() - 1];
        let first_image = prompt.iter().position(|&t| t == image_token).unwrap_or(prompt.len());
        let shared = |(images, row): &(Vec<String>, Vec<u32>)| {
            let common = agreement(row, prompt);
            if *images == case.images { common } else { common.min(first_image) }
        };
        self.0.iter().map(shared).max().unwrap_or(0) / BLOCK_TOKENS * BLOCK_TOKENS
    }
}

/// A chat client's turns about one picture (each re-sending the picture and the history) and
/// one system prompt before different pictures: with the prefix cache, each prompt prefills
/// only what no earlier row had, and the answers are still PyTorch's token for token, on every
/// family (Qwen2-VL's three-axis positions resume mid-prompt). The blocks reused are exactly
/// the shared full blocks, generated tokens included, and never an image token of another
/// picture, though every picture's tokens are the same placeholder ids.
#[test]
fn follow_up_turns_and_a_shared_system_prompt_reuse_cached_blocks_and_match_pytorch() {
    for reference in references() {
        follow_up_turns_of(&reference);
    }
}

fn follow_up_turns_of(reference: &Reference) {
    let (mut model, cache) = with_prefix_cache(reference, 64 << 20);
    let image_token = model.codec.family.image_token_id();
    let mut rows = CachedRows::default();
    for case in reference.conversations() {
        let expected = rows.reusable(&case, image_token);
        let params = params(reference.max_new_tokens);
        let completion = model.generate(prepare(&model, reference, &case), &params, &mut |_| Flow::Continue).unwrap();
        let name = format!("{} {}", reference.family, case.name);
        assert_eq!(completion.token_ids, case.generated_ids, "{name}: tokens differ from PyTorch's");
        assert_eq!(completion.timings.prefix_cached_tokens, expected, "{name}: reused tokens");
        assert_eq!(completion.usage(true).prompt_tokens_details.cached_tokens, expected, "{name}");
        if ["conversation_2", "conversation_3", "system_grayscale"].contains(&case.name.as_str()) {
            assert!(expected >= BLOCK_TOKENS, "{name}: the fixture shares too little to test reuse");
        }
        rows.add(&case, &completion.token_ids);
    }
    assert!(cache.bytes() > 0);
}

/// A prompt prepared while the feature cache holds its pictures' features takes them instead
/// of processing the pixels (a follow-up turn, with the prefix cache off), and the answers are
/// still PyTorch's on every family.
#[test]
fn a_prompt_whose_features_are_cached_skips_processing_and_matches_pytorch() {
    for reference in references() {
        let cache = Arc::new(FeatureCache::new(64 << 20).unwrap());
        let mut model = reference.load(Precision::Fp32).with_feature_cache(Some(cache.clone()));
        let mut seen = Vec::new();
        for case in reference.conversations() {
            let images = case.decoded_images(&reference.dir);
            let prompt = model.codec.prepare_cached(&case.chat_messages(), &images, &[], &[], Some(&cache)).unwrap();
            let name = format!("{} {}", reference.family, case.name);
            let cached = !case.images.is_empty() && seen.contains(&case.images);
            assert_eq!(matches!(prompt.images, Some(PromptImages::Features { .. })), cached, "{name}");
            let processed = prepare(&model, &reference, &case);
            assert_eq!(prompt.input_ids, processed.input_ids, "{name}: the layouts from the sizes expand alike");
            assert_eq!(prompt.positions.prompt, processed.positions.prompt, "{name}");
            let completion =
                model.generate(prompt, &params(reference.max_new_tokens), &mut |_| Flow::Continue).unwrap();
            assert_eq!(completion.token_ids, case.generated_ids, "{name}: tokens differ from PyTorch's");
            let features = if cached {
                ImageFeatures::FeatureCache
            } else if case.images.is_empty() {
                ImageFeatures::NoImages
            } else {
                ImageFeatures::Encoded
            };
            assert_eq!(completion.timings.image_features, features, "{name}");
            seen.push(case.images.clone());
        }
        assert!(seen.iter().filter(|i| !i.is_empty()).count() > 2, "{}: too few pictures", reference.family);
    }
}

/// `case`'s answer with its prompt prefilled in chunks of `prefill_tokens`.
fn chunked_answer(model: &mut Model, reference: &Reference, case: &Case, prefill_tokens: usize) -> Vec<u32> {
    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens, vision_tiles: 2 });
    let tag = Tagged { case: 0, max_new: 0, events: 0, streamed: String::new(), stop_after: None };
    let params = params(reference.max_new_tokens);
    batch.add(model, tag, prepare(model, reference, case), &params).map_err(|(_, e)| e).unwrap();
    let mut answer = Vec::new();
    while !batch.is_empty() {
        for (_, result) in batch.step(model, &mut |_, _| Flow::Continue).finished {
            answer = result.unwrap().token_ids;
        }
    }
    answer
}

/// In FP16 and INT8 the answers need not be PyTorch's, but the prefix cache (blocks kept in
/// the cache's own element type) must not change them. FP16: the same conversations with and
/// without it give the same tokens, on every family. INT8's kernels quantize activations per
/// call, so where prefilling the prompt in other chunks already changes an answer (the tiny
/// idefics3 fixture's near-ties), reused blocks may too: there the answer must equal the
/// cache-off one wherever chunking does not change it.
#[test]
fn reduced_precisions_answer_alike_with_and_without_the_prefix_cache() {
    let (mut compared, mut answers) = (0, 0);
    for reference in references() {
        for precision in [Precision::Fp16, Precision::Int8] {
            let mut plain = reference.load(precision);
            let cache = Arc::new(PrefixCache::new(64 << 20).unwrap());
            let mut cached = reference.load(precision).with_prefix_cache(Some(cache.clone()));
            let mut reused = 0;
            let cases = reference.conversations();
            for case in &cases {
                answers += 1;
                let params = params(reference.max_new_tokens);
                let name = format!("{} {precision:?} {}", reference.family, case.name);
                let expected =
                    plain.generate(prepare(&plain, &reference, case), &params, &mut |_| Flow::Continue).unwrap();
                let answer =
                    cached.generate(prepare(&cached, &reference, case), &params, &mut |_| Flow::Continue).unwrap();
                reused += answer.timings.prefix_cached_tokens;
                let shape_free = precision == Precision::Fp16
                    || chunked_answer(&mut plain, &reference, case, 16) == expected.token_ids;
                if shape_free {
                    assert_eq!(answer.token_ids, expected.token_ids, "{name}: the prefix cache changed the answer");
                    compared += 1;
                }
            }
            let family = &reference.family;
            assert!(reused >= 3 * BLOCK_TOKENS, "{family} {precision:?}: only {reused} tokens reused");
            assert!(cache.bytes() > 0);
        }
    }
    assert!(2 * compared >= answers, "only {compared} of {answers} answers compared");
}

/// The same prompts in a continuous batch, a few at a time, prefilled in chunks: a joining
/// sequence starts from its cached prefix, and every answer is still PyTorch's.
#[test]
fn sequences_joining_a_batch_start_from_their_cached_prefix() {
    for reference in references() {
        sequences_joining_of(&reference);
    }
}

fn sequences_joining_of(reference: &Reference) {
    let (mut model, _cache) = with_prefix_cache(reference, 64 << 20);
    let cases = reference.conversations();
    let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: 48, vision_tiles: 2 });
    let waves: [&[&str]; 3] = [
        &["conversation_1", "system_one_image"],
        &["conversation_2", "system_grayscale", "system_rgba"],
        &["conversation_3", "system_tiny_image"],
    ];
    let mut reused = 0;
    for wave in waves {
        for name in wave {
            let case = cases.iter().position(|c| c.name == *name).unwrap();
            let tag = Tagged { case, max_new: 0, events: 0, streamed: String::new(), stop_after: None };
            let prompt = prepare(&model, reference, &cases[case]);
            batch.add(&model, tag, prompt, &params(reference.max_new_tokens)).map_err(|(_, e)| e).unwrap();
        }
        while !batch.is_empty() {
            for (tag, result) in batch.step(&mut model, &mut |_, _| Flow::Continue).finished {
                let case = &cases[tag.case];
                let completion = result.unwrap();
                assert_eq!(completion.token_ids, case.generated_ids, "{} {}", reference.family, case.name);
                reused += completion.timings.prefix_cached_tokens;
            }
        }
    }
    assert!(reused >= 3 * BLOCK_TOKENS, "{}: only {reused} tokens reused", reference.family);
}

/// A picture of its own for each `i`: a coloured square on a background, both set by `i`.
fn numbered_picture(i: u32) -> image::RgbImage {
    let (x0, y0) = (8 + (i % 5) * 36, 8 + (i / 5 % 4) * 30);
    image::RgbImage::from_fn(224, 168, |x, y| {
        if (x0..x0 + 40).contains(&x) && (y0..y0 + 40).contains(&y) {
            image::Rgb([(i * 53 % 256) as u8, (i * 97 % 256) as u8, (255 - i * 31 % 256) as u8])
        } else {
            image::Rgb([(200 + i) as u8, 220, (i * 6) as u8])
        }
    })
}

/// Forty pictures with the same question, sent twice each, interleaved in a batch with the
/// prefix cache on: each answer equals its answer with the cache off, and no prompt reuses a
/// block holding another picture's tokens. The same picture at `detail: low` and `high`
/// shares no image block either.
#[test]
fn forty_pictures_with_one_question_never_share_image_blocks() {
    for reference in references() {
        let mut plain = reference.load(Precision::Fp32);
        let (mut model, _cache) = with_prefix_cache(&reference, 64 << 20);
        let image_token = model.codec.family.image_token_id();
        let question = [ChatMessage::user(1, "What is in the image?")];
        let ask = |model: &Model, i: u32, detail| {
            let budget = [ImageBudget { detail, max_pixels: None }];
            model.codec.prepare(&question, &[numbered_picture(i)], &budget, &[]).unwrap()
        };
        let params = params(6);
        let alone: Vec<Vec<u32>> = (0..40)
            .map(|i| plain.generate(ask(&plain, i, Detail::Auto), &params, &mut |_| Flow::Continue).unwrap().token_ids)
            .collect();
        assert!(alone.iter().any(|a| *a != alone[0]), "{}: the pictures give one answer", reference.family);

        let order: Vec<u32> = (0..2).flat_map(|_| (0..20).flat_map(|i| [i, i + 20])).collect();
        let mut batch = Batch::new(model.kv_layout(), Limits { prefill_tokens: 64, vision_tiles: 4 });
        let mut seen = [false; 40];
        for wave in order.chunks(5) {
            for &i in wave {
                let prompt = ask(&model, i, Detail::Auto);
                let first_image = prompt.input_ids.iter().position(|&t| t == image_token).unwrap();
                let tag = Tagged {
                    case: i as usize,
                    max_new: first_image,
                    events: 0,
                    streamed: String::new(),
                    stop_after: None,
                };
                batch.add(&model, tag, prompt, &params).map_err(|(_, e)| e).unwrap();
            }
            while !batch.is_empty() {
                for (tag, result) in batch.step(&mut model, &mut |_, _| Flow::Continue).finished {
                    let completion = result.unwrap();
                    assert_eq!(completion.token_ids, alone[tag.case], "{} picture {}", reference.family, tag.case);
                    let first_image = tag.max_new;
                    if !seen[tag.case] {
                        assert!(
                            completion.timings.prefix_cached_tokens <= first_image,
                            "{} picture {}: {} tokens reused, its first image token is at {first_image}",
                            reference.family,
                            tag.case,
                            completion.timings.prefix_cached_tokens
                        );
                    }
                    seen[tag.case] = true;
                }
            }
        }

        let mut cached = |detail| {
            let prompt = ask(&model, 40, detail);
            let first_image = prompt.input_ids.iter().position(|&t| t == image_token).unwrap();
            let completion = model.generate(prompt, &params, &mut |_| Flow::Continue).unwrap();
            (completion.timings.prefix_cached_tokens, first_image)
        };
        cached(Detail::Low);
        let (reused, first_image) = cached(Detail::High);
        assert!(reused <= first_image, "{}: low and high shared an image block", reference.family);
    }
}

/// A prefix cache of a few blocks evicts as it goes: the answers stay PyTorch's and the cache
/// stays within its bytes.
#[test]
fn a_small_prefix_cache_evicts_and_answers_stay_exact() {
    let reference = references().remove(0);
    let block_bytes = reference.load(Precision::Fp32).kv_layout().bytes_per_token() * BLOCK_TOKENS;
    let (mut model, cache) = with_prefix_cache(&reference, 5 * block_bytes);
    for case in reference.conversations().iter().chain(&reference.conversations()) {
        let params = params(reference.max_new_tokens);
        let completion = model.generate(prepare(&model, &reference, case), &params, &mut |_| Flow::Continue).unwrap();
        assert_eq!(completion.token_ids, case.generated_ids, "{}", case.name);
        assert!(cache.bytes() <= 5 * block_bytes && cache.bytes() > 0, "{} bytes held", cache.bytes());
    }
}
