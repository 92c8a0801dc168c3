//! Scoring for `vlmserve eval`: VQA answer normalization and soft accuracy, corpus BLEU-4.

use std::collections::HashMap;

/// Punctuation the VQA evaluation removes or turns into spaces (`vqaEval.py`'s `punct`).
/// Periods and apostrophes are handled separately, as there.
const PUNCTUATION: &[char] =
    &[';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!'];
const ARTICLES: &[&str] = &["a", "an", "the"];
const NUMBER_WORDS: &[(&str, &str)] = &[
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];

/// An answer as the VQA evaluation compares it: lower case; punctuation removed where it
/// touches a space (or between digits, as in "1,000"), else replaced by a space; periods dropped
/// unless a digit follows ("3.5" stays); number words as digits; articles removed; single spaces.
/// (The official table of contractions, e.g. "dont" -> "don't", is not applied.)
pub fn normalize_answer(answer: &str) -> String {
    let text = answer.replace(['\n', '\t'], " ").trim().to_lowercase();
    let text = strip_punctuation(&text);
    let text = strip_periods(&text);
    text.split_whitespace()
        .filter(|word| !ARTICLES.contains(word))
        .map(|word| NUMBER_WORDS.iter().find(|(w, _)| *w == word).map_or(word, |(_, digit)| digit))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `processPunctuation`: the decision is per character and per answer, as in `vqaEval.py`.
fn strip_punctuation(text: &str) -> String {
    let digit_comma_digit =
        text.as_bytes().windows(3).any(|w| w[0].is_ascii_digit() && w[1] == b',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for &p in PUNCTUATION {
        if !out.contains(p) {
            continue;
        }
        let touches_space = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if touches_space || digit_comma_digit { "" } else { " " });
    }
    out
}

/// `periodStrip`: a period not followed by a digit goes.
fn strip_periods(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c != '.' || chars.get(i + 1).is_some_and(char::is_ascii_digit))
        .map(|(_, &c)| c)
        .collect()
}

/// Score of one prediction against its references, both normalized. With three or more
/// references (several annotators, as in VQA) it is the soft score min(matches / 3, 1); with
/// one or two it is exact match against any of them (a single annotator's answer is the truth,
/// and 1/3 for a correct answer would make no sense).
pub fn vqa_score(prediction: &str, references: &[String]) -> f64 {
    let prediction = normalize_answer(prediction);
    let matches = references.iter().filter(|r| normalize_answer(r) == prediction).count();
    if references.len() >= 3 {
        (matches as f64 / 3.0).min(1.0)
    } else if matches > 0 {
        1.0
    } else {
        0.0
    }
}

/// Words for BLEU: lower case, punctuation split off as its own token (so "square," is
/// "square" and ",", as mteval's 13a tokenizer does).
pub fn bleu_tokens(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    for word in text.to_lowercase().split_whitespace() {
        let mut current = String::new();
        for c in word.chars() {
            if c.is_alphanumeric() || c == '\'' {
                current.push(c);
            } else {
                tokens.extend((!current.is_empty()).then(|| std::mem::take(&mut current)));
                tokens.push(c.to_string());
            }
        }
        tokens.extend((!current.is_empty()).then_some(current));
    }
    tokens
}

const MAX_ORDER: usize = 4;

/// Running sums for corpus BLEU-4: clipped n-gram matches and candidate n-grams per order,
/// candidate length and the closest reference length.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Bleu {
    matches: [usize; MAX_ORDER],
    totals: [usize; MAX_ORDER],
    candidate_len: usize,
    reference_len: usize,
}

impl Bleu {
    /// Add one segment: the candidate and its references, as tokens.
    pub fn add(&mut self, candidate: &[String], references: &[Vec<String>]) {
        for n in 1..=MAX_ORDER {
            let counts = ngram_counts(candidate, n);
            let mut max_ref: HashMap<&[String], usize> = HashMap::new();
            for reference in references {
                for (gram, count) in ngram_counts(reference, n) {
                    let entry = max_ref.entry(gram).or_default();
                    *entry = (*entry).max(count);
                }
            }
            self.matches[n - 1] +=
                counts.iter().map(|(g, &c)| c.min(max_ref.get(g).copied().unwrap_or(0))).sum::<usize>();
            self.totals[n - 1] += candidate.len().saturating_sub(n - 1);
        }
        self.candidate_len += candidate.len();
        // The reference closest in length; the shorter one on a tie.
        let closest = references.iter().map(Vec::len).min_by_key(|&len| (len.abs_diff(candidate.len()), len));
        self.reference_len += closest.unwrap_or(0);
    }

    /// Corpus BLEU-4 in [0, 1]: geometric mean of the four precisions times the brevity
    /// penalty exp(1 - r/c) when the candidates are shorter; 0 if any order has no match.
    pub fn score(&self) -> f64 {
        if self.candidate_len == 0 || self.matches.contains(&0) {
            return 0.0;
        }
        let log_precision: f64 =
            self.matches.iter().zip(&self.totals).map(|(&m, &t)| (m as f64 / t as f64).ln()).sum::<f64>()
                / MAX_ORDER as f64;
        let (c, r) = (self.candidate_len as f64, self.reference_len as f64);
        let brevity = if c > r { 1.0 } else { (1.0 - r / c).exp() };
        brevity * log_precision.exp()
    }
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    for gram in tokens.windows(n) {
        *counts.entry(gram).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(answers: &[&str]) -> Vec<String> {
        answers.iter().map(|s| s.to_string()).collect()
    }

    fn bleu_of(pairs: &[(&str, &[&str])]) -> f64 {
        let mut bleu = Bleu::default();
        for (candidate, references) in pairs {
            let references: Vec<Vec<String>> = references.iter().map(|r| bleu_tokens(r)).collect();
            bleu.add(&bleu_tokens(candidate), &references);
        }
        bleu.score()
    }

    #[test]
    fn normalization_follows_the_vqa_evaluation() {
        assert_eq!(normalize_answer("  Red.\n"), "red");
        assert_eq!(normalize_answer("The red circle"), "red circle");
        assert_eq!(normalize_answer("Two"), "2");
        assert_eq!(normalize_answer("none"), "0");
        assert_eq!(normalize_answer("yes!"), "yes");
        assert_eq!(normalize_answer("3.5"), "3.5");
        assert_eq!(normalize_answer("1,000"), "1000");
        // Punctuation between letters becomes a space, next to a space it goes.
        assert_eq!(normalize_answer("left-hand"), "left hand");
        assert_eq!(normalize_answer("red , blue"), "red blue");
        assert_eq!(normalize_answer("an apple"), "apple");
    }

    #[test]
    fn one_or_two_references_are_exact_match() {
        assert_eq!(vqa_score(" Red", &refs(&["red"])), 1.0);
        assert_eq!(vqa_score("blue", &refs(&["red"])), 0.0);
        assert_eq!(vqa_score("two", &refs(&["3", "2"])), 1.0);
    }

    #[test]
    fn several_references_give_the_soft_score() {
        let answers = refs(&["red", "red", "dark red", "red", "maroon"]);
        assert_eq!(vqa_score("red", &answers), 1.0);
        assert!((vqa_score("dark red", &answers) - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(vqa_score("blue", &answers), 0.0);
        let two_of_three = refs(&["yes", "yes", "no"]);
        assert!((vqa_score("yes", &two_of_three) - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn bleu_tokens_split_punctuation() {
        assert_eq!(
            bleu_tokens("A red circle, and a Blue square."),
            ["a", "red", "circle", ",", "and", "a", "blue", "square", "."]
        );
    }

    #[test]
    fn identical_corpus_scores_one() {
        assert!(
            (bleu_of(&[("a red circle and a blue square", &["a red circle and a blue square"])]) - 1.0).abs() < 1e-12
        );
    }

    #[test]
    fn short_candidate_pays_the_brevity_penalty() {
        // Every n-gram matches; c = 6, r = 7: exp(1 - 7/6).
        let score = bleu_of(&[("a red circle and a blue", &["a red circle and a blue square"])]);
        assert!((score - 0.846481724890614).abs() < 1e-12, "{score}");
    }

    #[test]
    fn corpus_precisions_are_summed_over_segments() {
        // Segment 1 matches fully (4/4, 3/3, 2/2, 1/1); segment 2 "a b c e" vs "a b c d" gives
        // 3/4, 2/3, 1/2, 0/1. Corpus: 7/8, 5/6, 3/4, 1/2; lengths equal, no penalty.
        let score = bleu_of(&[("a b c d", &["a b c d"]), ("a b c e", &["a b c d"])]);
        assert!((score - 0.7231269021297695).abs() < 1e-12, "{score}");
    }

    #[test]
    fn counts_are_clipped_and_no_four_gram_match_scores_zero() {
        let mut bleu = Bleu::default();
        bleu.add(&bleu_tokens("the the the the"), &[bleu_tokens("the cat the")]);
        assert_eq!((bleu.matches[0], bleu.totals[0]), (2, 4));
        assert_eq!(bleu.score(), 0.0);
    }

    #[test]
    fn closest_reference_sets_the_length() {
        // References of 3 and 9 tokens for a 4-token candidate: r = 3, so no penalty.
        let mut bleu = Bleu::default();
        let candidate = bleu_tokens("a b c d");
        bleu.add(&candidate, &[bleu_tokens("a b c"), bleu_tokens("a b c d e f g h i")]);
        assert_eq!((bleu.candidate_len, bleu.reference_len), (4, 3));
        // Equal distance (3 and 5 for 4): the shorter.
        let mut tie = Bleu::default();
        tie.add(&candidate, &[bleu_tokens("a b c d e"), bleu_tokens("a b c")]);
        assert_eq!(tie.reference_len, 3);
    }
}
