//! Constrained decoding: a constraint (JSON schema, regex, a choice of strings, a Lark grammar)
//! compiled by llguidance over the package's tokenizer into a [`Guide`], which masks each
//! step's logits to the tokens the constraint allows and follows the sampled ones.
//!
//! Compiled constraints are kept per model (most recently used first), so a schema sent with
//! every request compiles once; each sequence follows its own copy.

use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use lru::LruCache;
use serde_json::Value;

use super::EngineError;

/// What a request's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Constraint {
    /// Any JSON object.
    JsonObject,
    /// JSON that validates against this schema.
    JsonSchema(Value),
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark syntax.
    Lark(String),
}

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(compact_schema(serde_json::json!({"type": "object"})))
            }
            Constraint::JsonSchema(schema) => TopLevelGrammar::from_json_schema(compact_schema(schema.clone())),
            Constraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Constraint::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            Constraint::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        }
    }

    /// The cache's key: the kind and its text.
    fn key(&self) -> String {
        match self {
            Constraint::JsonObject => "json_object".into(),
            Constraint::JsonSchema(schema) => format!("json_schema {schema}"),
            Constraint::Regex(regex) => format!("regex {regex}"),
            Constraint::Choice(choices) => format!("choice {}", Value::from(choices.clone())),
            Constraint::Lark(grammar) => format!("lark {grammar}"),
        }
    }
}

/// JSON written one way (`{"a": 1, "b": [2, 3]}`) unless the schema sets llguidance's options
/// itself (`x-guidance`): where any whitespace may come between tokens, a small model can fill
/// its whole budget with newlines.
pub fn compact_schema(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(
            || serde_json::json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// `text` matched literally by llguidance's regex syntax.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~\"/".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The most compiled constraints a model keeps.
const COMPILED_KEPT: usize = 64;

/// One model's constraint compiler: the tokenizer as llguidance sees it (built on first use)
/// and the compiled constraints.
pub struct Grammars {
    factory: OnceLock<Result<ParserFactory, String>>,
    compiled: Mutex<LruCache<String, Matcher>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("ready", &self.factory.get().is_some()).finish_non_exhaustive()
    }
}

impl Default for Grammars {
    fn default() -> Self {
        let kept = NonZeroUsize::new(COMPILED_KEPT).unwrap_or(NonZeroUsize::MIN);
        Self { factory: OnceLock::new(), compiled: Mutex::new(LruCache::new(kept)) }
    }
}

impl Grammars {
    /// A guide for `constraint`, compiled (or copied from the cache) for the tokenizer at
    /// `tokenizer_json` whose sequences end at `eos`. A constraint llguidance refuses is
    /// [`EngineError::InvalidConstraint`].
    pub fn guide(&self, constraint: &Constraint, tokenizer_json: &Path, eos: &[u32]) -> Result<Guide, EngineError> {
        let start = Instant::now();
        let key = constraint.key();
        if let Some(matcher) = self.compiled.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(Guide::new(matcher.deep_clone(), 0.0));
        }
        let factory = self
            .factory
            .get_or_init(|| factory(tokenizer_json, eos))
            .as_ref()
            .map_err(|e| EngineError::Tokenizer(format!("for constrained decoding: {e}")))?;
        let parser =
            factory.create_parser(constraint.grammar()).map_err(|e| EngineError::InvalidConstraint(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(EngineError::InvalidConstraint(error));
        }
        let guide = Guide::new(matcher.deep_clone(), start.elapsed().as_secs_f64());
        self.compiled.lock().map_err(|_| poisoned())?.put(key, matcher);
        Ok(guide)
    }
}

fn poisoned() -> EngineError {
    EngineError::Inconsistent("the compiled-constraint cache was poisoned by a panic".into())
}

/// llguidance's view of the vocabulary: each token's bytes, read from `tokenizer.json` (its
/// byte-level or byte-fallback encoding undone, special tokens marked). Strings the grammar
/// forces are tokenized greedily over those bytes, which masks do not depend on.
fn factory(tokenizer_json: &Path, eos: &[u32]) -> Result<ParserFactory, String> {
    let text = std::fs::read_to_string(tokenizer_json).map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", tokenizer_json.display()))?;
    let words = llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
    let first_eos = *eos.first().ok_or("the model has no end-of-sequence token")?;
    let trie = TokTrie::from(&TokRxInfo::new(words.len() as u32, first_eos), &words).with_eos_tokens(eos);
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    // Refusals reach the caller as errors; llguidance need not print them too.
    factory.quiet();
    Ok(factory)
}

/// One sequence's constraint: which tokens may come next.
pub struct Guide {
    matcher: Matcher,
    /// The allowed next tokens, once computed for the current state.
    mask: Option<SimpleVob>,
    /// Seconds spent compiling the constraint (0 when it came from the cache).
    pub compile_s: f64,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").field("compile_s", &self.compile_s).finish_non_exhaustive()
    }
}

impl Clone for Guide {
    fn clone(&self) -> Self {
        Self { matcher: self.matcher.deep_clone(), mask: self.mask.clone(), compile_s: self.compile_s }
    }
}

impl Guide {
    fn new(matcher: Matcher, compile_s: f64) -> Self {
        Self { matcher, mask: None, compile_s }
    }

    /// Compute the mask of the current state, unless done already (the batch computes it
    /// while the decoder runs).
    pub(super) fn prepare(&mut self) -> Result<(), EngineError> {
        if self.mask.is_none() {
            let mask = self.matcher.compute_mask_or_eos().map_err(|e| EngineError::Constraint(e.to_string()))?;
            self.mask = Some(mask);
        }
        Ok(())
    }

    /// Set every token the constraint does not allow next to minus infinity.
    pub(super) fn apply(&mut self, logits: &mut [f32]) -> Result<(), EngineError> {
        self.prepare()?;
        let Some(mask) = &self.mask else { return Ok(()) };
        let mut allowed = 0;
        for (token, logit) in logits.iter_mut().enumerate() {
            if token < mask.len() && mask.is_allowed(token as u32) {
                allowed += 1;
            } else {
                *logit = f32::NEG_INFINITY;
            }
        }
        if allowed == 0 {
            return Err(EngineError::Constraint("the constraint allows no token of the model's vocabulary".into()));
        }
        Ok(())
    }

    /// Follow the sampled `token`. Returns whether the constraint is complete (nothing may
    /// follow but the end of the sequence).
    pub(super) fn consume(&mut self, token: u32) -> Result<bool, EngineError> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| EngineError::Constraint(e.to_string()))?;
        Ok(self.matcher.is_stopped())
    }
}
