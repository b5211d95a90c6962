//! Training the toy world's evaluators (issue 4): the identity and the context classifier, on
//! ground-truth renders of the train split and, for a fraction of each batch, their round trip
//! through the base model's VAE (so generated images are in distribution). Never used by the
//! method. Reports per-attribute accuracy on held-out identities, on real renders and through
//! the VAE (the ceiling a generator can reach).
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::{train, LoopConfig, StepOutput};
use crate::data::{images_to_tensor, Sample, Split, World};
use crate::eval::classifier::{AttributeClassifier, ClassifierConfig};
use crate::eval::fidelity::{context_config, identity_config, save_classifier};
use crate::io::DiffusersFolder;
use crate::models::vae::AutoencoderKL;

/// `configs/toy/evaluators.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluatorsConfig {
    pub world_seed: u64,
    pub batch: i64,
    /// Fraction of each batch replaced by its VAE round trip.
    pub vae_fraction: f64,
    pub identity_loop: LoopConfig,
    pub context_loop: LoopConfig,
    /// Held-out renders to measure accuracy on.
    pub eval_count: i64,
}

/// A batch of samples with labels: images `[B, 3, S, S]`, identity `[B, 5]`, context `[B, 4]`.
pub fn labelled(samples: &[Sample]) -> (Tensor, Tensor, Tensor) {
    let images: Vec<_> = samples.iter().map(|s| s.render()).collect();
    let id: Vec<i64> = samples
        .iter()
        .flat_map(|s| s.identity.labels().map(|l| l as i64))
        .collect();
    let ctx: Vec<i64> = samples
        .iter()
        .flat_map(|s| s.context.labels().map(|l| l as i64))
        .collect();
    let b = samples.len() as i64;
    (
        images_to_tensor(&images),
        Tensor::from_slice(&id).view([b, -1]),
        Tensor::from_slice(&ctx).view([b, -1]),
    )
}

/// decode(encode(x).mean) for the VAE round trip.
pub fn round_trip(vae: &AutoencoderKL, x: &Tensor) -> Result<Tensor> {
    tch::no_grad(|| Ok(vae.decode(&vae.encode(x)?.mean)?.clamp(-1.0, 1.0)))
}

/// Per-attribute accuracy of `model` on `(images, labels)`, in batches of 256.
pub fn accuracy(model: &AttributeClassifier, images: &Tensor, labels: &Tensor) -> Result<Vec<f64>> {
    let n = images.size()[0];
    let mut hits = vec![0i64; model.config.heads.len()];
    for start in (0..n).step_by(256) {
        let len = (n - start).min(256);
        let pred = model.predict(&images.narrow(0, start, len))?;
        let eq = pred
            .eq_tensor(&labels.narrow(0, start, len))
            .to_kind(Kind::Int64)
            .sum_dim_intlist(0, false, Kind::Int64);
        for (k, h) in hits.iter_mut().enumerate() {
            *h += eq.int64_value(&[k as i64]);
        }
    }
    Ok(hits.iter().map(|&h| h as f64 / n as f64).collect())
}

/// Trains both evaluators into `dir` and writes `dir/{identity,context}.safetensors` (f16) and
/// `dir/report.json`.
pub fn train_evaluators(
    cfg: &EvaluatorsConfig,
    vae_dir: &Path,
    dir: &Path,
    resume: bool,
    device: Device,
) -> Result<PathBuf> {
    let folder = DiffusersFolder::open(vae_dir)?;
    let (vae, _vae_vs) = AutoencoderKL::load(&folder, device)?;
    let config = serde_json::to_value(cfg)?;
    let mut report = serde_json::Map::new();
    for (name, model_cfg, lp, key) in [
        ("identity", identity_config(), &cfg.identity_loop, 0),
        ("context", context_config(), &cfg.context_loop, 1),
    ] {
        let (model, vs) = train_one(
            cfg,
            &model_cfg,
            lp,
            &config,
            &vae,
            &dir.join(name),
            resume,
            key,
            device,
        )?;
        // Held-out identities, fresh contexts: real renders and through the VAE.
        let samples: Vec<Sample> = (0..cfg.eval_count as u64)
            .map(|i| Sample::at(cfg.world_seed ^ 0xE7A1, Split::Heldout, i))
            .collect();
        let (x, id, ctx) = labelled(&samples);
        let labels = if key == 0 { id } else { ctx };
        let x = x.to_device(device);
        let labels = labels.to_device(device);
        let real = accuracy(&model, &x, &labels)?;
        let through = accuracy(&model, &round_trip(&vae, &x)?, &labels)?;
        let per_attr = |acc: &[f64]| -> serde_json::Value {
            model_cfg
                .heads
                .iter()
                .zip(acc)
                .map(|((n, _), a)| (n.clone(), serde_json::json!(a)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        };
        report.insert(name.to_string(), serde_json::json!({"heldout_real": per_attr(&real), "heldout_through_vae": per_attr(&through)}));
        save_classifier(&model, &vs, &dir.join(format!("{name}.safetensors")), true)?;
    }
    let path = dir.join("report.json");
    crate::util::write_atomic(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    Ok(path)
}

#[allow(clippy::too_many_arguments)]
fn train_one(
    cfg: &EvaluatorsConfig,
    model_cfg: &ClassifierConfig,
    lp: &LoopConfig,
    config: &serde_json::Value,
    vae: &AutoencoderKL,
    dir: &Path,
    resume: bool,
    key: usize,
    device: Device,
) -> Result<(AttributeClassifier, nn::VarStore)> {
    let _rng = crate::util::rng_lock();
    tch::manual_seed(lp.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let model = AttributeClassifier::new(vs.root(), model_cfg)?;
    let n_vae = ((cfg.batch as f64) * cfg.vae_fraction).round() as i64;
    let run_cfg = serde_json::json!({"all": config, "which": key});
    train(
        dir,
        lp,
        &run_cfg,
        &mut vs,
        resume,
        if key == 0 { "identity" } else { "context" },
        |step| {
            let mut world = World::new(super::step_seed(cfg.world_seed ^ (key as u64 + 1), step));
            let samples: Vec<Sample> = (0..cfg.batch).map(|_| world.sample(Split::Train)).collect();
            let (x, id, ctx) = labelled(&samples);
            let x = x.to_device(device);
            let x = if n_vae > 0 {
                let rt = round_trip(vae, &x.narrow(0, 0, n_vae))?;
                Tensor::cat(&[rt, x.narrow(0, n_vae, cfg.batch - n_vae)], 0)
            } else {
                x
            };
            let labels = if key == 0 { id } else { ctx }.to_device(device);
            let (loss, accs) = model.loss(&x, &labels)?;
            let mean_acc = accs.iter().sum::<f64>() / accs.len() as f64;
            Ok(StepOutput {
                loss,
                metrics: vec![("train_acc", mean_acc)],
            })
        },
    )
    .with_context(|| {
        format!(
            "training the {} evaluator",
            if key == 0 { "identity" } else { "context" }
        )
    })?;
    vs.freeze();
    Ok((model, vs))
}
