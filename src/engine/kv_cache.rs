//! The decoder's key/value cache.
//!
//! Strategy: the cache lives in ONNX Runtime values. Each step's `present.*` outputs are moved
//! (not copied) into the cache and handed back as the next step's `past_key_values.*` inputs,
//! so no cache data crosses into Rust arrays per token. The first step feeds empty tensors
//! (past length 0) shaped from the decoder's input metadata. With a standard attention export
//! the graph itself concatenates past and new keys (one pass over the cache per step, inside
//! ONNX Runtime). A batch of sequences shares one cache, left-padded to its longest row; rows
//! are copied only when a sequence joins or leaves. The layout also sizes the memory budget.

use ndarray::{Array2, s};
use ort::session::Session;
use ort::value::{DynValue, PrimitiveTensorElementType, Tensor, TensorElementType};

use super::EngineError;
use super::tensors::empty_float;

/// Shape of the cache as the decoder declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayout {
    /// `(past input name, present output name)` per cache tensor, keys and values of every layer.
    pub tensors: Vec<(String, String)>,
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
        for input in session.inputs().iter().filter(|i| i.name().starts_with("past_key_values.")) {
            let output = input.name().replacen("past_key_values", "present", 1);
            if !session.outputs().iter().any(|o| o.name() == output) {
                return Err(EngineError::GraphMismatch(format!("decoder has {} but no {output}", input.name())));
            }
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
        Ok(Self { layers: tensors.len() / 2, tensors, kv_heads, head_dim, element_type })
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

/// The cache of a batch of sequences: one value per cache tensor, `[rows, kv_heads, width,
/// head_dim]`. Row `i` holds its `lens[i]` positions right-aligned; the columns before them are
/// padding that the attention mask hides (left padding, so every row appends at the same column).
/// A decode step appends one column to every row inside ONNX Runtime; rows are only copied when
/// a sequence joins or leaves the batch.
#[derive(Debug)]
pub struct KvCache {
    pub(super) values: Vec<DynValue>,
    width: usize,
    lens: Vec<usize>,
    element_type: TensorElementType,
}

impl KvCache {
    /// An empty cache (past length 0) for one sequence.
    pub fn empty(layout: &KvLayout) -> Result<Self, EngineError> {
        let dims = [1, layout.kv_heads, 0, layout.head_dim];
        let values =
            layout.tensors.iter().map(|_| empty_float(&dims, layout.element_type)).collect::<Result<_, _>>()?;
        Ok(Self { values, width: 0, lens: vec![0], element_type: layout.element_type })
    }

    /// A cache of no sequences, for a batch to join into.
    pub fn none(layout: &KvLayout) -> Self {
        Self { values: Vec::new(), width: 0, lens: Vec::new(), element_type: layout.element_type }
    }

    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    /// Columns (the longest row's positions).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Positions held by row `row`.
    pub fn len(&self, row: usize) -> usize {
        self.lens[row]
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0
    }

    /// The decoder's `attention_mask` for `new` positions appended to every row.
    pub fn attention_mask(&self, new: usize) -> Array2<i64> {
        Array2::from_shape_fn((self.rows(), self.width + new), |(row, col)| {
            i64::from(col + self.lens[row] >= self.width)
        })
    }

    /// Take the decoder's `present.*` outputs, `new` columns wider than before.
    pub(super) fn advance(&mut self, values: Vec<DynValue>, new: usize) {
        self.values = values;
        self.width += new;
        self.lens.iter_mut().for_each(|len| *len += new);
    }

    /// Append `other`'s rows after this cache's (copies both, unless this one is empty).
    pub fn join(&mut self, other: KvCache) -> Result<(), EngineError> {
        if self.rows() == 0 {
            *self = other;
            return Ok(());
        }
        let rows: Vec<(&KvCache, usize)> =
            (0..self.rows()).map(|r| (&*self, r)).chain((0..other.rows()).map(|r| (&other, r))).collect();
        *self = Self::gather(&rows, self.element_type)?;
        Ok(())
    }

    /// Drop every row.
    pub fn clear(&mut self) {
        self.values.clear();
        self.width = 0;
        self.lens.clear();
    }

    /// Keep the rows where `keep` is true, dropping padding columns no row needs any more.
    /// Called after every step: costs nothing when every row stays.
    pub fn retain(&mut self, keep: &[bool]) -> Result<(), EngineError> {
        if keep.iter().all(|&k| k) {
            return Ok(());
        }
        let rows: Vec<(&KvCache, usize)> = (0..self.rows()).filter(|&r| keep[r]).map(|r| (&*self, r)).collect();
        if rows.is_empty() {
            self.clear();
        } else {
            *self = Self::gather(&rows, self.element_type)?;
        }
        Ok(())
    }

    /// A new cache made of the given rows of existing caches, right-aligned.
    fn gather(rows: &[(&KvCache, usize)], element_type: TensorElementType) -> Result<Self, EngineError> {
        let lens: Vec<usize> = rows.iter().map(|(cache, row)| cache.lens[*row]).collect();
        let width = lens.iter().copied().max().unwrap_or(0);
        let tensors = rows[0].0.values.len();
        let values = (0..tensors)
            .map(|t| {
                let sources: Vec<(&DynValue, usize, usize)> =
                    rows.iter().zip(&lens).map(|((cache, row), len)| (&cache.values[t], *row, *len)).collect();
                match element_type {
                    TensorElementType::Float16 => gather_rows(&sources, width, half::f16::ZERO),
                    _ => gather_rows(&sources, width, 0f32),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { values, width, lens, element_type })
    }

    /// Bytes the cache holds, padding included.
    pub fn bytes(&self, layout: &KvLayout) -> usize {
        self.rows() * self.width * layout.bytes_per_token()
    }
}

/// `[sources.len(), heads, width, dim]` with source `i`'s last `len` columns of row `row`
/// right-aligned in row `i`, zeros before them.
fn gather_rows<T>(sources: &[(&DynValue, usize, usize)], width: usize, zero: T) -> Result<DynValue, EngineError>
where
    T: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let views = sources.iter().map(|(value, ..)| value.try_extract_array::<T>()).collect::<Result<Vec<_>, _>>()?;
    let shape = views[0].shape();
    let mut out = ndarray::Array4::from_elem((sources.len(), shape[1], width, shape[3]), zero);
    for (i, (view, (_, row, len))) in views.iter().zip(sources).enumerate() {
        let from = view.shape()[2] - len;
        out.slice_mut(s![i, .., width - len.., ..]).assign(&view.slice(s![*row, .., from.., ..]));
    }
    Ok(Tensor::from_array(out)?.into_dyn())
}
