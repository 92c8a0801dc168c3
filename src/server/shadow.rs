//! Shadow copies: a request one version answers, run again on a version that shadows its model
//! (see `Scheduler::shadows`). The client never waits for the copy; its answer is compared
//! with the client's (greedy answers must have the same text), counted in the shadow's rollout
//! window and metrics, and discarded.

use std::time::Instant;

use actix_web::web;
use tokio::sync::watch;

use super::AppState;
use super::request::{self, PrepareInput};
use crate::scheduler::{Admission, Outcome};

/// Run `input` on the shadow version `admission` holds, beside the primary whose first
/// sample's text `primary` brings.
pub fn spawn(
    state: web::Data<AppState>,
    admission: Admission,
    input: PrepareInput,
    mut primary: watch::Receiver<Option<String>>,
) {
    let greedy = input.params.sampling.temperature == 0.0 && input.params.samples == 1;
    actix_web::rt::spawn(async move {
        let name = admission.model().to_string();
        let recorder = admission.recorder();
        // The copy starts once the primary has answered: it never competes with the primary's
        // own preparing and prefill, and a primary that ended without an answer costs nothing more.
        let primary = match primary.wait_for(Option::is_some).await {
            Ok(text) => text.clone(),
            Err(_) => None,
        };
        let result = match primary {
            None => "uncompared",
            Some(primary) => {
                let answer = match request::prepare(&state, &admission, input).await {
                    Ok(prepared) => {
                        request::collect(request::submit(&state, admission, prepared, Instant::now(), None)).await
                    }
                    Err(e) => Err(e),
                };
                match answer {
                    Err(e) => {
                        tracing::debug!(model = %name, "shadow copy failed: {}", e.message);
                        "failed"
                    }
                    Ok(shadow) if greedy => {
                        let agreed = shadow.text == primary;
                        recorder.record(Outcome::Compared { agreed: Some(agreed) });
                        if agreed { "agreed" } else { "disagreed" }
                    }
                    Ok(_) => {
                        recorder.record(Outcome::Compared { agreed: None });
                        "uncompared"
                    }
                }
            }
        };
        state.metrics.shadow_requests.with_label_values(&[&name, result]).inc();
    });
}
