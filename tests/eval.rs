//! `vlmserve eval` end to end on the committed default model (models/shapes-vlm) and a small
//! committed set: 20 items from the held-out evaluation set (`vlmexport.training.synthetic --out
//! tests/fixtures/eval-small --images 5 --bad-lines`), then a malformed line and an item
//! whose image is missing, which are reported with their line numbers and counted as failed.

mod common;

use std::process::Output;

use serde_json::Value;

fn eval(extra: &[&str]) -> Output {
    let model = common::root().join("models/shapes-vlm/package");
    let data = common::root().join("tests/fixtures/eval-small/eval.jsonl");
    common::vlmserve()
        .arg("eval")
        .arg("--model")
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .args(extra)
        .output()
        .expect("run vlmserve")
}

fn report(extra: &[&str]) -> Value {
    let out = eval(&[&["--json"], extra].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "eval failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("report is not JSON ({e}): {stderr}"))
}

#[test]
fn scores_the_good_items_and_reports_the_bad_lines() {
    let out = eval(&["--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("eval.jsonl:21: malformed item"), "{stderr}");
    assert!(stderr.contains("eval.jsonl:22: ") && stderr.contains("missing.png"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["items"], 22);
    assert_eq!(report["scored"], 20);
    assert_eq!(report["failed"], 2);
    let lines: Vec<u64> = report["failures"].as_array().unwrap().iter().map(|f| f["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, [21, 22]);
    assert_eq!(report["predictions"].as_array().unwrap().len(), 20);
}

/// Lowest VQA accuracy accepted on the 18 VQA items: the committed model gets 17 at every
/// precision (98.6% on the full held-out set, models/shapes-vlm/README.md; it puts an orange
/// star above the blue star it lies below); one miss is allowed.
const MIN_ACCURACY: f64 = 17.0 / 18.0;

#[test]
fn trained_model_answers_at_every_precision() {
    for precision in ["fp32", "fp16", "int8"] {
        let report = report(&["--precision", precision]);
        let accuracy = report["vqa"]["accuracy"].as_f64().unwrap();
        assert!(accuracy >= MIN_ACCURACY, "{precision}: VQA accuracy {accuracy}");
        assert!(report["caption"]["bleu4"].as_f64().is_some(), "{precision}: no BLEU-4");
        assert!(report["throughput"]["tokens_per_second"].as_f64().unwrap() > 0.0);
        let graphs = report["precision"].as_object().unwrap();
        assert!(graphs.len() == 3 && graphs.values().all(|p| p == precision), "{graphs:?}");
    }
}

#[test]
fn summary_lists_accuracy_per_kind() {
    let out = eval(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in ["VQA accuracy", "color", "count", "caption      BLEU-4", "tokens/s", "failed lines 21, 22"] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

#[test]
fn missing_data_file_is_a_clear_error() {
    let out = common::vlmserve()
        .args(["eval", "--model", "models/shapes-vlm/package", "--data", "no/such/set.jsonl"])
        .current_dir(common::root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no/such/set.jsonl: No such file"), "{stderr}");
}
