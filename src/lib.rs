//! vlmserve: serve vision-language models exported to ONNX.
//!
//! Data flows one way: request -> [`preprocess`] (through the model's [`family`]) ->
//! [`engine`] -> response. [`package`] reads model files, [`runtime`] owns ONNX Runtime,
//! [`config`] holds settings, [`cli`] is the command line, [`scheduler`] runs generations on
//! the models and [`server`] is the HTTP API.

// `deny`, not `forbid`: ndarray's `s!` expands to an `allow(unsafe_code)` of its own.
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod engine;
pub mod family;
pub mod package;
pub mod preprocess;
pub mod runtime;
pub mod scheduler;
pub mod server;
