//! Engine behaviour on the tiny fixture model: bad input gets typed errors, sampling is
//! reproducible, stop strings cut, streaming never splits characters, and the CLI prints
//! what the engine computes.

mod common;

use std::path::Path;

use common::{Reference, references};
use vlmserve::engine::{
    EngineError, FeatureCache, FinishReason, Flow, GenerationParams, ImageFeatures, Model, ModelOptions, SamplingParams,
};
use vlmserve::family::FamilyError;
use vlmserve::package::{PackageError, Precision};
use vlmserve::preprocess::chat_template::ChatMessage;
use vlmserve::runtime::RuntimeError;

fn fixture() -> Reference {
    references().remove(0)
}

fn load(dir: &Path) -> Result<Model, EngineError> {
    Model::load(dir, &ModelOptions::default())
}

/// A copy of the fixture package that a test may damage.
fn package_copy(reference: &Reference) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_dir(&reference.package_dir(), tmp.path());
    tmp
}

fn generate(
    model: &mut Model,
    messages: &[ChatMessage],
    params: &GenerationParams,
) -> Result<vlmserve::engine::Completion, EngineError> {
    let prompt = model.codec.prepare(messages, &[], &[], &[])?;
    model.generate(prompt, params, &mut |_| Flow::Continue)
}

#[test]
fn missing_variant_lists_the_available_ones() {
    let reference = fixture();
    let options = ModelOptions { precision: Precision::Q4, ..ModelOptions::default() };
    let err = Model::load(&reference.package_dir(), &options).unwrap_err();
    match err {
        EngineError::Package(PackageError::VariantMissing { requested, available, .. }) => {
            assert_eq!(requested, Precision::Q4);
            assert_eq!(available, "fp32, fp16, int8");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn missing_and_corrupt_graphs_are_typed_errors() {
    let reference = fixture();
    let tmp = package_copy(&reference);
    std::fs::remove_file(tmp.path().join("onnx/decoder_model_merged.onnx")).unwrap();
    assert!(matches!(load(tmp.path()), Err(EngineError::Package(PackageError::VariantMissing { .. }))));

    let tmp = package_copy(&reference);
    std::fs::write(tmp.path().join("onnx/vision_encoder.onnx"), b"not an onnx graph").unwrap();
    assert!(matches!(load(tmp.path()), Err(EngineError::Runtime(RuntimeError::Session { .. }))));
}

/// A config.json without `image_token_id` takes the family's default, outside this tokenizer's
/// vocabulary: refused at load instead of answering every image request with a 500.
#[test]
fn an_image_token_id_the_tokenizer_disagrees_with_is_refused_at_load() {
    let reference = fixture();
    let tmp = package_copy(&reference);
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("image_token_id");
    std::fs::write(&path, config.to_string()).unwrap();
    match load(tmp.path()) {
        Err(EngineError::Inconsistent(m)) => assert!(m.contains("128257") && m.contains("<image>"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
}

/// Graphs that load but do not fit together (here another family's vision encoder) fail the
/// warm-up, which runs at load, instead of every image request.
#[test]
fn a_vision_encoder_that_does_not_fit_fails_the_warm_up() {
    let reference = fixture();
    load(&reference.package_dir()).unwrap().warm_up().unwrap();
    let tmp = package_copy(&reference);
    let other = common::root().join("tests/fixtures/qwen2.5-vl-tiny/package/onnx/vision_encoder.onnx");
    std::fs::copy(other, tmp.path().join("onnx/vision_encoder.onnx")).unwrap();
    let mut swapped = load(tmp.path()).expect("each graph loads on its own");
    let error = swapped.warm_up().unwrap_err();
    assert!(error.to_string().contains("vision encoder"), "{error}");
}

#[test]
fn graphs_that_disagree_with_the_config_are_rejected() {
    let reference = fixture();
    let tmp = package_copy(&reference);
    let path = tmp.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let layers = config["text_config"]["num_hidden_layers"].as_u64().unwrap();
    config["text_config"]["num_hidden_layers"] = (layers + 1).into();
    std::fs::write(&path, config.to_string()).unwrap();
    match load(tmp.path()) {
        Err(EngineError::GraphMismatch(m)) => assert!(m.contains("num_hidden_layers"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn unknown_family_and_non_package_folders_are_rejected() {
    let reference = fixture();
    let tmp = package_copy(&reference);
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap().replace("\"idefics3\"", "\"llava_next\"");
    std::fs::write(&path, text).unwrap();
    assert!(
        matches!(load(tmp.path()), Err(EngineError::Family(FamilyError::UnsupportedModelType(t))) if t == "llava_next")
    );

    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(load(empty.path()), Err(EngineError::Package(PackageError::NotAPackage { .. }))));
}

#[test]
fn prompt_errors_are_typed() {
    let reference = fixture();
    let mut model = reference.load(Precision::Fp32);
    let params = GenerationParams { max_new_tokens: 4, ..GenerationParams::default() };

    let empty = generate(&mut model, &[ChatMessage::user(0, "")], &params);
    assert!(matches!(empty, Err(EngineError::EmptyPrompt)), "{empty:?}");

    let images = reference.cases.iter().find(|c| c.images.len() == 1).unwrap().decoded_images(&reference.dir);
    let two = vec![images[0].clone(), images[0].clone()];
    let err = model.codec.prepare(&[ChatMessage::user(1, "one placeholder")], &two, &[], &[]).unwrap_err();
    assert!(
        matches!(err, EngineError::Family(FamilyError::ImageCountMismatch { placeholders: 1, images: 2 })),
        "{err:?}"
    );

    let context = model.codec.info.context_length;
    let long = "shape ".repeat(context);
    let err = generate(&mut model, &[ChatMessage::user(0, &long)], &params).unwrap_err();
    assert!(matches!(err, EngineError::PromptTooLong { context: c, .. } if c == context), "{err:?}");

    let bad =
        GenerationParams { sampling: SamplingParams { top_p: 0.0, ..SamplingParams::default() }, ..params.clone() };
    let err = generate(&mut model, &[ChatMessage::user(0, "hi")], &bad).unwrap_err();
    assert!(matches!(err, EngineError::InvalidParameter(_)), "{err:?}");

    // A budget that would wrap prompt + max_new_tokens past the context check.
    let huge = GenerationParams { max_new_tokens: usize::MAX - 1, ..params.clone() };
    let err = generate(&mut model, &[ChatMessage::user(0, "hi")], &huge).unwrap_err();
    assert!(matches!(err, EngineError::PromptTooLong { .. }), "{err:?}");

    let zero = GenerationParams { max_new_tokens: 0, ..params };
    assert!(matches!(
        generate(&mut model, &[ChatMessage::user(0, "hi")], &zero),
        Err(EngineError::InvalidParameter(_))
    ));
}

#[test]
fn seeded_sampling_is_reproducible() {
    let reference = fixture();
    let mut model = reference.load(Precision::Fp32);
    let sampled = |model: &mut Model, seed| {
        let sampling =
            SamplingParams { temperature: 1.5, top_k: 50, top_p: 0.95, seed: Some(seed), ..Default::default() };
        let params = GenerationParams { sampling, max_new_tokens: 24, ignore_eos: true, ..Default::default() };
        generate(model, &[ChatMessage::user(0, "Describe the image.")], &params).unwrap().token_ids
    };
    let a = sampled(&mut model, 1);
    assert_eq!(a.len(), 24);
    assert_eq!(a, sampled(&mut model, 1));
    assert_ne!(a, sampled(&mut model, 2), "different seeds gave identical samples");
}

#[test]
fn stop_strings_cut_the_answer_and_streaming_agrees() {
    let reference = fixture();
    let mut model = reference.load(Precision::Fp32);
    let case = reference.cases.iter().find(|c| c.images.is_empty()).expect("a text-only case");
    let full = &case.generated_text;
    // Stop at a word in the middle of the reference answer.
    let word = full.split_whitespace().nth(2).expect("an answer of several words").to_string();
    let cut = full.find(&word).unwrap();
    let params = GenerationParams { max_new_tokens: reference.max_new_tokens, stop: vec![word], ..Default::default() };
    let prompt = model.codec.prepare(&case.chat_messages(), &[], &[], &[]).unwrap();
    let mut streamed = String::new();
    let out = model
        .generate(prompt, &params, &mut |e| {
            streamed.push_str(e.text);
            Flow::Continue
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, full[..cut]);
    assert_eq!(streamed, out.text);
}

#[test]
fn a_callback_can_stop_generation() {
    let reference = fixture();
    let mut model = reference.load(Precision::Fp32);
    let prompt = model.codec.prepare(&[ChatMessage::user(0, "Describe the image.")], &[], &[], &[]).unwrap();
    let params = GenerationParams { max_new_tokens: 20, ignore_eos: true, ..Default::default() };
    let mut seen = 0;
    let out = model
        .generate(prompt, &params, &mut |_| {
            seen += 1;
            if seen == 3 { Flow::Stop } else { Flow::Continue }
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Cancelled);
    assert_eq!(out.token_ids.len(), 3);
}

#[test]
fn streaming_never_splits_a_character() {
    let reference = fixture();
    let model = reference.load(Precision::Fp32);
    let text = "a red circle é € 😀 ok";
    let ids = model.codec.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
    assert!(ids.len() > text.chars().count() / 2, "expected byte-level pieces");
    let mut detok = vlmserve::engine::Detokenizer::new();
    let mut out = String::new();
    for id in ids {
        let piece = detok.push(&model.codec.tokenizer, id).unwrap();
        assert!(!piece.contains('\u{FFFD}'), "piece {piece:?} splits a character");
        out.push_str(&piece);
    }
    out.push_str(&detok.finish(&model.codec.tokenizer).unwrap());
    assert_eq!(out, text);
}

#[test]
fn cli_ask_json_prints_the_reference_tokens() {
    let reference = fixture();
    let case = reference.cases.iter().find(|c| c.images.len() == 1).unwrap();
    let text = case.messages[0]["content"].as_array().unwrap().iter().find_map(|p| p["text"].as_str()).unwrap();
    let out = common::vlmserve()
        .args(["ask", "--json", "--model"])
        .arg(reference.package_dir())
        .arg("--image")
        .arg(reference.dir.join(&case.images[0]))
        .args(["--max-new-tokens", &reference.max_new_tokens.to_string(), text])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).unwrap();
    assert_eq!(ids, case.generated_ids);
    assert_eq!(json["prompt_tokens"], case.input_ids.len());
    assert!(json["timings"]["vision_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn cli_reports_bad_images_and_models_without_panicking() {
    let reference = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let run = |args: &[&std::ffi::OsStr]| common::vlmserve().args(args).output().unwrap();
    let out = run(&[
        "ask".as_ref(),
        "--model".as_ref(),
        reference.package_dir().as_os_str(),
        "--image".as_ref(),
        bad.as_os_str(),
        "hi".as_ref(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("bad.png") && !stderr.contains("panicked"), "{stderr}");

    let out = run(&["ask".as_ref(), "--model".as_ref(), "no-such-model".as_ref(), "hi".as_ref()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no model named \"no-such-model\""), "{stderr}");
}

#[test]
fn unavailable_gpu_provider_is_an_error_unless_fallback_is_allowed() {
    let reference = fixture();
    let case = reference.cases.iter().find(|c| c.images.is_empty()).unwrap();
    let text = case.messages[0]["content"][0]["text"].as_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ask = |fallback: bool| {
        let config = tmp.path().join(format!("cuda-{fallback}.toml"));
        let toml = format!(
            "[[models]]\nname = \"gpu\"\npath = {:?}\nproviders = [{{ kind = \"cuda\" }}]\nfallback_to_cpu = {fallback}\n",
            reference.package_dir()
        );
        std::fs::write(&config, toml).unwrap();
        common::vlmserve()
            .arg("--config")
            .arg(&config)
            .args(["ask", "--json", "--model", "gpu", "--max-new-tokens", &reference.max_new_tokens.to_string(), text])
            .output()
            .unwrap()
    };
    // This machine's ONNX Runtime is the CPU build: CUDA cannot register.
    let refused = ask(false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("execution provider cuda is not available"), "{stderr}");

    let fell_back = ask(true);
    let stderr = String::from_utf8_lossy(&fell_back.stderr);
    assert!(fell_back.status.success(), "{stderr}");
    assert!(stderr.contains("falling back to CPU"), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&fell_back.stdout).unwrap();
    let ids: Vec<u32> = serde_json::from_value(json["token_ids"].clone()).unwrap();
    assert_eq!(ids, case.generated_ids);
}

#[test]
fn a_repeated_image_reuses_its_features_and_gives_the_same_tokens() {
    let reference = fixture();
    let cache = std::sync::Arc::new(FeatureCache::new(64 << 20).unwrap());
    let mut model = reference.load(Precision::Fp32).with_feature_cache(Some(cache.clone()));
    let with_images: Vec<_> = reference.cases.iter().filter(|c| !c.images.is_empty()).take(2).collect();
    let params = GenerationParams { max_new_tokens: reference.max_new_tokens, ..GenerationParams::default() };
    let mut run = |case: &common::Case| {
        let prompt =
            model.codec.prepare(&case.chat_messages(), &case.decoded_images(&reference.dir), &[], &[]).unwrap();
        let completion = model.generate(prompt, &params, &mut |_| Flow::Continue).unwrap();
        // Greedy tokens equal PyTorch's whether the features came from the encoder or the cache.
        assert_eq!(completion.token_ids, case.generated_ids, "{}", case.name);
        completion.timings.image_features
    };
    let (first, second) = (with_images[0], with_images[1]);
    assert_eq!(run(first), ImageFeatures::Encoded, "a new image runs the vision encoder");
    let held = cache.bytes();
    assert!(held > 0);
    assert_eq!(run(first), ImageFeatures::FeatureCache, "the same image again comes from the cache");
    assert_eq!(run(second), ImageFeatures::Encoded, "another image misses");
    assert!(cache.bytes() > held);
    assert_eq!((run(first), run(second)), (ImageFeatures::FeatureCache, ImageFeatures::FeatureCache));
}

#[test]
fn cli_bench_times_the_stages_and_can_skip_splitting() {
    let reference = fixture();
    let case = reference.cases.iter().find(|c| c.name == "large_nonsquare").unwrap();
    let text = "Describe the shapes in this wide picture.";
    let bench = |extra: &[&str]| {
        let out = common::vlmserve()
            .args(["bench", "--json", "--runs", "2", "--new-tokens", "4", "--model"])
            .arg(reference.package_dir())
            .arg("--image")
            .arg(reference.dir.join(&case.images[0]))
            .args(["--prompt", text])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let split = bench(&["--repeated-image"]);
    assert_eq!(split["prompt_tokens"], case.input_ids.len());
    assert_eq!((split["runs"].as_u64(), split["new_tokens"].as_u64()), (Some(2), Some(4)));
    let median = |report: &serde_json::Value, key: &str| report[key]["median"].as_f64().unwrap();
    for key in ["image_decode_s", "preprocess_s", "vision_s", "prefill_s", "decode_tokens_per_second"] {
        assert!(median(&split, key) > 0.0, "{key}: {split}");
    }
    let stages: f64 = ["image_decode_s", "preprocess_s", "vision_s", "prefill_s"]
        .iter()
        .map(|k| split[k]["min"].as_f64().unwrap())
        .sum();
    assert!(split["time_to_first_token_s"]["max"].as_f64().unwrap() >= stages * 0.999, "{split}");
    assert!(split["repeated_image_time_to_first_token_s"]["median"].as_f64().is_some());
    assert!(split["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    let one_tile = bench(&["--no-split"]);
    assert!(one_tile["prompt_tokens"].as_u64().unwrap() < split["prompt_tokens"].as_u64().unwrap(), "{one_tile}");

    let out =
        common::vlmserve().args(["bench", "--runs", "0", "--model"]).arg(reference.package_dir()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--runs and --new-tokens must be at least 1"));
}

#[test]
fn cli_bench_refuses_bad_arguments_with_their_reason() {
    let reference = fixture();
    let run = |extra: &[&str]| {
        let out =
            common::vlmserve().args(["bench", "--model"]).arg(reference.package_dir()).args(extra).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // A malformed override is a usage error (clap's exit code 2), naming the value.
    let (code, stderr) = run(&["--processor", "nonsense"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("\"nonsense\" is not KEY=VALUE"), "{stderr}");
    // A missing image file names the file and the OS error, without a panic.
    let (code, stderr) = run(&["--image", "/no/such/picture.png"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: /no/such/picture.png: No such file"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cli_ask_and_bench_take_the_image_budget_of_the_api() {
    let fixture = common::root().join("tests/fixtures/qwen2.5-vl-tiny");
    let tmp = tempfile::tempdir().unwrap();
    let large = tmp.path().join("large.png");
    image::RgbImage::new(1600, 1200).save(&large).unwrap();
    for command in [
        &["ask", "--max-new-tokens", "1"][..],
        &["bench", "--new-tokens", "1", "--runs", "1", "--warmup", "0", "--prompt"][..],
    ] {
        let run = |budget: &[&str]| {
            common::vlmserve()
                .args(command)
                .arg("What is in the image?")
                .args(["--json", "--processor", "low_detail_max_pixels=6272", "--model"])
                .arg(fixture.join("package"))
                .arg("--image")
                .arg(&large)
                .args(budget)
                .output()
                .unwrap()
        };
        let prompt_tokens = |budget: &[&str]| {
            let out = run(budget);
            assert!(out.status.success(), "{command:?}: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["prompt_tokens"].as_u64().unwrap()
        };
        // As tests/http.rs's qwen2_vl_serves_with_per_image_budgets: 24 image tokens at the
        // fixture's cap, 6 at `low` (56x84 pixels), 12 at 9408 pixels (112x84).
        let high = prompt_tokens(&[]);
        assert_eq!(prompt_tokens(&["--detail", "high"]), high, "{command:?}");
        assert_eq!(high - prompt_tokens(&["--detail", "low"]), 24 - 6, "{command:?}");
        assert_eq!(high - prompt_tokens(&["--max-pixels", "9408"]), 24 - 12, "{command:?}");
        for bad in [["--detail", "tiny"], ["--max-pixels", "0"]] {
            let out = run(&bad);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command:?}: {stderr}");
            assert!(stderr.contains(bad[0]) && !stderr.contains("panicked"), "{stderr}");
        }
    }
}
