//! `loracast finetune --base B --image I … --out L`: the DreamBooth-LoRA baseline (a LoRA trained
//! on the subject's images through the frozen model), and with `--init-lora` HyperDreamBooth's
//! rank-relaxed fast finetuning (the given LoRA frozen, a fresh `--rank` LoRA trained on top,
//! the sum exported as one LoRA). Writes diffusers-PEFT (default) or kohya.
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;

use crate::io::preprocess::RgbImage;
use crate::lora::format::{layers_per_block, read_lora, write_lora, LoraFormat};
use crate::lora::lidb::LidbConfig;
use crate::pipeline::StableDiffusion;
use crate::train::finetune::{finetune_lora, toy_prior, Examples, FinetuneConfig};
use crate::train::target_tensor;

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// Base model: a diffusers SD1.x folder, or `toy`.
    #[arg(long)]
    pub base: PathBuf,
    /// An image of the subject (PNG or JPEG); repeat for several.
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// Output LoRA file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Prompt of the subject images (DreamBooth's "a [V] [class]").
    #[arg(long, default_value = "a sks creature")]
    pub prompt: String,
    /// LoRA rank (with --init-lora: the rank of the LoRA trained on top).
    #[arg(long, default_value_t = 4)]
    pub rank: i64,
    /// LoRA alpha (default: the rank, i.e. scale 1).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 400)]
    pub steps: u64,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub warmup: u64,
    /// Subject images per step (drawn with replacement).
    #[arg(long, default_value_t = 4)]
    pub batch: i64,
    /// Prior preservation: a folder of class images (prompt --class-prompt), or `toy` (renders of
    /// train-split subjects with their captions).
    #[arg(long = "prior-preservation", alias = "class-data")]
    pub prior: Option<PathBuf>,
    /// Prompt of the class images.
    #[arg(long, default_value = "a creature")]
    pub class_prompt: String,
    /// γ: weight of the prior-preservation loss.
    #[arg(long, default_value_t = 1.0)]
    pub prior_weight: f64,
    /// Weight of the unconditional-preservation loss (the LoRA leaves the empty prompt's ε as
    /// the base model has it, so CFG amplifies what the LoRA adds to the prompt).
    #[arg(long, default_value_t = 0.0)]
    pub null_weight: f64,
    /// Lightweight DreamBooth (HyperDreamBooth §4.1): train in random subspaces of sizes
    /// `A,B` (input, output side; e.g. `100,50` on SD), bases seeded by --lidb-seed.
    #[arg(long, value_name = "A,B")]
    pub lidb: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub lidb_seed: u64,
    /// Fast finetuning: start from this LoRA (e.g. from `personalize`), kept frozen.
    #[arg(long)]
    pub init_lora: Option<PathBuf>,
    /// peft (diffusers) or kohya.
    #[arg(long, default_value = "peft")]
    pub format: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Overwrite --out if it exists.
    #[arg(long)]
    pub force: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(args: FinetuneArgs) -> Result<()> {
    super::train::single_process("finetune")?;
    let out = super::check_output(&args.out, "safetensors", args.force)?;
    let format = LoraFormat::from_cli_name(&args.format)?;
    let device = super::parse_device(&args.device)?;
    let cfg = FinetuneConfig {
        rank: args.rank,
        alpha: args.alpha,
        steps: args.steps,
        lr: args.lr,
        warmup: args.warmup,
        batch: args.batch,
        prior_weight: args.prior_weight,
        seed: args.seed,
        null_weight: args.null_weight,
        lidb: match &args.lidb {
            Some(dims) => Some(parse_lidb(dims, args.lidb_seed)?),
            None => None,
        },
    };
    cfg.validate()?;
    // Every input is decoded and checked before the model loads.
    let images = super::read_subject_images(&args.images)?;
    let base = crate::toy::resolve_base(&args.base)?;
    let sd = StableDiffusion::load(&base, device)?;
    let size = sd.default_size();
    let init = match &args.init_lora {
        Some(p) => {
            let lpb = layers_per_block(&sd.unet.config);
            let (set, _info) = read_lora(p, Some(sd.unet.lora_sites()), lpb)
                .with_context(|| format!("--init-lora {}", p.display()))?;
            Some(set)
        }
        None => None,
    };
    let prior = match &args.prior {
        None => None,
        Some(p) if p.to_str() == Some(crate::toy::NAME) => Some(toy_prior(args.seed ^ 0xC1A55, 64)),
        Some(dir) => {
            let paths = crate::io::folder::list_images(dir)
                .with_context(|| format!("--prior-preservation {}", dir.display()))?;
            if paths.is_empty() {
                anyhow::bail!("--prior-preservation {}: no PNG/JPEG images", dir.display());
            }
            let imgs = paths
                .iter()
                .map(|p| target_tensor(&RgbImage::open(p)?, size))
                .collect::<Result<Vec<_>>>()?;
            Some(Examples::with_prompt(imgs, &args.class_prompt))
        }
    };
    let targets = images
        .iter()
        .map(|img| target_tensor(img, size))
        .collect::<Result<Vec<_>>>()?;
    let subject = Examples::with_prompt(targets, &args.prompt);
    let done = finetune_lora(
        &sd,
        &cfg,
        &subject,
        prior.as_ref(),
        init.as_ref(),
        &[],
        true,
    )?;
    write_lora(&done.lora, format, &out)?;
    let first = done.losses.first().copied().unwrap_or(f64::NAN);
    let last = mean_tail(&done.losses, 20);
    eprintln!(
        "wrote {} ({} sites, rank {}) — {} steps in {:.1} s, subject loss {first:.4} → {last:.4} (mean of the last 20)",
        out.display(),
        done.lora.weights.len(),
        done.lora.weights.values().map(|w| w.rank()).max().unwrap_or(0),
        cfg.steps,
        done.seconds
    );
    Ok(())
}

fn mean_tail(v: &[f64], n: usize) -> f64 {
    let tail = &v[v.len().saturating_sub(n)..];
    tail.iter().sum::<f64>() / tail.len().max(1) as f64
}

/// `--lidb A,B` → the LiDB subspace sizes.
fn parse_lidb(dims: &str, seed: u64) -> Result<LidbConfig> {
    let parts: Vec<&str> = dims.split(',').map(str::trim).collect();
    let parsed: Option<Vec<i64>> = parts.iter().map(|p| p.parse().ok()).collect();
    match parsed.as_deref() {
        Some(&[a, b]) if a >= 1 && b >= 1 => Ok(LidbConfig { a, b, seed }),
        _ => anyhow::bail!("--lidb takes two positive integers A,B (e.g. 100,50), got {dims:?}"),
    }
}
