//! Reading `config.json` and image-processor settings, shared by the families.

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::FamilyError;
use crate::preprocess::normalize::Normalization;

pub(super) const CONFIG: &str = "config.json";
pub(super) const PROCESSOR: &str = "preprocessor_config.json";

/// Image-processor settings, in either of the shapes packages store them.
pub(super) struct ImageProcessorSettings<'a>(pub &'a Value);

impl<'a> ImageProcessorSettings<'a> {
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        let found = |v: &'a Value| v.get(key).filter(|v| !v.is_null());
        found(self.0).or_else(|| self.0.get("image_processor").and_then(found))
    }

    /// A boolean switch; every switch the families read defaults to true.
    pub(super) fn flag(&self, key: &str) -> Result<bool, FamilyError> {
        match self.get(key) {
            None => Ok(true),
            Some(v) => v.as_bool().ok_or_else(|| invalid(PROCESSOR, format!("{key} must be true or false"))),
        }
    }

    pub(super) fn int(&self, key: &str) -> Result<Option<i64>, FamilyError> {
        self.get(key)
            .map(|v| v.as_i64().ok_or_else(|| invalid(PROCESSOR, format!("{key} must be an integer"))))
            .transpose()
    }

    /// A token string, stored plain or as a serialized `AddedToken` (`{"content": ...}`).
    pub(super) fn token(&self, key: &str) -> Result<Option<&'a str>, FamilyError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .or_else(|| v["content"].as_str())
                    .ok_or_else(|| invalid(PROCESSOR, format!("{key} must be a token string")))
            })
            .transpose()
    }

    /// `{"longest_edge": n}` settings (`size`, `max_image_size`).
    pub(super) fn longest_edge(&self, key: &str) -> Result<Option<u32>, FamilyError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let edge = value["longest_edge"].as_u64().and_then(|n| u32::try_from(n).ok()).filter(|&n| n > 0);
        edge.map(Some)
            .ok_or_else(|| invalid(PROCESSOR, format!("{key} must be {{\"longest_edge\": <positive integer>}}")))
    }

    /// Rescale and normalize settings; `defaults` are the family's mean and std.
    pub(super) fn normalization(&self, defaults: ([f32; 3], [f32; 3])) -> Result<Normalization, FamilyError> {
        let rescale_factor = match self.flag("do_rescale")? {
            true => Some(self.number("rescale_factor")?.unwrap_or(1.0 / 255.0)),
            false => None,
        };
        let mean_std = match self.flag("do_normalize")? {
            true => Some((
                self.per_channel("image_mean")?.unwrap_or(defaults.0),
                self.per_channel("image_std")?.unwrap_or(defaults.1),
            )),
            false => None,
        };
        Ok(Normalization { rescale_factor, mean_std })
    }

    pub(super) fn number(&self, key: &str) -> Result<Option<f64>, FamilyError> {
        self.get(key)
            .map(|v| v.as_f64().ok_or_else(|| invalid(PROCESSOR, format!("{key} must be a number"))))
            .transpose()
    }

    /// A number or a list of three, cast to `f32` as numpy casts mean and std.
    pub(super) fn per_channel(&self, key: &str) -> Result<Option<[f32; 3]>, FamilyError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let bad = || invalid(PROCESSOR, format!("{key} must be a number or a list of 3 numbers"));
        if let Some(x) = value.as_f64() {
            return Ok(Some([x as f32; 3]));
        }
        let list = value.as_array().filter(|l| l.len() == 3).ok_or_else(bad)?;
        let mut out = [0.0; 3];
        for (dst, v) in out.iter_mut().zip(list) {
            *dst = v.as_f64().ok_or_else(bad)? as f32;
        }
        Ok(Some(out))
    }
}

/// `config.json` read into a family's own typed view of it; an error names the key
/// (`vision_config.patch_size: invalid type: string "16", expected u32`).
pub(super) fn read_config<T: DeserializeOwned>(config: &Value) -> Result<T, FamilyError> {
    serde_path_to_error::deserialize(config).map_err(|e| invalid(CONFIG, format!("{}: {}", e.path(), e.inner())))
}

/// A positive count from the processor settings.
pub(super) fn positive(n: i64, key: &str) -> Result<usize, FamilyError> {
    usize::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| invalid(PROCESSOR, format!("{key} must be positive")))
}

pub(super) fn invalid(file: &'static str, message: String) -> FamilyError {
    FamilyError::InvalidConfig { file, message }
}
