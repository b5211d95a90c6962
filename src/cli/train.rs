//! `loracast train base|evaluators|encoder|hypernet --config FILE --out DIR [--resume]`: the toy world's
//! training recipes (configs in configs/toy/). Progress bars, metrics logs, atomic checkpoints,
//! exact resume after a kill, NaN guard.
//!
//! `train hypernet` trains data parallel (issue #18, docs/SCALING.md) under torchrun
//! (`torchrun --nproc-per-node N --no-python loracast train hypernet …`: the `RANK`/`WORLD_SIZE`/
//! `MASTER_ADDR`/`MASTER_PORT` environment) or with `--nproc N` (N local workers on 127.0.0.1).
//! The other recipes run in one process and refuse a torchrun environment with more than one.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde::de::DeserializeOwned;

use crate::dist::{launch, Backend, Dist, Topology};
use crate::train::base::{train_base, BaseConfig};
use crate::train::encoder::{train_encoder, EncoderConfig};
use crate::train::evaluators::{train_evaluators, EvaluatorsConfig};
use crate::train::hypernet::{train_hypernet_dist, HypernetJob, HypernetTrainConfig, TrainData};
use crate::train::ip_adapter::{train_ip_adapter, IpAdapterJob, IpAdapterTrainConfig};

#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// The toy-world base model (VAE, CLIP text encoder, UNet) → DIR/model (diffusers folder).
    Base(TrainArgs),
    /// The toy-world evaluators (identity and context classifiers) → DIR/*.safetensors.
    Evaluators(EvaluatorArgs),
    /// The toy world's image encoder (self-supervised ViT) → DIR/encoder (transformers layout).
    Encoder(TrainArgs),
    /// The hypernetwork, end to end through a frozen base → DIR/hypernet.safetensors.
    Hypernet(HypernetArgs),
    /// An IP-Adapter-Plus for a frozen base, by image reconstruction with its caption (image and
    /// text dropped at random) → DIR/ip_adapter.safetensors (h94 layout) + DIR/image_encoder.
    IpAdapter(IpAdapterArgs),
}

#[derive(Args, Debug)]
pub struct IpAdapterArgs {
    #[command(flatten)]
    pub common: TrainArgs,
    /// Base model folder (diffusers layout) or `toy`.
    #[arg(long)]
    pub base: PathBuf,
    /// The frozen CLIPVisionModelWithProjection folder (`train encoder` with a clip_vision
    /// config makes the toy one).
    #[arg(long)]
    pub image_encoder: PathBuf,
    /// `toy` (the toy world's train split: renders with their captions).
    #[arg(long, default_value = "toy")]
    pub data: String,
}

#[derive(Args, Debug)]
pub struct HypernetArgs {
    #[command(flatten)]
    pub common: TrainArgs,
    /// Base model folder (diffusers layout) or `toy`.
    #[arg(long)]
    pub base: PathBuf,
    /// Frozen image encoder: a transformers ViT folder (config.json, model.safetensors,
    /// preprocessor_config.json), e.g. google/vit-base-patch16-224-in21k or `train encoder`'s.
    /// Not with --ip-adapter.
    #[arg(long)]
    pub encoder: Option<PathBuf>,
    /// Open category: θ0 = base + this IP-Adapter-Plus file (h94 layout, or `toy`); the
    /// hypernetwork shares its image encoder and records the file's SHA-256.
    #[arg(long)]
    pub ip_adapter: Option<PathBuf>,
    /// The IP-Adapter's CLIP image encoder folder (default: image_encoder/ beside --ip-adapter).
    #[arg(long)]
    pub image_encoder: Option<PathBuf>,
    /// IP-Adapter scale of θ0 in training (default 1.0; the paper infers at 0.55).
    #[arg(long)]
    pub ip_adapter_scale: Option<f64>,
    /// `toy` (the toy world's train split), a folder of subject folders DIR/<subject>/*.png, or
    /// a `pairs.jsonl` of Subject200K-style pairs: one JSON object per line,
    /// {"input": "a/1.jpg", "target": "a/2.jpg", "caption": "a dog on the beach", "class": "dog"}
    /// (paths relative to the file; the target prompt is the caption with the token before the
    /// class word, or "a <token> <class>, <caption>").
    #[arg(long)]
    pub data: PathBuf,
    /// Class images for prior preservation (gamma > 0) with folder data.
    #[arg(long)]
    pub class_data: Option<PathBuf>,
    /// Override the config's λ (weight of ‖h(x)‖²).
    #[arg(long)]
    pub lambda: Option<f64>,
    #[command(flatten)]
    pub dist: DistArgs,
}

/// Data-parallel training (torch.distributed c10d).
#[derive(Args, Debug)]
pub struct DistArgs {
    /// Train with N local worker processes (127.0.0.1, a free port, the torch threads split
    /// between them). Under torchrun (RANK and WORLD_SIZE set) the environment decides instead.
    #[arg(long, default_value_t = 1)]
    pub nproc: usize,
    /// Collective backend: gloo (CPU), nccl (CUDA; `--features cuda`) or auto.
    #[arg(long, default_value = "auto")]
    pub dist_backend: String,
    /// Seconds to wait for every rank to join and for each collective; a rank that dies or
    /// never joins makes the others fail within it.
    #[arg(long, default_value_t = 300.0)]
    pub dist_timeout: f64,
}

impl DistArgs {
    fn timeout(&self) -> Result<std::time::Duration> {
        if !(self.dist_timeout.is_finite() && self.dist_timeout > 0.0 && self.dist_timeout < 1e7) {
            anyhow::bail!(
                "--dist-timeout {}: expected a positive number of seconds",
                self.dist_timeout
            );
        }
        Ok(std::time::Duration::from_secs_f64(self.dist_timeout))
    }
}

/// Recipes without data parallelism refuse to run as several ranks (they would all write).
pub(crate) fn single_process(recipe: &str) -> Result<()> {
    if let Some(t) = Topology::from_env()? {
        if t.world > 1 {
            anyhow::bail!(
                "`{recipe}` trains in one process; data-parallel training (WORLD_SIZE={}) is implemented for `train hypernet`",
                t.world
            );
        }
    }
    Ok(())
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
            single_process("train base")?;
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
            single_process("train evaluators")?;
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
        TrainCommand::Encoder(args) => {
            single_process("train encoder")?;
            let cfg: EncoderConfig = read_config(&args.config)?;
            cfg.loop_cfg.validate()?;
            let device = super::parse_device(&args.device)?;
            let out = train_encoder(&cfg, &args.out, args.resume, device)?;
            eprintln!(
                "wrote {} in {:.1} min",
                out.display(),
                start.elapsed().as_secs_f64() / 60.0
            );
        }
        TrainCommand::Hypernet(args) => {
            let mut cfg: HypernetTrainConfig = read_config(&args.common.config)?;
            if let Some(l) = args.lambda {
                cfg.lambda = l;
            }
            cfg.validate()
                .with_context(|| format!("--config {}", args.common.config.display()))?;
            let timeout = args.dist.timeout()?;
            let topo = Topology::from_env()?.filter(|t| t.world > 1);
            let world = topo.as_ref().map_or(args.dist.nproc, |t| t.world);
            if world == 0 {
                anyhow::bail!("--nproc must be ≥ 1");
            }
            crate::dist::Shard { rank: 0, world }
                .rows(cfg.batch as usize, "subjects (config `batch`)")
                .with_context(|| format!("--config {}", args.common.config.display()))?;
            let mut device = super::parse_device(&args.common.device)?;
            if let (Some(t), tch::Device::Cuda(_)) = (&topo, device) {
                device = tch::Device::Cuda(t.local_rank);
            }
            let backend = Backend::choose(&args.dist.dist_backend, device)?;
            if topo.is_none() && args.dist.nproc > 1 {
                // The launcher: N copies of this command, each a rank.
                let argv: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
                return launch::spawn_local(args.dist.nproc, &argv);
            }
            let base = crate::toy::resolve_base(&args.base)?;
            let toy = args.data.to_str() == Some(crate::toy::NAME);
            if cfg.gamma > 0.0 && !toy && args.class_data.is_none() {
                anyhow::bail!(
                    "gamma > 0 (prior preservation) with folder data needs --class-data DIR"
                );
            }
            let data = match args.data.to_str() {
                Some(crate::toy::NAME) => TrainData::Toy,
                _ if args.data.extension().is_some_and(|e| e == "jsonl") => {
                    TrainData::from_pairs(&args.data, args.class_data.as_deref())?
                }
                _ => TrainData::from_folders(&args.data, args.class_data.as_deref(), cfg.mode)?,
            };
            let ip = match &args.ip_adapter {
                Some(f) => Some(crate::toy::resolve_ip_adapter(f)?),
                None => {
                    if args.image_encoder.is_some() || args.ip_adapter_scale.is_some() {
                        anyhow::bail!("--image-encoder and --ip-adapter-scale need --ip-adapter");
                    }
                    None
                }
            };
            let image_encoder = match (&ip, &args.image_encoder) {
                (_, Some(d)) => Some(d.clone()),
                (Some(f), None) => Some(super::default_image_encoder(f)),
                (None, None) => None,
            };
            let job = HypernetJob {
                base: &base,
                encoder: args.encoder.as_deref(),
                ip_adapter: ip
                    .as_deref()
                    .zip(image_encoder.as_deref())
                    .map(|(file, enc)| crate::train::hypernet::IpTrain {
                        file,
                        image_encoder: enc,
                        scale: args.ip_adapter_scale.unwrap_or(1.0),
                    }),
                data,
                out: &args.common.out,
                resume: args.common.resume,
                device,
            };
            let dist = match &topo {
                Some(t) => Some(Dist::init(t, backend, device, timeout)?),
                None => None,
            };
            let out = train_hypernet_dist(&cfg, job, dist.as_ref())?;
            let main = dist.as_ref().is_none_or(|d| d.rank() == 0);
            if let Some(d) = dist {
                d.shutdown()?;
            }
            if main {
                eprintln!(
                    "wrote {} in {:.1} min",
                    out.display(),
                    start.elapsed().as_secs_f64() / 60.0
                );
            }
        }
        TrainCommand::IpAdapter(args) => {
            single_process("train ip-adapter")?;
            let cfg: IpAdapterTrainConfig = read_config(&args.common.config)?;
            cfg.validate()
                .with_context(|| format!("--config {}", args.common.config.display()))?;
            if args.data != crate::toy::NAME {
                anyhow::bail!(
                    "--data {:?}: IP-Adapter training reads the toy world only (--data toy)",
                    args.data
                );
            }
            let device = super::parse_device(&args.common.device)?;
            let base = crate::toy::resolve_base(&args.base)?;
            let job = IpAdapterJob {
                base: &base,
                image_encoder: &args.image_encoder,
                out: &args.common.out,
                resume: args.common.resume,
                device,
            };
            let out = train_ip_adapter(&cfg, job)?;
            eprintln!(
                "wrote {} in {:.1} min",
                out.display(),
                start.elapsed().as_secs_f64() / 60.0
            );
        }
    }
    Ok(())
}
