//! `scheduler/scheduler_config.json` and diffusers' `from_config` semantics.
//!
//! Matches diffusers 0.42.1 `configuration_utils.py` (`extract_init_dict`, `register_to_config`'s
//! `_use_default_values`) for `X.from_config(pipe.scheduler.config)` where the pipeline loaded its
//! scheduler from the folder's JSON with its own class: X receives exactly the JSON keys that are
//! X's `__init__` parameters (values as the own class stored them), and X's own defaults for the
//! rest. A key the JSON lacks never inherits the own class's default (e.g. the SD1.5 hub config
//! has no `timestep_spacing`, so Euler gets its own `linspace`, not PNDM's `leading`).
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{json, Map, Value};

/// The samplers loracast implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    Pndm,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
}

impl SchedulerKind {
    pub const ALL: [Self; 5] = [
        Self::Ddim,
        Self::Pndm,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmSolverMultistep,
    ];

    /// The `--scheduler` name.
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmSolverMultistep => "dpm++2m",
        }
    }

    /// The diffusers class.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// From a diffusers `_class_name`; other diffusers schedulers are an error naming them.
    pub fn from_class_name(name: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|k| k.class_name() == name) {
            Some(k) => Ok(k),
            None => bail!(
                "scheduler class {name:?} is not supported; loracast implements {} \
                 (pick one with --scheduler {})",
                Self::ALL.map(|k| k.class_name()).join(", "),
                Self::ALL.map(|k| k.cli_name()).join("|"),
            ),
        }
    }

    /// From a `--scheduler` name: `ddim|pndm|euler|euler-a|dpm++2m`.
    pub fn from_cli_name(name: &str) -> Result<Self> {
        match Self::ALL.into_iter().find(|k| k.cli_name() == name) {
            Some(k) => Ok(k),
            None => bail!(
                "unknown scheduler {name:?}; expected one of {}",
                Self::ALL.map(|k| k.cli_name()).join(", ")
            ),
        }
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;

    /// A CLI name or a diffusers class name.
    fn from_str(s: &str) -> Result<Self> {
        Self::from_cli_name(s).or_else(|e| Self::from_class_name(s).map_err(|_| e))
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    Discrete,
    Continuous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    Linear,
    LogLinear,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    Zero,
    SigmaMin,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlgorithmType {
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// Every `__init__` parameter of DDIM/PNDM/Euler/EulerAncestral/DPMSolverMultistep (and DDPM,
/// for training), with diffusers' names. Struct defaults are DDIMScheduler's (and the class's
/// own for parameters only one class has); [`SchedulerConfig::for_kind`] gives each class its
/// own defaults. Unknown JSON keys are ignored; unsupported values are errors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    // DDIM / DDPM
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub thresholding: bool,
    pub dynamic_thresholding_ratio: f64,
    pub sample_max_value: f64,
    pub variance_type: Option<String>,
    // PNDM
    pub skip_prk_steps: bool,
    // Euler / DPM-Solver sigmas
    pub interpolation_type: InterpolationType,
    #[serde(deserialize_with = "bool_or_null")]
    pub use_karras_sigmas: bool,
    #[serde(deserialize_with = "bool_or_null")]
    pub use_exponential_sigmas: bool,
    #[serde(deserialize_with = "bool_or_null")]
    pub use_beta_sigmas: bool,
    pub use_lu_lambdas: bool,
    pub use_flow_sigmas: bool,
    pub flow_shift: f64,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_type: TimestepType,
    pub final_sigmas_type: FinalSigmasType,
    // DPM-Solver
    pub solver_order: usize,
    pub algorithm_type: AlgorithmType,
    pub solver_type: SolverType,
    pub lower_order_final: bool,
    pub euler_at_final: bool,
    #[serde(deserialize_with = "py_float", serialize_with = "py_float_ser")]
    pub lambda_min_clipped: f64,
    pub use_dynamic_shifting: bool,
    pub time_shift_type: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            variance_type: None,
            skip_prk_steps: false,
            interpolation_type: InterpolationType::Linear,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            sigma_min: None,
            sigma_max: None,
            timestep_type: TimestepType::Discrete,
            final_sigmas_type: FinalSigmasType::Zero,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
        }
    }
}

impl SchedulerConfig {
    /// SD1.5's scheduler (PNDM, scaled-linear betas, `steps_offset` 1, PLMS) for unit tests.
    pub fn tiny() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            clip_sample: false,
            set_alpha_to_one: false,
            skip_prk_steps: true,
            steps_offset: 1,
            ..Self::default()
        }
    }

    /// diffusers' `<target>.from_config(pipe.scheduler.config)`, where the pipeline loaded
    /// `json` (a `scheduler_config.json`) with its own class `own_class`.
    pub fn for_kind(json: &Value, own_class: &str, target: SchedulerKind) -> Result<Self> {
        resolve(json, own_class, target.class_name())
    }

    /// [`Self::for_kind`] with the own class from the JSON's `_class_name` (`kind`'s class when
    /// the JSON names none): what `--scheduler kind` means for a pipeline folder.
    pub fn from_pipeline_config(json: &Value, kind: SchedulerKind) -> Result<Self> {
        let own = json
            .get("_class_name")
            .and_then(Value::as_str)
            .unwrap_or(kind.class_name());
        Self::for_kind(json, own, kind)
    }

    /// `kind`'s class loading `json` directly (`X.from_pretrained(folder)` / `X.from_config(json)`).
    pub fn from_json(json: &Value, kind: SchedulerKind) -> Result<Self> {
        Self::for_kind(json, kind.class_name(), kind)
    }

    /// `DDPMScheduler.from_pretrained(folder, subfolder="scheduler")`: the training noise
    /// schedule of diffusers' fine-tuning scripts.
    pub fn for_training(json: &Value) -> Result<Self> {
        resolve(json, "DDPMScheduler", "DDPMScheduler")
    }
}

/// The `__init__` parameters of a diffusers class with their defaults (diffusers 0.42.1).
fn class_defaults(class: &str) -> Option<Map<String, Value>> {
    let common = json!({
        "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
        "beta_schedule": "linear", "trained_betas": null, "prediction_type": "epsilon",
        "steps_offset": 0,
    });
    let own = match class {
        "DDIMScheduler" => json!({
            "clip_sample": true, "set_alpha_to_one": true, "thresholding": false,
            "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
            "sample_max_value": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": false,
        }),
        "PNDMScheduler" => json!({
            "skip_prk_steps": false, "set_alpha_to_one": false, "timestep_spacing": "leading",
        }),
        "EulerDiscreteScheduler" => json!({
            "interpolation_type": "linear", "use_karras_sigmas": false,
            "use_exponential_sigmas": false, "use_beta_sigmas": false, "sigma_min": null,
            "sigma_max": null, "timestep_spacing": "linspace", "timestep_type": "discrete",
            "rescale_betas_zero_snr": false, "final_sigmas_type": "zero",
        }),
        "EulerAncestralDiscreteScheduler" => json!({
            "timestep_spacing": "linspace", "rescale_betas_zero_snr": false,
        }),
        "DPMSolverMultistepScheduler" => json!({
            "solver_order": 2, "thresholding": false, "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
            "lower_order_final": true, "euler_at_final": false, "use_karras_sigmas": false,
            "use_exponential_sigmas": false, "use_beta_sigmas": false, "use_lu_lambdas": false,
            "use_flow_sigmas": false, "flow_shift": 1.0, "final_sigmas_type": "zero",
            "lambda_min_clipped": "-Infinity", "variance_type": null,
            "timestep_spacing": "linspace", "rescale_betas_zero_snr": false,
            "use_dynamic_shifting": false, "time_shift_type": "exponential",
        }),
        "DDPMScheduler" => json!({
            "variance_type": "fixed_small", "clip_sample": true, "thresholding": false,
            "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0,
            "sample_max_value": 1.0, "timestep_spacing": "leading", "rescale_betas_zero_snr": false,
        }),
        _ => return None,
    };
    let (Value::Object(mut map), Value::Object(own)) = (common, own) else {
        return None;
    };
    map.extend(own);
    Some(map)
}

/// Values a class's `__init__` rewrites with `register_to_config` when it loads them (so the
/// pipeline's config holds the rewritten value): the DEIS / UniPC / DPM-Solver families.
fn init_rewrite(class: &str, key: &str, value: &Value) -> Value {
    let v = value.as_str().unwrap_or_default();
    let new = match (class, key) {
        ("DEISMultistepScheduler", "algorithm_type")
            if ["dpmsolver", "dpmsolver++"].contains(&v) =>
        {
            "deis"
        }
        ("DEISMultistepScheduler", "solver_type")
            if ["midpoint", "heun", "bh1", "bh2"].contains(&v) =>
        {
            "logrho"
        }
        ("UniPCMultistepScheduler", "solver_type")
            if ["midpoint", "heun", "logrho"].contains(&v) =>
        {
            "bh2"
        }
        (c, "algorithm_type") if c.starts_with("DPMSolver") && v == "deis" => "dpmsolver++",
        (c, "solver_type")
            if c.starts_with("DPMSolver") && ["logrho", "bh1", "bh2"].contains(&v) =>
        {
            "midpoint"
        }
        _ => return value.clone(),
    };
    Value::from(new)
}

/// The target class's config: its defaults, overridden by every JSON key that is one of its
/// `__init__` parameters (private keys and keys listed in `_use_default_values` are dropped
/// first, as `extract_init_dict` does). DPMSolverMultistep also reads `sigma_min` / `sigma_max`
/// through `hasattr(config, ...)`, so those carry over to it as hidden keys.
fn resolve(json: &Value, own_class: &str, target_class: &str) -> Result<SchedulerConfig> {
    let obj = json
        .as_object()
        .context("scheduler config: expected a JSON object")?;
    let mut init = class_defaults(target_class)
        .with_context(|| format!("no from_config table for {target_class}"))?;
    let defaulted: HashSet<&str> = obj
        .get("_use_default_values")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let hidden: &[&str] = match target_class {
        "DPMSolverMultistepScheduler" => &["sigma_min", "sigma_max"],
        _ => &[],
    };
    for (k, v) in obj {
        if k.starts_with('_') || defaulted.contains(k.as_str()) {
            continue;
        }
        if init.contains_key(k) || hidden.contains(&k.as_str()) {
            let v = init_rewrite(own_class, k, v);
            init.insert(k.clone(), init_rewrite(target_class, k, &v));
        }
    }
    let cfg: SchedulerConfig =
        serde_json::from_value(Value::Object(init.clone())).map_err(|e| {
            // Name the offending key: serde's enum errors do not.
            let bad = init.iter().find(|(k, v)| {
                serde_json::from_value::<SchedulerConfig>(json!({ k.as_str(): v })).is_err()
            });
            // Values from the file are echoed at most 80 characters long (one short line).
            let clip = |x: String| match x.char_indices().nth(80) {
                Some((i, _)) => format!("{}…", &x[..i]),
                None => x,
            };
            match bad {
                Some((k, v)) => anyhow::anyhow!(
                    "{target_class} config: {k} = {}: {}",
                    clip(v.to_string()),
                    clip(e.to_string())
                ),
                None => anyhow::anyhow!("{target_class} config: {e}"),
            }
        })?;
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("{target_class} config: {e}"))?;
    Ok(cfg)
}

/// The most training timesteps a schedule may have (diffusers' configs use 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 1 << 20;

impl SchedulerConfig {
    /// Every size and number the samplers compute with, each named by its key: a value that
    /// would overflow an index, allocate without bound or turn the schedule into NaN is an
    /// error here rather than deep inside a sampler.
    pub fn validate(&self) -> Result<()> {
        let t = self.num_train_timesteps;
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&t) {
            bail!("num_train_timesteps must be in [2, {MAX_TRAIN_TIMESTEPS}], got {t}");
        }
        if self.steps_offset >= t {
            bail!(
                "steps_offset must be < num_train_timesteps ({t}), got {}",
                self.steps_offset
            );
        }
        for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                bail!("{key} must be a number in [0, 1), got {v}");
            }
        }
        if let Some(b) = &self.trained_betas {
            if let Some((i, v)) = b
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && (0.0..1.0).contains(*v)))
            {
                bail!("trained_betas[{i}] must be a number in [0, 1), got {v}");
            }
        }
        for (key, v) in [
            ("clip_sample_range", self.clip_sample_range),
            ("sample_max_value", self.sample_max_value),
            ("flow_shift", self.flow_shift),
        ] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{key} must be a finite number > 0, got {v}");
            }
        }
        if !(self.dynamic_thresholding_ratio > 0.0 && self.dynamic_thresholding_ratio <= 1.0) {
            bail!(
                "dynamic_thresholding_ratio must be in (0, 1], got {}",
                self.dynamic_thresholding_ratio
            );
        }
        for (key, v) in [("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)] {
            if let Some(v) = v.filter(|v| !(v.is_finite() && *v > 0.0)) {
                bail!("{key} must be a finite number > 0, got {v}");
            }
        }
        if self.lambda_min_clipped.is_nan() {
            bail!("lambda_min_clipped must be a number or -Infinity, got NaN");
        }
        if self.solver_order > 3 {
            bail!("solver_order must be 1, 2 or 3, got {}", self.solver_order);
        }
        Ok(())
    }
}

fn bool_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

/// A float, or Python's `Infinity` / `-Infinity` / `NaN` as [`crate::io::folder::parse_config_json`] writes them.
fn py_float<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Str(String),
    }
    match F::deserialize(d)? {
        F::Num(x) => Ok(x),
        F::Str(s) => match s.as_str() {
            "Infinity" | "inf" => Ok(f64::INFINITY),
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "NaN" | "nan" => Ok(f64::NAN),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, got {s:?}"
            ))),
        },
    }
}

fn py_float_ser<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    match *x {
        x if x == f64::INFINITY => s.serialize_str("Infinity"),
        x if x == f64::NEG_INFINITY => s.serialize_str("-Infinity"),
        x if x.is_nan() => s.serialize_str("NaN"),
        x => s.serialize_f64(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::folder::parse_config_json;

    #[test]
    fn names_round_trip() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.cli_name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(SchedulerKind::from_class_name(k.class_name()).unwrap(), k);
        }
        let e = SchedulerKind::from_class_name("LMSDiscreteScheduler").unwrap_err();
        assert!(e.to_string().contains("LMSDiscreteScheduler"), "{e}");
        assert!("lms".parse::<SchedulerKind>().is_err());
    }

    #[test]
    fn python_json_tokens() {
        let v =
            parse_config_json(r#"{"a": -Infinity, "b": "NaN x \" Infinity", "c": NaN}"#).unwrap();
        assert_eq!(v["a"], "-Infinity");
        assert_eq!(v["b"], "NaN x \" Infinity");
        let cfg = SchedulerConfig::from_json(&v, SchedulerKind::DpmSolverMultistep).unwrap();
        assert_eq!(cfg.lambda_min_clipped, f64::NEG_INFINITY);
    }

    #[test]
    fn missing_keys_take_target_defaults() {
        let hub = json!({"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                         "clip_sample": false, "steps_offset": 1});
        let euler = SchedulerConfig::from_pipeline_config(&hub, SchedulerKind::Euler).unwrap();
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
        let ddim = SchedulerConfig::from_pipeline_config(&hub, SchedulerKind::Ddim).unwrap();
        assert!(!ddim.clip_sample && ddim.set_alpha_to_one && ddim.steps_offset == 1);
        let tiny = SchedulerConfig::tiny();
        assert_eq!(tiny.beta_schedule, BetaSchedule::ScaledLinear);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e =
            SchedulerConfig::from_json(&json!({"beta_schedule": "cosine"}), SchedulerKind::Ddim)
                .unwrap_err();
        assert!(e.to_string().contains("beta_schedule"), "{e}");
    }
}
