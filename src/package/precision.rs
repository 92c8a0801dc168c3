//! Precision variants of a graph and their file-name suffixes (onnx-community convention).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use super::PackageError;

/// Which variant of a graph to load. `Quantized`..`Bnb4` are the published onnx-community
/// variants, accepted by name so such packages load unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precision {
    Fp32,
    Fp16,
    Int8,
    Uint8,
    Quantized,
    Q4,
    Q4f16,
    Bnb4,
}

impl Precision {
    pub const ALL: [Precision; 8] = [
        Precision::Fp32,
        Precision::Fp16,
        Precision::Int8,
        Precision::Uint8,
        Precision::Quantized,
        Precision::Q4,
        Precision::Q4f16,
        Precision::Bnb4,
    ];

    /// File-name suffix after the graph stem.
    pub fn suffix(self) -> &'static str {
        match self {
            Precision::Fp32 => "",
            Precision::Fp16 => "_fp16",
            Precision::Int8 => "_int8",
            Precision::Uint8 => "_uint8",
            Precision::Quantized => "_quantized",
            Precision::Q4 => "_q4",
            Precision::Q4f16 => "_q4f16",
            Precision::Bnb4 => "_bnb4",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            other => &other.suffix()[1..],
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = PackageError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let lower = match lower.as_str() {
            "q8" => "quantized",
            "float32" | "f32" => "fp32",
            "float16" | "f16" => "fp16",
            other => other,
        };
        Precision::ALL.into_iter().find(|p| p.name() == lower).ok_or_else(|| PackageError::UnknownPrecision(s.into()))
    }
}

impl<'de> Deserialize<'de> for Precision {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_suffixes_round_trip() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert_eq!("q8".parse::<Precision>().unwrap(), Precision::Quantized);
        assert_eq!(Precision::Q4f16.suffix(), "_q4f16");
        assert_eq!(Precision::Fp32.suffix(), "");
        assert!(matches!("int3".parse::<Precision>(), Err(PackageError::UnknownPrecision(s)) if s == "int3"));
    }
}
