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
    pub stop_strings: StopStrings,
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
}

/// Stop strings as one Aho-Corasick automaton over bytes, with the state of the text read so
/// far: each token's new text is read once, so a stop check costs the length of that text, not
/// of the stop strings; the state also says how much of the text's end could begin one.
#[derive(Debug, Clone)]
pub struct StopStrings {
    /// Per node of the strings' trie, its children by byte, sorted.
    children: Vec<Vec<(u8, u32)>>,
    /// The node of the longest proper suffix of this node's string that is in the trie.
    fail: Vec<u32>,
    /// Bytes from the root.
    depth: Vec<u32>,
    /// The longest stop string ending at this node's string (0: none).
    ends: Vec<u32>,
    /// The node of the longest tail of the text read so far that is in the trie.
    state: u32,
    /// Bytes read so far.
    read: usize,
}

impl Default for StopStrings {
    fn default() -> Self {
        Self::new(&[])
    }
}

impl StopStrings {
    pub fn new(strings: &[String]) -> Self {
        let mut automaton =
            Self { children: vec![Vec::new()], fail: vec![0], depth: vec![0], ends: vec![0], state: 0, read: 0 };
        for string in strings.iter().filter(|s| !s.is_empty()) {
            let mut node = 0;
            for &byte in string.as_bytes() {
                node = match automaton.child(node, byte) {
                    Some(next) => next,
                    None => automaton.add_child(node, byte),
                };
            }
            automaton.ends[node as usize] = string.len() as u32;
        }
        // Failure links breadth first, so a node's failure is final before its children's.
        let mut queue: std::collections::VecDeque<u32> = automaton.children[0].iter().map(|&(_, c)| c).collect();
        while let Some(node) = queue.pop_front() {
            let children = automaton.children[node as usize].clone();
            for (byte, child) in children {
                let fail = automaton.step(automaton.fail[node as usize], byte);
                automaton.fail[child as usize] = fail;
                if automaton.ends[child as usize] == 0 {
                    automaton.ends[child as usize] = automaton.ends[fail as usize];
                }
                queue.push_back(child);
            }
        }
        automaton
    }

    fn child(&self, node: u32, byte: u8) -> Option<u32> {
        let children = &self.children[node as usize];
        children.binary_search_by_key(&byte, |&(b, _)| b).ok().map(|i| children[i].1)
    }

    fn add_child(&mut self, node: u32, byte: u8) -> u32 {
        let next = self.children.len() as u32;
        let children = &mut self.children[node as usize];
        let at = children.partition_point(|&(b, _)| b < byte);
        children.insert(at, (byte, next));
        self.children.push(Vec::new());
        self.fail.push(0);
        self.depth.push(self.depth[node as usize] + 1);
        self.ends.push(0);
        next
    }

    /// The node after `byte` from `node`, following failure links (amortized constant).
    fn step(&self, mut node: u32, byte: u8) -> u32 {
        loop {
            if let Some(next) = self.child(node, byte) {
                return next;
            }
            if node == 0 {
                return 0;
            }
            node = self.fail[node as usize];
        }
    }

    /// Read the text's next piece; if a stop string ends in it, the length to cut the whole
    /// text to: before the first stop string to complete (the longest, where several end at
    /// once).
    pub fn cut_after(&mut self, new: &str) -> Option<usize> {
        for (i, &byte) in new.as_bytes().iter().enumerate() {
            self.state = self.step(self.state, byte);
            let ends = self.ends[self.state as usize] as usize;
            if ends > 0 {
                return Some(self.read + i + 1 - ends);
            }
        }
        self.read += new.len();
        None
    }

    /// How many bytes at the end of the text read could be the start of a stop string:
    /// streaming holds them back until it is clear that they are not.
    pub fn pending(&self) -> usize {
        self.depth[self.state as usize] as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> StopRules {
        StopRules {
            eos_token_ids: vec![2, 7],
            stop_strings: StopStrings::default(),
            max_new_tokens: 5,
            context_length: 100,
            ignore_eos: false,
        }
    }

    fn stops(strings: &[&str]) -> StopStrings {
        StopStrings::new(&strings.iter().map(|s| s.to_string()).collect::<Vec<_>>())
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
    fn stop_strings_cut_where_they_begin_even_across_pieces() {
        let mut s = stops(&["STOP", "\n\n"]);
        assert_eq!(s.cut_after("hello ST"), None);
        assert_eq!(s.pending(), 2, "\"ST\" may begin STOP");
        assert_eq!(s.cut_after("OP and more\n\n"), Some(6));
        let mut s = stops(&["STOP", "\n\n"]);
        assert_eq!(s.cut_after("a\n\nb STOP"), Some(1));
        let mut s = stops(&["STOP"]);
        assert_eq!(s.cut_after("é€"), None);
        assert_eq!(s.cut_after("STOP"), Some(5));
        let mut s = stops(&["abcd", "bc", "x"]);
        assert_eq!(s.cut_after("zab"), None);
        assert_eq!(s.cut_after("cd"), Some(2), "bc completes first");
    }

    #[test]
    fn pending_holds_back_possible_starts() {
        let mut s = stops(&["STOP", "\n\n"]);
        s.cut_after("hello\n");
        assert_eq!(s.pending(), 1);
        let mut s = stops(&["STOP"]);
        s.cut_after("hello");
        assert_eq!(s.pending(), 0);
        // A tail that is a failure away from the start of a string.
        let mut s = stops(&["aab"]);
        s.cut_after("xaaa");
        assert_eq!(s.pending(), 2);
    }

    /// Against the direct reading: the first position where some string ends, cut before the
    /// longest that ends there; the longest tail that begins a string.
    #[test]
    fn the_automaton_agrees_with_the_direct_reading_on_random_texts() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let word = |rng: &mut rand::rngs::StdRng, n: usize| -> String {
            (0..rng.random_range(1..=n)).map(|_| ['a', 'b', 'c'][rng.random_range(0..3)]).collect()
        };
        for _ in 0..2000 {
            let strings: Vec<String> = (0..rng.random_range(1..4)).map(|_| word(&mut rng, 4)).collect();
            let text = word(&mut rng, 24);
            let direct = (1..=text.len()).find_map(|end| {
                let longest = strings.iter().filter(|s| text[..end].ends_with(s.as_str())).map(String::len).max();
                longest.map(|len| end - len)
            });
            let mut automaton = StopStrings::new(&strings);
            let mut cut = None;
            let mut read = 0;
            while cut.is_none() && read < text.len() {
                let next = (read + rng.random_range(1..4)).min(text.len());
                cut = automaton.cut_after(&text[read..next]);
                read = next;
            }
            assert_eq!(cut, direct, "{strings:?} in {text:?}");
            if cut.is_none() {
                let tail = strings.iter().flat_map(|s| (1..s.len()).filter(|&n| text.ends_with(&s[..n]))).max();
                assert_eq!(automaton.pending(), tail.unwrap_or(0), "{strings:?} after {text:?}");
            }
        }
    }
}
