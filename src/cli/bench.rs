//! `loracast bench unet`: times the UNet forward on a given config (random weights) and prints
//! one JSON line. `scripts/bench_unet.py` runs diffusers on the same config and prints the ratio.
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use tch::{nn, Device, Kind, Tensor};

use crate::models::unet::{UNet2DConditionModel, UNetConfig};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time UNet2DConditionModel.forward (ε for a batch) with random weights.
    Unet(UNetBenchArgs),
}

#[derive(Args, Debug)]
pub struct UNetBenchArgs {
    /// A UNet config.json; `sd15` or `tiny` for the built-in presets.
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
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Unet(args) => unet(args),
    }
}

fn unet(args: UNetBenchArgs) -> Result<()> {
    let config = match args.config.as_str() {
        "sd15" => UNetConfig::sd15(),
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
    let opts = (Kind::Float, Device::Cpu);
    let x = Tensor::randn([args.batch, config.in_channels, args.size, args.size], opts);
    let t = Tensor::full([args.batch], 500.0, opts);
    let ctx = Tensor::randn([args.batch, args.tokens, cross], opts);
    let mut times = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for i in 0..args.warmup + args.iters {
            let start = Instant::now();
            let eps = unet.forward(&x, &t, &ctx, None)?;
            let _ = eps.sum(Kind::Float).double_value(&[]);
            if i >= args.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        Ok(())
    })?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "impl": "loracast", "batch": args.batch, "size": args.size,
            "threads": tch::get_num_threads(), "median_s": median, "mean_s": mean,
            "params": vs.variables().values().map(|v| v.numel()).sum::<usize>(),
        })
    );
    Ok(())
}
