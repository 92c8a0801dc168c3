//! The decoder's key/value cache.
//!
//! Strategy: the cache lives in ONNX Runtime values. Each step's `present.*` outputs are moved
//! (not copied) into the cache and handed back as the next step's `past_key_values.*` inputs,
//! so no cache data crosses into Rust arrays per token. The first step feeds empty tensors
//! (past length 0) shaped from the decoder's input metadata. A decoder that concatenates past
//! and new keys copies the whole cache at every step; one exported with an older block
//! (`older_key_values.*`, read by attention but not returned) lets the cache keep most of its
//! positions there, untouched, while the graph extends only a short recent block, whose
//! positions move into the older block one cache tensor per step (see [`KvCache::advance`]).
//! A fused decoder (`export --attention fused`) takes one buffer per cache tensor with room to
//! spare and writes the new positions into it: the buffer is bound as both its past input and
//! its present output, so a step copies nothing, and the buffer grows (one copy) only when a
//! step needs more columns than it has.
//! A batch of sequences shares one cache, left-padded to its longest row; rows are copied only
//! when a sequence joins or leaves. The layout also sizes the memory budget.
//!
//! Blocks the cache makes itself (an older block grown by a recent one, rows gathered when the
//! batch changes) come from the decoder session's CPU arena, like the decoder's own outputs:
//! the arena keeps its memory from step to step and request to request, where the heap handed
//! each grown block fresh pages whose faults cost more than the copy (docs/benchmarks.md,
//! "Measurements behind design choices").

use std::sync::Arc;

use ndarray::{Array2, s};
use ort::memory::{Allocator, MemoryInfo};
use ort::session::Session;
use ort::value::{DynTensorValueType, DynValue, PrimitiveTensorElementType, Tensor, TensorElementType, ValueType};

use super::EngineError;
use super::prefix_cache::{BLOCK_TOKENS, Block, Columns};
use super::tensors::{empty_float, host_copy, on_host, tensor_bytes};

/// The least room a buffer written in place grows by: a long prefill's buffer would otherwise
/// be copied again after a few steps.
const SPARE_COLUMNS: usize = 64;

/// How the decoder writes new positions into the cache it is given, and so what the cache does
/// after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheWrites {
    /// `present` is the recent block with the new positions appended, and positions move from
    /// the recent blocks into the older blocks now and then. Only on the host: on a device the
    /// move would bring the blocks across to the host.
    AppendAndSettle,
    /// `present` is the recent block with the new positions appended, and it keeps them all (a
    /// decoder without older blocks, or one on a device: its older blocks stay empty).
    Append,
    /// The decoder writes the new positions into the buffer it is given and returns that buffer
    /// (present's length axis is past's): the fused decoder.
    InPlace,
}

/// Shape of the cache as the decoder declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayout {
    /// `(past input name, present output name)` per cache tensor, keys and values of every layer.
    pub tensors: Vec<(String, String)>,
    /// The older-block input of each cache tensor, in the same order; empty when the decoder
    /// has none.
    pub older: Vec<String>,
    pub writes: CacheWrites,
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub element_type: TensorElementType,
}

impl KvLayout {
    /// Read the layout from the decoder's `past_key_values.{i}.key/value` inputs.
    pub fn from_session(session: &Session) -> Result<Self, EngineError> {
        let mut tensors = Vec::new();
        let mut dims = None;
        let mut in_place = Vec::new();
        for input in session.inputs().iter().filter(|i| i.name().starts_with("past_key_values.")) {
            let output = input.name().replacen("past_key_values", "present", 1);
            let Some(present) = session.outputs().iter().find(|o| o.name() == output) else {
                return Err(EngineError::GraphMismatch(format!("decoder has {} but no {output}", input.name())));
            };
            in_place.push(matches!(
                (length_symbol(input.dtype()), length_symbol(present.dtype())),
                (Some(past), Some(present)) if past == present
            ));
            let shape = input.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default();
            let ty = input.dtype().tensor_type().unwrap_or(TensorElementType::Float32);
            match shape.as_slice() {
                [_, heads, _, head_dim] if *heads > 0 && *head_dim > 0 => {
                    dims.get_or_insert((*heads as usize, *head_dim as usize, ty));
                }
                other => {
                    return Err(EngineError::GraphMismatch(format!(
                        "{} has shape {other:?}; expected [batch, kv_heads, past, head_dim] with fixed heads and head size",
                        input.name()
                    )));
                }
            }
            tensors.push((input.name().to_string(), output));
        }
        let (kv_heads, head_dim, element_type) =
            dims.ok_or_else(|| EngineError::GraphMismatch("decoder has no past_key_values inputs".into()))?;
        let inputs: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        let older = older_inputs(&inputs, &tensors)?;
        let writes = match written_in_place(&in_place, !older.is_empty())? {
            true => CacheWrites::InPlace,
            false if older.is_empty() => CacheWrites::Append,
            false => CacheWrites::AppendAndSettle,
        };
        Ok(Self { layers: tensors.len() / 2, tensors, writes, older, kv_heads, head_dim, element_type })
    }

    /// Bytes of cache one token occupies across all layers.
    pub fn bytes_per_token(&self) -> usize {
        let element = match self.element_type {
            TensorElementType::Float16 | TensorElementType::Bfloat16 => 2,
            _ => 4,
        };
        self.tensors.len() * self.kv_heads * self.head_dim * element
    }
}

/// Whether the decoder writes its cache in place, from whether each cache tensor's present has
/// its past's length axis: all of them (and no older blocks), or none.
fn written_in_place(per_tensor: &[bool], has_older: bool) -> Result<bool, EngineError> {
    let n = per_tensor.iter().filter(|&&b| b).count();
    match (n, has_older) {
        (0, _) => Ok(false),
        (n, false) if n == per_tensor.len() => Ok(true),
        (_, true) => Err(EngineError::GraphMismatch(
            "decoder has older_key_values inputs and returns cache buffers at their input's length".into(),
        )),
        (n, false) => Err(EngineError::GraphMismatch(format!(
            "decoder returns {n} of its {} cache tensors at their input's length: expected all or none",
            per_tensor.len()
        ))),
    }
}

/// The name of a cache tensor's length axis (`[batch, kv_heads, length, head_dim]`), if named.
fn length_symbol(ty: &ValueType) -> Option<&str> {
    match ty {
        ValueType::Tensor { dimension_symbols, .. } => {
            dimension_symbols.get(2).map(String::as_str).filter(|name| !name.is_empty())
        }
        _ => None,
    }
}

/// `older_key_values.*` for every `past_key_values.*` input, or none at all. A decoder with
/// older blocks splits each layer's keys and values at the same column, so its cache tensors
/// must come as `past_key_values.{i}.key` then `.value`, layer by layer.
fn older_inputs(inputs: &[&str], tensors: &[(String, String)]) -> Result<Vec<String>, EngineError> {
    let names: Vec<String> =
        tensors.iter().map(|(past, _)| past.replacen("past_key_values", "older_key_values", 1)).collect();
    match names.iter().filter(|name| inputs.contains(&name.as_str())).count() {
        0 => return Ok(Vec::new()),
        n if n < names.len() => {
            return Err(EngineError::GraphMismatch(format!(
                "decoder has older_key_values inputs for {n} of its {} cache tensors",
                names.len()
            )));
        }
        _ => {}
    }
    let paired = tensors.iter().enumerate().all(|(t, (past, _))| {
        *past == format!("past_key_values.{}.{}", t / 2, if t % 2 == 0 { "key" } else { "value" })
    });
    if !paired {
        return Err(EngineError::GraphMismatch(
            "a decoder with older_key_values inputs must take past_key_values.{i}.key and .value in layer order".into(),
        ));
    }
    Ok(names)
}

/// The cache of a batch of sequences: per cache tensor, a recent block and (when the decoder
/// has one) an older block, each `[rows, kv_heads, columns, head_dim]`. Row `i` holds its
/// `lens[i]` positions right-aligned across the older block's columns then the recent block's;
/// the columns before them are padding that the attention mask hides (left padding, so every
/// row appends at the same column). A decode step appends one column to every row's recent
/// block inside ONNX Runtime; rows are only copied when a sequence joins or leaves the batch.
/// With a decoder that writes in place, the recent block is a buffer whose columns from
/// `width` on are room for new positions.
#[derive(Debug)]
pub struct KvCache {
    pub(super) recent: Vec<DynValue>,
    /// Empty when the decoder has no older block.
    pub(super) older: Vec<DynValue>,
    width: usize,
    lens: Vec<usize>,
    element_type: TensorElementType,
    /// `(kv_heads, head_dim)`.
    dims: (usize, usize),
    /// The layer whose recent blocks move into its older blocks after the next single step.
    turn: usize,
    writes: CacheWrites,
    /// Bytes brought from the device to the host since [`KvCache::take_transferred`] last ran.
    transferred: usize,
}

impl KvCache {
    /// An empty cache (past length 0) for one sequence.
    pub fn empty(layout: &KvLayout) -> Result<Self, EngineError> {
        let mut cache = Self::none(layout);
        cache.recent = layout.tensors.iter().map(|_| cache.empty_block(1)).collect::<Result<_, _>>()?;
        cache.older = layout.older.iter().map(|_| cache.empty_block(1)).collect::<Result<_, _>>()?;
        cache.lens = vec![0];
        Ok(cache)
    }

    /// A cache of no sequences, for a batch to join into.
    pub fn none(layout: &KvLayout) -> Self {
        Self {
            recent: Vec::new(),
            older: Vec::new(),
            width: 0,
            lens: Vec::new(),
            element_type: layout.element_type,
            dims: (layout.kv_heads, layout.head_dim),
            turn: 0,
            writes: layout.writes,
            transferred: 0,
        }
    }

    /// A block of no columns for `rows` rows, shaped like this cache's.
    fn empty_block(&self, rows: usize) -> Result<DynValue, EngineError> {
        empty_float(&[rows, self.dims.0, 0, self.dims.1], self.element_type)
    }

    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Columns (the longest row's positions).
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0
    }

    /// The decoder's `attention_mask` for `new` positions appended to every row (older block's
    /// columns first).
    pub fn attention_mask(&self, new: usize) -> Array2<i64> {
        Array2::from_shape_fn((self.rows(), self.width + new), |(row, col)| {
            i64::from(col + self.lens[row] >= self.width)
        })
    }

    /// Take the decoder's `present.*` outputs (the recent blocks, `new` columns wider). Then
    /// one layer's recent blocks move into its older blocks (every layer's after a prompt
    /// chunk): a recent block never holds more columns than there are layers, and each step
    /// copies about one layer's share of the cache instead of all of it.
    pub(super) fn advance(
        &mut self,
        values: Vec<DynValue>,
        new: usize,
        allocator: &Allocator,
    ) -> Result<(), EngineError> {
        self.width += new;
        self.lens.iter_mut().for_each(|len| *len += new);
        match self.writes {
            // `values` are the buffers themselves, written by the decoder.
            CacheWrites::InPlace => Ok(()),
            CacheWrites::Append => {
                self.recent = values;
                Ok(())
            }
            CacheWrites::AppendAndSettle => {
                self.recent = values;
                self.settle(new, allocator)
            }
        }
    }

    /// Move one layer's recent blocks into its older blocks (every layer's after `new` > 1).
    fn settle(&mut self, new: usize, allocator: &Allocator) -> Result<(), EngineError> {
        let layers = self.recent.len() / 2;
        let settle = if new > 1 {
            0..2 * layers
        } else {
            let layer = self.turn;
            self.turn = (layer + 1) % layers;
            2 * layer..2 * layer + 2
        };
        for t in settle {
            let empty = self.empty_block(self.rows())?;
            let recent = std::mem::replace(&mut self.recent[t], empty);
            self.older[t] = if self.older[t].shape()[2] == 0 {
                recent
            } else {
                match self.element_type {
                    TensorElementType::Float16 => append_columns::<half::f16>(&self.older[t], &recent, allocator)?,
                    _ => append_columns::<f32>(&self.older[t], &recent, allocator)?,
                }
            };
        }
        Ok(())
    }

    /// Make room for `new` positions in a cache written in place: buffers too short for them are
    /// copied into longer ones, with room to spare (see [`gather`](Self::gather)). Nothing to do
    /// for other caches.
    pub(super) fn reserve(&mut self, new: usize, allocator: &Allocator) -> Result<(), EngineError> {
        let needed = self.width + new;
        if self.writes != CacheWrites::InPlace || self.capacity() >= needed {
            return Ok(());
        }
        self.transferred += self.bring_to_host()?;
        let rows: Vec<(&KvCache, usize)> = (0..self.rows()).map(|r| (&*self, r)).collect();
        let grown = Self::gather(&rows, needed, allocator)?;
        self.recent = grown.recent;
        Ok(())
    }

    /// Copy buffers written in place that are on the host (gathered or grown there) into the
    /// device memory of `device`, where the decoder then writes them step after step. Returns
    /// the bytes copied.
    pub(super) fn place_buffers(&mut self, device: &MemoryInfo) -> Result<usize, EngineError> {
        if self.writes != CacheWrites::InPlace {
            return Ok(0);
        }
        let mut bytes = 0;
        for buffer in self.recent.iter_mut().filter(|b| on_host(b)) {
            let tensor = buffer.view().downcast::<DynTensorValueType>()?;
            let placed = tensor.to(device.allocation_device(), device.device_id())?.into_dyn();
            bytes += tensor_bytes(&placed);
            *buffer = placed;
        }
        Ok(bytes)
    }

    /// Columns of the recent blocks (a buffer's room included).
    fn capacity(&self) -> usize {
        self.recent.first().map_or(0, |block| block.shape()[2] as usize)
    }

    /// Append `other`'s rows after this cache's, `copies` times over (samples of one prompt
    /// share its prefill); copies both, unless this one is empty and one copy is asked for.
    pub fn join(&mut self, mut other: KvCache, copies: usize, allocator: &Allocator) -> Result<(), EngineError> {
        if self.rows() == 0 && copies == 1 {
            *self = other;
            return Ok(());
        }
        let transferred = self.bring_to_host()? + other.bring_to_host()? + self.transferred + other.transferred;
        let repeated = (0..copies).flat_map(|_| 0..other.rows());
        let rows: Vec<(&KvCache, usize)> =
            (0..self.rows()).map(|r| (&*self, r)).chain(repeated.map(|r| (&other, r))).collect();
        *self = Self::gather(&rows, 0, allocator)?;
        self.transferred = transferred;
        Ok(())
    }

    /// Drop every row.
    pub fn clear(&mut self) {
        self.recent.clear();
        self.older.clear();
        self.width = 0;
        self.lens.clear();
    }

    /// Keep the rows where `keep` is true, dropping padding columns no row needs any more.
    /// Called after every step: costs nothing when every row stays.
    pub fn retain(&mut self, keep: &[bool], allocator: &Allocator) -> Result<(), EngineError> {
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        if !keep.contains(&true) {
            self.clear();
            return Ok(());
        }
        let transferred = self.bring_to_host()? + self.transferred;
        let rows: Vec<(&KvCache, usize)> = (0..self.rows()).filter(|&r| keep[r]).map(|r| (&*self, r)).collect();
        *self = Self::gather(&rows, 0, allocator)?;
        self.transferred = transferred;
        Ok(())
    }

    /// Copy the blocks held on a device to the host, where rows are gathered (this happens
    /// only when the batch's sequences change). Returns the bytes copied.
    fn bring_to_host(&mut self) -> Result<usize, EngineError> {
        let mut bytes = 0;
        for block in self.recent.iter_mut().chain(self.older.iter_mut()) {
            if let Some(copy) = host_copy(block)? {
                bytes += tensor_bytes(&copy);
                *block = copy;
            }
        }
        Ok(bytes)
    }

    /// Bytes brought from the device to the host since the last call.
    pub(super) fn take_transferred(&mut self) -> usize {
        std::mem::take(&mut self.transferred)
    }

    /// The blocks of cache tensor `t`, oldest first, each with the columns it holds (a buffer's
    /// room left out).
    fn blocks(&self, t: usize) -> Vec<HeldBlock<'_>> {
        let older = self.older.get(t).map(|block| (block, block.shape()[2] as usize));
        let recent = &self.recent[t];
        let held = match self.writes {
            CacheWrites::InPlace => self.width,
            _ => recent.shape()[2] as usize,
        };
        older.into_iter().chain(std::iter::once((recent, held))).collect()
    }

    /// A new cache made of the given rows of existing caches, right-aligned, every position in
    /// the older block when the decoder has one; for a decoder that writes in place, in buffers
    /// with room for at least `capacity` columns and a quarter more (at least [`SPARE_COLUMNS`]),
    /// so that copies stay rare as sequences grow.
    fn gather(rows: &[(&KvCache, usize)], capacity: usize, allocator: &Allocator) -> Result<Self, EngineError> {
        let first = rows[0].0;
        let lens: Vec<usize> = rows.iter().map(|(cache, row)| cache.lens[*row]).collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        let columns = match capacity.max(width) {
            held if first.writes == CacheWrites::InPlace => held + (held / 4).max(SPARE_COLUMNS),
            _ => width,
        };
        let gathered = (0..first.recent.len())
            .map(|t| {
                let sources: Vec<(Vec<HeldBlock>, usize, usize)> =
                    rows.iter().zip(&lens).map(|((cache, row), len)| (cache.blocks(t), *row, *len)).collect();
                match first.element_type {
                    TensorElementType::Float16 => gather_rows(&sources, width, columns, half::f16::ZERO, allocator),
                    _ => gather_rows(&sources, width, columns, 0f32, allocator),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut cache = Self { recent: gathered, older: Vec::new(), width, lens, turn: 0, transferred: 0, ..*first };
        if !first.older.is_empty() {
            let empty = (0..cache.recent.len()).map(|_| cache.empty_block(cache.rows())).collect::<Result<_, _>>()?;
            cache.older = match cache.writes {
                CacheWrites::AppendAndSettle => std::mem::replace(&mut cache.recent, empty),
                _ => empty,
            };
        }
        Ok(cache)
    }

    /// Bytes the cache holds, padding and a buffer's room included.
    pub fn bytes(&self, layout: &KvLayout) -> usize {
        self.rows() * self.width.max(self.capacity()) * layout.bytes_per_token()
    }

    /// A cache of one sequence holding `blocks`' positions, in the layout a prefill leaves.
    pub(super) fn from_blocks(
        layout: &KvLayout,
        blocks: &[Arc<Block>],
        allocator: &Allocator,
    ) -> Result<Self, EngineError> {
        let mut cache = Self::none(layout);
        let len = blocks.len() * BLOCK_TOKENS;
        let filled = (0..layout.tensors.len())
            .map(|t| match layout.element_type {
                TensorElementType::Float16 => from_columns::<half::f16>(blocks, t, cache.dims, allocator),
                _ => from_columns::<f32>(blocks, t, cache.dims, allocator),
            })
            .collect::<Result<Vec<_>, _>>()?;
        cache.width = len;
        cache.lens = vec![len];
        let empty = || (0..layout.tensors.len()).map(|_| cache.empty_block(1)).collect::<Result<Vec<_>, _>>();
        (cache.older, cache.recent) = match (layout.older.is_empty(), layout.writes) {
            (true, _) => (Vec::new(), filled),
            (false, CacheWrites::AppendAndSettle) => (filled, empty()?),
            (false, _) => (empty()?, filled),
        };
        Ok(cache)
    }

    /// Positions `from..from + BLOCK_TOKENS` of row `row` (counted from the row's first
    /// position, not from the padding), copied out as a block. Host blocks only.
    pub(super) fn block(&self, row: usize, from: usize) -> Result<Block, EngineError> {
        let column = self.width - self.lens[row] + from;
        let tensors = (0..self.recent.len())
            .map(|t| {
                let blocks = self.blocks(t);
                Ok(match self.element_type {
                    TensorElementType::Float16 => Columns::F16(read_columns(&blocks, row, column)?),
                    _ => Columns::F32(read_columns(&blocks, row, column)?),
                })
            })
            .collect::<Result<_, EngineError>>()?;
        Ok(Block { tensors })
    }

    /// Positions row `row` holds (padding not counted).
    pub(super) fn row_len(&self, row: usize) -> usize {
        self.lens[row]
    }
}

/// A cache block and the columns of it that hold positions, from its first.
type HeldBlock<'a> = (&'a DynValue, usize);

/// `[1, heads, blocks x BLOCK_TOKENS, dim]` made of cache tensor `t` of every block in order.
fn from_columns<T>(
    blocks: &[Arc<Block>],
    t: usize,
    (heads, dim): (usize, usize),
    allocator: &Allocator,
) -> Result<DynValue, EngineError>
where
    T: PrimitiveTensorElementType + BlockElement + Copy + std::fmt::Debug + 'static,
{
    let len = blocks.len() * BLOCK_TOKENS;
    let mut tensor = Tensor::<T>::new(allocator, [1, heads, len, dim])?;
    let (_, out) = tensor.try_extract_tensor_mut()?;
    let lane = BLOCK_TOKENS * dim;
    for (b, block) in blocks.iter().enumerate() {
        let columns = block
            .tensors
            .get(t)
            .and_then(T::columns)
            .filter(|c| c.len() == heads * lane)
            .ok_or_else(|| EngineError::GraphMismatch("a cached block of another layout".into()))?;
        for h in 0..heads {
            out[h * len * dim + b * lane..][..lane].copy_from_slice(&columns[h * lane..][..lane]);
        }
    }
    Ok(tensor.into_dyn())
}

/// `[heads, BLOCK_TOKENS, dim]` of row `row` from column `column` of blocks read as one.
fn read_columns<T>(blocks: &[HeldBlock], row: usize, column: usize) -> Result<Vec<T>, EngineError>
where
    T: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let mut out = Vec::new();
    let views = blocks
        .iter()
        .map(|(b, held)| Ok((b.try_extract_array::<T>()?, *held)))
        .collect::<Result<Vec<_>, ort::Error>>()?;
    let heads = views.first().map_or(0, |(v, _)| v.shape()[1]);
    for h in 0..heads {
        let (mut at, mut left) = (column, BLOCK_TOKENS);
        for (view, columns) in &views {
            let columns = *columns;
            if at >= columns {
                at -= columns;
                continue;
            }
            let take = left.min(columns - at);
            out.extend(view.slice(s![row, h, at..at + take, ..]).iter().copied());
            left -= take;
            at = 0;
            if left == 0 {
                break;
            }
        }
        if left > 0 {
            return Err(EngineError::GraphMismatch("a cache block past the row's positions".into()));
        }
    }
    Ok(out)
}

/// The element types a block's columns come in.
trait BlockElement: Sized {
    fn columns(columns: &Columns) -> Option<&[Self]>;
}

impl BlockElement for f32 {
    fn columns(columns: &Columns) -> Option<&[Self]> {
        match columns {
            Columns::F32(v) => Some(v),
            Columns::F16(_) => None,
        }
    }
}

impl BlockElement for half::f16 {
    fn columns(columns: &Columns) -> Option<&[Self]> {
        match columns {
            Columns::F16(v) => Some(v),
            Columns::F32(_) => None,
        }
    }
}

/// `[sources.len(), heads, columns, dim]` with the last `len` columns of row `row` of source `i`
/// (its blocks read as one, oldest first, each up to the columns it holds) right-aligned at
/// column `width` in row `i`, zeros before them; the columns from `width` on are room.
fn gather_rows<T>(
    sources: &[(Vec<HeldBlock>, usize, usize)],
    width: usize,
    columns: usize,
    zero: T,
    allocator: &Allocator,
) -> Result<DynValue, EngineError>
where
    T: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let shape = sources[0].0[0].0.shape();
    let mut tensor = Tensor::<T>::new(allocator, [sources.len(), shape[1] as usize, columns, shape[3] as usize])?;
    let mut out = tensor.try_extract_array_mut()?.into_dimensionality::<ndarray::Ix4>().map_err(shape_error)?;
    // Padding must be zeros (masked, but still multiplied); ort documents new data as uninitialized.
    out.slice_mut(s![.., .., ..width, ..]).fill(zero);
    for (i, (blocks, row, len)) in sources.iter().enumerate() {
        // Fill from the right: the newest block's columns last.
        let (mut end, mut left) = (width, *len);
        for (block, held) in blocks.iter().rev() {
            let view = block.try_extract_array::<T>()?;
            let columns = *held;
            let take = left.min(columns);
            out.slice_mut(s![i, .., end - take..end, ..]).assign(&view.slice(s![
                *row,
                ..,
                columns - take..columns,
                ..
            ]));
            end -= take;
            left -= take;
        }
    }
    Ok(tensor.into_dyn())
}

fn shape_error(e: ndarray::ShapeError) -> EngineError {
    EngineError::GraphMismatch(format!("cache block: {e}"))
}

/// `a` then `b` along the column axis. Each `[row, head]` holds its columns contiguously in
/// both, so the result is two slice copies per row and head (ndarray's concatenate was slower:
/// docs/benchmarks.md).
fn append_columns<T>(a: &DynValue, b: &DynValue, allocator: &Allocator) -> Result<DynValue, EngineError>
where
    T: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let ((shape, a), (b_shape, b)) = (a.try_extract_tensor::<T>()?, b.try_extract_tensor::<T>()?);
    let lanes = (shape[0] * shape[1]) as usize;
    let (a_lane, b_lane) = (a.len() / lanes.max(1), b.len() / lanes.max(1));
    if b_shape[0] != shape[0] || b_shape[1] != shape[1] || b_shape[3] != shape[3] {
        return Err(EngineError::GraphMismatch(format!("cache blocks of shapes {shape:?} and {b_shape:?}")));
    }
    let dims = [shape[0], shape[1], shape[2] + b_shape[2], shape[3]].map(|d| d as usize);
    let mut joined = Tensor::<T>::new(allocator, dims)?;
    let (_, out) = joined.try_extract_tensor_mut()?;
    for (lane, out) in out.chunks_exact_mut((a_lane + b_lane).max(1)).enumerate() {
        out[..a_lane].copy_from_slice(&a[lane * a_lane..(lane + 1) * a_lane]);
        out[a_lane..].copy_from_slice(&b[lane * b_lane..(lane + 1) * b_lane]);
    }
    Ok(joined.into_dyn())
}

#[cfg(test)]
mod tests {
    use ndarray::{Array4, ArrayView4, Axis, s};
    use ort::memory::Allocator;
    use ort::value::{DynValue, Tensor, TensorElementType};

    use std::sync::Arc;

    use super::{CacheWrites, EngineError, KvCache, KvLayout, SPARE_COLUMNS, older_inputs, written_in_place};
    use crate::engine::BLOCK_TOKENS;
    use crate::engine::prefix_cache::{Block, Columns};

    const HEADS: usize = 2;
    const DIM: usize = 3;

    /// Two layers with older blocks.
    fn layout() -> KvLayout {
        let tensors: Vec<(String, String)> = (0..2)
            .flat_map(|l| ["key", "value"].map(|kv| (format!("past_key_values.{l}.{kv}"), format!("present.{l}.{kv}"))))
            .collect();
        let older = tensors.iter().map(|(past, _)| past.replace("past_", "older_")).collect();
        KvLayout {
            tensors,
            older,
            writes: CacheWrites::AppendAndSettle,
            layers: 2,
            kv_heads: HEADS,
            head_dim: DIM,
            element_type: TensorElementType::Float32,
        }
    }

    /// Columns `from..to` of one row, each holding `tag * 1000 + position` everywhere.
    fn columns(tag: usize, from: usize, to: usize) -> Array4<f32> {
        Array4::from_shape_fn((1, HEADS, to - from, DIM), |(_, _, c, _)| (tag * 1000 + from + c) as f32)
    }

    /// ONNX Runtime's plain CPU allocator (the decoder's arena needs a session).
    fn heap() -> Allocator {
        Allocator::default()
    }

    fn array(value: &DynValue) -> Array4<f32> {
        value.try_extract_array::<f32>().unwrap().into_dimensionality().unwrap().to_owned()
    }

    /// What the decoder returns: each tensor's recent block with `new` positions appended.
    fn present(cache: &KvCache, tag: usize, new: usize) -> Vec<DynValue> {
        (0..cache.recent.len())
            .map(|t| {
                let recent = array(&cache.recent[t]);
                let appended = columns(tag + t, cache.width(), cache.width() + new);
                let rows: Vec<ArrayView4<f32>> = vec![appended.view(); cache.rows()];
                let appended = ndarray::concatenate(Axis(0), &rows).unwrap();
                let joined = ndarray::concatenate(Axis(2), &[recent.view(), appended.view()]).unwrap();
                Tensor::from_array(joined).unwrap().into_dyn()
            })
            .collect()
    }

    /// Row `row` of tensor `t`, older block then recent block, as one position tag per column.
    fn row(cache: &KvCache, t: usize, row: usize) -> Vec<f32> {
        let (older, recent) = (array(&cache.older[t]), array(&cache.recent[t]));
        let joined = ndarray::concatenate(Axis(2), &[older.view(), recent.view()]).unwrap();
        joined.slice(s![row, 0, .., 0]).to_vec()
    }

    fn widths(cache: &KvCache) -> Vec<(i64, i64)> {
        cache.older.iter().zip(&cache.recent).map(|(o, r)| (o.shape()[2], r.shape()[2])).collect()
    }

    #[test]
    fn positions_move_into_the_older_block_one_layer_per_step_and_rows_keep_them_across_joins() {
        crate::runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let layout = layout();
        let mut cache = KvCache::empty(&layout).unwrap();
        // A prompt chunk lands in the older blocks of every layer (moved, as they were empty).
        cache.advance(present(&cache, 0, 4), 4, &heap()).unwrap();
        assert_eq!(widths(&cache), [(4, 0); 4]);
        // Single steps: layer 0's recent blocks move first, then layer 1's.
        cache.advance(present(&cache, 0, 1), 1, &heap()).unwrap();
        assert_eq!(widths(&cache), [(5, 0), (5, 0), (4, 1), (4, 1)]);
        cache.advance(present(&cache, 0, 1), 1, &heap()).unwrap();
        assert_eq!(widths(&cache), [(5, 1), (5, 1), (6, 0), (6, 0)]);
        assert_eq!(row(&cache, 2, 0), [2000., 2001., 2002., 2003., 2004., 2005.]);
        assert_eq!(cache.attention_mask(1).row(0).to_vec(), [1; 7]);

        // A shorter sequence joins: both rows right-aligned, every position in the older blocks.
        let mut other = KvCache::empty(&layout).unwrap();
        other.advance(present(&other, 10, 3), 3, &heap()).unwrap();
        cache.join(other, 1, &heap()).unwrap();
        assert_eq!((cache.rows(), cache.width()), (2, 6));
        assert_eq!(widths(&cache), [(6, 0); 4]);
        assert_eq!(row(&cache, 1, 0), [1000., 1001., 1002., 1003., 1004., 1005.]);
        assert_eq!(row(&cache, 1, 1), [0., 0., 0., 11000., 11001., 11002.]);
        assert_eq!(cache.attention_mask(1).row(1).to_vec(), [0, 0, 0, 1, 1, 1, 1]);

        // The longer row leaves: the padding columns go with it.
        cache.advance(present(&cache, 20, 1), 1, &heap()).unwrap();
        cache.retain(&[false, true], &heap()).unwrap();
        assert_eq!((cache.rows(), cache.width()), (1, 4));
        assert_eq!(row(&cache, 3, 0), [13000., 13001., 13002., 23006.]);
        assert_eq!(cache.bytes(&layout), 4 * layout.bytes_per_token());
    }

    #[test]
    fn a_prefilled_row_joins_as_many_copies_as_samples_into_an_empty_or_busy_batch() {
        crate::runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let layout = layout();
        let prefilled = |tag, len| {
            let mut cache = KvCache::empty(&layout).unwrap();
            cache.advance(present(&cache, tag, len), len, &heap()).unwrap();
            cache
        };
        let mut batch = KvCache::none(&layout);
        batch.join(prefilled(10, 3), 2, &heap()).unwrap();
        assert_eq!((batch.rows(), batch.width()), (2, 3));
        assert_eq!(row(&batch, 1, 0), row(&batch, 1, 1));
        batch.join(prefilled(20, 2), 3, &heap()).unwrap();
        assert_eq!((batch.rows(), batch.width()), (5, 3));
        for copy in 2..5 {
            assert_eq!(row(&batch, 0, copy), [0., 20000., 20001.]);
        }
        assert_eq!(row(&batch, 0, 0), [10000., 10001., 10002.]);
        assert_eq!(batch.attention_mask(0).row(4).to_vec(), [0, 1, 1]);
    }

    #[test]
    fn a_decoder_without_older_blocks_keeps_every_position_in_the_recent_block() {
        crate::runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let layout = KvLayout { older: Vec::new(), writes: CacheWrites::Append, ..layout() };
        let mut cache = KvCache::empty(&layout).unwrap();
        cache.advance(present(&cache, 0, 4), 4, &heap()).unwrap();
        cache.advance(present(&cache, 0, 1), 1, &heap()).unwrap();
        let mut other = KvCache::empty(&layout).unwrap();
        other.advance(present(&other, 10, 2), 2, &heap()).unwrap();
        cache.join(other, 1, &heap()).unwrap();
        assert!(cache.older.is_empty());
        let recent: Vec<i64> = cache.recent.iter().map(|r| r.shape()[2]).collect();
        assert_eq!(recent, [5; 4]);
        let tags = array(&cache.recent[1]).slice(s![1, 0, .., 0]).to_vec();
        assert_eq!(tags, [0., 0., 0., 11000., 11001.]);
    }

    #[test]
    fn a_decoder_writes_every_cache_tensor_in_place_or_none_and_then_has_no_older_blocks() {
        assert!(!written_in_place(&[false; 4], false).unwrap());
        assert!(!written_in_place(&[false; 4], true).unwrap());
        assert!(written_in_place(&[true; 4], false).unwrap());
        let mixed = written_in_place(&[true, true, false, true], false).unwrap_err();
        assert!(matches!(&mixed, EngineError::GraphMismatch(m) if m.contains("3 of its 4")), "{mixed}");
        let with_older = written_in_place(&[true; 4], true).unwrap_err();
        assert!(matches!(&with_older, EngineError::GraphMismatch(m) if m.contains("older_key_values")), "{with_older}");
    }

    /// What a decoder that writes in place does in one step: room made, `new` positions tagged
    /// like [`present`]'s written into every row's buffer after its columns.
    fn step_in_place(cache: &mut KvCache, tag: usize, new: usize) {
        cache.reserve(new, &heap()).unwrap();
        let (width, rows) = (cache.width(), cache.rows());
        for t in 0..cache.recent.len() {
            let mut buffer = cache.recent[t].try_extract_array_mut::<f32>().unwrap();
            let written = columns(tag + t, width, width + new);
            for row in 0..rows {
                buffer.slice_mut(s![row, .., width..width + new, ..]).assign(&written.slice(s![0, .., .., ..]));
            }
        }
        cache.advance(Vec::new(), new, &heap()).unwrap();
    }

    /// Tensor `t`'s columns of row `row` in use (a buffer's room left out), one tag each.
    fn held(cache: &KvCache, t: usize, row: usize) -> Vec<f32> {
        array(&cache.recent[t]).slice(s![row, 0, ..cache.width(), 0]).to_vec()
    }

    #[test]
    fn buffers_written_in_place_grow_with_room_and_keep_their_rows_through_joins() {
        crate::runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let layout = KvLayout { older: Vec::new(), writes: CacheWrites::InPlace, ..layout() };
        let mut cache = KvCache::empty(&layout).unwrap();
        step_in_place(&mut cache, 0, 4);
        let capacity = cache.capacity();
        assert_eq!(capacity, 4 + SPARE_COLUMNS, "a prompt's buffer has room for the answer");
        step_in_place(&mut cache, 0, 1);
        assert_eq!(cache.capacity(), capacity, "a step within the room copies nothing");
        assert_eq!(held(&cache, 2, 0), [2000., 2001., 2002., 2003., 2004.]);
        assert_eq!(cache.bytes(&layout), capacity * layout.bytes_per_token());

        // A shorter sequence joins: rows right-aligned at the width, room after it.
        let mut other = KvCache::empty(&layout).unwrap();
        step_in_place(&mut other, 10, 3);
        cache.join(other, 1, &heap()).unwrap();
        assert_eq!((cache.rows(), cache.width(), cache.capacity()), (2, 5, 5 + SPARE_COLUMNS));
        assert_eq!(held(&cache, 1, 1), [0., 0., 11000., 11001., 11002.]);
        assert_eq!(cache.attention_mask(1).row(1).to_vec(), [0, 0, 1, 1, 1, 1]);

        // Steps past the room: the buffers are copied into longer ones once.
        for _ in 0..SPARE_COLUMNS + 1 {
            step_in_place(&mut cache, 20, 1);
        }
        let width = 6 + SPARE_COLUMNS;
        assert_eq!(cache.width(), width);
        assert!(cache.capacity() >= width + SPARE_COLUMNS - 1);
        let tags = held(&cache, 0, 1);
        assert_eq!(tags[..5], [0., 0., 10000., 10001., 10002.]);
        assert_eq!(tags[5..], (5..width).map(|c| (20000 + c) as f32).collect::<Vec<_>>()[..]);

        // The longer row leaves; the prefix cache reads and restores the other's blocks.
        cache.retain(&[false, true], &heap()).unwrap();
        assert_eq!((cache.rows(), cache.width()), (1, width - 2));
        assert_eq!(held(&cache, 0, 0)[..3], [10000., 10001., 10002.]);
        round_trip(&layout, &cache, 0);
    }

    /// Row `row` of `cache` read out as whole blocks from its first position, and a cache made
    /// of them: both hold the same positions, whichever of the older and recent blocks they
    /// were in, and the padding of a shorter row is never read.
    fn round_trip(layout: &KvLayout, cache: &KvCache, row_index: usize) {
        let len = cache.row_len(row_index) / BLOCK_TOKENS * BLOCK_TOKENS;
        let blocks: Vec<Arc<Block>> =
            (0..len / BLOCK_TOKENS).map(|b| Arc::new(cache.block(row_index, b * BLOCK_TOKENS).unwrap())).collect();
        let rebuilt = KvCache::from_blocks(layout, &blocks, &heap()).unwrap();
        assert_eq!((rebuilt.rows(), rebuilt.width(), rebuilt.row_len(0)), (1, len, len));
        let padding = cache.width() - cache.row_len(row_index);
        for t in 0..layout.tensors.len() {
            let tags = |c: &KvCache, r: usize| match c.older.get(t) {
                Some(_) => row(c, t, r),
                None => array(&c.recent[t]).slice(s![r, 0, .., 0]).to_vec(),
            };
            assert_eq!(tags(&rebuilt, 0), tags(cache, row_index)[padding..padding + len], "tensor {t}");
        }
        assert_eq!(blocks.iter().map(|b| b.bytes()).sum::<usize>(), len * layout.bytes_per_token());
    }

    #[test]
    fn blocks_read_from_a_row_rebuild_its_positions_in_either_layout() {
        crate::runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        for layout in [layout(), KvLayout { older: Vec::new(), writes: CacheWrites::Append, ..layout() }] {
            // 69 positions: a prompt chunk, then single steps (older and recent blocks both
            // hold some), beside a shorter row right-aligned after it.
            let mut cache = KvCache::empty(&layout).unwrap();
            cache.advance(present(&cache, 0, 66), 66, &heap()).unwrap();
            for _ in 0..3 {
                cache.advance(present(&cache, 0, 1), 1, &heap()).unwrap();
            }
            let split = widths(&cache).iter().any(|&(older, recent)| older > 0 && recent > 0);
            assert!(layout.older.is_empty() || split, "positions in both older and recent blocks");
            round_trip(&layout, &cache, 0);
            let mut other = KvCache::empty(&layout).unwrap();
            other.advance(present(&other, 10, 40), 40, &heap()).unwrap();
            cache.join(other, 1, &heap()).unwrap();
            round_trip(&layout, &cache, 0);
            round_trip(&layout, &cache, 1);
        }
    }

    #[test]
    fn float16_blocks_round_trip_and_blocks_of_another_type_are_refused() {
        crate::runtime::init(None, &[]).unwrap_or_else(|e| panic!("{e}"));
        let layout = KvLayout { element_type: TensorElementType::Float16, ..layout() };
        let values = |b: usize, t: usize| -> Vec<half::f16> {
            (0..HEADS * BLOCK_TOKENS * DIM)
                .map(|i| half::f16::from_f32((b * 100 + t * 10) as f32 + i as f32 / 8.0))
                .collect()
        };
        let blocks: Vec<Arc<Block>> = (0..2)
            .map(|b| {
                Arc::new(Block { tensors: (0..layout.tensors.len()).map(|t| Columns::F16(values(b, t))).collect() })
            })
            .collect();
        let cache = KvCache::from_blocks(&layout, &blocks, &heap()).unwrap();
        for b in 0..blocks.len() {
            let read = cache.block(0, b * BLOCK_TOKENS).unwrap();
            for (t, columns) in read.tensors.iter().enumerate() {
                assert!(matches!(columns, Columns::F16(v) if *v == values(b, t)), "block {b} tensor {t}");
            }
        }
        let float32 =
            Arc::new(Block { tensors: (0..4).map(|_| Columns::F32(vec![0.0; HEADS * BLOCK_TOKENS * DIM])).collect() });
        assert!(matches!(KvCache::from_blocks(&layout, &[float32], &heap()), Err(EngineError::GraphMismatch(_))));
    }

    #[test]
    fn older_blocks_are_refused_unless_every_layer_has_them_in_key_value_order() {
        let tensors = layout().tensors;
        let past: Vec<&str> = tensors.iter().map(|(past, _)| past.as_str()).collect();
        assert_eq!(older_inputs(&past, &tensors).unwrap(), Vec::<String>::new());
        let all = [
            "older_key_values.0.key",
            "older_key_values.0.value",
            "older_key_values.1.key",
            "older_key_values.1.value",
        ];
        assert_eq!(older_inputs(&all, &tensors).unwrap(), all);
        let err = older_inputs(&all[..3], &tensors).unwrap_err();
        assert!(matches!(&err, EngineError::GraphMismatch(m) if m.contains("3 of its 4")), "{err}");
        let mut swapped = tensors.clone();
        swapped.swap(0, 1);
        let err = older_inputs(&all, &swapped).unwrap_err();
        assert!(matches!(&err, EngineError::GraphMismatch(m) if m.contains("layer order")), "{err}");
    }
}
