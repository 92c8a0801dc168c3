//! The vision encoder on one thread of its own for the model's lifetime, fed by a channel: the
//! session, its thread pool and a GPU provider's stream stay with one thread, and prefill and
//! decode run beside its calls instead of waiting for them.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};

use ndarray::Array2;

use super::EngineError;
use super::graphs::VisionEncoder;
use crate::family::NamedTensor;

type Features = Result<Array2<f32>, EngineError>;

struct Job {
    inputs: Vec<NamedTensor>,
    reply: Sender<Features>,
}

/// The handle of a model's vision thread; dropping it ends the thread once its call is done.
#[derive(Debug)]
pub(super) struct VisionWorker {
    jobs: Sender<Job>,
}

/// The features of one queued call, once they are ready.
pub(super) struct VisionReply(Receiver<Features>);

impl VisionWorker {
    pub(super) fn start(mut encoder: VisionEncoder) -> Result<Self, EngineError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vision-encoder".into())
            .spawn(move || {
                for job in queue {
                    // A panic fails its own call, not the thread and the calls after it.
                    let features = std::panic::catch_unwind(AssertUnwindSafe(|| encoder.encode(job.inputs)))
                        .unwrap_or(Err(EngineError::VisionEncoderStopped));
                    // Nobody waits where the batch abandoned the call.
                    let _ = job.reply.send(features);
                }
            })
            .map_err(EngineError::Thread)?;
        Ok(Self { jobs })
    }

    /// Queue one call.
    pub(super) fn encode(&self, inputs: Vec<NamedTensor>) -> Result<VisionReply, EngineError> {
        let (reply, features) = mpsc::channel();
        self.jobs.send(Job { inputs, reply }).map_err(|_| EngineError::VisionEncoderStopped)?;
        Ok(VisionReply(features))
    }
}

impl VisionReply {
    /// The call's features: `None` while it runs, unless `wait`, which blocks until it is done.
    pub(super) fn poll(&self, wait: bool) -> Option<Features> {
        if wait {
            return Some(self.0.recv().unwrap_or(Err(EngineError::VisionEncoderStopped)));
        }
        match self.0.try_recv() {
            Ok(features) => Some(features),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(EngineError::VisionEncoderStopped)),
        }
    }
}
