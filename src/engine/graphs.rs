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
use super::kv_cache::{CacheWrites, KvCache, KvLayout};
use super::tensors::{last_rows, on_host, tensor_bytes, to_f32_array, to_value};
use crate::family::{NamedTensor, TensorData};
use crate::runtime::{self, GraphOptions};

type Inputs<'v> = Vec<(Cow<'static, str>, SessionInputValue<'v>)>;

fn open(env: &Environment, path: &Path, options: &GraphOptions, spinning: bool) -> Result<Session, EngineError> {
    Ok(runtime::open_session(env, path, options, spinning)?)
}

/// Where a graph's outputs that feed the next graph or step are kept.
#[derive(Debug)]
enum Placement {
    /// ONNX Runtime hands every output to the host (the CPU provider, where that costs nothing).
    Host,
    /// On the session's GPU: those outputs stay in device memory and go back in from there,
    /// through an IoBinding; only what the host reads (logits) crosses.
    Device(MemoryInfo<'static>),
}

impl Placement {
    /// The device of the first GPU provider in `options`, if the session got it (it may have
    /// fallen back to the CPU): the session then has an allocator for that device's memory.
    fn of(session: &Session, options: &GraphOptions) -> Self {
        let device = options.providers.iter().find_map(|p| p.cuda_device()).and_then(|id| {
            MemoryInfo::new(AllocationDevice::CUDA, id, AllocatorType::Device, MemoryType::Default).ok()
        });
        match device {
            Some(info) if Allocator::new(session, info.clone()).is_ok() => {
                tracing::info!(device = info.device_id(), "graph outputs that feed later runs stay in CUDA memory");
                Placement::Device(info)
            }
            _ => Placement::Host,
        }
    }
}

/// Where an output of [`run`] goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Keep {
    /// Stays with the session (on its device, if it has one): fed to a later run.
    Placed,
    /// To the host, which reads it.
    Host,
}

/// What one run cost: time inside ONNX Runtime and bytes handed between host and device.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunCost {
    pub in_runtime: Duration,
    /// Host inputs of a device session plus its outputs brought to the host: an upper bound of
    /// what crossed (ONNX Runtime keeps an input on the host where only CPU nodes read it).
    pub transferred: usize,
}

impl std::ops::AddAssign for RunCost {
    fn add_assign(&mut self, other: Self) {
        self.in_runtime += other.in_runtime;
        self.transferred += other.transferred;
    }
}

/// Tensors a graph writes in place: each bound as the input and the output named beside it.
struct InPlace<'a> {
    /// `(input, output)` per tensor.
    names: &'a [(String, String)],
    tensors: &'a mut [DynValue],
}

/// Run `session` on `inputs` (and `in_place`) and return the named `outputs` in their order.
fn run(
    session: &mut Session,
    placement: &Placement,
    inputs: &[(Cow<'static, str>, &DynValue)],
    outputs: &[(&str, Keep)],
    in_place: Option<InPlace>,
) -> Result<(Vec<DynValue>, RunCost), EngineError> {
    let missing = |name: &str| EngineError::GraphMismatch(format!("the graph did not return {name}"));
    let start = Instant::now();
    let device = match placement {
        Placement::Device(device) => Some(device),
        Placement::Host if in_place.is_none() => {
            let inputs: Inputs = inputs.iter().map(|(name, value)| (name.clone(), value.view().into())).collect();
            let mut returned = session.run(inputs)?;
            let in_runtime = start.elapsed();
            let values = outputs.iter().map(|(name, _)| returned.remove(name).ok_or_else(|| missing(name)));
            return Ok((values.collect::<Result<_, _>>()?, RunCost { in_runtime, transferred: 0 }));
        }
        Placement::Host => None,
    };
    // Host memory crosses to and from a device session; on the CPU provider nothing crosses.
    let crossing = |value: &DynValue| if device.is_some() && on_host(value) { tensor_bytes(value) } else { 0 };
    let host = MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default)?;
    let mut binding = session.create_binding()?;
    let mut transferred = 0;
    for (name, value) in inputs {
        binding.bind_input(name.as_ref(), *value)?;
        transferred += crossing(value);
    }
    for (name, keep) in outputs {
        binding.bind_output_to_device(*name, device.filter(|_| *keep == Keep::Placed).unwrap_or(&host))?;
    }
    if let Some(InPlace { names, tensors }) = in_place {
        for ((input, output), tensor) in names.iter().zip(tensors.iter_mut()) {
            binding.bind_input(input.as_str(), &*tensor)?;
            binding.bind_output(output.as_str(), &mut *tensor)?;
            transferred += 2 * crossing(tensor);
        }
    }
    let mut returned = session.run_binding(&binding)?;
    let in_runtime = start.elapsed();
    let values: Vec<DynValue> =
        outputs.iter().map(|(name, _)| returned.remove(name).ok_or_else(|| missing(name))).collect::<Result<_, _>>()?;
    if device.is_some() {
        transferred += outputs
            .iter()
            .zip(&values)
            .filter(|((_, keep), _)| *keep == Keep::Host)
            .map(|(_, v)| tensor_bytes(v))
            .sum::<usize>();
    }
    Ok((values, RunCost { in_runtime, transferred }))
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
    placement: Placement,
}

impl Embedder {
    /// `spinning`: see `runtime::open_session`.
    pub fn open(env: &Environment, path: &Path, options: &GraphOptions, spinning: bool) -> Result<Self, EngineError> {
        let session = open(env, path, options, spinning)?;
        if input_type(&session, "input_ids").is_none() {
            return Err(EngineError::GraphMismatch("embed_tokens has no input_ids input".into()));
        }
        let output = output_name(&session, 0)?;
        let placement = Placement::of(&session, options);
        Ok(Self { session, output, placement })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Embeddings of `ids` as `[rows, ids / rows, hidden]`, left in ONNX Runtime's memory (on
    /// the device, for a session on one).
    pub fn embed(&mut self, ids: &[u32], rows: usize) -> Result<(DynValue, RunCost), EngineError> {
        let ids: Vec<i64> = ids.iter().map(|&id| i64::from(id)).collect();
        let ids = Tensor::from_array(([rows, ids.len() / rows], ids))?.into_dyn();
        let outputs = [(self.output.as_str(), Keep::Placed)];
        let (mut values, cost) =
            run(&mut self.session, &self.placement, &[("input_ids".into(), &ids)], &outputs, None)?;
        Ok((values.remove(0), cost))
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
    placement: Placement,
}

impl Decoder {
    /// `spinning`: see `runtime::open_session`.
    pub fn open(env: &Environment, path: &Path, options: &GraphOptions, spinning: bool) -> Result<Self, EngineError> {
        let session = open(env, path, options, spinning)?;
        for name in ["inputs_embeds", "attention_mask", "position_ids"] {
            if input_type(&session, name).is_none() {
                return Err(EngineError::GraphMismatch(format!("decoder has no {name} input")));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == "logits") {
            return Err(EngineError::GraphMismatch("decoder has no logits output".into()));
        }
        let mut layout = KvLayout::from_session(&session)?;
        let placement = Placement::of(&session, options);
        if layout.writes == CacheWrites::AppendAndSettle && !matches!(placement, Placement::Host) {
            layout.writes = CacheWrites::Append;
        }
        let embeds_type = input_type(&session, "inputs_embeds").unwrap_or(TensorElementType::Float32);
        let has_cache_branch = input_type(&session, "use_cache_branch").is_some();
        let cache_allocator = arena_allocator(&session);
        Ok(Self { session, layout, embeds_type, has_cache_branch, cache_allocator, placement })
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The allocator of the KV cache's blocks: the session's CPU arena where it has one.
    pub fn cache_allocator(&self) -> &Allocator {
        &self.cache_allocator
    }

    /// Whether the KV cache's blocks live in host memory.
    pub fn cache_on_host(&self) -> bool {
        matches!(self.placement, Placement::Host)
    }

    /// Element type the decoder wants for `inputs_embeds`.
    pub fn embeds_type(&self) -> TensorElementType {
        self.embeds_type
    }

    /// Run one forward pass over `embeds` (`[rows, s, hidden]`) after the cached positions and
    /// return each row's last-position logits. The cache is advanced in place (its blocks stay
    /// on the session's device, if it has one). The cost counts the cache's own copies to the
    /// host since the last pass (when rows joined or left). A decoder that writes its cache in
    /// place gets the cache's buffers as both its past inputs and its present outputs.
    pub fn forward(
        &mut self,
        embeds: DynValue,
        positions: ArrayD<i64>,
        cache: &mut KvCache,
    ) -> Result<(Vec<Vec<f32>>, RunCost), EngineError> {
        let new = embeds.shape().get(1).copied().unwrap_or(0) as usize;
        cache.reserve(new, &self.cache_allocator)?;
        let placed = match &self.placement {
            Placement::Device(device) => cache.place_buffers(device)?,
            Placement::Host => 0,
        };
        let mut owned: Vec<(&'static str, DynValue)> = vec![
            ("inputs_embeds", embeds),
            ("attention_mask", Tensor::from_array(cache.attention_mask(new))?.into_dyn()),
            ("position_ids", Tensor::from_array(positions)?.into_dyn()),
        ];
        if self.has_cache_branch {
            let branch = Tensor::from_array(ArrayD::from_elem(IxDyn(&[1]), !cache.is_empty()))?;
            owned.push(("use_cache_branch", branch.into_dyn()));
        }
        let mut inputs: Vec<(Cow<'static, str>, &DynValue)> =
            owned.iter().map(|(name, value)| (Cow::Borrowed(*name), value)).collect();
        let (past, in_place) = if self.layout.writes == CacheWrites::InPlace {
            (&[][..], Some(InPlace { names: &self.layout.tensors, tensors: &mut cache.recent }))
        } else {
            (&cache.recent[..], None)
        };
        for ((name, _), value) in self.layout.tensors.iter().zip(past) {
            inputs.push((Cow::Owned(name.clone()), value));
        }
        for (older, value) in self.layout.older.iter().zip(&cache.older) {
            inputs.push((Cow::Owned(older.clone()), value));
        }
        let returned = past.len();
        let outputs: Vec<(&str, Keep)> = std::iter::once(("logits", Keep::Host))
            .chain(self.layout.tensors[..returned].iter().map(|(_, present)| (present.as_str(), Keep::Placed)))
            .collect();
        let (mut values, mut cost) = run(&mut self.session, &self.placement, &inputs, &outputs, in_place)?;
        let present = values.split_off(1);
        let logits = last_rows(&values[0])?;
        cost.transferred += cache.take_transferred() + placed;
        cache.advance(present, new, &self.cache_allocator)?;
        Ok((logits, cost))
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
    use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
    use ort::value::{DynTensorValueType, Tensor};

    use super::{CacheWrites, Decoder, KvCache, Placement, RunCost};
    use crate::runtime::{self, GraphOptions};

    fn decoder() -> Decoder {
        let env = runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/idefics3-tiny/package/onnx/decoder_model_merged.onnx");
        Decoder::open(env, path.as_ref(), &GraphOptions::default(), true).unwrap()
    }

    fn hidden(decoder: &Decoder) -> usize {
        let embeds = decoder.session().inputs().iter().find(|i| i.name() == "inputs_embeds").unwrap();
        embeds.dtype().tensor_shape().unwrap()[2] as usize
    }

    /// `rows` rows of `new` positions from `start`, each row's embeddings a different value.
    fn step(decoder: &mut Decoder, cache: &mut KvCache, rows: &[(f32, usize)], new: usize) -> Vec<Vec<f32>> {
        step_cost(decoder, cache, rows, new).0
    }

    fn step_cost(
        decoder: &mut Decoder,
        cache: &mut KvCache,
        rows: &[(f32, usize)],
        new: usize,
    ) -> (Vec<Vec<f32>>, RunCost) {
        let hidden = hidden(decoder);
        let embeds = Array3::from_shape_fn((rows.len(), new, hidden), |(r, s, h)| rows[r].0 + 0.01 * (s + h) as f32);
        let positions = ArrayD::from_shape_fn(IxDyn(&[rows.len(), new]), |i| (rows[i[0]].1 + i[1]) as i64);
        decoder.forward(Tensor::from_array(embeds).unwrap().into_dyn(), positions, cache).unwrap()
    }

    /// A prompt of three positions, then single steps until every layer's recent block has
    /// moved into its older block at least once: each block the cache made is arena memory.
    #[test]
    fn the_cache_grows_its_blocks_in_the_decoder_arena() {
        let mut decoder = decoder();
        assert_eq!(decoder.cache_allocator().memory_info().allocator_type(), AllocatorType::Arena);
        let mut cache = KvCache::empty(&decoder.layout).unwrap();
        let mut width = 0;
        for new in [3, 1, 1, 1, 1] {
            let logits = step(&mut decoder, &mut cache, &[(0.1, width)], new);
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

    /// The device path run on the CPU, whose "device" memory is host memory: through an
    /// IoBinding, outputs kept with the session, older blocks left empty and rows gathered
    /// through host copies, it must give the host path's logits as sequences join and leave,
    /// and count what it hands over.
    #[test]
    fn the_bound_device_path_gives_the_host_path_logits() {
        let mut host = decoder();
        let mut bound = decoder();
        assert!(matches!(bound.placement, Placement::Host), "no GPU provider asked for");
        bound.placement = Placement::Device(
            MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).unwrap(),
        );
        bound.layout.writes = CacheWrites::Append;
        let mut logits = Vec::new();
        let mut older_widths = Vec::new();
        let mut transferred = Vec::new();
        for decoder in [&mut host, &mut bound] {
            let mut run = Vec::new();
            let mut cache = KvCache::empty(&decoder.layout).unwrap();
            run.push(step(decoder, &mut cache, &[(0.1, 0)], 3));
            run.push(step(decoder, &mut cache, &[(0.2, 3)], 1));
            let mut other = KvCache::empty(&decoder.layout).unwrap();
            run.push(step(decoder, &mut other, &[(0.3, 0)], 2));
            cache.join(other, 1, &Allocator::default()).unwrap();
            run.push(step(decoder, &mut cache, &[(0.4, 4), (0.5, 2)], 1));
            let (last, cost) = step_cost(decoder, &mut cache, &[(0.6, 5), (0.6, 3)], 1);
            run.push(last);
            transferred.push(cost.transferred);
            cache.retain(&[false, true], &Allocator::default()).unwrap();
            run.push(step(decoder, &mut cache, &[(0.7, 4)], 1));
            older_widths.push(cache.older.iter().map(|b| b.shape()[2]).max());
            logits.push(run);
        }
        let (host, bound) = (logits[0].concat().concat(), logits[1].concat().concat());
        assert_eq!(host.len(), bound.len());
        let worst = host.iter().zip(&bound).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "logits differ by {worst}");
        assert_eq!(older_widths, [Some(5), Some(0)], "the host settles positions in the older blocks, a device not");
        assert_eq!(transferred[0], 0);
        assert!(transferred[1] > 2 * 1000, "the logits rows at least: {}", transferred[1]);
    }
}
