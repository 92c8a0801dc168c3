//! `vlmserve bench`: one image and one question, timed over several runs. Time to first token
//! is split into image decode, preprocessing, vision encoder and prefill; decode speed is
//! measured over a fixed number of new tokens (end of sequence ignored); peak memory is the
//! process's high-water mark. Runs alone: compare against other programs only in one script.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::{CliError, ImageBudgetArgs, ModelArgs};
use crate::config::Settings;
use crate::engine::{Completion, FeatureCache, Flow, GenerationParams, Model};
use crate::preprocess::chat_template::ChatMessage;

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image file (none: a text-only prompt).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// One tile per image: the same as `--processor do_image_splitting=false`.
    #[arg(long)]
    pub no_split: bool,
    #[command(flatten)]
    pub budget: ImageBudgetArgs,
    #[arg(long, default_value = "Describe the image.")]
    pub prompt: String,
    /// Tokens generated per run (end of sequence ignored).
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    /// Timed runs, after `--warmup` untimed ones.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Also time the same image again with the image-feature cache on (after one run fills it).
    #[arg(long)]
    pub repeated_image: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One run's times, in seconds.
#[derive(Debug, Clone, Copy)]
struct Sample {
    image_decode_s: f64,
    preprocess_s: f64,
    vision_s: f64,
    prefill_s: f64,
    time_to_first_token_s: f64,
    decode_tokens_per_second: f64,
    /// Share of the decode steps' time spent outside ONNX Runtime's run calls.
    decode_outside_runtime_share: f64,
    /// Bytes handed between host and device per decode step (zero on the CPU).
    decode_transferred_bytes_per_step: f64,
}

/// Median and range of one measure over the runs.
#[derive(Debug, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

fn spread(samples: &[Sample], measure: fn(&Sample) -> f64) -> Spread {
    let mut values: Vec<f64> = samples.iter().map(measure).collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    Spread { median, min: values[0], max: values[n - 1] }
}

/// A named measure of a run.
type Measure = (&'static str, fn(&Sample) -> f64);

const MEASURES: [Measure; 8] = [
    ("image_decode_s", |s| s.image_decode_s),
    ("preprocess_s", |s| s.preprocess_s),
    ("vision_s", |s| s.vision_s),
    ("prefill_s", |s| s.prefill_s),
    ("time_to_first_token_s", |s| s.time_to_first_token_s),
    ("decode_tokens_per_second", |s| s.decode_tokens_per_second),
    ("decode_outside_runtime_share", |s| s.decode_outside_runtime_share),
    ("decode_transferred_bytes_per_step", |s| s.decode_transferred_bytes_per_step),
];

/// What one run needs: the image's bytes (decoded every run, as a server would) and the question.
struct Workload<'a> {
    image: Option<(PathBuf, Vec<u8>)>,
    args: &'a BenchArgs,
}

impl Workload<'_> {
    fn run(&self, model: &mut Model) -> Result<(Sample, Completion), CliError> {
        let start = Instant::now();
        let images = match &self.image {
            Some((path, bytes)) => vec![super::decode_file(path, bytes)?],
            None => Vec::new(),
        };
        let image_decode_s = start.elapsed().as_secs_f64();
        let message = ChatMessage::user(images.len(), &self.args.prompt);
        let prompt = model.codec.prepare(&[message], &images, &self.args.budget.per_image(images.len()), &[])?;
        let params =
            GenerationParams { max_new_tokens: self.args.new_tokens, ignore_eos: true, ..GenerationParams::default() };
        let completion = model.generate(prompt, &params, &mut |_| Flow::Continue)?;
        let t = &completion.timings;
        let sample = Sample {
            image_decode_s,
            preprocess_s: t.preprocess_s,
            vision_s: t.vision_s,
            prefill_s: t.prefill_s,
            // From the image file's bytes to the first token.
            time_to_first_token_s: image_decode_s + t.preprocess_s + t.time_to_first_token_s,
            decode_tokens_per_second: t.decode_tokens_per_second(),
            decode_outside_runtime_share: if t.decode_s > 0.0 { 1.0 - t.decode_in_runtime_s / t.decode_s } else { 0.0 },
            decode_transferred_bytes_per_step: t.decode_transferred_bytes as f64 / t.decode_steps.max(1) as f64,
        };
        Ok((sample, completion))
    }

    /// Samples of `runs` runs after `warmup`, and the last run's completion.
    fn repeat(&self, model: &mut Model, warmup: usize, runs: usize) -> Result<(Vec<Sample>, Completion), CliError> {
        for _ in 0..warmup {
            self.run(model)?;
        }
        let (first, mut last) = self.run(model)?;
        let mut samples = vec![first];
        for _ in 1..runs {
            let (sample, completion) = self.run(model)?;
            samples.push(sample);
            last = completion;
        }
        Ok((samples, last))
    }
}

/// The process's peak resident set (VmHWM), in bytes; `None` where /proc does not say.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn run(settings: &Settings, args: &BenchArgs) -> Result<(), CliError> {
    if args.runs == 0 || args.new_tokens == 0 {
        return Err(CliError::Usage("--runs and --new-tokens must be at least 1".into()));
    }
    let mut model_args = args.model.clone();
    if args.no_split {
        model_args.processor.push(("do_image_splitting".into(), json!(false)));
    }
    let load_start = Instant::now();
    let mut model = model_args.load(settings)?;
    let load_s = load_start.elapsed().as_secs_f64();
    let image = match &args.image {
        Some(path) => Some((path.clone(), super::read_file(path)?)),
        None => None,
    };
    let workload = Workload { image, args };
    let (samples, completion) = workload.repeat(&mut model, args.warmup, args.runs)?;
    let prompt_tokens = completion.prompt_tokens;
    let repeated = if args.repeated_image && workload.image.is_some() {
        let cache = FeatureCache::new(1 << 30).map(Arc::new);
        let mut cached = model.with_feature_cache(cache);
        Some(workload.repeat(&mut cached, 1, args.runs)?.0)
    } else {
        None
    };
    let mut rows: Vec<(&str, Spread)> =
        MEASURES.iter().map(|&(name, measure)| (name, spread(&samples, measure))).collect();
    if let Some(repeated) = &repeated {
        rows.push(("repeated_image_time_to_first_token_s", spread(repeated, |s| s.time_to_first_token_s)));
    }
    let peak_rss = peak_rss_bytes();
    let mut out = std::io::stdout().lock();
    let written = if args.json {
        let mut report = json!({
            "model": args.model.model,
            "precision": args.model.precision.map(|p| p.to_string()),
            "image": args.image,
            "no_split": args.no_split,
            "prompt_tokens": prompt_tokens,
            "new_tokens": args.new_tokens,
            "runs": args.runs,
            "load_s": load_s,
            "peak_rss_bytes": peak_rss,
            "token_ids": completion.token_ids,
        });
        for (name, spread) in &rows {
            report[*name] = json!(spread);
        }
        writeln!(out, "{report}")
    } else {
        let header = format!(
            "model        {} ({prompt_tokens} prompt tokens, {} new tokens, {} runs)",
            args.model.model, args.new_tokens, args.runs
        );
        write_table(&mut out, &header, &rows, peak_rss)
    };
    written.map_err(|e| CliError::Output(e.to_string()))
}

fn write_table(
    out: &mut impl Write,
    header: &str,
    rows: &[(&str, Spread)],
    peak_rss: Option<u64>,
) -> std::io::Result<()> {
    writeln!(out, "{header}")?;
    for (name, s) in rows {
        writeln!(out, "{name:<38} {:>10.4}  [{:.4} .. {:.4}]", s.median, s.min, s.max)?;
    }
    if let Some(bytes) = peak_rss {
        writeln!(out, "{:<38} {:>10.1}", "peak_rss_mb", bytes as f64 / (1 << 20) as f64)?;
    }
    Ok(())
}
