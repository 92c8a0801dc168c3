//! Automatic rollback: each version's recent outcomes over a sliding window, and the gates a
//! candidate version must keep passing against the model's stable version (the one with the
//! largest weight). A candidate that fails one loses its traffic (see `Scheduler::check_gates`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::RolloutSettings;

/// How one request ended on a version, as far as the gates care.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// Generated, with its time to first token.
    Answered { ttft_s: f64 },
    /// Failed inside the model (not a client's cancellation or a deadline).
    Failed,
    /// A shadow copy's answer against the primary's: `agreed` for greedy requests, whose texts
    /// must be equal; `None` when nothing could be compared.
    Compared { agreed: Option<bool> },
}

/// A version's outcomes within the last `span`.
#[derive(Debug)]
pub struct Window {
    span: Duration,
    outcomes: Mutex<VecDeque<(Instant, Outcome)>>,
}

/// What a window holds now.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Summary {
    /// Requests that ended (answered or failed).
    pub requests: usize,
    pub errors: usize,
    pub error_rate: f64,
    pub ttft_p99_s: Option<f64>,
    /// Shadow answers compared with the primary's, and how many agreed.
    pub shadow_compared: usize,
    pub shadow_agreed: usize,
    pub shadow_agreement: Option<f64>,
}

impl Window {
    pub fn new(span: Duration) -> Self {
        Self { span, outcomes: Mutex::new(VecDeque::new()) }
    }

    pub fn record(&self, outcome: Outcome) {
        let now = Instant::now();
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut outcomes, now, self.span);
        outcomes.push_back((now, outcome));
    }

    fn expire(outcomes: &mut VecDeque<(Instant, Outcome)>, now: Instant, span: Duration) {
        while outcomes.front().is_some_and(|(at, _)| now.duration_since(*at) > span) {
            outcomes.pop_front();
        }
    }

    /// Forget everything: a version whose weights or files changed starts a new record.
    pub fn clear(&self) {
        self.outcomes.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn summary(&self) -> Summary {
        let mut outcomes = self.outcomes.lock().unwrap_or_else(|e| e.into_inner());
        Self::expire(&mut outcomes, Instant::now(), self.span);
        let mut ttfts = Vec::new();
        let mut summary = Summary::default();
        for (_, outcome) in outcomes.iter() {
            match *outcome {
                Outcome::Answered { ttft_s } => ttfts.push(ttft_s),
                Outcome::Failed => summary.errors += 1,
                Outcome::Compared { agreed: Some(agreed) } => {
                    summary.shadow_compared += 1;
                    summary.shadow_agreed += usize::from(agreed);
                }
                Outcome::Compared { agreed: None } => {}
            }
        }
        summary.requests = ttfts.len() + summary.errors;
        if summary.requests > 0 {
            summary.error_rate = summary.errors as f64 / summary.requests as f64;
        }
        ttfts.sort_by(f64::total_cmp);
        // The nearest-rank 99th percentile.
        let rank = (ttfts.len() * 99).div_ceil(100);
        summary.ttft_p99_s = rank.checked_sub(1).map(|i| ttfts[i]);
        if summary.shadow_compared > 0 {
            summary.shadow_agreement = Some(summary.shadow_agreed as f64 / summary.shadow_compared as f64);
        }
        summary
    }
}

/// Which gate a candidate failed, and why, in words for `/v1/models` and the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub gate: &'static str,
    pub reason: String,
}

/// The gate `candidate` fails against `stable`, if any. Each gate waits for enough evidence:
/// `min_requests` ended requests (or compared shadow answers) on the candidate, and for the
/// latency ratio as many on the stable version. `latency` is false for versions that only
/// shadow: they run at the lowest CPU priority, so their latency says nothing.
pub fn verdict(candidate: &Summary, stable: &Summary, gates: &RolloutSettings, latency: bool) -> Option<Verdict> {
    let enough = |n: usize| n >= gates.min_requests.max(1);
    if enough(candidate.requests) {
        let limit = (stable.error_rate * gates.max_error_ratio).max(gates.min_error_rate);
        if candidate.error_rate > limit {
            return Some(Verdict {
                gate: "errors",
                reason: format!(
                    "error rate {:.1}% over {} requests, above {:.1}% ({}x the stable version's {:.1}%, at least {:.1}%)",
                    candidate.error_rate * 100.0,
                    candidate.requests,
                    limit * 100.0,
                    gates.max_error_ratio,
                    stable.error_rate * 100.0,
                    gates.min_error_rate * 100.0
                ),
            });
        }
    }
    if latency
        && enough(candidate.requests)
        && enough(stable.requests)
        && let (Some(mine), Some(theirs)) = (candidate.ttft_p99_s, stable.ttft_p99_s)
        && mine > theirs * gates.max_ttft_p99_ratio
        && mine > theirs + gates.min_ttft_p99_increase_s
    {
        return Some(Verdict {
            gate: "ttft",
            reason: format!(
                "time to first token p99 {:.3} s, above {}x the stable version's {:.3} s and {:.3} s more",
                mine, gates.max_ttft_p99_ratio, theirs, gates.min_ttft_p99_increase_s
            ),
        });
    }
    if enough(candidate.shadow_compared)
        && let Some(agreement) = candidate.shadow_agreement
        && agreement < gates.min_shadow_agreement
    {
        return Some(Verdict {
            gate: "shadow_agreement",
            reason: format!(
                "shadow agreement {:.1}% over {} greedy answers, below {:.1}%",
                agreement * 100.0,
                candidate.shadow_compared,
                gates.min_shadow_agreement * 100.0
            ),
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates() -> RolloutSettings {
        RolloutSettings { min_requests: 10, ..RolloutSettings::default() }
    }

    fn summary(outcomes: &[Outcome]) -> Summary {
        let window = Window::new(Duration::from_secs(60));
        for outcome in outcomes {
            window.record(*outcome);
        }
        window.summary()
    }

    fn answered(ttft_s: f64, n: usize) -> Vec<Outcome> {
        vec![Outcome::Answered { ttft_s }; n]
    }

    #[test]
    fn a_window_counts_errors_latency_and_agreement() {
        let mut outcomes = answered(0.1, 99);
        outcomes.push(Outcome::Answered { ttft_s: 2.0 });
        outcomes.push(Outcome::Failed);
        outcomes.extend([true, true, false, true].map(|a| Outcome::Compared { agreed: Some(a) }));
        outcomes.push(Outcome::Compared { agreed: None });
        let s = summary(&outcomes);
        assert_eq!((s.requests, s.errors, s.shadow_compared, s.shadow_agreed), (101, 1, 4, 3));
        assert!((s.error_rate - 1.0 / 101.0).abs() < 1e-12);
        // 99 of 100 answers at 0.1 s: the 99th percentile is 0.1 s, the slowest one is above it.
        assert_eq!(s.ttft_p99_s, Some(0.1));
        assert_eq!(s.shadow_agreement, Some(0.75));
        assert_eq!(summary(&[]), Summary::default());
    }

    #[test]
    fn outcomes_leave_the_window_when_it_passes() {
        let window = Window::new(Duration::from_millis(30));
        window.record(Outcome::Failed);
        std::thread::sleep(Duration::from_millis(60));
        window.record(Outcome::Answered { ttft_s: 0.2 });
        assert_eq!((window.summary().requests, window.summary().errors), (1, 0));
    }

    #[test]
    fn each_gate_trips_on_its_own_evidence_only() {
        let stable = summary(&answered(0.1, 50));
        let healthy = summary(&answered(0.12, 20));
        assert_eq!(verdict(&healthy, &stable, &gates(), true), None);

        let mut failing = answered(0.1, 5);
        failing.extend(vec![Outcome::Failed; 5]);
        let v = verdict(&summary(&failing), &stable, &gates(), true).unwrap();
        assert_eq!(v.gate, "errors");
        assert!(v.reason.contains("50.0%"), "{}", v.reason);
        // Too few requests yet: no judgement.
        assert_eq!(verdict(&summary(&[Outcome::Failed; 3]), &stable, &gates(), true), None);

        let slow = summary(&answered(0.3, 20));
        assert_eq!(verdict(&slow, &stable, &gates(), true).unwrap().gate, "ttft");
        assert_eq!(verdict(&slow, &stable, &gates(), false), None, "a shadow's latency is not judged");
        // Three times slower by milliseconds is scheduling noise, not a verdict.
        let fast = summary(&answered(0.001, 50));
        assert_eq!(verdict(&summary(&answered(0.003, 20)), &fast, &gates(), true), None);

        let disagreeing: Vec<Outcome> = (0..20).map(|i| Outcome::Compared { agreed: Some(i % 4 != 0) }).collect();
        let v = verdict(&summary(&disagreeing), &stable, &gates(), false).unwrap();
        assert_eq!(v.gate, "shadow_agreement");
        assert!(v.reason.contains("75.0%"), "{}", v.reason);
    }
}
