//! `POST /api/jobs` bodies: a JSON object read field by field so that every bad value is a 422
//! naming its field (unknown fields too), then turned into the library's [`GenerateRequest`]
//! exactly as `loracast generate` builds one from its flags (same defaults: the folder's
//! scheduler, 50 steps, guidance 7.5, size = UNet sample_size × VAE scale factor; a generic
//! prompt switches to HM-CFG with κ = 1), so a job reproduces the CLI's image for its seed.
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::{ApiError, ApiResult};
use crate::diffusion::SchedulerKind;
use crate::pipeline::GenerateRequest;

/// The largest seed a client may give: 2^53 − 1, so the page's JavaScript numbers hold it.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// What the loaded models default to (filled by the worker once they load).
#[derive(Debug, Clone, Serialize)]
pub struct Defaults {
    pub guidance_scale: f64,
    pub steps: usize,
    pub scheduler: &'static str,
    pub width: i64,
    pub height: i64,
    /// The token the toy world's subject prompts carry ("a sks creature …").
    pub subject_token: &'static str,
}

/// Bounds on what one job may ask for.
#[derive(Debug, Clone, Serialize)]
pub struct JobLimits {
    pub max_steps: usize,
    pub max_side: i64,
    pub max_count: usize,
    pub max_kappas: usize,
    pub max_prompt_chars: usize,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_steps: 150,
            max_side: 1024,
            max_count: 8,
            max_kappas: 9,
            max_prompt_chars: 2000,
        }
    }
}

/// A validated job: what is run and what `GET /api/jobs/{id}` and the PNG chunk report.
#[derive(Debug, Clone, Serialize)]
pub struct JobParams {
    pub subject_id: Option<String>,
    pub prompt: String,
    pub generic_prompt: Option<String>,
    /// HM-CFG's κ (with a generic prompt, no sweep).
    pub kappa: Option<f64>,
    /// A κ sweep: one image per κ, same prompt and seed.
    pub kappas: Option<Vec<f64>>,
    pub negative_prompt: Option<String>,
    pub guidance_scale: f64,
    pub lora_scale: f64,
    pub steps: usize,
    pub scheduler: &'static str,
    /// The seed used (a random one when the client sent −1).
    pub seed: u64,
    pub width: i64,
    pub height: i64,
    pub count: usize,
}

impl JobParams {
    /// How many images the job makes.
    pub fn n_images(&self) -> usize {
        self.kappas.as_ref().map_or(self.count, Vec::len)
    }

    /// Denoising steps in all (a sweep runs one loop per κ).
    pub fn total_steps(&self) -> usize {
        self.steps * self.kappas.as_ref().map_or(1, Vec::len)
    }

    /// The library request of run `k` (a sweep's k-th κ; 0 otherwise), without the LoRA.
    pub fn request(&self, k: usize) -> GenerateRequest {
        let kappa = match &self.kappas {
            Some(ks) => ks.get(k).copied().unwrap_or(1.0),
            None => self.kappa.unwrap_or(1.0),
        };
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            guidance_scale: self.guidance_scale,
            steps: self.steps,
            scheduler: SchedulerKind::from_cli_name(self.scheduler).ok(),
            seed: self.seed,
            height: Some(self.height),
            width: Some(self.width),
            lora_scale: self.lora_scale,
            generic_prompt: self.generic_prompt.clone(),
            kappa,
            num_images: if self.kappas.is_some() { 1 } else { self.count },
            ..GenerateRequest::new("")
        }
    }
}

const FIELDS: [&str; 15] = [
    "subject_id",
    "prompt",
    "generic_prompt",
    "kappa",
    "kappas",
    "negative_prompt",
    "guidance_scale",
    "lora_scale",
    "steps",
    "scheduler",
    "seed",
    "width",
    "height",
    "count",
    "num_images",
];

fn number(obj: &Map<String, Value>, key: &str) -> ApiResult<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(v) if v.is_finite() => Ok(Some(v)),
            _ => Err(ApiError::invalid(
                key,
                format!("{key} must be a finite number"),
            )),
        },
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be a number"))),
    }
}

fn integer(obj: &Map<String, Value>, key: &str, lo: i64, hi: i64) -> ApiResult<Option<i64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) if (lo..=hi).contains(&v) => Ok(Some(v)),
            _ => Err(ApiError::invalid(
                key,
                format!("{key} must be an integer from {lo} to {hi}, got {n}"),
            )),
        },
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be an integer"))),
    }
}

fn text(obj: &Map<String, Value>, key: &str, max_chars: usize) -> ApiResult<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() > max_chars => Err(ApiError::invalid(
            key,
            format!("{key} is longer than {max_chars} characters"),
        )),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(key, format!("{key} must be a string"))),
    }
}

/// A random seed below 2^32 (as other UIs draw them), from the OS.
pub fn random_seed() -> u64 {
    u64::from_le_bytes(super::state::random_bytes::<8>()) & 0xFFFF_FFFF
}

/// Parses and validates a job body against the loaded models' defaults and the limits.
pub fn parse_job(body: &Value, defaults: &Defaults, limits: &JobLimits) -> ApiResult<JobParams> {
    let obj = body.as_object().ok_or_else(|| {
        ApiError::invalid("", "the body must be a JSON object")
            .hint("send {\"prompt\": \"…\", …} with Content-Type: application/json")
    })?;
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::invalid(k, format!("unknown field {k:?}"))
            .hint(format!("known fields: {}", FIELDS.join(", "))));
    }
    let max = limits.max_prompt_chars;
    let prompt = text(obj, "prompt", max)?
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| ApiError::invalid("prompt", "prompt is required and must not be empty"))?;
    let subject_id = text(obj, "subject_id", 128)?.filter(|s| !s.is_empty());
    let generic_prompt = text(obj, "generic_prompt", max)?;
    let negative_prompt = text(obj, "negative_prompt", max)?;
    let kappa = number(obj, "kappa")?;
    let kappas = match obj.get("kappas") {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => {
            if a.is_empty() || a.len() > limits.max_kappas {
                return Err(ApiError::invalid(
                    "kappas",
                    format!("kappas must list 1 to {} values", limits.max_kappas),
                ));
            }
            let ks = a
                .iter()
                .map(|v| v.as_f64().filter(|k| (0.0..=2.0).contains(k)))
                .collect::<Option<Vec<f64>>>()
                .ok_or_else(|| {
                    ApiError::invalid("kappas", "every κ in kappas must be a number in [0, 2]")
                })?;
            Some(ks)
        }
        Some(_) => return Err(ApiError::invalid("kappas", "kappas must be an array")),
    };
    if let Some(k) = kappa {
        if !(0.0..=2.0).contains(&k) {
            return Err(ApiError::invalid(
                "kappa",
                format!("kappa must be in [0, 2], got {k}"),
            ));
        }
    }
    if generic_prompt.is_some() && subject_id.is_none() {
        return Err(ApiError::invalid(
            "generic_prompt",
            "generic_prompt (HM-CFG) needs subject_id: it mixes the base and the personalized model",
        ));
    }
    if kappa.is_some() && generic_prompt.is_none() {
        return Err(ApiError::invalid(
            "kappa",
            "kappa needs generic_prompt (it weights HM-CFG's personalized model)",
        ));
    }
    if kappas.is_some() {
        if generic_prompt.is_none() || subject_id.is_none() {
            return Err(ApiError::invalid(
                "kappas",
                "a κ sweep needs subject_id and generic_prompt (HM-CFG)",
            ));
        }
        if kappa.is_some() {
            return Err(ApiError::invalid(
                "kappa",
                "give either kappa or kappas (a sweep), not both",
            ));
        }
    }
    let guidance_scale = number(obj, "guidance_scale")?.unwrap_or(defaults.guidance_scale);
    if !(0.0..=50.0).contains(&guidance_scale) {
        return Err(ApiError::invalid(
            "guidance_scale",
            "guidance_scale must be in [0, 50]",
        ));
    }
    let lora_scale = number(obj, "lora_scale")?.unwrap_or(1.0);
    if !(-4.0..=4.0).contains(&lora_scale) {
        return Err(ApiError::invalid(
            "lora_scale",
            "lora_scale must be in [-4, 4]",
        ));
    }
    if obj.get("lora_scale").is_some_and(|v| !v.is_null()) && subject_id.is_none() {
        return Err(ApiError::invalid(
            "lora_scale",
            "lora_scale needs subject_id",
        ));
    }
    let steps =
        integer(obj, "steps", 1, limits.max_steps as i64)?.map_or(defaults.steps, |s| s as usize);
    let scheduler = match text(obj, "scheduler", 32)? {
        None => defaults.scheduler,
        Some(s) if s.is_empty() => defaults.scheduler,
        Some(s) => SchedulerKind::from_cli_name(&s)
            .map(SchedulerKind::cli_name)
            .map_err(|e| ApiError::invalid("scheduler", e.to_string()))?,
    };
    let seed = match integer(obj, "seed", -1, MAX_SEED as i64)? {
        None | Some(-1) => random_seed(),
        Some(s) => s as u64,
    };
    let side = |key: &str, default: i64| -> ApiResult<i64> {
        let v = integer(obj, key, 8, limits.max_side)?.unwrap_or(default);
        if v % 8 != 0 {
            return Err(ApiError::invalid(
                key,
                format!("{key} must be a multiple of 8, got {v}"),
            ));
        }
        Ok(v)
    };
    let width = side("width", defaults.width)?;
    let height = side("height", defaults.height)?;
    if obj.contains_key("count") && obj.contains_key("num_images") {
        return Err(ApiError::invalid(
            "count",
            "give count or num_images, not both",
        ));
    }
    let count_key = if obj.contains_key("num_images") {
        "num_images"
    } else {
        "count"
    };
    let count = integer(obj, count_key, 1, limits.max_count as i64)?.map_or(1, |c| c as usize);
    if kappas.is_some() && count != 1 {
        return Err(ApiError::invalid(
            count_key,
            "a κ sweep makes one image per κ; count must be 1",
        ));
    }
    Ok(JobParams {
        kappa: if generic_prompt.is_some() && kappas.is_none() {
            Some(kappa.unwrap_or(1.0))
        } else {
            None
        },
        subject_id,
        prompt,
        generic_prompt,
        kappas,
        negative_prompt,
        guidance_scale,
        lora_scale,
        steps,
        scheduler,
        seed,
        width,
        height,
        count,
    })
}
