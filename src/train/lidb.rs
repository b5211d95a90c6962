//! Pre-optimised LiDB subjects: the weight-space targets of HyperDreamBooth's hypernetwork
//! (hyperdreambooth §4.2, eq. 2: L = α‖D_θ̂(x + ε, c) − x‖² + β‖θ̂ − θ‖², θ pre-optimised per
//! subject), at toy scale.
//!
//! 1. Draw `subjects` distinct train-split identities (held-out ones are never drawn).
//! 2. For each: `views` renders in random contexts, captioned with the subject token
//!    ("a sks creature wearing a hat …"), and a LiDB DreamBooth run on them
//!    ([`super::finetune::finetune_lora`] with `lidb`, the hypernetwork's rank and alpha, one
//!    seed for all subjects: the same initial T_A, so targets differ only by what was learned).
//! 3. Keep the trained factors (T_A, T_B per site) in the hypernetwork's output layout: one
//!    `[K, numel]` tensor per decoder matrix (`theta.{m}`), with the identities (`identities`).
//!
//! The result is cached next to the hypernetwork run (`lidb_subjects.safetensors`, written
//! atomically once all subjects are done) and reused only when its recorded settings and base
//! fingerprint match.
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::finetune::{finetune_lora, Examples, FinetuneConfig};
use crate::data::{subject_prompt, Identity, Split, World};
use crate::hypernet::DecoderConfig;
use crate::io::safetensors::{save, SafeTensorsFile};
use crate::pipeline::StableDiffusion;

/// How the pre-optimised subjects are made and weighed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LidbTargetsConfig {
    /// K: distinct train identities.
    pub subjects: usize,
    /// Captioned renders per identity.
    pub views: usize,
    /// LiDB DreamBooth steps per identity.
    pub steps: u64,
    pub lr: f64,
    /// Rows per finetuning step.
    pub batch: i64,
    /// β: weight of the weight-space loss ‖θ̂ − θ‖² in hypernetwork training.
    pub weight: f64,
    pub seed: u64,
}

impl LidbTargetsConfig {
    pub fn validate(&self) -> Result<()> {
        if self.subjects < 1 || self.views < 1 || self.steps < 1 || self.batch < 1 {
            bail!("lidb_targets: subjects, views, steps and batch must be ≥ 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("lidb_targets: lr must be a positive number");
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            bail!("lidb_targets: weight must be finite and ≥ 0");
        }
        Ok(())
    }
}

/// K pre-optimised subjects: their identities and, per decoder matrix, `[K, numel]`.
pub struct LidbTargets {
    pub identities: Vec<Identity>,
    pub theta: Vec<Tensor>,
}

impl LidbTargets {
    /// The targets of the subjects at `picked` (indices into `identities`), per matrix `[B, numel]`.
    pub fn select(&self, picked: &[usize]) -> Vec<Tensor> {
        let idx: Vec<i64> = picked.iter().map(|&k| k as i64).collect();
        let idx = Tensor::from_slice(&idx);
        self.theta.iter().map(|t| t.index_select(0, &idx)).collect()
    }
}

/// What a cache file must record to be reused.
fn cache_key(
    sd: &StableDiffusion,
    decoder: &DecoderConfig,
    cfg: &LidbTargetsConfig,
    token: &str,
) -> Result<String> {
    // β only weighs the targets in training: changing it keeps the cache.
    let made = LidbTargetsConfig {
        weight: 0.0,
        ..cfg.clone()
    };
    Ok(serde_json::to_string(&serde_json::json!({
        "targets": made,
        "rank": decoder.rank,
        "alpha": decoder.alpha,
        "lidb": decoder.lidb,
        "token": token,
        "base_fingerprint": sd.unet.lora_fingerprint(),
    }))?)
}

/// Loads the cached targets at `path`, or pre-optimises them and writes the cache.
pub fn preoptimize(
    sd: &StableDiffusion,
    decoder: &DecoderConfig,
    cfg: &LidbTargetsConfig,
    token: &str,
    path: &Path,
) -> Result<LidbTargets> {
    cfg.validate()?;
    let Some(lidb) = decoder.lidb else {
        bail!("lidb_targets needs a LiDB decoder (decoder.lidb)");
    };
    let key = cache_key(sd, decoder, cfg, token)?;
    let sites = sd.unet.lora_sites().to_vec();
    let n_matrices = 2 * sites.len();
    if path.is_file() {
        let file = SafeTensorsFile::open(path)?;
        let meta = file.metadata()?.unwrap_or_default();
        if meta.get("config") != Some(&key) {
            bail!(
                "{} was made with other settings or for another base; delete it to pre-optimise again",
                path.display()
            );
        }
        let ids = file.tensor("identities", Kind::Float)?.to_kind(Kind::Int64);
        let identities = Vec::<i64>::try_from(&ids)?
            .into_iter()
            .map(|i| Identity::from_index(i as usize))
            .collect::<Result<Vec<_>>>()?;
        let theta = (0..n_matrices)
            .map(|m| file.tensor(&format!("theta.{m}"), Kind::Float))
            .collect::<Result<Vec<_>>>()?;
        return Ok(LidbTargets { identities, theta });
    }
    // 1. K distinct train identities.
    let identities = World::new(cfg.seed).distinct_identities(Split::Train, cfg.subjects);
    let size = sd.default_size();
    let bar = ProgressBar::new(identities.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "pre-optimising LiDB subjects {bar:30} {pos}/{len} [{elapsed}<{eta}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut per_matrix: Vec<Vec<Tensor>> = (0..n_matrices).map(|_| Vec::new()).collect();
    for (k, id) in identities.iter().enumerate() {
        // 2. Captioned views, then LiDB DreamBooth.
        let mut world = World::new(crate::data::rng::mix64(cfg.seed ^ (k as u64 + 1)));
        let (mut images, mut prompts) = (Vec::new(), Vec::new());
        for _ in 0..cfg.views {
            let v = world.view(*id);
            images.push(super::hypernet::toy_target(&v, size)?);
            prompts.push(subject_prompt(&v.context, token));
        }
        let ft = FinetuneConfig {
            rank: decoder.rank,
            alpha: Some(decoder.alpha),
            steps: cfg.steps,
            lr: cfg.lr,
            warmup: 0,
            batch: cfg.batch,
            prior_weight: 0.0,
            // One seed for every subject: the same initial T_A, so the targets differ by what
            // each subject's images taught, not by their random starting points.
            seed: cfg.seed,
            null_weight: 0.0,
            lidb: Some(lidb),
        };
        let done = finetune_lora(
            sd,
            &ft,
            &Examples { images, prompts },
            None,
            None,
            &[],
            false,
        )
        .with_context(|| format!("pre-optimising LiDB subject {k}"))?;
        // 3. Flatten in the decoder's layout: T_A [r, a] → [r·a], T_B [b, r] → [b·r].
        for (i, (a, b)) in done.factors.iter().enumerate() {
            per_matrix[2 * i].push(a.flatten(0, -1));
            per_matrix[2 * i + 1].push(b.flatten(0, -1));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let theta: Vec<Tensor> = per_matrix.iter().map(|v| Tensor::stack(v, 0)).collect();
    let ids: Vec<i64> = identities.iter().map(|i| i.index() as i64).collect();
    let mut tensors: Vec<(String, Tensor)> = theta
        .iter()
        .enumerate()
        .map(|(m, t)| (format!("theta.{m}"), t.shallow_clone()))
        .collect();
    // Identity indices are < 2²⁴: exact in f32, the file's one dtype.
    tensors.push((
        "identities".to_string(),
        Tensor::from_slice(&ids).to_kind(Kind::Float),
    ));
    let meta = [("config".to_string(), key)].into_iter().collect();
    save(&tensors, Kind::Float, Some(meta), path)?;
    Ok(LidbTargets { identities, theta })
}
