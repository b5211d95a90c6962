//! Per-subject LoRA finetuning: the DreamBooth-LoRA baseline (paper §5, Tables 2/3; diffusers'
//! `train_dreambooth_lora.py`) and HyperDreamBooth's rank-relaxed fast finetuning
//! (hyperdreambooth §4.3: start from the hypernetwork's prediction, train a higher-rank LoRA
//! for a few steps).
//!
//! 1. The subject's images (and the class images for prior preservation) are encoded once:
//!    VAE latent means × scaling factor, CLIP embeddings of their prompts (all frozen).
//! 2. A fresh LoRA on every attn2 `to_q/to_k/to_v` site, initialised as PEFT does:
//!    A ~ kaiming-uniform(a = √5) = U(±1/√in), B = 0 (so ΔW = 0 at step 0), scale alpha/r.
//! 3. Each step: a batch of subject rows drawn with replacement, ε-MSE at t ~ U{0..T−1}
//!    (diffusers' DDPM noising); with prior preservation the same number of class rows,
//!    L = L_subject + γ·L_prior (DreamBooth eq. 2). AdamW, constant LR after warm-up.
//! 4. LiDB (`lidb`, hyperdreambooth §4.1): the trained factors are T_A `[r, a]`, T_B `[b, r]` in
//!    frozen random subspaces, A = T_A·P_A, B = P_B·T_B ([`crate::lora::lidb`]); same init rule.
//! 5. With an initial LoRA (fast finetuning) that LoRA is frozen and added to the trained one:
//!    per site `A = [A₀; A₁]`, `B = [s₀B₀, s₁B₁]`, alpha = r₀ + r₁, so one LoRA of rank r₀ + r₁
//!    holds exactly ΔW₀ + ΔW₁ — that is what is trained through and exported.
//!
//! Every random draw of step k comes from `step_seed(seed, k)`: same seed + thread count →
//! same bytes.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tch::{nn, Kind, Tensor};

use super::{step_seed, AdamW, DenoiseRows};
use crate::data::Rng;
use crate::lora::lidb::{LidbBasis, LidbConfig};
use crate::lora::{LoraBatch, LoraDelta, LoraSet, LoraSite, LoraWeights};
use crate::pipeline::StableDiffusion;

/// Hyper-parameters of one finetuning run.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneConfig {
    /// Rank of the trained LoRA (r₁ when an initial LoRA is given).
    pub rank: i64,
    /// LoRA alpha (PEFT's `lora_alpha`); `None` = rank (scale 1).
    pub alpha: Option<f64>,
    pub steps: u64,
    pub lr: f64,
    pub warmup: u64,
    /// Subject rows per step.
    pub batch: i64,
    /// γ: weight of the prior-preservation loss (used when class images are given).
    pub prior_weight: f64,
    pub seed: u64,
    /// Weight of the unconditional-preservation loss: the LoRA model's ε on the empty prompt
    /// should equal the frozen model's on the same noisy subject rows (0 = off).
    pub null_weight: f64,
    /// Train in LiDB's random subspace (hyperdreambooth §4.1) instead of full LoRA factors.
    pub lidb: Option<LidbConfig>,
}

impl FinetuneConfig {
    /// Defaults sized for the toy world (DreamBooth-LoRA: rank 4, 1e-3 AdamW, batch 4).
    pub fn toy(steps: u64) -> Self {
        Self {
            rank: 4,
            alpha: None,
            steps,
            lr: 1e-3,
            warmup: 0,
            batch: 4,
            prior_weight: 1.0,
            seed: 0,
            null_weight: 0.0,
            lidb: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank < 1 {
            bail!("--rank must be ≥ 1, got {}", self.rank);
        }
        if self.steps == 0 || self.batch < 1 {
            bail!("--steps and --batch must be ≥ 1");
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if let Some(a) = self.alpha {
            if !(a.is_finite() && a > 0.0) {
                bail!("--alpha must be a positive number, got {a}");
            }
        }
        if !(self.prior_weight.is_finite() && self.prior_weight >= 0.0) {
            bail!("--prior-weight must be finite and ≥ 0");
        }
        if !(self.null_weight.is_finite() && self.null_weight >= 0.0) {
            bail!("--null-weight must be finite and ≥ 0");
        }
        if let Some(l) = &self.lidb {
            l.validate()?;
        }
        Ok(())
    }
}

/// Training images with their prompts: `[3, H, W]` in [-1, 1] at the model's size.
pub struct Examples {
    pub images: Vec<Tensor>,
    pub prompts: Vec<String>,
}

impl Examples {
    /// One prompt for every image.
    pub fn with_prompt(images: Vec<Tensor>, prompt: &str) -> Self {
        let prompts = vec![prompt.to_string(); images.len()];
        Self { images, prompts }
    }
}

/// The result of [`finetune_lora`].
pub struct Finetuned {
    /// The trained LoRA (including the frozen initial LoRA, when one was given).
    pub lora: LoraSet,
    /// `(step count, LoRA, seconds so far)` at every requested snapshot.
    pub snapshots: Vec<(u64, LoraSet, f64)>,
    /// Subject loss of every step.
    pub losses: Vec<f64>,
    /// The trained factors per site, in site order: (A `[r, in]`, B `[out, r]`), or with LiDB
    /// (T_A `[r, a]`, T_B `[b, r]`) — the pre-optimised weights a LiDB hypernetwork learns.
    pub factors: Vec<(Tensor, Tensor)>,
    pub seconds: f64,
}

/// Frozen latents `[N, C, h, w]` and text embeddings `[N, 77, D]` of some examples.
fn encode(sd: &StableDiffusion, ex: &Examples) -> Result<(Tensor, Tensor)> {
    if ex.images.is_empty() || ex.images.len() != ex.prompts.len() {
        bail!("finetuning needs at least one image, each with a prompt");
    }
    tch::no_grad(|| {
        let x = Tensor::stack(&ex.images, 0).to_device(sd.device);
        let z = sd.vae.encode(&x)?.mean * sd.vae.config().scaling_factor;
        let texts: Vec<&str> = ex.prompts.iter().map(String::as_str).collect();
        let ids = sd.tokenizer.encode_batch(&texts).to_device(sd.device);
        Ok((z, sd.text_encoder.forward(&ids)?))
    })
}

/// One site's trainable factors (and the frozen initial ones).
struct SiteParams {
    site: LoraSite,
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// `(A₀ [r₀, in], s₀·B₀ [out, r₀])` of the initial LoRA.
    init: Option<(Tensor, Tensor)>,
    /// LiDB's frozen bases `(P_A [a, in], P_B [out, b])`: then `a`, `b` are T_A, T_B.
    basis: Option<(Tensor, Tensor)>,
}

impl SiteParams {
    /// The trained LoRA's own factors `(A [r, in], B [out, r])` (LiDB: T_A·P_A, P_B·T_B).
    fn factors(&self) -> (Tensor, Tensor) {
        match &self.basis {
            None => (self.a.shallow_clone(), self.b.shallow_clone()),
            Some((pa, pb)) => (self.a.matmul(pa), pb.matmul(&self.b)),
        }
    }

    /// `(A, B)` of the summed LoRA at scale 1: `[r₀+r₁, in]`, `[out, r₀+r₁]`.
    fn combined(&self) -> (Tensor, Tensor) {
        let (a1, b1) = self.factors();
        let b1 = b1 * self.scale;
        match &self.init {
            None => (a1, b1),
            Some((a0, b0)) => (Tensor::cat(&[a0, &a1], 0), Tensor::cat(&[b0, &b1], 1)),
        }
    }
}

/// Finetunes a LoRA on `subject` (+ `prior` class examples) through the frozen model; the LoRA
/// after each step count in `snapshots` is kept too (the same run, not one run per count).
pub fn finetune_lora(
    sd: &StableDiffusion,
    cfg: &FinetuneConfig,
    subject: &Examples,
    prior: Option<&Examples>,
    init: Option<&LoraSet>,
    snapshots: &[u64],
    progress: bool,
) -> Result<Finetuned> {
    cfg.validate()?;
    let device = sd.device;
    let sites = sd.unet.lora_sites().to_vec();
    if let Some(init) = init {
        init.validate(&sites)?;
        if cfg.lidb.is_some() {
            bail!("LiDB finetuning starts from zero: it takes no initial LoRA");
        }
    }
    let basis = match cfg.lidb {
        Some(l) => Some(LidbBasis::new(l, &sites, device)?),
        None => None,
    };
    let start = std::time::Instant::now();
    // 1. Frozen encodings.
    let (z_subj, c_subj) = encode(sd, subject)?;
    let prior = match prior {
        Some(p) if cfg.prior_weight > 0.0 => Some(encode(sd, p)?),
        _ => None,
    };
    let c_null = match cfg.null_weight > 0.0 {
        true => Some(tch::no_grad(|| sd.encode_text("", None, None))?),
        false => None,
    };
    let noise_cfg = crate::diffusion::SchedulerConfig::for_training(&sd.scheduler_json)?;
    let schedule = crate::diffusion::NoiseSchedule::new(&noise_cfg)?;
    let n_train = schedule.num_train_timesteps() as i64;

    let _rng = crate::util::rng_lock();
    tch::manual_seed(cfg.seed as i64);
    // 2. Fresh LoRA factors (PEFT init).
    let vs = nn::VarStore::new(device);
    let root = vs.root();
    let mut params = Vec::new();
    for (k, site) in sites.iter().enumerate() {
        // LiDB trains T_A [r, a], T_B [b, r] in the site's subspace (same init rule).
        let basis = basis
            .as_ref()
            .map(|l| (l.bases[k].0.shallow_clone(), l.bases[k].1.shallow_clone()));
        let (i, o) = match &basis {
            Some((pa, pb)) => (pa.size()[0], pb.size()[1]),
            None => (site.in_features as i64, site.out_features as i64),
        };
        let path = &root / site.module_path().replace('.', "_");
        let bound = 1.0 / (i as f64).sqrt();
        let a = path.var(
            "lora_A",
            &[cfg.rank, i],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let b = path.var("lora_B", &[o, cfg.rank], nn::Init::Const(0.0));
        let init = init.and_then(|s| s.weights.get(site)).map(|w| {
            (
                w.a.to_device(device).to_kind(Kind::Float),
                w.b.to_device(device).to_kind(Kind::Float) * w.scale(),
            )
        });
        params.push(SiteParams {
            site: *site,
            a,
            b,
            scale: cfg.alpha.unwrap_or(cfg.rank as f64) / cfg.rank as f64,
            init,
            basis,
        });
    }
    let mut opt = AdamW::new(&vs, 0.0);

    let bar = if progress {
        let bar = ProgressBar::new(cfg.steps);
        bar.set_style(
            ProgressStyle::with_template(
                "finetune {bar:30} {pos}/{len} loss {msg} [{elapsed}<{eta}]",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let n_subj = z_subj.size()[0] as usize;
    let mut losses = Vec::with_capacity(cfg.steps as usize);
    let mut taken = Vec::new();
    for step in 0..cfg.steps {
        let seed = step_seed(cfg.seed, step);
        tch::manual_seed(seed as i64);
        let mut rng = Rng::new(seed);
        // 3. Subject rows (with replacement), then as many class rows.
        let mut rows: Vec<i64> = (0..cfg.batch).map(|_| rng.below(n_subj) as i64).collect();
        let idx = Tensor::from_slice(&rows).to_device(device);
        let (mut z, mut c) = (z_subj.index_select(0, &idx), c_subj.index_select(0, &idx));
        if let Some((zp, cp)) = &prior {
            let n = zp.size()[0] as usize;
            rows = (0..cfg.batch).map(|_| rng.below(n) as i64).collect();
            let idx = Tensor::from_slice(&rows).to_device(device);
            z = Tensor::cat(&[z, zp.index_select(0, &idx)], 0);
            c = Tensor::cat(&[c, cp.index_select(0, &idx)], 0);
        }
        let n = z.size()[0];
        let t = Tensor::randint(n_train, [n], (Kind::Int64, device));
        let noise = z.randn_like();
        let mut dn = DenoiseRows {
            noisy: schedule.add_noise(&z, &noise, &t)?,
            target: schedule.target(&z, &noise, &t)?,
            t,
            ctx: c,
            added: None,
            image: None,
        };
        if let Some(cn) = &c_null {
            // Unconditional preservation: the subject rows again with the empty prompt.
            dn.append_null_rows(sd, cn, cfg.batch)?;
        }
        let n = dn.noisy.size()[0];
        let mut lora = LoraBatch::new();
        for p in &params {
            let (a, b) = p.combined();
            lora.insert(
                p.site,
                LoraDelta {
                    // one LoRA for every row: [1, r, in], [1, out, r]
                    a: a.unsqueeze(0),
                    b: b.unsqueeze(0),
                    scale: Tensor::ones([n], (Kind::Float, device)),
                },
            );
        }
        let pred = sd.unet.forward(&dn.noisy, &dn.t, &dn.ctx, Some(&lora))?;
        // [N, C, h, w] → per-row MSE [N]
        let per_row = (pred - &dn.target)
            .square()
            .flatten(1, -1)
            .mean_dim(1, false, Kind::Float);
        let l_subj = per_row.narrow(0, 0, cfg.batch).mean(Kind::Float);
        let mut loss = l_subj.shallow_clone();
        if prior.is_some() {
            loss += per_row.narrow(0, cfg.batch, cfg.batch).mean(Kind::Float) * cfg.prior_weight;
        }
        if c_null.is_some() {
            let first = n - cfg.batch;
            loss += per_row.narrow(0, first, cfg.batch).mean(Kind::Float) * cfg.null_weight;
        }
        let value = l_subj.double_value(&[]);
        if !loss.double_value(&[]).is_finite() {
            bail!("finetuning diverged at step {step} (loss is NaN/Inf): lower --lr");
        }
        opt.zero_grad();
        loss.backward();
        let lr = cfg.lr * ((step + 1) as f64 / cfg.warmup.max(1) as f64).min(1.0);
        opt.step(lr);
        losses.push(value);
        if snapshots.contains(&(step + 1)) {
            taken.push((
                step + 1,
                export(&params, cfg),
                start.elapsed().as_secs_f64(),
            ));
        }
        bar.set_message(format!("{value:.4}"));
        bar.inc(1);
    }
    bar.finish_and_clear();

    let lora = export(&params, cfg);
    let factors = tch::no_grad(|| {
        params
            .iter()
            .map(|p| {
                (
                    p.a.detach().to_device(tch::Device::Cpu).copy(),
                    p.b.detach().to_device(tch::Device::Cpu).copy(),
                )
            })
            .collect()
    });
    Ok(Finetuned {
        lora,
        snapshots: taken,
        losses,
        factors,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// 5. The LoRA as it stands (the summed LoRA at scale 1 when an initial LoRA was given).
fn export(params: &[SiteParams], cfg: &FinetuneConfig) -> LoraSet {
    let mut weights = BTreeMap::new();
    tch::no_grad(|| {
        for p in params {
            // Without an initial LoRA: the factors as trained, with the user's alpha.
            let (a, b, alpha) = match p.init {
                None => {
                    let (a, b) = p.factors();
                    (a, b, cfg.alpha.unwrap_or(cfg.rank as f64))
                }
                Some(_) => {
                    let (a, b) = p.combined();
                    let rank = a.size()[0] as f64;
                    (a, b, rank)
                }
            };
            weights.insert(
                p.site,
                LoraWeights {
                    // copies: the variables keep training after a snapshot
                    a: a.detach().to_device(tch::Device::Cpu).copy(),
                    b: b.detach().to_device(tch::Device::Cpu).copy(),
                    alpha,
                },
            );
        }
    });
    LoraSet { weights }
}

/// Prior-preservation examples for the toy world: renders of `n` train-split subjects with
/// their captions (the class's own prompts; held-out identities are never drawn).
pub fn toy_prior(seed: u64, n: usize) -> Examples {
    let mut world = crate::data::World::new(seed);
    let (mut images, mut prompts) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let s = world.sample(crate::data::Split::Train);
        images.push(s.render().to_tensor());
        prompts.push(s.context.caption());
    }
    Examples { images, prompts }
}
