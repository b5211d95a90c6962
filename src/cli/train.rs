//! `loracast train base|evaluators --config FILE --out DIR [--resume]`: the toy world's
//! training recipes (configs in configs/toy/). Progress bars, metrics logs, atomic checkpoints,
//! exact resume after a kill, NaN guard.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;

use crate::train::base::{train_base, BaseConfig};
use crate::train::evaluators::{train_evaluators, EvaluatorsConfig};

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// The toy-world base model (VAE, CLIP text encoder, UNet) → DIR/model (diffusers folder).
    Base(TrainArgs),
    /// The toy-world evaluators (identity and context classifiers) → DIR/*.safetensors.
    Evaluators(EvaluatorArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its checkpoints.
    #[arg(long)]
    pub resume: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Args, Debug)]
pub struct EvaluatorArgs {
    #[command(flatten)]
    pub common: TrainArgs,
    /// The trained base model folder whose VAE round trips the evaluators learn.
    #[arg(long)]
    pub vae: PathBuf,
}

fn read_config<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --config {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("--config {}", path.display()))
}

pub fn run(cmd: TrainCommand) -> Result<()> {
    let start = Instant::now();
    match cmd {
        TrainCommand::Base(args) => {
            let cfg: BaseConfig = read_config(&args.config)?;
            cfg.vae_loop.validate()?;
            cfg.unet_loop.validate()?;
            let device = super::parse_device(&args.device)?;
            let out = train_base(&cfg, &args.out, args.resume, device)?;
            eprintln!(
                "wrote {} in {:.1} min",
                out.display(),
                start.elapsed().as_secs_f64() / 60.0
            );
        }
        TrainCommand::Evaluators(args) => {
            let cfg: EvaluatorsConfig = read_config(&args.common.config)?;
            let device = super::parse_device(&args.common.device)?;
            let report = train_evaluators(
                &cfg,
                &args.vae,
                &args.common.out,
                args.common.resume,
                device,
            )?;
            eprintln!("{}", std::fs::read_to_string(&report)?);
            eprintln!(
                "wrote {} in {:.1} min",
                args.common.out.display(),
                start.elapsed().as_secs_f64() / 60.0
            );
        }
    }
    Ok(())
}
