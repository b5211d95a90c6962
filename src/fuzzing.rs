//! Entry points that read one user file (or a small set of them) from bytes exactly as the CLI's
//! loaders do, shared by the `cargo fuzz` targets (`fuzz/fuzz_targets/*.rs`) and the stable
//! mutation test (`tests/mutation.rs`), plus the tiny models their seeds are made for.
//!
//! Each `check_*` function returns `Err` for an input loracast rightly refuses and `Ok` for one
//! it loads; a panic (or an unbounded allocation) is a bug. Where a successful load implies a
//! property (a written LoRA file reads back the same, a decoded image has `w·h·3` bytes), the
//! function asserts it, so the fuzzer reports a violation as a crash.
//!
//! The parsers and their selectors (the first input byte, where a target covers several):
//! - [`check_safetensors`]: a weights file loaded strictly into a tiny UNet / VAE / CLIP text
//!   encoder through the real folder loaders (selector: the component);
//! - [`check_lora_file`]: a LoRA file, read alone and against the tiny UNet's sites, written back
//!   as PEFT and read again;
//! - [`check_hypernet_file`]: a hypernetwork file (config in the metadata, weights strictly);
//! - [`check_lora_key`]: one tensor name through the LoRA key grammar;
//! - [`check_config`]: `config.json` of each model, `scheduler_config.json` (every sampler built
//!   and stepped), `model_index.json`, `preprocessor_config.json` and a hypernetwork config
//!   (selector: [`ConfigKind`]);
//! - [`check_tokenizer`]: `tokenizer.json`, or `vocab.json` + `merges.txt`, with
//!   `tokenizer_config.json` / `special_tokens_map.json` (parts split at NUL bytes);
//! - [`check_image`]: PNG/JPEG bytes through [`crate::io::image::decode_rgb8`] and preprocessing.
use std::cell::RefCell;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{nn, Device, Kind};

use crate::diffusion::{self, NoiseSchedule, SchedulerConfig, SchedulerKind};
use crate::hypernet::{DecoderConfig, HypernetConfig, Hypernetwork};
use crate::io::image::decode_rgb8;
use crate::io::preprocess::{Preprocess, RgbImage};
use crate::io::safetensors::{serialize, SafeTensorsFile};
use crate::io::DiffusersFolder;
use crate::lora::format::{
    encode_lora, parse_key_debug, read_lora_file, regenerate_key, LoraFormat,
};
use crate::lora::LoraSite;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::clip_vision::ClipConfig;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{PerBlock, UNet2DConditionModel, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::models::vit::ViTConfig;

/// A tiny SD1.x-shaped UNet (two levels, cross-attention on the first): the fuzz seeds' base.
pub fn tiny_unet_config() -> UNetConfig {
    UNetConfig {
        sample_size: 4,
        block_out_channels: vec![8, 8],
        layers_per_block: PerBlock::One(1),
        cross_attention_dim: PerBlock::One(8),
        attention_head_dim: PerBlock::One(2),
        norm_num_groups: Some(4),
        ..UNetConfig::tiny()
    }
}

/// A one-level VAE with 8 channels.
pub fn tiny_vae_config() -> VaeConfig {
    VaeConfig {
        block_out_channels: vec![8],
        down_block_types: vec!["DownEncoderBlock2D".into()],
        up_block_types: vec!["UpDecoderBlock2D".into()],
        norm_num_groups: 4,
        ..VaeConfig::default()
    }
}

/// A one-layer CLIP text encoder with a 64-token vocabulary.
pub fn tiny_text_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 64,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        max_position_embeddings: 8,
        bos_token_id: 62,
        eos_token_id: 63,
        ..ClipTextConfig::base()
    }
}

/// A hypernetwork config for the tiny UNet's sites: a 32-pixel one-layer ViT, a width-8 decoder.
pub fn tiny_hypernet_config() -> Result<HypernetConfig> {
    let encoder = ViTConfig {
        hidden_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        intermediate_size: 12,
        image_size: 32,
        patch_size: 16,
        ..ViTConfig::base()
    };
    let decoder = DecoderConfig {
        rank: 1,
        alpha: 1.0,
        width: 8,
        layers: 1,
        heads: 2,
        intermediate: 8,
        rounds: 1,
        lidb: None,
        kind: Default::default(),
    };
    let preprocess = serde_json::json!({"size": {"height": 32, "width": 32}});
    let sites = tiny_unet_sites()?;
    Ok(HypernetConfig::new(
        decoder,
        encoder,
        preprocess,
        sites,
        "fuzz".into(),
    ))
}

thread_local! {
    static SITES: RefCell<Option<Vec<LoraSite>>> = const { RefCell::new(None) };
    static SCRATCH: RefCell<Option<tempfile_dir::Scratch>> = const { RefCell::new(None) };
}

/// The LoRA sites of the tiny UNet (built once per thread).
pub fn tiny_unet_sites() -> Result<Vec<LoraSite>> {
    SITES.with(|s| {
        if let Some(sites) = s.borrow().as_ref() {
            return Ok(sites.clone());
        }
        let vs = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(vs.root(), &tiny_unet_config())?;
        let sites = unet.lora_sites().to_vec();
        *s.borrow_mut() = Some(sites.clone());
        Ok(sites)
    })
}

/// The seed inputs of each parser (what the fuzz corpora start from and the mutation test
/// mutates): the tiny models' weights, LoRA files in both written formats, a tiny hypernetwork.
pub mod seeds {
    use super::*;

    fn weights(vs: &nn::VarStore) -> Result<Vec<u8>> {
        let tensors = crate::io::safetensors::sorted_variables(vs);
        serialize(&tensors, Kind::Float, None)
    }

    /// Weights files for [`check_safetensors`], with their selector byte prepended.
    pub fn safetensors() -> Result<Vec<(String, Vec<u8>)>> {
        let _rng = crate::util::rng_lock();
        tch::manual_seed(0);
        let mut out = Vec::new();
        let vs = nn::VarStore::new(Device::Cpu);
        UNet2DConditionModel::new(vs.root(), &tiny_unet_config())?;
        out.push(("unet".to_string(), [vec![0u8], weights(&vs)?].concat()));
        let vs = nn::VarStore::new(Device::Cpu);
        AutoencoderKL::new(vs.root(), &tiny_vae_config())?;
        out.push(("vae".to_string(), [vec![1u8], weights(&vs)?].concat()));
        let vs = nn::VarStore::new(Device::Cpu);
        ClipTextModel::new(vs.root(), &tiny_text_config())?;
        out.push((
            "text_encoder".to_string(),
            [vec![2u8], weights(&vs)?].concat(),
        ));
        Ok(out)
    }

    /// A rank-2 LoRA for the tiny UNet, as PEFT and kohya files.
    pub fn lora_files() -> Result<Vec<(String, Vec<u8>)>> {
        let mut set = crate::lora::LoraSet::default();
        for (i, site) in tiny_unet_sites()?.into_iter().enumerate() {
            let a = tch::Tensor::arange(2 * site.in_features as i64, (Kind::Float, Device::Cpu))
                .reshape([2, site.in_features as i64])
                / 7.0;
            let b = tch::Tensor::ones([site.out_features as i64, 2], (Kind::Float, Device::Cpu))
                * (i as f64 + 1.0);
            let alpha = if i % 2 == 0 { 2.0 } else { 1.5 };
            set.weights
                .insert(site, crate::lora::LoraWeights { a, b, alpha });
        }
        let mut out = Vec::new();
        for format in [LoraFormat::Peft, LoraFormat::Kohya] {
            let (tensors, meta) = encode_lora(&set, format)?;
            out.push((
                format.name().to_string(),
                serialize(&tensors, Kind::Float, Some(meta))?,
            ));
        }
        Ok(out)
    }

    /// The tiny models' configs for [`check_config`], with their selector byte prepended.
    pub fn configs() -> Result<Vec<(String, Vec<u8>)>> {
        let json = |sel: ConfigKind, v: serde_json::Value| -> Result<Vec<u8>> {
            Ok([vec![sel as u8], serde_json::to_vec_pretty(&v)?].concat())
        };
        let vit = tiny_hypernet_config()?.encoder;
        Ok(vec![
            (
                "unet".into(),
                json(ConfigKind::Unet, serde_json::to_value(tiny_unet_config())?)?,
            ),
            (
                "vae".into(),
                json(ConfigKind::Vae, serde_json::to_value(tiny_vae_config())?)?,
            ),
            (
                "text_encoder".into(),
                json(
                    ConfigKind::ClipText,
                    serde_json::to_value(tiny_text_config())?,
                )?,
            ),
            (
                "vit".into(),
                json(ConfigKind::Vit, serde_json::to_value(vit)?)?,
            ),
            (
                "hypernet".into(),
                json(
                    ConfigKind::Hypernet,
                    serde_json::to_value(tiny_hypernet_config()?)?,
                )?,
            ),
        ])
    }

    /// A tiny hypernetwork file (f16, as `train hypernet` writes compact files).
    pub fn hypernet_file() -> Result<Vec<u8>> {
        let config = tiny_hypernet_config()?;
        let _rng = crate::util::rng_lock();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let h = Hypernetwork::new(&vs.root(), &config)?;
        let tensors = crate::io::safetensors::sorted_variables(&vs);
        let meta = [
            ("format".to_string(), "loracast-hypernet-v1".to_string()),
            ("config".to_string(), serde_json::to_string(&h.config)?),
        ]
        .into_iter()
        .collect();
        serialize(&tensors, Kind::Half, Some(meta))
    }
}

/// The config files [`check_config`] reads, by selector byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    Unet = 0,
    Vae = 1,
    ClipText = 2,
    Clip = 3,
    Vit = 4,
    Scheduler = 5,
    ModelIndex = 6,
    Preprocessor = 7,
    Hypernet = 8,
}

impl ConfigKind {
    pub const ALL: [Self; 9] = [
        Self::Unet,
        Self::Vae,
        Self::ClipText,
        Self::Clip,
        Self::Vit,
        Self::Scheduler,
        Self::ModelIndex,
        Self::Preprocessor,
        Self::Hypernet,
    ];

    pub fn from_byte(b: u8) -> Self {
        Self::ALL[b as usize % Self::ALL.len()]
    }
}

/// A per-thread scratch folder for parsers that read folders (removed with the thread).
mod tempfile_dir {
    use std::path::PathBuf;

    pub struct Scratch(pub PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// An empty per-thread scratch folder (under `$TMPDIR`).
fn scratch() -> Result<PathBuf> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            let id = format!(
                "loracast-fuzz-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            );
            let dir: String = id
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            *s = Some(tempfile_dir::Scratch(std::env::temp_dir().join(dir)));
        }
        let dir = s.as_ref().map(|s| s.0.clone()).context("scratch folder")?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    })
}

/// An error message must be one short line apart from what it quotes from the input (a tensor
/// name or JSON key in `"…"` or `` `…` `` may be long, or hold a newline), and no libtorch error
/// (with its C++ stack trace) may reach it: those mean a value was not validated.
fn short(e: anyhow::Error) -> anyhow::Error {
    let msg = format!("{e:#}");
    let mut unquoted = String::new();
    let (mut quote, mut escaped) = (None, false);
    for c in msg.chars() {
        match quote {
            Some(_) if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '`' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    // Quoted input may hold anything, these words included: look outside the quotes only.
    assert!(
        !unquoted.contains("Exception raised from") && !unquoted.contains("frame #0"),
        "a libtorch error reached the message: {msg}"
    );
    let n = unquoted.chars().count();
    assert!(
        !unquoted.contains('\n') && n <= 400,
        "error message is not one short line ({n} chars unquoted): {msg}"
    );
    e
}

/// A weights file (after the selector byte) loaded by the real folder loader of the tiny UNet
/// (0), VAE (1) or CLIP text encoder (2).
pub fn check_safetensors(data: &[u8]) -> Result<()> {
    let Some((&sel, bytes)) = data.split_first() else {
        bail!("empty input");
    };
    let root = scratch()?;
    let write = |p: PathBuf, b: &[u8]| -> Result<()> {
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        std::fs::write(&p, b).with_context(|| format!("cannot write {}", p.display()))
    };
    write(root.join("model_index.json"), b"{}")?;
    let result = match sel % 3 {
        0 => {
            write(
                root.join("unet/config.json"),
                &serde_json::to_vec(&tiny_unet_config())?,
            )?;
            write(root.join("unet/diffusion_pytorch_model.safetensors"), bytes)?;
            UNet2DConditionModel::load(&DiffusersFolder::open(&root)?, Device::Cpu).map(|_| ())
        }
        1 => {
            write(
                root.join("vae/config.json"),
                &serde_json::to_vec(&tiny_vae_config())?,
            )?;
            write(root.join("vae/diffusion_pytorch_model.safetensors"), bytes)?;
            AutoencoderKL::load(&DiffusersFolder::open(&root)?, Device::Cpu).map(|_| ())
        }
        _ => {
            write(
                root.join("text_encoder/config.json"),
                &serde_json::to_vec(&tiny_text_config())?,
            )?;
            write(root.join("text_encoder/model.safetensors"), bytes)?;
            ClipTextModel::load(&DiffusersFolder::open(&root)?, Device::Cpu).map(|_| ())
        }
    };
    result.map_err(short)
}

/// A LoRA file: read alone and against the tiny UNet; a file that reads is written back as PEFT
/// and must read back to the same weights.
pub fn check_lora_file(bytes: &[u8]) -> Result<()> {
    let file = SafeTensorsFile::from_bytes(Path::new("input.safetensors"), bytes.to_vec())
        .map_err(short)?;
    let sites = tiny_unet_sites()?;
    let against = read_lora_file(&file, Some(&sites), Some(1)).map_err(short);
    let (set, _info) = read_lora_file(&file, None, None).map_err(short)?;
    let (tensors, meta) = encode_lora(&set, LoraFormat::Peft).map_err(short)?;
    let written = serialize(&tensors, Kind::Float, Some(meta))?;
    let back = SafeTensorsFile::from_bytes(Path::new("written.safetensors"), written)
        .expect("a written LoRA file has a valid header");
    let (again, _) = read_lora_file(&back, None, None).expect("a written LoRA file reads back");
    assert_eq!(
        set.weights.len(),
        again.weights.len(),
        "sites lost in the round trip"
    );
    for ((s1, w1), (s2, w2)) in set.weights.iter().zip(&again.weights) {
        assert_eq!(s1, s2, "site changed in the round trip");
        assert!(
            w1.a.equal(&w2.a) && w1.b.equal(&w2.b),
            "{s1}: weights changed"
        );
        assert!(
            w1.alpha == w2.alpha || (w1.alpha - w2.alpha).abs() <= 1e-12 * w1.alpha.abs(),
            "{s1}: alpha {} became {}",
            w1.alpha,
            w2.alpha
        );
    }
    against.map(|_| ())
}

/// A hypernetwork file.
pub fn check_hypernet_file(bytes: &[u8]) -> Result<()> {
    let file = SafeTensorsFile::from_bytes(Path::new("hypernet.safetensors"), bytes.to_vec())
        .map_err(short)?;
    Hypernetwork::load_file(&file, Device::Cpu)
        .map(|_| ())
        .map_err(short)
}

/// One tensor name (the first byte picks `layers_per_block` 1–4); a key that parses and that
/// loracast can write must parse back to the same site from the key loracast writes.
pub fn check_lora_key(data: &[u8]) -> Result<()> {
    let Some((&sel, bytes)) = data.split_first() else {
        bail!("empty input");
    };
    let lpb = i64::from(sel % 4) + 1;
    let key = std::str::from_utf8(bytes).context("not UTF-8")?;
    let parsed = parse_key_debug(key, lpb).map_err(|e| anyhow::anyhow!(e))?;
    if let Some(again) = regenerate_key(key, lpb) {
        let reparsed = parse_key_debug(&again, lpb)
            .unwrap_or_else(|e| panic!("{key:?} → {again:?} does not parse: {e}"));
        assert_eq!(
            parsed, reparsed,
            "{key:?} and its regenerated key {again:?} differ"
        );
    }
    Ok(())
}

/// One config file (after the selector byte, see [`ConfigKind`]) parsed, validated and used as
/// loracast uses it.
pub fn check_config(data: &[u8]) -> Result<()> {
    let Some((&sel, bytes)) = data.split_first() else {
        bail!("empty input");
    };
    let text = std::str::from_utf8(bytes).context("not UTF-8")?;
    let value = crate::io::folder::parse_config_json(text)?;
    let kind = ConfigKind::from_byte(sel);
    check_config_value(kind, value).map_err(short)
}

/// Configs whose weights are at most this many (by their lower bound) are also built, and run
/// once on a tiny input: what a loader does after validating them.
const BUILD_LIMIT: u128 = 1 << 18;

fn check_config_value(kind: ConfigKind, value: serde_json::Value) -> Result<()> {
    let f = || (Kind::Float, Device::Cpu);
    match kind {
        ConfigKind::Unet => {
            let cfg = UNetConfig::from_json(value)?;
            let layout = cfg.validate()?;
            let n = cfg.block_out_channels.len() as u32;
            if cfg.min_params(&layout) <= BUILD_LIMIT && n <= 4 {
                let vs = nn::VarStore::new(Device::Cpu);
                let unet = UNet2DConditionModel::new(vs.root(), &cfg)?;
                let side = 1i64 << (n - 1);
                let x = tch::Tensor::zeros([1, cfg.in_channels, side, side], f());
                let ctx = tch::Tensor::zeros([1, 2, layout.cross_dims[0]], f());
                let t = tch::Tensor::from(10i64);
                let _ = unet.forward(&x, &t, &ctx, None)?;
            }
        }
        ConfigKind::Vae => {
            let cfg: VaeConfig = serde_json::from_value(value)?;
            cfg.check()?;
            let _ = (cfg.min_params(), cfg.scale_factor());
            if cfg.min_params() <= BUILD_LIMIT && cfg.block_out_channels.len() <= 4 {
                let vs = nn::VarStore::new(Device::Cpu);
                let vae = AutoencoderKL::new(vs.root(), &cfg)?;
                let side = cfg.scale_factor();
                let x = tch::Tensor::zeros([1, cfg.in_channels, side, side], f());
                let z = vae.encode(&x)?.mode();
                let _ = vae.decode(&z)?;
            }
        }
        ConfigKind::ClipText => {
            let cfg = ClipTextConfig::from_json(value)?;
            if cfg.min_params() <= BUILD_LIMIT {
                let vs = nn::VarStore::new(Device::Cpu);
                let model = ClipTextModel::new(vs.root(), &cfg)?;
                let len = cfg.max_position_embeddings.min(3);
                let ids = tch::Tensor::zeros([1, len], (Kind::Int64, Device::Cpu));
                let _ = model.forward(&ids)?;
            }
        }
        ConfigKind::Clip => {
            let cfg: ClipConfig = serde_json::from_value(value)?;
            cfg.validate()?;
            if cfg.min_params() <= BUILD_LIMIT {
                let vs = nn::VarStore::new(Device::Cpu);
                let model = crate::models::clip_vision::ClipModel::new(vs.root(), &cfg)?;
                let v = &cfg.vision_config;
                let px = tch::Tensor::zeros([1, v.num_channels, v.image_size, v.image_size], f());
                let _ = model.image_embeds(&px)?;
            }
        }
        ConfigKind::Vit => {
            let cfg: ViTConfig = serde_json::from_value(value)?;
            cfg.validate()?;
            let _ = cfg.grid();
            if cfg.min_params() <= BUILD_LIMIT {
                let vs = nn::VarStore::new(Device::Cpu);
                let model = crate::models::vit::ViTModel::new(vs.root(), &cfg, true)?;
                let s = cfg.image_size;
                let px = tch::Tensor::zeros([1, cfg.num_channels, s, s], f());
                let _ = model.forward(&px)?;
            }
        }
        ConfigKind::Scheduler => check_scheduler(&value)?,
        ConfigKind::ModelIndex => {
            let root = scratch()?;
            std::fs::write(root.join("model_index.json"), value.to_string())?;
            let folder = DiffusersFolder::open(&root)?;
            for c in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
                let _ = folder.component_class(c);
            }
            if let Some(class) = folder.component_class("scheduler") {
                SchedulerKind::from_class_name(&class)?;
            }
        }
        ConfigKind::Preprocessor => {
            let pre = Preprocess::vit().with_json(value)?;
            // Bounded: the declared output size is at most MAX_SIDE; fuzz only small outputs.
            let small = |(h, w): (u32, u32)| (h as u64) * (w as u64) <= 1 << 16;
            let out = match pre.size {
                crate::io::preprocess::Size::Exact { height, width } => (height, width),
                crate::io::preprocess::Size::ShortestEdge(s) => (s, s.saturating_mul(3)),
            };
            if small(out) && small(pre.crop_size) {
                let img = RgbImage::new(3, 5, vec![128; 45])?;
                let _ = pre.batch(&[img])?;
            }
        }
        ConfigKind::Hypernet => {
            let cfg: HypernetConfig = serde_json::from_value(value)?;
            cfg.validate()?;
            if cfg.min_params() <= BUILD_LIMIT {
                let vs = nn::VarStore::new(Device::Cpu);
                Hypernetwork::new(&vs.root(), &cfg)?;
            }
        }
    }
    Ok(())
}

/// Every sampler from a `scheduler_config.json` set up for a few steps and stepped through on a
/// tiny latent, and the training schedule's noising at its first and last timestep.
fn check_scheduler(value: &serde_json::Value) -> Result<()> {
    let x = tch::Tensor::ones([1, 1, 2, 2], (Kind::Float, Device::Cpu));
    let mut any = Ok(());
    for kind in SchedulerKind::ALL {
        let run = || -> Result<()> {
            let cfg = SchedulerConfig::from_pipeline_config(value, kind)?;
            let steps = 3.min(cfg.num_train_timesteps);
            let mut s = diffusion::build(kind, &cfg, steps)?;
            let mut sample = &x * s.init_noise_sigma();
            for i in 0..s.timesteps().len() {
                let input = s.scale_model_input(&sample, i);
                sample = s.step(&(&input * 0.5), i, &sample)?;
            }
            Ok(())
        };
        if let Err(e) = run() {
            any = Err(e);
        }
    }
    let cfg = SchedulerConfig::for_training(value)?;
    let ns = NoiseSchedule::new(&cfg)?;
    let t = tch::Tensor::from_slice(&[0i64, ns.num_train_timesteps() as i64 - 1]);
    let x0 = tch::Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu));
    let _ = ns.target(&x0, &x0, &t)?;
    let _ = ns.add_noise(&x0, &x0, &t)?;
    any
}

/// Tokenizer files: the first byte picks the layout (even: `tokenizer.json`, odd:
/// `vocab.json` + `merges.txt`); the rest is split at NUL bytes into that file (or those two),
/// then `tokenizer_config.json` and `special_tokens_map.json` (absent when missing). A
/// tokenizer that loads encodes a few prompts.
pub fn check_tokenizer(data: &[u8]) -> Result<()> {
    let Some((&sel, bytes)) = data.split_first() else {
        bail!("empty input");
    };
    let dir = scratch()?;
    let names: &[&str] = if sel % 2 == 0 {
        &[
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
    } else {
        &[
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
    };
    for (name, part) in names.iter().zip(bytes.split(|&b| b == 0)) {
        std::fs::write(dir.join(name), part)?;
    }
    let tok = ClipTokenizer::from_dir(&dir).map_err(short)?;
    let tail = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(64)..]).into_owned();
    for prompt in [
        "a photo of a sks dog",
        "",
        "ÀÉ 12 <|endoftext|> !!",
        tail.as_str(),
    ] {
        let ids = tok.encode(prompt);
        assert_eq!(ids.len(), tok.max_length, "encode gives max_length ids");
    }
    Ok(())
}

/// PNG/JPEG bytes decoded as `--image` files are, then preprocessed as the CLIP metrics do when
/// the image is small.
pub fn check_image(bytes: &[u8]) -> Result<()> {
    let (w, h, rgb) = decode_rgb8(bytes, "input").map_err(short)?;
    assert_eq!(rgb.len() as u64, w as u64 * h as u64 * 3, "RGB size");
    let img = RgbImage::new(w, h, rgb)?;
    if (w as u64) * (h as u64) <= 1 << 16 && w.max(h) <= 4 * w.min(h) {
        let _ = Preprocess::clip().batch(&[img])?;
    }
    Ok(())
}

/// Runs `f` on `input` with panics caught: `Ok(Ok(()))` loaded, `Ok(Err(e))` refused,
/// `Err(msg)` panicked (a bug).
pub fn catch(f: fn(&[u8]) -> Result<()>, input: &[u8]) -> std::result::Result<Result<()>, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(input))).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}
