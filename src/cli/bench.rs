//! Benchmarks on random weights, one JSON line each.
//! `loracast bench unet`: the UNet forward on a config; `scripts/bench_unet.py` runs diffusers on
//! the same config and prints the ratio.
//! `loracast bench guidance`: time per denoising step (UNet call + combination) of CFG (2 rows),
//! CFG with a per-sample LoRA, and HM-CFG (3 rows, LoRA on one) — issue 3's ratio.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tch::{nn, Device, Kind, Tensor};

use crate::lora::{LoraSet, LoraWeights};
use crate::models::unet::{AddedCond, ImageTokens, UNet2DConditionModel, UNetCond, UNetConfig};
use crate::pipeline::Guidance;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time UNet2DConditionModel.forward (ε for a batch) with random weights.
    Unet(UNetBenchArgs),
    /// Time one denoising step with CFG vs HM-CFG.
    Guidance(UNetBenchArgs),
}

#[derive(Args, Debug)]
pub struct UNetBenchArgs {
    /// A UNet config.json; `sd15`, `sdxl` or `tiny` for the built-in presets.
    #[arg(long, default_value = "sd15")]
    pub config: String,
    #[arg(long, default_value_t = 1)]
    pub batch: i64,
    /// Latent height = width.
    #[arg(long, default_value_t = 64)]
    pub size: i64,
    #[arg(long, default_value_t = 77)]
    pub tokens: i64,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Time a training step (forward + backward of mean ε²) instead of a forward.
    #[arg(long)]
    pub train: bool,
    /// With IP-Adapter image tokens (this many per row, random to_k_ip/to_v_ip on every attn2).
    #[arg(long, default_value_t = 0)]
    pub ip_tokens: i64,
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Unet(args) => unet(args),
        BenchCommand::Guidance(args) => guidance(args),
    }
}

/// A UNet of the requested config with random weights, and its cross-attention width.
fn random_unet(config: &str) -> Result<(UNet2DConditionModel, nn::VarStore, i64)> {
    let config = match config {
        "sd15" => UNetConfig::sd15(),
        "sdxl" => UNetConfig::sdxl(),
        "tiny" => UNetConfig::tiny(),
        path => {
            let path = PathBuf::from(path);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", path.display()))?;
            UNetConfig::from_json(value)?
        }
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config)?;
    let cross = unet
        .lora_sites()
        .iter()
        .find(|s| s.proj != crate::lora::Proj::Q)
        .map(|s| s.in_features as i64)
        .context("UNet has no cross-attention")?;
    Ok((unet, vs, cross))
}

/// Random conditioning for `b` rows: text states `[b, tokens, cross]`, for an SDXL UNet pooled
/// embeds and 1024² time ids, and `ip_tokens` IP-Adapter image tokens per row.
struct RandomCond {
    text: Tensor,
    added: Option<(Tensor, Tensor)>,
    image: Option<ImageTokens>,
}

impl RandomCond {
    fn new(unet: &UNet2DConditionModel, b: i64, tokens: i64, cross: i64, ip_tokens: i64) -> Self {
        let opts = (Kind::Float, Device::Cpu);
        let image = (ip_tokens > 0).then(|| {
            let weights = unet
                .lora_sites()
                .iter()
                .filter(|s| s.proj == crate::lora::Proj::K)
                .map(|s| {
                    let shape = [s.out_features as i64, cross];
                    let w = || Tensor::randn(shape, opts) * 0.05;
                    (s.transformer, (w(), w()))
                })
                .collect();
            ImageTokens {
                tokens: Tensor::randn([b, ip_tokens, cross], opts),
                scale: Tensor::ones([b], opts),
                weights: std::rc::Rc::new(weights),
            }
        });
        Self {
            image,
            text: Tensor::randn([b, tokens, cross], opts),
            added: unet.added_embedding().map(|a| {
                let ids = Tensor::from_slice(&[1024f32, 1024., 0., 0., 1024., 1024.]);
                (
                    Tensor::randn([b, a.pooled_dim()], opts),
                    ids.unsqueeze(0).repeat([b, 1]),
                )
            }),
        }
    }

    fn cond(&self) -> UNetCond<'_> {
        UNetCond {
            image: self.image.as_ref(),
            text: &self.text,
            added: self.added.as_ref().map(|(p, ids)| AddedCond {
                text_embeds: p,
                time_ids: ids,
            }),
        }
    }
}

/// Median seconds of `f` over `iters` runs after `warmup`.
fn median_time(warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..warmup + iters {
        let start = Instant::now();
        f()?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn guidance(args: UNetBenchArgs) -> Result<()> {
    let (unet, _vs, cross) = random_unet(&args.config)?;
    let opts = (Kind::Float, Device::Cpu);
    // The paper's rank-3 LoRA on every attn2 q/k/v.
    let mut lora = LoraSet::default();
    for site in unet.lora_sites() {
        let (i, o) = (site.in_features as i64, site.out_features as i64);
        let w = LoraWeights {
            a: Tensor::randn([3, i], opts) * 0.1,
            b: Tensor::randn([o, 3], opts) * 0.1,
            alpha: 3.0,
        };
        lora.weights.insert(*site, w);
    }
    let c = unet.config.in_channels;
    let x = Tensor::randn([1, c, args.size, args.size], opts);
    let t = Tensor::from(500.0f32);
    let step = |guidance: Guidance, rows: &[Option<(&LoraSet, f64)>]| -> Result<f64> {
        let n = rows.len() as i64;
        let cond = RandomCond::new(&unet, n, args.tokens, cross, args.ip_tokens);
        let batch = rows
            .iter()
            .any(Option::is_some)
            .then(|| LoraSet::batch(rows));
        tch::no_grad(|| {
            median_time(args.warmup, args.iters, || {
                let xs = x.expand([n, -1, -1, -1], false).contiguous();
                let eps = unet.forward_cond(&xs, &t, &cond.cond(), batch.as_ref())?;
                let _ = guidance.combine(&eps).sum(Kind::Float).double_value(&[]);
                Ok(())
            })
        })
    };
    let g = 7.5;
    let cfg = step(Guidance::Cfg { scale: g }, &[None, None])?;
    let cfg_lora = step(
        Guidance::Cfg { scale: g },
        &[Some((&lora, 1.0)), Some((&lora, 1.0))],
    )?;
    let hm = step(
        Guidance::HmCfg {
            scale: g,
            kappa: 1.0,
        },
        &[None, None, Some((&lora, 1.0))],
    )?;
    println!(
        "{}",
        serde_json::json!({
            "config": args.config, "size": args.size, "threads": tch::get_num_threads(),
            "cfg_s": cfg, "cfg_lora_s": cfg_lora, "hm_cfg_s": hm,
            "hm_over_cfg": hm / cfg, "hm_over_cfg_lora": hm / cfg_lora,
        })
    );
    Ok(())
}

fn unet(args: UNetBenchArgs) -> Result<()> {
    let (unet, vs, cross) = random_unet(&args.config)?;
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn(
        [args.batch, unet.config.in_channels, args.size, args.size],
        opts,
    );
    let t = Tensor::full([args.batch], 500.0, opts);
    let cond = RandomCond::new(&unet, args.batch, args.tokens, cross, args.ip_tokens);
    let median = if args.train {
        median_time(args.warmup, args.iters, || {
            let loss = unet
                .forward_cond(&x, &t, &cond.cond(), None)?
                .square()
                .mean(Kind::Float);
            loss.backward();
            let _ = loss.double_value(&[]);
            Ok(())
        })?
    } else {
        tch::no_grad(|| {
            median_time(args.warmup, args.iters, || {
                let eps = unet.forward_cond(&x, &t, &cond.cond(), None)?;
                let _ = eps.sum(Kind::Float).double_value(&[]);
                Ok(())
            })
        })?
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": "loracast", "batch": args.batch, "size": args.size, "train": args.train,
            "ip_tokens": args.ip_tokens,
            "threads": tch::get_num_threads(), "median_s": median,
            "params": vs.variables().values().map(|v| v.numel()).sum::<usize>(),
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

/// This process's peak resident set (`VmHWM` of /proc/self/status) in MiB, if known.
pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
