//! The decoder's key/value cache.
//!
//! Strategy: the cache lives in ONNX Runtime values. Each step's `present.*` outputs are moved
//! (not copied) into the cache and handed back as the next step's `past_key_values.*` inputs,
//! so no cache data crosses into Rust arrays per token. The first step feeds empty tensors
//! (past length 0) shaped from the decoder's input metadata. With a standard attention export
//! the graph itself concatenates past and new keys (one pass over the cache per step, inside
//! ONNX Runtime); the layout below also sizes the admission budget.

use ort::session::Session;
use ort::value::{DynValue, TensorElementType};

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

/// One sequence's cache: a value per cache tensor, and how many positions it holds.
#[derive(Debug)]
pub struct KvCache {
    pub(super) values: Vec<DynValue>,
    pub(super) len: usize,
}

impl KvCache {
    /// An empty cache (past length 0) for batch size 1.
    pub fn empty(layout: &KvLayout) -> Result<Self, EngineError> {
        let dims = [1, layout.kv_heads, 0, layout.head_dim];
        let values =
            layout.tensors.iter().map(|_| empty_float(&dims, layout.element_type)).collect::<Result<_, _>>()?;
        Ok(Self { values, len: 0 })
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
