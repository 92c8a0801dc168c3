//! Where the ONNX Runtime shared library comes from.
//!
//! Order: the explicit path (flag or setting), `ORT_DYLIB_PATH`, the folder our set-up script
//! installs to, then an `onnxruntime` / `onnxruntime-gpu` wheel installed in the user's Python.
//! When a GPU provider is requested, locations without the CUDA provider library are skipped
//! unless they were named explicitly.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::RuntimeError;

/// The ONNX Runtime release we build against (`api-31`).
pub const ORT_VERSION: &str = "1.31.1";

const LIBRARY_NAME: &str = "libonnxruntime.so.1.31.1";

/// Folder where `scripts/setup-ort.sh` puts the library: `$VLMSERVE_HOME/onnxruntime/<version>`
/// (default `~/.local/share/vlmserve`).
pub fn setup_dir() -> PathBuf {
    let home = std::env::var_os("VLMSERVE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".local/share"));
        base.join("vlmserve")
    });
    home.join("onnxruntime").join(ORT_VERSION)
}

/// Find the library file, trying each location in order. With `needs_gpu`, discovered
/// locations that have the CUDA provider win; if none has it, the first CPU build is used and
/// the provider's registration reports the problem (or falls back to CPU when allowed).
pub fn locate_library(explicit: Option<&Path>, needs_gpu: bool) -> Result<PathBuf, RuntimeError> {
    let mut tried = Vec::new();
    let named = explicit.map(Path::to_path_buf).or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
    if let Some(path) = named {
        let file = library_file(&path);
        if file.is_file() {
            return Ok(file);
        }
        tried.push(format!("{} (missing)", path.display()));
    }
    let mut found = Vec::new();
    for dir in [Some(setup_dir()), python_onnxruntime_dir()].into_iter().flatten() {
        let file = dir.join(LIBRARY_NAME);
        if file.is_file() {
            found.push((dir.join("libonnxruntime_providers_cuda.so").is_file(), file));
        } else {
            tried.push(format!("{} (missing)", file.display()));
        }
    }
    if let Some((_, file)) = found.iter().find(|(cuda, _)| *cuda || !needs_gpu) {
        return Ok(file.clone());
    }
    if let Some((_, file)) = found.into_iter().next() {
        tracing::warn!(library = %file.display(), "no ONNX Runtime build with the CUDA provider found; using a CPU build");
        return Ok(file);
    }
    Err(RuntimeError::LibraryNotFound { tried: tried.join(", ") })
}

/// A folder given instead of a file means the library inside it.
fn library_file(path: &Path) -> PathBuf {
    if path.is_dir() { path.join(LIBRARY_NAME) } else { path.to_path_buf() }
}

/// `onnxruntime/capi` of the first Python on PATH that has the package installed.
fn python_onnxruntime_dir() -> Option<PathBuf> {
    let script = "import importlib.util as u, os; s = u.find_spec('onnxruntime'); \
                  print(os.path.join(os.path.dirname(s.origin), 'capi') if s else '')";
    let out = Command::new("python3").args(["-c", script]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}
