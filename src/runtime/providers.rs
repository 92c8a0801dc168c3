//! Execution providers as configured by users, and the CUDA libraries they need.

use std::path::{Path, PathBuf};

use ort::ep::{self, ExecutionProviderDispatch};
use serde::Deserialize;

use super::RuntimeError;

/// One execution provider and its options, as written in the configuration:
/// `{ kind = "cuda", device_id = 1 }`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Provider {
    Cpu(CpuOptions),
    Cuda(CudaOptions),
    Tensorrt(TensorRtOptions),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CpuOptions {
    /// Intra-op threads; ONNX Runtime picks one per physical core when unset.
    pub threads: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CudaOptions {
    #[serde(default)]
    pub device_id: i32,
    /// Upper bound of the CUDA memory arena in bytes.
    pub memory_limit: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TensorRtOptions {
    #[serde(default)]
    pub device_id: i32,
    #[serde(default)]
    pub fp16: bool,
    #[serde(default)]
    pub int8: bool,
    /// Folder where built engines are cached between runs (strongly recommended).
    pub engine_cache: Option<PathBuf>,
    /// Optimization profile shapes, TensorRT syntax: `input:1x3x512x512,...`.
    pub profile_min_shapes: Option<String>,
    pub profile_opt_shapes: Option<String>,
    pub profile_max_shapes: Option<String>,
}

impl Provider {
    pub fn name(&self) -> &'static str {
        match self {
            Provider::Cpu(_) => "cpu",
            Provider::Cuda(_) => "cuda",
            Provider::Tensorrt(_) => "tensorrt",
        }
    }

    pub fn is_gpu(&self) -> bool {
        !matches!(self, Provider::Cpu(_))
    }

    /// The CUDA device a GPU provider runs on.
    pub fn cuda_device(&self) -> Option<i32> {
        match self {
            Provider::Cpu(_) => None,
            Provider::Cuda(o) => Some(o.device_id),
            Provider::Tensorrt(o) => Some(o.device_id),
        }
    }

    /// The `ort` dispatch for a GPU provider, set to fail loudly so that we decide about fallback.
    pub(super) fn dispatch(&self) -> Result<ExecutionProviderDispatch, RuntimeError> {
        let dispatch = match self {
            Provider::Cpu(_) => ep::CPU::default().build(),
            Provider::Cuda(o) => {
                let mut cuda = ep::CUDA::default().with_device_id(o.device_id);
                if let Some(limit) = o.memory_limit {
                    cuda = cuda.with_memory_limit(limit);
                }
                cuda.build()
            }
            Provider::Tensorrt(o) => tensorrt(o).build(),
        };
        Ok(dispatch.error_on_failure())
    }
}

fn tensorrt(o: &TensorRtOptions) -> ep::TensorRT {
    let mut trt = ep::TensorRT::default().with_device_id(o.device_id).with_fp16(o.fp16).with_int8(o.int8);
    if let Some(dir) = &o.engine_cache {
        trt = trt.with_engine_cache(true).with_engine_cache_path(dir.display());
    }
    if let Some(s) = &o.profile_min_shapes {
        trt = trt.with_profile_min_shapes(s);
    }
    if let Some(s) = &o.profile_opt_shapes {
        trt = trt.with_profile_opt_shapes(s);
    }
    if let Some(s) = &o.profile_max_shapes {
        trt = trt.with_profile_max_shapes(s);
    }
    trt
}

/// The CUDA 13 / cuDNN 9 libraries the CUDA provider links against, in load order.
const CUDA_LIBRARIES: &[&str] = &[
    "libcudart.so.13",
    "libcublasLt.so.13",
    "libcublas.so.13",
    "libcurand.so.10",
    "libcufft.so.12",
    "libcudnn.so.9",
    "libcudnn_graph.so.9",
    "libcudnn_ops.so.9",
    "libcudnn_heuristic.so.9",
    "libcudnn_adv.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_engines_precompiled.so.9",
    "libcudnn_engines_runtime_compiled.so.9",
    "libnvinfer.so.10",
    "libnvonnxparser.so.10",
];

/// Preload CUDA and cuDNN from the `nvidia-*` pip packages next to ONNX Runtime (or any
/// `site-packages/nvidia` on the way up from it), so that `pip install onnxruntime-gpu` is
/// enough. Libraries already on the loader path need nothing; missing ones are reported when
/// the provider fails to register.
pub(super) fn preload_cuda_libraries(ort_library: &Path) {
    let dirs = nvidia_lib_dirs(ort_library);
    for name in CUDA_LIBRARIES {
        if let Some(path) = dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()) {
            match ort::util::preload_dylib(&path) {
                Ok(()) => tracing::debug!(library = %path.display(), "preloaded"),
                Err(e) => tracing::warn!(library = %path.display(), error = %e, "could not preload"),
            }
        }
    }
}

fn nvidia_lib_dirs(ort_library: &Path) -> Vec<PathBuf> {
    let Some(site) = ort_library.ancestors().find(|a| a.join("nvidia").is_dir()) else {
        return Vec::new();
    };
    let nvidia = site.join("nvidia");
    let mut dirs: Vec<PathBuf> =
        ["cu13/lib", "cudnn/lib", "tensorrt_libs", "tensorrt/lib"].iter().map(|d| nvidia.join(d)).collect();
    if let Ok(entries) = std::fs::read_dir(&nvidia) {
        dirs.extend(entries.flatten().map(|e| e.path().join("lib")));
    }
    dirs.retain(|d| d.is_dir());
    dirs
}
