//! `vlmserve inspect`: what a package holds and how it will run.

use std::fmt::Write as _;

use clap::Args;

use super::{CliError, ModelArgs};
use crate::config::Settings;
use crate::engine::Model;
use crate::family::ImageBudget;
use crate::package::Graph;

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

/// Image sizes whose token cost `inspect` reports.
const SAMPLE_SIZES: [(u32, u32); 4] = [(512, 512), (1024, 768), (2048, 2048), (64, 64)];

pub fn run(settings: &Settings, args: &InspectArgs) -> Result<(), CliError> {
    let model = args.model.load(settings)?;
    print!("{}", describe(&model));
    Ok(())
}

fn describe(model: &Model) -> String {
    let info = &model.codec.info;
    let mut out = String::new();
    let _ = writeln!(out, "package:        {}", info.dir.display());
    let _ = writeln!(out, "family:         {} (model_type {})", info.family, info.model_type);
    let _ = writeln!(out, "context length: {}", info.context_length);
    let _ = writeln!(out, "eos token ids:  {:?}", info.eos_token_ids);
    let layout = model.kv_layout();
    let _ = writeln!(
        out,
        "kv cache:       {} layers, {} kv heads, head dim {}, {:?}, {} bytes per token",
        layout.layers,
        layout.kv_heads,
        layout.head_dim,
        layout.element_type,
        layout.bytes_per_token()
    );
    let _ = writeln!(out, "tokens per image:");
    for (w, h) in SAMPLE_SIZES {
        let _ = writeln!(
            out,
            "  {w}x{h}: {}",
            model
                .codec
                .family
                .image_layout(w, h, ImageBudget::default())
                .map_or_else(|e| e.to_string(), |l| l.tokens.to_string())
        );
    }
    let described = model.describe_graphs();
    for ((graph, precision, path, providers), (_, inputs, outputs)) in info.graphs.iter().zip(described) {
        let available: Vec<String> = model.codec.package.available(*graph).iter().map(ToString::to_string).collect();
        let _ = writeln!(out, "{graph}:");
        let _ = writeln!(out, "  loaded:    {} ({precision}) on {}", path.display(), providers.join(", "));
        let _ = writeln!(out, "  available: {}", available.join(", "));
        for (kind, list) in [("input ", &inputs), ("output", &outputs)] {
            for line in list.iter().filter(|l| !is_repetitive_kv(*graph, l)) {
                let _ = writeln!(out, "  {kind}    {line}");
            }
        }
        if *graph == Graph::Decoder {
            let _ = writeln!(
                out,
                "  (+ past_key_values.N.key/value in, present.N.key/value out for {} layers)",
                layout.layers
            );
        }
    }
    out
}

/// KV tensors beyond the first layer add nothing to the listing.
fn is_repetitive_kv(graph: Graph, line: &str) -> bool {
    graph == Graph::Decoder
        && (line.starts_with("past_key_values.") || line.starts_with("present."))
        && !line.starts_with("past_key_values.0.")
        && !line.starts_with("present.0.")
}
