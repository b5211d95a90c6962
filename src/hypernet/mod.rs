//! The hypernetwork h_φ(x): a few images of a subject → LoRA weights for the UNet's attn2
//! q/k/v (paper "hypernet-finetuning-free-personalization" §4.1, Fig. 1; SPEC §2).
//!
//! 1. Preprocess the image like the encoder's image processor (`preprocessor_config.json`).
//! 2. Frozen ViT encoder (transformers' `ViTModel`, e.g. `google/vit-base-patch16-224-in21k`;
//!    for the toy world a small ViT loracast pretrains itself, see `train::encoder`) →
//!    image tokens `[B, 1+N, C]`, computed once.
//! 3. [`WeightDecoder`]: one token per LoRA matrix, s rounds of refinement, one head per matrix.
//! 4. The flat outputs become `lora_A [r, in]` / `lora_B [out, r]` per site (a LiDB decoder,
//!    HyperDreamBooth §4.2, outputs T_A `[r, a]` / T_B `[b, r]`, expanded through
//!    [`crate::lora::lidb`]'s frozen bases): a per-sample
//!    [`LoraBatch`] during training (gradients flow through the frozen UNet into φ), or one
//!    [`LoraSet`] for a subject, averaging the outputs over its images, β = (1/N)·Σ h(x_n).
//!
//! A hypernetwork file is a safetensors file holding the encoder (`encoder.*`, ViT hub keys)
//! and decoder (`decoder.*`) weights, with the [`HypernetConfig`] (encoder config,
//! preprocessing, rank, sites, and the base UNet's [`lora_fingerprint`]) in its metadata.
//!
//! Open category (seed paper §5.2, θ0 = base + IP-Adapter-Plus): the hypernetwork has no encoder
//! of its own; it reads the `hidden_states[-2]` of the IP-Adapter's CLIP vision tower (computed
//! once, shared with the adapter's Resampler), its decoder is a [`ResamplerDecoder`], and its
//! config's `ip_adapter` records the adapter file's SHA-256 (and the tower's feature shape), so
//! it refuses another adapter.
//!
//! [`lora_fingerprint`]: crate::models::unet::UNet2DConditionModel::lora_fingerprint
pub mod decoder;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

pub use decoder::{Decoder, DecoderDims, MatrixSpec, ResamplerDecoder, WeightDecoder};

use crate::io::preprocess::{Preprocess, RgbImage};
use crate::io::safetensors::{load_strict, save, SafeTensorsFile};
use crate::lora::lidb::{LidbBasis, LidbConfig};
use crate::lora::{LoraBatch, LoraDelta, LoraSet, LoraSite, LoraWeights};
use crate::models::vit::{ViTConfig, ViTModel};

/// The smallest image side `personalize` accepts (smaller images carry no subject).
pub const MIN_IMAGE_SIDE: u32 = 16;

const FORMAT: &str = "loracast-hypernet-v1";
const SHARED: &str = "this hypernetwork reads an IP-Adapter's image encoder (open category): give --ip-adapter FILE (and --image-encoder DIR)";
/// The most values LiDB's frozen bases may hold (SD1.5's 48 sites with a = 100, b = 50: 9.2M).
const MAX_LIDB_VALUES: u128 = 1 << 25;

/// Fails on images too small to show a subject (sides below [`MIN_IMAGE_SIDE`]).
pub fn check_image_size(img: &RgbImage) -> Result<()> {
    if img.width < MIN_IMAGE_SIDE || img.height < MIN_IMAGE_SIDE {
        bail!(
            "{}×{} pixels is too small to show a subject (at least {MIN_IMAGE_SIDE}×{MIN_IMAGE_SIDE})",
            img.width,
            img.height
        );
    }
    Ok(())
}

/// Everything needed to rebuild a hypernetwork (stored in its file's metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypernetConfig {
    /// The frozen image encoder (transformers' `ViTConfig`), stored in the file (`encoder.*`);
    /// `None` with `ip_adapter` (the adapter's image encoder is shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoder: Option<ViTConfig>,
    /// The encoder's `preprocessor_config.json` (applied over transformers' ViT defaults;
    /// unused with `ip_adapter`: the adapter's image encoder preprocesses).
    #[serde(default)]
    pub preprocess: serde_json::Value,
    /// Rank/alpha of the predicted LoRA and the decoder's sizes.
    pub decoder: DecoderConfig,
    /// The UNet sites the LoRA targets, in module order.
    pub sites: Vec<LoraSite>,
    /// [`crate::models::unet::UNet2DConditionModel::lora_fingerprint`] of the base it was
    /// trained for.
    pub base_fingerprint: String,
    /// λ the decoder was trained with (reported by `demo`), when known.
    #[serde(default)]
    pub lambda: Option<f64>,
    /// Open category: the IP-Adapter(-Plus) θ0 includes, whose image encoder the hypernetwork
    /// reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_adapter: Option<IpAdapterBinding>,
}

/// Which IP-Adapter an open-category hypernetwork was trained on top of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpAdapterBinding {
    /// SHA-256 of the IP-Adapter file's bytes.
    pub sha256: String,
    /// Width of its image encoder's `hidden_states[-2]` (the decoder's input).
    pub hidden_size: i64,
    /// Tokens of those states (1 + patches).
    pub tokens: i64,
    /// The IP-Adapter scale of training (the inference default).
    pub scale: f64,
}

/// Which decoder architecture predicts the weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderKind {
    /// The closed category's transformer decoder with iterative refinement ([`WeightDecoder`]).
    #[default]
    Transformer,
    /// The open category's IP-Adapter-Plus Resampler architecture ([`ResamplerDecoder`]).
    Resampler,
}

fn is_default_kind(k: &DecoderKind) -> bool {
    *k == DecoderKind::Transformer
}

/// The decoder's knobs: LoRA rank and alpha of the predicted weights (ΔW = alpha/r · B·A),
/// decoder width, layers, heads, MLP width and refinement rounds s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderConfig {
    pub rank: i64,
    pub alpha: f64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub intermediate: i64,
    pub rounds: i64,
    /// Predict LiDB weights (HyperDreamBooth §4.2): the heads output T_A `[r, a]` and T_B
    /// `[b, r]` per site, expanded through LiDB's frozen bases; `None`: full LoRA factors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lidb: Option<LidbConfig>,
    /// `transformer` (default) or `resampler` (open category; rounds must be 1, width a
    /// multiple of 64, heads = width / 64).
    #[serde(default, skip_serializing_if = "is_default_kind")]
    pub kind: DecoderKind,
}

impl DecoderConfig {
    /// The paper's decoder (4 layers, s = 4 rounds) with rank 3 (SD1.5, closed category).
    pub fn paper() -> Self {
        Self {
            rank: 3,
            alpha: 3.0,
            width: 512,
            layers: 4,
            heads: 8,
            intermediate: 2048,
            rounds: 4,
            lidb: None,
            kind: DecoderKind::Transformer,
        }
    }

    /// The paper's open-category decoder (§5.2, appendix B.2): the Resampler architecture with
    /// embedding dimension 512 (IP-Adapter-Plus's depth 4, 8 heads × 64, FF 4×), rank 2.
    pub fn paper_open() -> Self {
        Self {
            rank: 2,
            alpha: 2.0,
            width: 512,
            layers: 4,
            heads: 8,
            intermediate: 2048,
            rounds: 1,
            lidb: None,
            kind: DecoderKind::Resampler,
        }
    }

    /// A tiny decoder for tests.
    pub fn tiny() -> Self {
        Self {
            rank: 2,
            alpha: 2.0,
            width: 32,
            layers: 1,
            heads: 4,
            intermediate: 64,
            rounds: 2,
            lidb: None,
            kind: DecoderKind::Transformer,
        }
    }
}

impl HypernetConfig {
    pub fn new(
        decoder: DecoderConfig,
        encoder: ViTConfig,
        preprocess: serde_json::Value,
        sites: Vec<LoraSite>,
        base_fingerprint: String,
    ) -> Self {
        Self {
            encoder: Some(encoder),
            preprocess,
            decoder,
            sites,
            base_fingerprint,
            lambda: None,
            ip_adapter: None,
        }
    }

    /// An open-category hypernetwork's config: no encoder of its own, the IP-Adapter's.
    pub fn on_ip_adapter(
        decoder: DecoderConfig,
        ip_adapter: IpAdapterBinding,
        sites: Vec<LoraSite>,
        base_fingerprint: String,
    ) -> Self {
        Self {
            encoder: None,
            preprocess: serde_json::json!({}),
            decoder,
            sites,
            base_fingerprint,
            lambda: None,
            ip_adapter: Some(ip_adapter),
        }
    }

    /// The width of the image features the decoder reads.
    fn image_dim(&self) -> i64 {
        match (&self.encoder, &self.ip_adapter) {
            (Some(e), _) => e.hidden_size,
            (None, Some(ip)) => ip.hidden_size,
            (None, None) => 0,
        }
    }

    /// `lora_A` then `lora_B` of every site (LiDB: T_A `[r, a]` then T_B `[b, r]`).
    pub fn matrices(&self) -> Vec<MatrixSpec> {
        self.sites
            .iter()
            .flat_map(|s| {
                let (i, o) = match &self.decoder.lidb {
                    Some(l) => l.dims(s),
                    None => (s.in_features as i64, s.out_features as i64),
                };
                let r = self.decoder.rank;
                [
                    MatrixSpec {
                        rows: r,
                        cols: i,
                        is_b: false,
                    },
                    MatrixSpec {
                        rows: o,
                        cols: r,
                        is_b: true,
                    },
                ]
            })
            .collect()
    }

    fn dims(&self) -> DecoderDims {
        let d = &self.decoder;
        DecoderDims {
            image_dim: self.image_dim(),
            width: d.width,
            layers: d.layers,
            heads: d.heads,
            intermediate: d.intermediate,
            rounds: d.rounds,
        }
    }

    pub fn preprocessor(&self) -> Result<Preprocess> {
        Preprocess::vit()
            .with_json(self.preprocess.clone())
            .context("hypernetwork preprocessing")
    }

    /// A lower bound on the weight count (the decoder's heads and input projections, its
    /// layers, and the encoder), to compare with the file before anything is allocated.
    pub fn min_params(&self) -> u128 {
        use crate::models::params;
        let d = &self.decoder;
        let w = d.width;
        let heads = self
            .matrices()
            .iter()
            .map(|m| params(&[2, m.rows, m.cols, w]))
            .fold(0, u128::saturating_add);
        let layer = params(&[8, w, w]).saturating_add(params(&[2, w, d.intermediate]));
        heads
            .saturating_add(layer.saturating_mul(d.layers.max(0) as u128))
            .saturating_add(params(&[self.image_dim(), w]))
            .saturating_add(self.encoder.as_ref().map_or(0, |e| e.min_params()))
    }

    /// Every size of the config, each named by its key (the config comes from a file).
    pub fn validate(&self) -> Result<()> {
        use crate::models::{check_range, MAX_DEPTH, MAX_WIDTH};
        const WHAT: &str = "hypernetwork config";
        match (&self.encoder, &self.ip_adapter) {
            (Some(e), None) => {
                e.validate()?;
            }
            (None, Some(ip)) => {
                check_range(WHAT, "ip_adapter.hidden_size", ip.hidden_size, 1, MAX_WIDTH)?;
                check_range(WHAT, "ip_adapter.tokens", ip.tokens, 1, 1 << 20)?;
                if !ip.scale.is_finite() {
                    bail!("{WHAT}: ip_adapter.scale must be a finite number");
                }
                if ip.sha256.len() != 64 || !ip.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
                    bail!("{WHAT}: ip_adapter.sha256 is not a SHA-256 hex digest");
                }
            }
            _ => bail!("{WHAT}: give exactly one of encoder (its own ViT) and ip_adapter (the adapter's image encoder)"),
        }
        let d = &self.decoder;
        for (key, v, min, max) in [
            ("decoder.rank", d.rank, 1, 1 << 12),
            ("decoder.width", d.width, 1, MAX_WIDTH),
            ("decoder.layers", d.layers, 1, MAX_DEPTH),
            ("decoder.heads", d.heads, 1, MAX_WIDTH),
            ("decoder.intermediate", d.intermediate, 1, 4 * MAX_WIDTH),
            ("decoder.rounds", d.rounds, 1, MAX_DEPTH),
        ] {
            check_range(WHAT, key, v, min, max)?;
        }
        if d.width % d.heads != 0 {
            bail!(
                "{WHAT}: decoder.width {} is not divisible by decoder.heads {}",
                d.width,
                d.heads
            );
        }
        if d.kind == DecoderKind::Resampler
            && (d.rounds != 1
                || d.width % decoder::DIM_HEAD != 0
                || d.heads != d.width / decoder::DIM_HEAD)
        {
            bail!(
                    "{WHAT}: a resampler decoder has rounds 1 and width a multiple of {0} with heads = width / {0} (got rounds {1}, width {2}, heads {3})",
                    decoder::DIM_HEAD, d.rounds, d.width, d.heads
                );
        }
        if let Some(l) = &d.lidb {
            check_range(WHAT, "decoder.lidb.a", l.a, 1, MAX_WIDTH)?;
            check_range(WHAT, "decoder.lidb.b", l.b, 1, MAX_WIDTH)?;
            // The frozen bases are rebuilt from the seed, not read from the file: bound them.
            let values = self
                .sites
                .iter()
                .map(|s| {
                    let (a, b) = l.dims(s);
                    let io = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
                    crate::models::params(&[a, io(s.in_features)])
                        .saturating_add(crate::models::params(&[b, io(s.out_features)]))
                })
                .fold(0u128, u128::saturating_add);
            if values > MAX_LIDB_VALUES {
                bail!("{WHAT}: decoder.lidb bases for these sites hold {values} values, more than {MAX_LIDB_VALUES}");
            }
        }
        if self.sites.len() > 1 << 16 {
            bail!("{WHAT}: {} sites, more than any UNet has", self.sites.len());
        }
        for (i, s) in self.sites.iter().enumerate() {
            for (key, v) in [
                ("in_features", s.in_features),
                ("out_features", s.out_features),
            ] {
                let v = i64::try_from(v).unwrap_or(i64::MAX);
                check_range(WHAT, &format!("sites[{i}].{key}"), v, 1, MAX_WIDTH)?;
            }
        }
        if self.decoder.rank < 1 || !self.decoder.alpha.is_finite() || self.decoder.alpha <= 0.0 {
            bail!("hypernetwork: rank must be ≥ 1 and alpha positive");
        }
        if self.sites.is_empty() {
            bail!("hypernetwork: no LoRA sites");
        }
        if let Some(l) = &self.decoder.lidb {
            l.validate()?;
        }
        let Some(encoder) = &self.encoder else {
            return Ok(());
        };
        let pre = self.preprocessor()?;
        let side = encoder.image_size as u32;
        let out = match (pre.do_center_crop, pre.size) {
            (true, _) => pre.crop_size,
            (false, crate::io::preprocess::Size::Exact { height, width }) => (height, width),
            (false, crate::io::preprocess::Size::ShortestEdge(_)) => (0, 0),
        };
        if out != (side, side) {
            bail!(
                "hypernetwork: the encoder's preprocessing gives {}×{} images, the encoder takes {side}×{side}",
                out.1, out.0
            );
        }
        Ok(())
    }
}

/// A loaded (or freshly initialised) hypernetwork. The encoder is frozen by its caller's
/// choice of trainable variables (see [`Hypernetwork::new`]).
pub struct Hypernetwork {
    pub config: HypernetConfig,
    /// Its own frozen ViT (`None` in the open category: the IP-Adapter's encoder is shared).
    pub encoder: Option<ViTModel>,
    pub decoder: Decoder,
    pub preprocess: Preprocess,
    /// LiDB's frozen bases when the decoder predicts LiDB weights.
    pub lidb: Option<LidbBasis>,
}

impl Hypernetwork {
    /// Builds the encoder under `vs/encoder` and the decoder under `vs/decoder`.
    pub fn new(vs: &nn::Path, config: &HypernetConfig) -> Result<Self> {
        config.validate()?;
        let encoder = match &config.encoder {
            Some(e) => Some(ViTModel::new(vs / "encoder", e, false)?),
            None => None,
        };
        let decoder = {
            let _rng = crate::util::rng_lock();
            let (dims, m) = (config.dims(), config.matrices());
            match config.decoder.kind {
                DecoderKind::Transformer => {
                    Decoder::Transformer(WeightDecoder::new(vs / "decoder", dims, &m)?)
                }
                DecoderKind::Resampler => {
                    Decoder::Resampler(ResamplerDecoder::new(vs / "decoder", dims, &m)?)
                }
            }
        };
        let lidb = match config.decoder.lidb {
            Some(l) => Some(LidbBasis::new(l, &config.sites, vs.device())?),
            None => None,
        };
        Ok(Self {
            config: config.clone(),
            encoder,
            decoder,
            preprocess: config.preprocessor()?,
            lidb,
        })
    }

    /// Loads a hypernetwork file (config from its metadata, every tensor strictly).
    pub fn load(path: &Path, device: Device) -> Result<(Self, nn::VarStore)> {
        let shown = path.display();
        if !path.is_file() {
            bail!("hypernetwork {shown}: no such file");
        }
        Self::load_file(&SafeTensorsFile::open(path)?, device)
    }

    /// [`Self::load`] on an opened (or in-memory) safetensors file. The config in the metadata
    /// is validated, and the weights it implies are checked against the file's data size,
    /// before any variable is allocated.
    pub fn load_file(file: &SafeTensorsFile, device: Device) -> Result<(Self, nn::VarStore)> {
        let shown = file.path().display();
        let meta = file.metadata()?.unwrap_or_default();
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("{shown} is not a loracast hypernetwork (no {FORMAT:?} in its metadata)");
        }
        let config: HypernetConfig = meta
            .get("config")
            .context("no config in the metadata")
            .and_then(|c| serde_json::from_str(c).context("unreadable config"))
            .with_context(|| format!("hypernetwork {shown}"))?;
        config
            .validate()
            .with_context(|| format!("hypernetwork {shown}"))?;
        crate::io::safetensors::check_size_budget(
            std::slice::from_ref(file),
            config.min_params(),
            "the hypernetwork config",
        )?;
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(&vs.root(), &config)?;
        load_strict(&mut vs, std::slice::from_ref(file), &[])
            .with_context(|| format!("hypernetwork {shown}"))?;
        vs.freeze();
        Ok((model, vs))
    }

    /// Writes every variable of `vs` (f16 when `compact`) with the config in the metadata.
    pub fn save(&self, vs: &nn::VarStore, path: &Path, compact: bool) -> Result<()> {
        let tensors = crate::io::safetensors::sorted_variables(vs);
        let meta = [
            ("format".to_string(), FORMAT.to_string()),
            ("config".to_string(), serde_json::to_string(&self.config)?),
        ]
        .into_iter()
        .collect();
        let kind = if compact { Kind::Half } else { Kind::Float };
        save(&tensors, kind, Some(meta), path)
    }

    /// Fails unless this hypernetwork was trained for a UNet with `fingerprint`.
    pub fn check_base(&self, fingerprint: &str) -> Result<()> {
        if self.config.base_fingerprint != fingerprint {
            bail!(
                "this hypernetwork was trained for another base model (UNet fingerprint {}, this base has {fingerprint})",
                self.config.base_fingerprint
            );
        }
        Ok(())
    }

    /// Preprocessed pixel values of user images: `[N, 3, S, S]`.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        for img in images {
            check_image_size(img)?;
        }
        self.preprocess.batch(images)
    }

    /// h(x) for a batch: one flat `[B, rows·cols]` per matrix (`lora_A`, `lora_B` per site).
    /// The encoder runs without gradient (it is frozen).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Vec<Tensor>> {
        let Some(encoder) = &self.encoder else {
            bail!("{SHARED}");
        };
        let device = encoder.device();
        let tokens = tch::no_grad(|| encoder.forward(&pixel_values.to_device(device)))?;
        self.decoder.forward(&tokens.last_hidden_state)
    }

    /// h(x) from image features `[B, tokens, hidden]`: the open category's shared IP-Adapter
    /// encoder states ([`crate::models::ip_adapter::ImageEncoder::penultimate`]).
    pub fn decode(&self, features: &Tensor) -> Result<Vec<Tensor>> {
        if let Some(ip) = &self.config.ip_adapter {
            if features.size().get(1) != Some(&ip.tokens) {
                bail!(
                    "hypernetwork: the image encoder gives {:?} features, this hypernetwork was trained on [B, {}, {}]: another image encoder",
                    features.size(),
                    ip.tokens,
                    ip.hidden_size
                );
            }
        }
        self.decoder.forward(features)
    }

    /// Fails unless this is an open-category hypernetwork trained on the IP-Adapter whose
    /// file has SHA-256 `sha256`.
    pub fn check_ip_adapter(&self, sha256: &str, shown: &str) -> Result<()> {
        match &self.config.ip_adapter {
            None => bail!("this hypernetwork has its own image encoder and was not trained with an IP-Adapter: drop --ip-adapter"),
            Some(b) if b.sha256 != sha256 => bail!(
                "this hypernetwork was trained with another IP-Adapter (SHA-256 {}…), not {shown} ({}…)",
                &b.sha256[..12],
                &sha256[..sha256.len().min(12)]
            ),
            Some(_) => Ok(()),
        }
    }

    /// Personalizes from user images through the shared IP-Adapter image encoder (open
    /// category): preprocess as the encoder does, `hidden_states[-2]`, h(x_n), average → LoRA.
    pub fn personalize_shared(
        &self,
        encoder: &crate::models::ip_adapter::ImageEncoder,
        images: &[RgbImage],
    ) -> Result<LoraSet> {
        if images.is_empty() {
            bail!("personalize needs at least one image");
        }
        for img in images {
            check_image_size(img)?;
        }
        let features = encoder.penultimate(&encoder.pixel_values(images)?)?;
        let theta = tch::no_grad(|| self.decode(&features))?;
        self.lora_set(&theta)
    }

    /// The matrix specs, after checking `theta` has one tensor per matrix.
    fn check_theta(&self, theta: &[Tensor]) -> Result<&[MatrixSpec]> {
        let specs = self.decoder.matrices();
        if theta.len() != specs.len() {
            bail!(
                "hypernetwork output has {} matrices, expected {}",
                theta.len(),
                specs.len()
            );
        }
        Ok(specs)
    }

    /// Site `i`'s LoRA factors from the decoder's flat outputs `[B, ·]`: A `[B, r, in]`,
    /// B `[B, out, r]` (LiDB outputs are expanded through the frozen bases).
    fn site_factors(&self, specs: &[MatrixSpec], theta: &[Tensor], i: usize) -> (Tensor, Tensor) {
        let (sa, sb) = (specs[2 * i], specs[2 * i + 1]);
        // [B, r·in] → [B, r, in];  [B, out·r] → [B, out, r]  (LiDB: [B, r, a], [B, b, r])
        let a = theta[2 * i].view([-1, sa.rows, sa.cols]);
        let b = theta[2 * i + 1].view([-1, sb.rows, sb.cols]);
        match &self.lidb {
            Some(l) => l.expand(i, &a, &b),
            None => (a, b),
        }
    }

    /// ‖h(x)‖² per row, `[B]`: the paper's regulariser (eq. 5) on the weight update the
    /// hypernetwork predicts, Σ_sites ‖ΔW‖²_F with ΔW = (alpha/r)·B·A, computed as
    /// Σ (BᵀB ∘ AAᵀ) on r×r Gram matrices. (Penalising the factors A and B themselves would
    /// decay A — the only non-zero factor at init, B = 0 — before B receives any gradient.)
    pub fn squared_norm(&self, theta: &[Tensor]) -> Result<Tensor> {
        let specs = self.check_theta(theta)?;
        let scale = self.config.decoder.alpha / self.config.decoder.rank as f64;
        let mut total: Option<Tensor> = None;
        for i in 0..self.config.sites.len() {
            let (a, b) = self.site_factors(specs, theta, i);
            // AAᵀ, BᵀB: [B, r, r]
            let ga = a.matmul(&a.transpose(1, 2));
            let gb = b.transpose(1, 2).matmul(&b);
            let n =
                (ga * gb).sum_dim_intlist([1, 2].as_slice(), false, Kind::Float) * (scale * scale);
            total = Some(match total {
                Some(t) => t + n,
                None => n,
            });
        }
        total.context("no sites")
    }

    /// The per-sample LoRA of a batch (row b gets h(x_b)), `scale` on top of alpha/r.
    pub fn lora_batch(&self, theta: &[Tensor], scale: &Tensor) -> Result<LoraBatch> {
        let specs = self.check_theta(theta)?;
        let s = scale * (self.config.decoder.alpha / self.config.decoder.rank as f64);
        let mut batch = LoraBatch::new();
        for (i, site) in self.config.sites.iter().enumerate() {
            let (a, b) = self.site_factors(specs, theta, i);
            batch.insert(
                *site,
                LoraDelta {
                    a,
                    b,
                    scale: s.shallow_clone(),
                },
            );
        }
        Ok(batch)
    }

    /// One subject's LoRA from the outputs of its N images: β = (1/N)·Σ h(x_n).
    pub fn lora_set(&self, theta: &[Tensor]) -> Result<LoraSet> {
        let specs = self.check_theta(theta)?;
        // [B, ·] → [1, ·]: the mean over the subject's images (the expansion is linear)
        let mean: Vec<Tensor> = theta
            .iter()
            .map(|t| {
                t.detach()
                    .to_kind(Kind::Float)
                    .mean_dim(0, true, Kind::Float)
                    .to_device(Device::Cpu)
            })
            .collect();
        let mut weights = BTreeMap::new();
        for (i, site) in self.config.sites.iter().enumerate() {
            let (a, b) = self.site_factors(specs, &mean, i);
            weights.insert(
                *site,
                LoraWeights {
                    // [1, r, in] → [r, in];  [1, out, r] → [out, r]
                    a: a.squeeze_dim(0),
                    b: b.squeeze_dim(0),
                    alpha: self.config.decoder.alpha,
                },
            );
        }
        Ok(LoraSet { weights })
    }

    /// Personalizes from user images: preprocess, h(x_n) for each, average → LoRA.
    /// (Open category: [`Self::personalize_shared`].)
    pub fn personalize(&self, images: &[RgbImage]) -> Result<LoraSet> {
        if images.is_empty() {
            bail!("personalize needs at least one image");
        }
        let px = self.pixel_values(images)?;
        let theta = tch::no_grad(|| self.forward(&px))?;
        self.lora_set(&theta)
    }
}
