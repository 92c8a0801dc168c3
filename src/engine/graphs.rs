//! The three graphs of a VLM, each wrapping one ONNX Runtime session and knowing its inputs.

use std::borrow::Cow;
use std::path::Path;
use std::time::{Duration, Instant};

use ndarray::{Array2, ArrayD, Axis, IxDyn};
use ort::environment::Environment;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType};

use super::EngineError;
use super::kv_cache::{KvCache, KvLayout};
use super::tensors::{last_rows, to_f32_array, to_value};
use crate::family::{NamedTensor, TensorData};
use crate::runtime::{self, GraphOptions};

type Inputs<'v> = Vec<(Cow<'static, str>, SessionInputValue<'v>)>;

fn open(env: &Environment, path: &Path, options: &GraphOptions, spinning: bool) -> Result<Session, EngineError> {
    Ok(runtime::open_session(env, path, options, spinning)?)
}

fn input_type(session: &Session, name: &str) -> Option<TensorElementType> {
    session.inputs().iter().find(|i| i.name() == name).and_then(|i| i.dtype().tensor_type())
}

fn input_rank(session: &Session, name: &str) -> Option<usize> {
    session.inputs().iter().find(|i| i.name() == name).and_then(|i| i.dtype().tensor_shape().map(|s| s.len()))
}

fn output_name(session: &Session, index: usize) -> Result<String, EngineError> {
    session
        .outputs()
        .get(index)
        .map(|o| o.name().to_string())
        .ok_or_else(|| EngineError::GraphMismatch("graph has no outputs".into()))
}

/// The vision encoder: tiles or patches in, one feature row per image token out.
#[derive(Debug)]
pub struct VisionEncoder {
    session: Session,
}

impl VisionEncoder {
    pub fn open(env: &Environment, path: &Path, options: &GraphOptions) -> Result<Self, EngineError> {
        // It runs on its own thread beside the decoder: its idle threads must not spin.
        Ok(Self { session: open(env, path, options, false)? })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Run the encoder and return its features as `[rows, hidden]` f32. Takes the inputs, so
    /// their pixels move into ONNX Runtime's values instead of being copied again.
    pub fn encode(&mut self, inputs: Vec<NamedTensor>) -> Result<Array2<f32>, EngineError> {
        let mut values: Inputs = Vec::new();
        for NamedTensor { name, data } in inputs {
            let want = input_type(&self.session, &name)
                .ok_or_else(|| EngineError::GraphMismatch(format!("vision encoder has no input {name}")))?;
            // Some exports (transformers.js) take `[batch, images, ...]`: add the batch axis.
            let data = match input_rank(&self.session, &name) {
                Some(rank) if rank == data.ndim() + 1 => data.insert_batch_axis(),
                _ => data,
            };
            let value = to_value(data, want, &name)?;
            values.push((Cow::Owned(name), value.into()));
        }
        let name = output_name(&self.session, 0)?;
        let outputs = self.session.run(values)?;
        let features = to_f32_array(&outputs[name.as_str()], &name)?;
        let hidden = *features.shape().last().unwrap_or(&0);
        let rows = features.len() / hidden.max(1);
        features
            .into_shape_with_order((rows, hidden))
            .map_err(|e| EngineError::GraphMismatch(format!("image features: {e}")))
    }
}

impl TensorData {
    fn ndim(&self) -> usize {
        match self {
            TensorData::F32(a) => a.ndim(),
            TensorData::I64(a) => a.ndim(),
            TensorData::Bool(a) => a.ndim(),
        }
    }

    fn insert_batch_axis(self) -> Self {
        match self {
            TensorData::F32(a) => TensorData::F32(a.insert_axis(Axis(0))),
            TensorData::I64(a) => TensorData::I64(a.insert_axis(Axis(0))),
            TensorData::Bool(a) => TensorData::Bool(a.insert_axis(Axis(0))),
        }
    }
}

/// The token embedder: `input_ids [b, s]` to `inputs_embeds [b, s, hidden]`.
#[derive(Debug)]
pub struct Embedder {
    session: Session,
    output: String,
}

impl Embedder {
    pub fn open(env: &Environment, path: &Path, options: &GraphOptions) -> Result<Self, EngineError> {
        let session = open(env, path, options, true)?;
        if input_type(&session, "input_ids").is_none() {
            return Err(EngineError::GraphMismatch("embed_tokens has no input_ids input".into()));
        }
        let output = output_name(&session, 0)?;
        Ok(Self { session, output })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Embeddings of `ids` as `[rows, ids / rows, hidden]`, left in ONNX Runtime's memory.
    pub fn embed(&mut self, ids: &[u32], rows: usize) -> Result<DynValue, EngineError> {
        let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
        let tensor = Tensor::from_array(([rows, ids.len() / rows], ids))?;
        let mut outputs = self.session.run(ort::inputs!["input_ids" => tensor])?;
        outputs
            .remove(self.output.as_str())
            .ok_or_else(|| EngineError::GraphMismatch(format!("embed_tokens did not return {}", self.output)))
    }
}

/// The decoder with its KV cache inputs and outputs.
#[derive(Debug)]
pub struct Decoder {
    session: Session,
    pub layout: KvLayout,
    embeds_type: TensorElementType,
    has_cache_branch: bool,
    /// Where the KV cache makes its blocks (see `kv_cache`).
    cache_allocator: Allocator,
}

impl Decoder {
    pub fn open(env: &Environment, path: &Path, options: &GraphOptions) -> Result<Self, EngineError> {
        let session = open(env, path, options, true)?;
        for name in ["inputs_embeds", "attention_mask", "position_ids"] {
            if input_type(&session, name).is_none() {
                return Err(EngineError::GraphMismatch(format!("decoder has no {name} input")));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == "logits") {
            return Err(EngineError::GraphMismatch("decoder has no logits output".into()));
        }
        let layout = KvLayout::from_session(&session)?;
        let embeds_type = input_type(&session, "inputs_embeds").unwrap_or(TensorElementType::Float32);
        let has_cache_branch = input_type(&session, "use_cache_branch").is_some();
        let cache_allocator = arena_allocator(&session);
        Ok(Self { session, layout, embeds_type, has_cache_branch, cache_allocator })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The allocator of the KV cache's blocks: the session's CPU arena where it has one.
    pub fn cache_allocator(&self) -> &Allocator {
        &self.cache_allocator
    }

    /// Element type the decoder wants for `inputs_embeds`.
    pub fn embeds_type(&self) -> TensorElementType {
        self.embeds_type
    }

    /// Run one forward pass over `embeds` (`[rows, s, hidden]`) after the cached positions and
    /// return each row's last-position logits. The cache is advanced in place. Also returns the
    /// time spent inside ONNX Runtime.
    pub fn forward(
        &mut self,
        embeds: DynValue,
        positions: ArrayD<i64>,
        cache: &mut KvCache,
    ) -> Result<(Vec<Vec<f32>>, Duration), EngineError> {
        let new = embeds.shape().get(1).copied().unwrap_or(0) as usize;
        let mut inputs: Inputs = vec![
            (Cow::Borrowed("inputs_embeds"), embeds.into()),
            (Cow::Borrowed("attention_mask"), Tensor::from_array(cache.attention_mask(new))?.into()),
            (Cow::Borrowed("position_ids"), Tensor::from_array(positions)?.into()),
        ];
        if self.has_cache_branch {
            let branch = Tensor::from_array(ArrayD::from_elem(IxDyn(&[1]), !cache.is_empty()))?;
            inputs.push((Cow::Borrowed("use_cache_branch"), branch.into()));
        }
        for ((past, _), value) in self.layout.tensors.iter().zip(&cache.recent) {
            inputs.push((Cow::Owned(past.clone()), value.view().into()));
        }
        for (older, value) in self.layout.older.iter().zip(&cache.older) {
            inputs.push((Cow::Owned(older.clone()), value.view().into()));
        }
        let start = Instant::now();
        let mut outputs = self.session.run(inputs)?;
        let in_ort = start.elapsed();
        let logits = last_rows(&outputs["logits"])?;
        let present = self
            .layout
            .tensors
            .iter()
            .map(|(_, present)| {
                outputs
                    .remove(present.as_str())
                    .ok_or_else(|| EngineError::GraphMismatch(format!("decoder did not return {present}")))
            })
            .collect::<Result<_, _>>()?;
        cache.advance(present, new, &self.cache_allocator)?;
        Ok((logits, in_ort))
    }
}

/// The session's CPU arena allocator, or ONNX Runtime's plain CPU allocator where the session
/// has no arena (`CreateAllocator` finds none registered): blocks work the same, only without
/// memory kept between steps.
fn arena_allocator(session: &Session) -> Allocator {
    MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Arena, MemoryType::Default)
        .and_then(|arena| Allocator::new(session, arena))
        .unwrap_or_else(|e| {
            tracing::debug!(error = %e, "no CPU arena in the decoder session; the KV cache uses the default allocator");
            Allocator::default()
        })
}

#[cfg(test)]
mod tests {
    use ndarray::{Array3, ArrayD, IxDyn};
    use ort::memory::AllocatorType;
    use ort::value::{DynTensorValueType, Tensor};

    use super::{Decoder, KvCache};
    use crate::runtime::{self, GraphOptions};

    /// A prompt of three positions, then single steps until every layer's recent block has
    /// moved into its older block at least once: each block the cache made is arena memory.
    #[test]
    fn the_cache_grows_its_blocks_in_the_decoder_arena() {
        let env = runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/idefics3-tiny/package/onnx/decoder_model_merged.onnx");
        let mut decoder = Decoder::open(env, path.as_ref(), &GraphOptions::default()).unwrap();
        assert_eq!(decoder.cache_allocator().memory_info().allocator_type(), AllocatorType::Arena);
        let embeds = decoder.session().inputs().iter().find(|i| i.name() == "inputs_embeds").unwrap();
        let hidden = embeds.dtype().tensor_shape().unwrap()[2] as usize;
        let mut cache = KvCache::empty(&decoder.layout).unwrap();
        let mut width = 0;
        for new in [3, 1, 1, 1, 1] {
            let embeds = Tensor::from_array(Array3::from_elem((1, new, hidden), 0.1f32)).unwrap().into_dyn();
            let positions = ArrayD::from_shape_fn(IxDyn(&[1, new]), |i| (width + i[1]) as i64);
            let (logits, _) = decoder.forward(embeds, positions, &mut cache).unwrap();
            width += new;
            assert!(logits[0].iter().all(|l| l.is_finite()));
        }
        assert_eq!(cache.width(), width);
        // Two layers: the four single steps moved each layer's recent block twice.
        assert_eq!(decoder.layout.layers, 2);
        for block in &cache.older {
            let tensor = block.view().downcast::<DynTensorValueType>().unwrap();
            assert_eq!(tensor.memory_info().allocator_type(), AllocatorType::Arena);
            assert!(block.shape()[2] > 3, "grown after the prompt");
        }
    }
}
