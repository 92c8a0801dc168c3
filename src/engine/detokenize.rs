//! Incremental detokenization for streaming.
//!
//! Byte-level tokenizers split multi-byte characters across tokens, and decoding a suffix of
//! the ids on its own can change spacing. As TGI does, we decode a window that starts a few
//! tokens back and emit only what the new token added, holding back text that ends in an
//! incomplete UTF-8 sequence (decoded as U+FFFD).

use tokenizers::Tokenizer;

use super::EngineError;

#[derive(Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the window decoded for context.
    prefix_offset: usize,
    /// Tokens whose text has been emitted.
    read_offset: usize,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a token and return the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String, EngineError> {
        self.ids.push(id);
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()));
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back at the end of generation (e.g. a dangling partial character).
    pub fn finish(&mut self, tokenizer: &Tokenizer) -> Result<String, EngineError> {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| EngineError::Tokenizer(e.to_string()));
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
