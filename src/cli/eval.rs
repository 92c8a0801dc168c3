//! `vlmserve eval`: answers every question of a JSONL set with greedy decoding and scores them:
//! VQA accuracy (normalized exact match, soft score with several references) and corpus BLEU-4
//! for caption items, per kind, with throughput and a JSON report.
//!
//! One item per line: `{"image": "images/0001.png", "question": "...", "answers": ["red"],
//! "kind": "color"}`; `image` is relative to the JSONL file's folder, `kind` is optional
//! ("vqa"), and items of kind "caption" are scored with BLEU-4 instead of VQA accuracy. A line
//! that does not parse or whose image cannot be read is reported with its line number, counted
//! as failed and skipped; failed items are not part of the scores.
//!
//! With `--url`, the questions go to a running server's chat completions API instead (greedy,
//! the same prompt), so a deployed version is scored as clients meet it; `--min-accuracy` makes
//! the command fail below a threshold, as a promotion gate.

mod progress;
mod score;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use clap::Args;
use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::progress::Progress;
use self::score::{Bleu, bleu_tokens, normalize_answer, vqa_score};
use super::{CliError, ModelArgs};
use crate::config::Settings;
use crate::engine::{Flow, GenerationParams, Model};
use crate::preprocess::chat_template::ChatMessage;

const CAPTION: &str = "caption";

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL file, one `{"image", "question", "answers": [...], "kind"}` per line.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Print the JSON report (with every prediction) on stdout instead of the summary.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Ask a running server (http://HOST:PORT) instead of loading the model here; `--model` is
    /// then the name it serves (`name` or `name@version`).
    #[arg(long)]
    pub url: Option<String>,
    /// Fail (exit status 1) when the VQA accuracy is below this fraction, from 0 to 1.
    #[arg(long, value_parser = fraction)]
    pub min_accuracy: Option<f64>,
}

fn fraction(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if (0.0..=1.0).contains(&value) { Ok(value) } else { Err(format!("{value} is not a fraction from 0 to 1")) }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Item {
    image: PathBuf,
    question: String,
    answers: Vec<String>,
    #[serde(default = "default_kind")]
    kind: String,
}

fn default_kind() -> String {
    "vqa".to_string()
}

/// One scored item, as the report lists it.
#[derive(Debug, Serialize)]
struct Scored {
    line: usize,
    kind: String,
    question: String,
    answers: Vec<String>,
    prediction: String,
    /// VQA score (caption items: normalized exact match).
    score: f64,
    generated_tokens: usize,
    #[serde(skip)]
    decode: Option<(usize, f64)>,
    #[serde(skip)]
    elapsed_s: f64,
}

#[derive(Debug, Serialize)]
struct Failure {
    line: usize,
    error: String,
}

pub fn run(settings: &Settings, args: &EvalArgs) -> Result<(), CliError> {
    let text =
        std::fs::read_to_string(&args.data).map_err(|source| CliError::Io { path: args.data.clone(), source })?;
    let lines = parse_lines(&text);
    let mut answerer = match &args.url {
        Some(url) => Answerer::Remote(Remote::new(url, &args.model.model)),
        None => Answerer::Local { model: Box::new(args.model.load(settings)?), images: LastImage::default() },
    };
    let base = args.data.parent().unwrap_or(Path::new(""));
    let mut tally = Tally::default();
    let mut progress = Progress::new(lines.len());
    let start = Instant::now();
    for (line, item) in lines {
        let outcome = item.and_then(|item| score(&mut answerer, base, item, args.max_new_tokens));
        match outcome {
            Ok(mut scored) => {
                scored.line = line;
                tally.add(scored);
            }
            Err(error) => {
                progress.message(&format!("{}:{line}: {error}", args.data.display()));
                tally.failures.push(Failure { line, error });
            }
        }
        progress.tick(&tally.status());
    }
    progress.finish();
    let report = tally.report(&answerer, args, start.elapsed().as_secs_f64());
    write_outputs(args, &report, &tally)?;
    if tally.scored.is_empty() && !tally.failures.is_empty() {
        return Err(CliError::Output(format!("all {} items failed", tally.failures.len())));
    }
    if let Some(min) = args.min_accuracy {
        let accuracy = mean(tally.vqa_items().map(|s| s.score)).unwrap_or(0.0);
        if accuracy < min {
            return Err(CliError::Usage(format!(
                "VQA accuracy {:.2}% is below --min-accuracy {:.2}%",
                100.0 * accuracy,
                100.0 * min
            )));
        }
    }
    Ok(())
}

/// Where the answers come from.
enum Answerer {
    Local { model: Box<Model>, images: LastImage },
    Remote(Remote),
}

/// A model's greedy answer to one question about one image.
struct Answer {
    text: String,
    generated_tokens: usize,
    /// Decode steps and their time, when the model ran here.
    decode: Option<(usize, f64)>,
}

impl Answerer {
    fn answer(&mut self, image: PathBuf, question: &str, max_new_tokens: usize) -> Result<Answer, String> {
        match self {
            Answerer::Local { model, images } => {
                let image = images.get(image)?;
                let message = ChatMessage::user(1, question);
                let prompt = model
                    .codec
                    .prepare(&[message], std::slice::from_ref(image), &[], &[])
                    .map_err(|e| e.to_string())?;
                let params = GenerationParams { max_new_tokens, ..GenerationParams::default() };
                let completion = model.generate(prompt, &params, &mut |_| Flow::Continue).map_err(|e| e.to_string())?;
                let timings = &completion.timings;
                Ok(Answer {
                    generated_tokens: completion.token_ids.len(),
                    decode: Some((timings.decode_steps, timings.decode_s)),
                    text: completion.text,
                })
            }
            Answerer::Remote(remote) => remote.answer(&image, question, max_new_tokens),
        }
    }

    /// What answered, for the report: the package and its precisions, or the server and the
    /// version that answered.
    fn describe(&self) -> serde_json::Map<String, Value> {
        let described = match self {
            Answerer::Local { model, .. } => {
                let precisions: BTreeMap<String, String> = model
                    .codec
                    .info
                    .graphs
                    .iter()
                    .map(|(graph, precision, ..)| (graph.to_string(), precision.to_string()))
                    .collect();
                json!({"model": model.codec.info.dir, "precision": precisions})
            }
            Answerer::Remote(remote) => json!({
                "model": remote.model,
                "url": remote.endpoint,
                "answered_by": remote.answered_by,
            }),
        };
        match described {
            Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        }
    }
}

/// A server's chat completions endpoint.
struct Remote {
    agent: ureq::Agent,
    endpoint: String,
    model: String,
    /// The versions that answered (`system_fingerprint`), in order of first answer.
    answered_by: Vec<String>,
}

impl Remote {
    fn new(url: &str, model: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(600)))
            .http_status_as_error(false)
            .user_agent(concat!("vlmserve-eval/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let endpoint = format!("{}/v1/chat/completions", url.trim_end_matches('/'));
        Self { agent, endpoint, model: model.to_string(), answered_by: Vec::new() }
    }

    fn answer(&mut self, image: &Path, question: &str, max_new_tokens: usize) -> Result<Answer, String> {
        let bytes = std::fs::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
        let media_type = image::ImageFormat::from_path(image).map_or("application/octet-stream", |f| f.to_mime_type());
        let url = format!("data:{media_type};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes));
        let body = json!({
            "model": self.model,
            "temperature": 0,
            "max_tokens": max_new_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": question},
            ]}],
        });
        let mut response = self
            .agent
            .post(&self.endpoint)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| format!("{}: {e}", self.endpoint))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().map_err(|e| format!("{}: {e}", self.endpoint))?;
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if !status.is_success() {
            let message = answer["error"]["message"].as_str().unwrap_or(&text);
            return Err(format!("the server answered {status}: {message}"));
        }
        let content = answer["choices"][0]["message"]["content"].as_str();
        let content = content.ok_or_else(|| format!("the server's answer has no message content: {text}"))?;
        if let Some(version) = answer["system_fingerprint"].as_str()
            && !self.answered_by.iter().any(|v| v == version)
        {
            self.answered_by.push(version.to_string());
        }
        Ok(Answer {
            text: content.to_string(),
            generated_tokens: answer["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize,
            decode: None,
        })
    }
}

/// Numbered non-blank lines, each parsed or with its parse error.
fn parse_lines(text: &str) -> Vec<(usize, Result<Item, String>)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| (i + 1, parse_item(line)))
        .collect()
}

fn parse_item(line: &str) -> Result<Item, String> {
    let item: Item = serde_json::from_str(line).map_err(|e| format!("malformed item: {e}"))?;
    if item.answers.is_empty() {
        return Err("malformed item: \"answers\" is empty".to_string());
    }
    Ok(item)
}

/// An error and its causes on one line, as `main` prints them.
fn with_cause(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(&format!(": {e}"));
        cause = e.source();
    }
    line
}

/// The decoded image of the previous item: sets list the questions about one image together.
#[derive(Default)]
struct LastImage(Option<(PathBuf, RgbImage)>);

impl LastImage {
    fn get(&mut self, path: PathBuf) -> Result<&RgbImage, String> {
        if !matches!(&self.0, Some((last, _)) if *last == path) {
            let image = super::read_image(&path).map_err(|e| with_cause(&e))?;
            self.0 = Some((path, image));
        }
        self.0.as_ref().map(|(_, image)| image).ok_or_else(|| "no image".to_string())
    }
}

/// Greedy answer to one item and its score.
fn score(answerer: &mut Answerer, base: &Path, item: Item, max_new_tokens: usize) -> Result<Scored, String> {
    let start = Instant::now();
    let answer = answerer.answer(base.join(&item.image), &item.question, max_new_tokens)?;
    let prediction = answer.text.trim().to_string();
    let score = if item.kind == CAPTION {
        f64::from(u8::from(item.answers.iter().any(|a| normalize_answer(a) == normalize_answer(&prediction))))
    } else {
        vqa_score(&prediction, &item.answers)
    };
    Ok(Scored {
        line: 0,
        kind: item.kind,
        question: item.question,
        answers: item.answers,
        prediction,
        score,
        generated_tokens: answer.generated_tokens,
        decode: answer.decode,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// Everything scored so far.
#[derive(Default)]
struct Tally {
    scored: Vec<Scored>,
    failures: Vec<Failure>,
    bleu: Bleu,
}

impl Tally {
    fn add(&mut self, scored: Scored) {
        if scored.kind == CAPTION {
            let references: Vec<Vec<String>> = scored.answers.iter().map(|a| bleu_tokens(a)).collect();
            self.bleu.add(&bleu_tokens(&scored.prediction), &references);
        }
        self.scored.push(scored);
    }

    fn vqa_items(&self) -> impl Iterator<Item = &Scored> {
        self.scored.iter().filter(|s| s.kind != CAPTION)
    }

    fn captions(&self) -> impl Iterator<Item = &Scored> {
        self.scored.iter().filter(|s| s.kind == CAPTION)
    }

    /// Running figures for the progress bar.
    fn status(&self) -> String {
        let mut parts = Vec::new();
        if let Some(accuracy) = mean(self.vqa_items().map(|s| s.score)) {
            parts.push(format!("accuracy {:.1}%", 100.0 * accuracy));
        }
        if !self.failures.is_empty() {
            parts.push(format!("{} failed", self.failures.len()));
        }
        parts.join(", ")
    }

    /// Accuracy and item count of every kind, by name.
    fn per_kind(&self) -> BTreeMap<&str, (f64, usize)> {
        let mut groups: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for s in &self.scored {
            groups.entry(&s.kind).or_default().push(s.score);
        }
        groups
            .into_iter()
            .map(|(kind, scores)| (kind, (mean(scores.iter().copied()).unwrap_or(0.0), scores.len())))
            .collect()
    }

    fn report(&self, answerer: &Answerer, args: &EvalArgs, wall_s: f64) -> Value {
        let generated: usize = self.scored.iter().map(|s| s.generated_tokens).sum();
        let decode_s: f64 = self.scored.iter().filter_map(|s| s.decode).map(|d| d.1).sum();
        let decode_steps: usize = self.scored.iter().filter_map(|s| s.decode).map(|d| d.0).sum();
        let answering_s: f64 = self.scored.iter().map(|s| s.elapsed_s).sum();
        let per_kind: BTreeMap<&str, Value> = self
            .per_kind()
            .into_iter()
            .map(|(kind, (accuracy, items))| (kind, json!({"accuracy": accuracy, "items": items})))
            .collect();
        let mut report = answerer.describe();
        let figures = json!({
            "data": args.data,
            "items": self.scored.len() + self.failures.len(),
            "scored": self.scored.len(),
            "failed": self.failures.len(),
            "vqa": {"accuracy": mean(self.vqa_items().map(|s| s.score)), "items": self.vqa_items().count()},
            "caption": {
                "bleu4": (self.captions().count() > 0).then(|| 100.0 * self.bleu.score()),
                "exact_match": mean(self.captions().map(|s| s.score)),
                "items": self.captions().count(),
            },
            "per_kind": per_kind,
            "throughput": {
                "generated_tokens": generated,
                "tokens_per_second": ratio(generated as f64, answering_s),
                "decode_tokens_per_second": ratio(decode_steps as f64, decode_s),
                "items_per_second": ratio(self.scored.len() as f64, answering_s),
                "wall_s": wall_s,
            },
            "failures": self.failures,
            "predictions": self.scored,
        });
        if let Value::Object(figures) = figures {
            report.extend(figures);
        }
        Value::Object(report)
    }
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(sum, n), v| (sum + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 { numerator / denominator } else { 0.0 }
}

/// "fp16" when every graph runs at one precision, else "vision_encoder fp16, ...".
fn precision_label(precisions: &Value) -> String {
    let Some(map) = precisions.as_object() else { return String::new() };
    let distinct: std::collections::BTreeSet<_> = map.values().filter_map(Value::as_str).collect();
    match distinct.len() {
        1 => distinct.into_iter().next().unwrap_or_default().to_string(),
        _ => map
            .iter()
            .map(|(graph, p)| format!("{graph} {}", p.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn write_outputs(args: &EvalArgs, report: &Value, tally: &Tally) -> Result<(), CliError> {
    let pretty = serde_json::to_string_pretty(report).map_err(|e| CliError::Output(e.to_string()))?;
    if let Some(path) = &args.report {
        std::fs::write(path, format!("{pretty}\n")).map_err(|source| CliError::Io { path: path.clone(), source })?;
    }
    let text = if args.json { format!("{pretty}\n") } else { summary(report, tally) };
    std::io::stdout().lock().write_all(text.as_bytes()).map_err(|e| CliError::Output(e.to_string()))
}

/// The human-readable summary of a report.
fn summary(report: &Value, tally: &Tally) -> String {
    let percent = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{:.2}%", 100.0 * x));
    let mut out = format!(
        "model        {} ({})\nitems        {} scored, {} failed\n",
        report["model"].as_str().unwrap_or_default(),
        precision_label(&report["precision"]),
        report["scored"],
        report["failed"],
    );
    out += &format!("VQA accuracy {} over {} items\n", percent(&report["vqa"]["accuracy"]), report["vqa"]["items"]);
    for (kind, (accuracy, items)) in tally.per_kind() {
        out += &format!("  {kind:<10} {:.2}% ({items})\n", 100.0 * accuracy);
    }
    let caption = &report["caption"];
    if caption["items"].as_u64().unwrap_or(0) > 0 {
        out += &format!(
            "caption      BLEU-4 {:.2}, exact match {} over {} items\n",
            caption["bleu4"].as_f64().unwrap_or(0.0),
            percent(&caption["exact_match"]),
            caption["items"]
        );
    }
    let t = &report["throughput"];
    out += &format!(
        "throughput   {} tokens, {:.1} tokens/s ({:.1} in decode), {:.2} items/s, {:.1}s wall\n",
        t["generated_tokens"],
        t["tokens_per_second"].as_f64().unwrap_or(0.0),
        t["decode_tokens_per_second"].as_f64().unwrap_or(0.0),
        t["items_per_second"].as_f64().unwrap_or(0.0),
        t["wall_s"].as_f64().unwrap_or(0.0),
    );
    if !tally.failures.is_empty() {
        let lines: Vec<String> = tally.failures.iter().map(|f| f.line.to_string()).collect();
        out += &format!("failed lines {}\n", lines.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_from_one_and_blank_lines_skipped() {
        let text = "{\"image\": \"a.png\", \"question\": \"q\", \"answers\": [\"red\"], \"kind\": \"color\"}\n\n{oops\n\
                    {\"image\": \"a.png\", \"question\": \"q\", \"answers\": []}\n";
        let lines = parse_lines(text);
        assert_eq!(lines.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 3, 4]);
        let first = lines[0].1.as_ref().unwrap();
        assert_eq!((first.kind.as_str(), first.answers.as_slice()), ("color", ["red".to_string()].as_slice()));
        assert!(lines[1].1.as_ref().unwrap_err().starts_with("malformed item"));
        assert!(lines[2].1.as_ref().unwrap_err().contains("answers"));
    }

    #[test]
    fn kind_defaults_to_vqa() {
        let item = parse_item(r#"{"image": "a.png", "question": "q", "answers": ["yes"]}"#).unwrap();
        assert_eq!(item.kind, "vqa");
    }

    #[test]
    fn missing_image_names_the_file() {
        let error = LastImage::default().get(PathBuf::from("/nonexistent/x.png")).unwrap_err();
        assert!(error.starts_with("/nonexistent/x.png: "), "{error}");
    }
}
