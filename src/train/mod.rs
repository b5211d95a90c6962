//! The training loop every trainer shares (base model, VAE, evaluators, hypernetwork):
//! AdamW with constant LR after linear warm-up, optional gradient clipping, a metrics log
//! (`DIR/metrics.jsonl`), a progress bar, atomic checkpoints (`DIR/checkpoint.safetensors`:
//! weights + optimizer moments + step + config), exact resume, and a NaN guard.
//!
//! Exact resume by construction: every random draw of step `k` comes from generators seeded
//! with [`step_seed`]`(seed, k)` (the global torch generator is re-seeded at each step, data
//! sampling takes the same seed), so a resumed run repeats the uninterrupted one bit for bit at
//! the same thread count.
//!
//! Data parallel (issue #18, [`train_dist`]): with a [`Dist`] group every rank runs this same
//! loop on its shard of the global batch; rank 0 loads the checkpoint and broadcasts the
//! parameters and optimizer moments, the gradients are averaged (one all-reduce) after the
//! step's backward passes and before clipping, the logged scalars are averaged too, and only
//! rank 0 writes metrics, progress and checkpoints. Without a group (`None`, world size 1)
//! nothing of this runs: today's loop, bit for bit.
pub mod base;
pub mod encoder;
pub mod evaluators;
pub mod finetune;
pub mod hypernet;
pub mod ip_adapter;
pub mod lidb;
pub mod optim;

pub use optim::AdamW;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use tch::{nn::VarStore, Kind, Tensor};

use crate::dist::{fingerprint, Dist};
use crate::io::safetensors::{load_strict, save, SafeTensorsFile};

/// Optimizer and schedule settings of a run (part of every trainer's config file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    pub steps: u64,
    pub lr: f64,
    #[serde(default)]
    pub warmup: u64,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default)]
    pub grad_clip: Option<f64>,
    #[serde(default = "d_every")]
    pub checkpoint_every: u64,
    #[serde(default = "d_log")]
    pub log_every: u64,
    #[serde(default)]
    pub seed: u64,
    /// Steps at the end of the run over which the LR decays linearly to 0 (a warm-up–stable–
    /// decay schedule; 0 = constant to the end). The decay averages out the last steps' noise,
    /// as an EMA of the weights would.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cooldown: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn d_every() -> u64 {
    500
}
fn d_log() -> u64 {
    50
}

impl LoopConfig {
    /// A few steps, for tests.
    pub fn tiny() -> Self {
        Self {
            steps: 8,
            lr: 1e-3,
            warmup: 2,
            weight_decay: 0.0,
            grad_clip: Some(1.0),
            checkpoint_every: 4,
            log_every: 2,
            seed: 0,
            cooldown: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 || self.checkpoint_every == 0 || self.log_every == 0 {
            bail!("steps, checkpoint_every and log_every must be ≥ 1");
        }
        if !self.lr.is_finite() || self.lr <= 0.0 || !self.weight_decay.is_finite() {
            bail!("lr must be a positive number and weight_decay finite");
        }
        if self.cooldown > self.steps {
            bail!(
                "cooldown ({}) must not exceed steps ({})",
                self.cooldown,
                self.steps
            );
        }
        Ok(())
    }

    /// LR of step `step`: linear warm-up, constant (diffusers' `constant_with_warmup`), then,
    /// with `cooldown`, linear decay over the last `cooldown` steps (the last step at lr/cooldown).
    pub fn lr_at(&self, step: u64) -> f64 {
        let warm = match self.warmup {
            0 => 1.0,
            w => ((step + 1) as f64 / w as f64).min(1.0),
        };
        let stable_end = self.steps - self.cooldown;
        let decay = match step >= stable_end && self.cooldown > 0 {
            true => (self.steps - step) as f64 / self.cooldown as f64,
            false => 1.0,
        };
        self.lr * warm * decay
    }
}

/// SplitMix64 of (seed, step): the seed of every random draw of one step.
pub fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & (i64::MAX as u64)
}

/// What one training step returns: the loss to minimize and extra scalars to log.
/// A step that accumulates gradients over micro-batches calls `backward` itself and returns
/// the detached total (a loss that does not require grad is not back-propagated again).
pub struct StepOutput {
    pub loss: Tensor,
    pub metrics: Vec<(&'static str, f64)>,
}

/// The outcome of [`train`].
#[derive(Debug, Clone)]
pub struct Summary {
    pub start_step: u64,
    pub steps: u64,
    /// (step, mean loss) at every log point of this run.
    pub losses: Vec<(u64, f64)>,
    pub seconds: f64,
}

/// A training image as the UNet's target: resize (shortest edge, bicubic) + centre crop to
/// `size`, `[3, size, size]` in [-1, 1].
pub fn target_tensor(img: &crate::io::preprocess::RgbImage, size: i64) -> Result<Tensor> {
    use crate::io::preprocess::{Preprocess, Size};
    let s = u32::try_from(size).context("image size")?;
    let prep = Preprocess {
        size: Size::ShortestEdge(s),
        crop_size: (s, s),
        image_mean: [0.5; 3],
        image_std: [0.5; 3],
        ..Preprocess::clip()
    };
    Ok(prep.pixel_values(img))
}

/// One denoising batch: noisy latents, timesteps, text embeddings and ε targets, row-aligned,
/// with SDXL's added conditioning and IP-Adapter image tokens when the base has them.
pub(crate) struct DenoiseRows {
    pub noisy: Tensor,
    pub t: Tensor,
    pub ctx: Tensor,
    pub target: Tensor,
    /// SDXL: pooled text embeds `[rows, P]` and time ids `[rows, 6]`.
    pub added: Option<(Tensor, Tensor)>,
    /// IP-Adapter (θ0 includes it): image tokens per row.
    pub image: Option<RowImages>,
}

/// IP-Adapter image tokens of the rows of a [`DenoiseRows`].
pub(crate) struct RowImages {
    /// `[rows, T, cross]`
    pub tokens: Tensor,
    /// The unconditional image's tokens `[1, T, cross]` (unconditional-preservation rows).
    pub uncond: Tensor,
    pub scale: f64,
    pub weights: crate::models::unet::IpWeights,
}

impl DenoiseRows {
    pub(crate) fn new(
        noisy: Tensor,
        t: Tensor,
        cond: &crate::pipeline::TextCond,
        target: Tensor,
        time_ids: Option<&Tensor>,
    ) -> Self {
        let added = cond.pooled.as_ref().zip(time_ids).map(|(p, ids)| {
            // [1, 6] → [rows, 6]
            (p.shallow_clone(), ids.expand([p.size()[0], -1], false))
        });
        Self {
            noisy,
            t,
            ctx: cond.hidden.shallow_clone(),
            target,
            added,
            image: None,
        }
    }

    /// ε of rows `start..start + len` (with `lora` for those rows, when given).
    pub(crate) fn eps(
        &self,
        sd: &crate::pipeline::StableDiffusion,
        start: i64,
        len: i64,
        lora: Option<&crate::lora::LoraBatch>,
    ) -> Result<Tensor> {
        use crate::models::unet::{AddedCond, ImageTokens, UNetCond};
        let rows = |t: &Tensor| t.narrow(0, start, len);
        let ctx = rows(&self.ctx);
        let added = self.added.as_ref().map(|(p, ids)| (rows(p), rows(ids)));
        let image = self.image.as_ref().map(|im| ImageTokens {
            tokens: rows(&im.tokens),
            scale: Tensor::full([len], im.scale, (tch::Kind::Float, self.noisy.device())),
            weights: im.weights.clone(),
        });
        let cond = UNetCond {
            text: &ctx,
            added: added.as_ref().map(|(text_embeds, time_ids)| AddedCond {
                text_embeds,
                time_ids,
            }),
            image: image.as_ref(),
        };
        sd.unet
            .forward_cond(&rows(&self.noisy), &rows(&self.t), &cond, lora)
    }

    /// Unconditional preservation (finetuning and hypernetwork training): appends the first `b`
    /// rows again with the unconditional text `c_null` (one row) and, with an IP-Adapter, the
    /// unconditional image, the frozen model's ε on them as their targets.
    pub(crate) fn append_null_rows(
        &mut self,
        sd: &crate::pipeline::StableDiffusion,
        c_null: &crate::pipeline::TextCond,
        b: i64,
    ) -> Result<()> {
        let (xs, ts) = (self.noisy.narrow(0, 0, b), self.t.narrow(0, 0, b));
        // [1, …] → [b, …]
        let null = c_null.repeat(b);
        let mut rows = DenoiseRows {
            noisy: xs,
            t: ts,
            ctx: null.hidden.shallow_clone(),
            target: Tensor::zeros([0], (tch::Kind::Float, self.noisy.device())),
            added: self
                .added
                .as_ref()
                .zip(null.pooled.as_ref())
                .map(|((_, ids), p)| (p.shallow_clone(), ids.narrow(0, 0, b))),
            image: self.image.as_ref().map(|im| RowImages {
                tokens: im.uncond.repeat([b, 1, 1]),
                uncond: im.uncond.shallow_clone(),
                scale: im.scale,
                weights: im.weights.clone(),
            }),
        };
        let eps0 = tch::no_grad(|| rows.eps(sd, 0, b, None))?;
        let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0);
        self.noisy = cat(&self.noisy, &rows.noisy);
        self.t = cat(&self.t, &rows.t);
        self.ctx = cat(&self.ctx, &rows.ctx);
        self.target = cat(&self.target, &eps0);
        if let (Some((p, ids)), Some((pn, idn))) = (&mut self.added, rows.added.take()) {
            *p = cat(p, &pn);
            *ids = cat(ids, &idn);
        }
        if let (Some(im), Some(imn)) = (&mut self.image, rows.image.take()) {
            im.tokens = cat(&im.tokens, &imn.tokens);
        }
        Ok(())
    }
}

pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint.safetensors")
}

/// Runs (or resumes) a training loop writing into `dir`.
///
/// `config` is the trainer's whole config; a resumed run must have the same one. `step_fn(k)`
/// computes the loss of step `k` (draw data with [`step_seed`]`(cfg.seed, k)`).
pub fn train(
    dir: &Path,
    cfg: &LoopConfig,
    config: &serde_json::Value,
    vs: &mut VarStore,
    resume: bool,
    label: &str,
    step_fn: impl FnMut(u64) -> Result<StepOutput>,
) -> Result<Summary> {
    train_dist(dir, cfg, config, vs, resume, label, None, step_fn)
}

/// [`train`] as one rank of a data-parallel group (`dist`), or alone (`None`). `step_fn(k)`
/// computes this rank's shard of step `k`'s global batch (its loss is a mean over its rows).
#[allow(clippy::too_many_arguments)]
pub fn train_dist(
    dir: &Path,
    cfg: &LoopConfig,
    config: &serde_json::Value,
    vs: &mut VarStore,
    resume: bool,
    label: &str,
    dist: Option<&Dist>,
    mut step_fn: impl FnMut(u64) -> Result<StepOutput>,
) -> Result<Summary> {
    cfg.validate()?;
    // Every step re-seeds the global generator: keep other seeded work out meanwhile.
    let _rng = crate::util::rng_lock();
    let main = dist.is_none_or(|d| d.rank() == 0);
    if let Some(d) = dist {
        d.agree(
            fingerprint(config.to_string().as_bytes()),
            "the training config",
        )?;
    }
    let ckpt = checkpoint_path(dir);
    let metrics_path = dir.join("metrics.jsonl");
    let mut opt = AdamW::new(vs, cfg.weight_decay);
    let mut start = 0;
    if main {
        let prepared = prepare_run(dir, cfg, config, vs, &mut opt, resume);
        if let Some(d) = dist {
            // The others learn rank 0's start step (or that it failed) before anything else.
            let code = prepared.as_ref().map_or(-1, |&s| s as i64);
            let t = Tensor::from_slice(&[code]).to_device(d.device());
            d.broadcast(std::slice::from_ref(&t), 0)?;
        }
        start = prepared?;
    } else if let Some(d) = dist {
        let t = Tensor::from_slice(&[0i64]).to_device(d.device());
        d.broadcast(std::slice::from_ref(&t), 0)?;
        start = u64::try_from(t.int64_value(&[0])).map_err(|_| {
            anyhow::anyhow!(
                "rank {} of {}: rank 0 could not prepare {} (see its error)",
                d.rank(),
                d.world(),
                dir.display()
            )
        })?;
    }
    if let Some(d) = dist {
        // Rank 0's parameters and optimizer moments (fresh or resumed) on every rank.
        let mut state: Vec<Tensor> = opt.params().into_iter().map(|(_, p)| p).collect();
        state.extend(opt.state().into_iter().map(|(_, t)| t));
        let shipped: Vec<Tensor> = state.iter().map(|t| t.to_device(d.device())).collect();
        d.broadcast(&shipped, 0)?;
        tch::no_grad(|| {
            for (mut dst, src) in state.into_iter().zip(&shipped) {
                dst.copy_(src);
            }
        });
        opt.t = start as i64;
    }
    let begin = Instant::now();
    let bar = match main {
        true => ProgressBar::new(cfg.steps),
        false => ProgressBar::hidden(),
    }
    .with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed}<{eta} {per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(start);
    bar.set_message(label.to_string());
    let mut window: Vec<f64> = Vec::new();
    let mut extra: Vec<(&'static str, f64)> = Vec::new();
    let mut comm_s = 0.0;
    let mut losses = Vec::new();
    let mut last_ckpt = start;
    for step in start..cfg.steps {
        tch::manual_seed(step_seed(cfg.seed, step) as i64);
        opt.zero_grad();
        let mut out = step_fn(step)?;
        let mut loss = out.loss.double_value(&[]);
        if let Some(d) = dist {
            // The global batch's scalars: the mean of the ranks' means.
            let t0 = Instant::now();
            let mut vals = vec![loss];
            vals.extend(out.metrics.iter().map(|(_, v)| *v));
            let t = Tensor::from_slice(&vals).to_device(d.device());
            d.all_reduce_mean(std::slice::from_ref(&t))?;
            let vals = Vec::<f64>::try_from(&t.to_device(tch::Device::Cpu))?;
            loss = vals[0];
            for ((_, v), m) in out.metrics.iter_mut().zip(&vals[1..]) {
                *v = *m;
            }
            comm_s += t0.elapsed().as_secs_f64();
        }
        if !loss.is_finite() {
            bar.abandon();
            bail!(
                "loss is {loss} at step {step}: training stopped; the last good checkpoint (step {last_ckpt}) is kept in {}",
                dir.display()
            );
        }
        if out.loss.requires_grad() {
            out.loss.backward();
        }
        if let Some(d) = dist {
            // Data parallel: the global batch's gradient (after every micro-batch's backward).
            let t0 = Instant::now();
            d.all_reduce_mean(&opt.grads())?;
            comm_s += t0.elapsed().as_secs_f64();
        }
        let norm = opt.clip_grad_norm(cfg.grad_clip.unwrap_or(f64::INFINITY));
        if !norm.is_finite() {
            bar.abandon();
            bail!(
                "gradient norm is {norm} at step {step}: training stopped; the last good checkpoint (step {last_ckpt}) is kept in {}",
                dir.display()
            );
        }
        opt.step(cfg.lr_at(step));
        window.push(loss);
        for (k, v) in out.metrics {
            match extra.iter_mut().find(|(n, _)| *n == k) {
                Some(e) => e.1 += v,
                None => extra.push((k, v)),
            }
        }
        let done = step + 1;
        bar.set_position(done);
        if done % cfg.log_every == 0 || done == cfg.steps {
            let n = window.len() as f64;
            let mean = window.iter().sum::<f64>() / n;
            let mut line = serde_json::json!({
                "step": done, "loss": mean, "lr": cfg.lr_at(step), "grad_norm": norm,
                "elapsed_s": begin.elapsed().as_secs_f64(),
            });
            for (k, v) in &extra {
                line[*k] = serde_json::json!(v / n);
            }
            if let Some(d) = dist {
                line["world_size"] = serde_json::json!(d.world());
                line["comm_s"] = serde_json::json!(comm_s / n);
            }
            if main {
                append_line(&metrics_path, &line)?;
            }
            bar.set_message(format!("{label} loss {mean:.4}"));
            losses.push((done, mean));
            window.clear();
            extra.clear();
            comm_s = 0.0;
        }
        if main && (done % cfg.checkpoint_every == 0 || done == cfg.steps) {
            save_checkpoint(&ckpt, config, cfg, vs, &opt, done)?;
            last_ckpt = done;
        }
    }
    if let Some(d) = dist {
        // Every rank must end with rank 0's weights (same broadcast start, same averaged
        // gradients, same updates); this also keeps everyone until rank 0's last checkpoint is
        // written (a failure there fails all).
        d.agree(weights_fingerprint(&opt)?, "the trained weights")?;
    }
    bar.finish_and_clear();
    Ok(Summary {
        start_step: start,
        steps: cfg.steps,
        losses,
        seconds: begin.elapsed().as_secs_f64(),
    })
}

/// FNV-1a of every optimized parameter's f32 bytes, in name order.
fn weights_fingerprint(opt: &AdamW) -> Result<i64> {
    let mut bytes = Vec::new();
    for (_, p) in opt.params() {
        let v = Vec::<f32>::try_from(p.detach().to_device(tch::Device::Cpu).flatten(0, -1))?;
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    Ok(fingerprint(&bytes))
}

/// Rank 0's start of a run in `dir`: a fresh run (no checkpoint; an old metrics log removed)
/// or, with `resume`, the checkpoint's weights, moments and step. Returns the start step.
fn prepare_run(
    dir: &Path,
    cfg: &LoopConfig,
    config: &serde_json::Value,
    vs: &mut VarStore,
    opt: &mut AdamW,
    resume: bool,
) -> Result<u64> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ckpt = checkpoint_path(dir);
    let metrics_path = dir.join("metrics.jsonl");
    let mut start = 0;
    if ckpt.exists() {
        if !resume {
            bail!(
                "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                dir.display()
            );
        }
        start = load_checkpoint(&ckpt, config, cfg, vs, opt)?;
        truncate_metrics(&metrics_path, start)?;
    } else if metrics_path.exists() {
        std::fs::remove_file(&metrics_path).ok();
    }
    Ok(start)
}

fn save_checkpoint(
    path: &Path,
    config: &serde_json::Value,
    loop_cfg: &LoopConfig,
    vs: &VarStore,
    opt: &AdamW,
    step: u64,
) -> Result<()> {
    let mut tensors = crate::io::safetensors::sorted_variables(vs);
    tensors.extend(opt.state());
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = [
        ("format".to_string(), "loracast-checkpoint-v1".to_string()),
        ("step".to_string(), step.to_string()),
        ("config".to_string(), config.to_string()),
        ("loop".to_string(), serde_json::to_string(loop_cfg)?),
    ]
    .into_iter()
    .collect();
    save(&tensors, Kind::Float, Some(meta), path)
}

/// Restores weights and optimizer state; returns the step to continue from.
fn load_checkpoint(
    path: &Path,
    config: &serde_json::Value,
    loop_cfg: &LoopConfig,
    vs: &mut VarStore,
    opt: &mut AdamW,
) -> Result<u64> {
    let file = SafeTensorsFile::open(path)?;
    let meta = file.metadata()?.unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some("loracast-checkpoint-v1") {
        bail!("{} is not a loracast training checkpoint", path.display());
    }
    let step: u64 = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}: no step in the metadata", path.display()))?;
    let saved: serde_json::Value = meta
        .get("config")
        .and_then(|c| serde_json::from_str(c).ok())
        .with_context(|| format!("{}: no config in the metadata", path.display()))?;
    if without_steps(&saved) != without_steps(config) {
        bail!(
            "{} was written with a different config; resume with the same config file",
            path.display()
        );
    }
    // The steps so far must have run under the same LR schedule (a run may be extended, or
    // branch into a cooldown, only from its constant phase). Checkpoints written before the
    // `loop` entry existed had no cooldown.
    let saved_loop: LoopConfig = match meta.get("loop") {
        Some(l) => serde_json::from_str(l)
            .with_context(|| format!("{}: unreadable loop config", path.display()))?,
        None => LoopConfig {
            steps: loop_cfg.steps.max(step),
            cooldown: 0,
            ..loop_cfg.clone()
        },
    };
    if let Some(k) = (0..step).find(|&k| saved_loop.lr_at(k) != loop_cfg.lr_at(k)) {
        bail!(
            "{} ran step {k} at LR {} but this config gives {}: a run can only be extended from before its cooldown",
            path.display(),
            saved_loop.lr_at(k),
            loop_cfg.lr_at(k)
        );
    }
    let names = file.names();
    let ignore: Vec<&str> = names
        .iter()
        .filter(|n| n.starts_with("adam_m.") || n.starts_with("adam_v."))
        .map(String::as_str)
        .collect();
    load_strict(vs, std::slice::from_ref(&file), &ignore)?;
    opt.load_state(&file, step as i64)?;
    Ok(step)
}

/// A config with the `steps` and `cooldown` of every loop removed: a run may be resumed with
/// more (or fewer) steps or another cooldown — [`load_checkpoint`] checks the LR schedule of
/// the steps already run instead.
fn without_steps(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let is_loop = map.contains_key("lr") && map.contains_key("warmup");
            map.iter()
                .filter(|(k, _)| !(is_loop && matches!(k.as_str(), "steps" | "cooldown")))
                .map(|(k, x)| (k.clone(), without_steps(x)))
                .collect::<serde_json::Map<_, _>>()
                .into()
        }
        serde_json::Value::Array(xs) => xs.iter().map(without_steps).collect(),
        other => other.clone(),
    }
}

fn append_line(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{value}").with_context(|| format!("cannot write {}", path.display()))
}

/// Drops metric lines written after the checkpoint a run resumes from.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::util::write_atomic(path, kept.as_bytes())
}
