//! When generation ends: an end-of-sequence token, a stop string, the token budget, or the
//! model's context.

use serde::Serialize;

/// Why a generation ended, in OpenAI's vocabulary ([`FinishReason::as_str`] everywhere: API
/// bodies, CLI output, metric labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_new_tokens` or the context length.
    Length,
    /// The caller asked to stop (client gone, deadline).
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

impl Serialize for FinishReason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Stop conditions of one generation.
#[derive(Debug, Clone, Default)]
pub struct StopRules {
    pub eos_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub max_new_tokens: usize,
    /// Total positions the model can attend to.
    pub context_length: usize,
    /// Keep going past end-of-sequence tokens (benchmarks at a fixed length).
    pub ignore_eos: bool,
}

impl StopRules {
    /// Check after `token` was generated; `generated` counts it, `total` is prompt + generated.
    pub fn after_token(&self, token: u32, generated: usize, total: usize) -> Option<FinishReason> {
        if !self.ignore_eos && self.eos_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if generated >= self.max_new_tokens || total >= self.context_length {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    /// If `text` (everything generated so far) contains a stop string, the length to cut it
    /// to: the output ends before the earliest stop string, as OpenAI servers do.
    pub fn stop_string_cut(&self, text: &str, searched_from: usize) -> Option<usize> {
        self.stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| {
                // A stop string may straddle the previous chunk: search a little before it.
                let from = floor_char_boundary(text, searched_from.saturating_sub(s.len()));
                text[from..].find(s.as_str()).map(|i| from + i)
            })
            .min()
    }

    /// Longest tail of `text` that could be the start of a stop string; streaming holds it back
    /// until it is clear that it is not.
    pub fn pending_prefix(&self, text: &str) -> usize {
        self.stop_strings
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> StopRules {
        StopRules {
            eos_token_ids: vec![2, 7],
            stop_strings: vec!["STOP".into(), "\n\n".into()],
            max_new_tokens: 5,
            context_length: 100,
            ignore_eos: false,
        }
    }

    #[test]
    fn eos_budget_and_context() {
        let r = rules();
        assert_eq!(r.after_token(7, 1, 10), Some(FinishReason::Stop));
        assert_eq!(r.after_token(3, 4, 10), None);
        assert_eq!(r.after_token(3, 5, 10), Some(FinishReason::Length));
        assert_eq!(r.after_token(3, 1, 100), Some(FinishReason::Length));
        let ignoring = StopRules { ignore_eos: true, ..rules() };
        assert_eq!(ignoring.after_token(7, 1, 10), None);
    }

    #[test]
    fn stop_strings_cut_at_the_earliest_match_even_across_chunks() {
        let r = rules();
        assert_eq!(r.stop_string_cut("hello ST", 0), None);
        assert_eq!(r.stop_string_cut("hello STOP and more\n\n", 6), Some(6));
        assert_eq!(r.stop_string_cut("a\n\nb STOP", 2), Some(1));
        assert_eq!(r.stop_string_cut("é€STOP", 5), Some(5));
    }

    #[test]
    fn pending_prefix_holds_back_possible_starts() {
        let r = rules();
        assert_eq!(r.pending_prefix("hello ST"), 2);
        assert_eq!(r.pending_prefix("hello\n"), 1);
        assert_eq!(r.pending_prefix("hello"), 0);
    }
}
