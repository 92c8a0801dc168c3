//! `vlmserve ask`: one user message (images first, then the text) and its answer.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::{CliError, ImageBudgetArgs, ModelArgs};
use crate::config::Settings;
use crate::engine::{Flow, GenerationParams, SamplingParams};
use crate::preprocess::chat_template::ChatMessage;

#[derive(Debug, Args)]
pub struct AskArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image file; repeat for several images, in order.
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when this text appears (repeatable); it is not part of the answer.
    #[arg(long)]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub budget: ImageBudgetArgs,
    /// Print `{"text", "token_ids", "prompt_tokens", "finish_reason", "timings"}` instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// The question.
    pub prompt: String,
}

impl AskArgs {
    fn params(&self) -> GenerationParams {
        GenerationParams {
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            },
            guide: None,
            logprobs: None,
            samples: 1,
            max_new_tokens: self.max_new_tokens,
            stop: self.stop.clone(),
            ignore_eos: false,
        }
    }
}

pub fn run(settings: &Settings, args: &AskArgs) -> Result<(), CliError> {
    let mut model = args.model.load(settings)?;
    let decode_start = Instant::now();
    let images = args.images.iter().map(|path| super::read_image(path)).collect::<Result<Vec<_>, _>>()?;
    let image_decode_s = decode_start.elapsed().as_secs_f64();
    let message = ChatMessage::user(images.len(), &args.prompt);
    let prompt = model.codec.prepare(&[message], &images, &args.budget.per_image(images.len()), &[])?;
    let mut stdout = std::io::stdout().lock();
    let mut write_error = None;
    let completion = model.generate(prompt, &args.params(), &mut |event| {
        if args.json {
            return Flow::Continue;
        }
        match stdout.write_all(event.text.as_bytes()).and_then(|()| stdout.flush()) {
            Ok(()) => Flow::Continue,
            Err(e) => {
                write_error = Some(e.to_string());
                Flow::Stop
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(CliError::Output(e));
    }
    let out = if args.json {
        let report = json!({
            "text": completion.text,
            "token_ids": completion.token_ids,
            "prompt_tokens": completion.prompt_tokens,
            "finish_reason": completion.finish_reason,
            "timings": completion.timings_report(image_decode_s, true),
        });
        writeln!(stdout, "{report}")
    } else {
        writeln!(stdout)
    };
    out.map_err(|e| CliError::Output(e.to_string()))
}
