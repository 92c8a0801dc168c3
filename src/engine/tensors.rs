//! Conversions between our arrays and ONNX Runtime values, honouring the element type each
//! graph input declares (fp16 packages may take and return float16).

use half::f16;
use ndarray::{ArrayD, IxDyn};
use ort::memory::AllocationDevice;
use ort::value::{DynTensorValueType, DynValue, Tensor, TensorElementType};

use super::EngineError;
use crate::family::TensorData;

/// Build a value for an input of element type `want` from our typed data.
pub fn to_value(data: TensorData, want: TensorElementType, name: &str) -> Result<DynValue, EngineError> {
    let value = match (data, want) {
        (TensorData::F32(a), TensorElementType::Float32) => Tensor::from_array(a)?.into_dyn(),
        (TensorData::F32(a), TensorElementType::Float16) => Tensor::from_array(a.mapv(f16::from_f32))?.into_dyn(),
        (TensorData::I64(a), TensorElementType::Int64) => Tensor::from_array(a)?.into_dyn(),
        (TensorData::I64(a), TensorElementType::Int32) => Tensor::from_array(a.mapv(|v| v as i32))?.into_dyn(),
        (TensorData::Bool(a), TensorElementType::Bool) => Tensor::from_array(a)?.into_dyn(),
        (TensorData::Bool(a), TensorElementType::Int64) => Tensor::from_array(a.mapv(i64::from))?.into_dyn(),
        (data, want) => {
            return Err(EngineError::GraphMismatch(format!("input {name} expects {want:?}, we have {}", data.kind())));
        }
    };
    Ok(value)
}

/// Copy a float output (f32 or f16) into an f32 array.
pub fn to_f32_array(value: &DynValue, name: &str) -> Result<ArrayD<f32>, EngineError> {
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float32) => Ok(value.try_extract_array::<f32>()?.to_owned()),
        Some(TensorElementType::Float16) => Ok(value.try_extract_array::<f16>()?.mapv(f16::to_f32)),
        other => Err(EngineError::GraphMismatch(format!("output {name} is {other:?}, expected a float tensor"))),
    }
}

/// The last position's logits of every batch row of a `[batch, seq, vocab]` output, as f32.
pub fn last_rows(value: &DynValue) -> Result<Vec<Vec<f32>>, EngineError> {
    fn rows<T: Copy>(shape: &[i64], data: &[T], f32_of: impl Fn(T) -> f32) -> Result<Vec<Vec<f32>>, EngineError> {
        let &[batch, seq, vocab] = shape else {
            return Err(EngineError::GraphMismatch(format!(
                "logits have shape {shape:?}, expected [batch, seq, vocab]"
            )));
        };
        if seq == 0 {
            return Err(EngineError::GraphMismatch("logits have no positions".into()));
        }
        let (seq, vocab) = (seq as usize, vocab as usize);
        let row = |b: usize| data[(b * seq + seq - 1) * vocab..][..vocab].iter().map(|&v| f32_of(v)).collect();
        Ok((0..batch as usize).map(row).collect())
    }
    match value.dtype().tensor_type() {
        Some(TensorElementType::Float32) => {
            let (shape, data) = value.try_extract_tensor::<f32>()?;
            rows(shape, data, |v| v)
        }
        Some(TensorElementType::Float16) => {
            let (shape, data) = value.try_extract_tensor::<f16>()?;
            rows(shape, data, f16::to_f32)
        }
        other => Err(EngineError::GraphMismatch(format!("logits are {other:?}, expected float"))),
    }
}

/// An empty tensor (`dims` with a zero) of the given float type, for the first step's past.
pub fn empty_float(dims: &[usize], ty: TensorElementType) -> Result<DynValue, EngineError> {
    let shape = IxDyn(dims);
    Ok(match ty {
        TensorElementType::Float16 => Tensor::from_array(ArrayD::from_elem(shape, f16::ZERO))?.into_dyn(),
        _ => Tensor::from_array(ArrayD::<f32>::zeros(shape))?.into_dyn(),
    })
}

/// Whether the host can read the tensor's data where it lies (a non-tensor counts as host).
pub fn on_host(value: &DynValue) -> bool {
    value.view().downcast::<DynTensorValueType>().is_ok_and(|tensor| tensor.memory_info().is_cpu_accessible())
}

/// The tensor's data size in bytes.
pub fn tensor_bytes(value: &DynValue) -> usize {
    value.view().downcast::<DynTensorValueType>().ok().and_then(|tensor| tensor.size()).unwrap_or(0)
}

/// A host copy of a tensor held on a device; `None` when the host can read it already.
pub fn host_copy(value: &DynValue) -> Result<Option<DynValue>, EngineError> {
    if on_host(value) {
        return Ok(None);
    }
    let tensor = value.view().downcast::<DynTensorValueType>()?;
    Ok(Some(tensor.to(AllocationDevice::CPU, 0)?.into_dyn()))
}

impl TensorData {
    fn kind(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "float32",
            TensorData::I64(_) => "int64",
            TensorData::Bool(_) => "bool",
        }
    }
}
