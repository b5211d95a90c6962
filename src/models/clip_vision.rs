//! transformers 5.23's `CLIPModel` (`models/clip/modeling_clip.py`) for the metrics: the vision
//! tower (`CLIPVisionTransformer`: patch conv without bias, `class_embedding`, learned
//! positions, `pre_layrnorm`, bidirectional pre-LN layers, `post_layernorm` on the CLS state),
//! `visual_projection`, the text tower ([`ClipTextModel`]) pooled at the EOS token, and
//! `text_projection`.
//!
//! Variable names are the checkpoint keys of a hub `CLIPModel` folder: `vision_model.…`,
//! `text_model.…`, `visual_projection.weight`, `text_projection.weight`, `logit_scale`.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Tensor};

use super::clip_text::{ClipTextConfig, ClipTextModel};
use super::vit::self_attention;
use crate::io::safetensors::SafeTensorsFile;
use crate::nn::{layer_norm, Activation, Linear};

/// Opens an HF model folder: `config.json` parsed into `T`, `model.safetensors` (or the
/// shards of `model.safetensors.index.json`). `what` names the model in errors.
pub fn open_hf_folder<T: DeserializeOwned>(
    dir: &Path,
    what: &str,
) -> Result<(T, Vec<SafeTensorsFile>)> {
    if !dir.is_dir() {
        bail!("{what} model folder {}: no such folder", dir.display());
    }
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        bail!("{what} model folder {}: missing config.json", dir.display());
    }
    let value = crate::io::folder::read_json(&cfg_path)?;
    let config: T = serde_json::from_value(value)
        .with_context(|| format!("{}: not a {what} config", cfg_path.display()))?;
    let single = dir.join("model.safetensors");
    let files = if single.is_file() {
        vec![SafeTensorsFile::open(&single)?]
    } else if dir.join("model.safetensors.index.json").is_file() {
        let index = crate::io::folder::read_json(&dir.join("model.safetensors.index.json"))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| {
                format!(
                    "{}: model.safetensors.index.json has no weight_map",
                    dir.display()
                )
            })?;
        let mut shards: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        shards.sort();
        shards.dedup();
        shards
            .iter()
            .map(|s| SafeTensorsFile::open(&dir.join(s)))
            .collect::<Result<_>>()?
    } else if dir.join("pytorch_model.bin").is_file() {
        bail!(
            "{what} model folder {}: only pytorch_model.bin; loracast reads safetensors only \
             (convert with `model.save_pretrained(dir, safe_serialization=True)`)",
            dir.display()
        );
    } else {
        bail!(
            "{what} model folder {}: missing model.safetensors",
            dir.display()
        );
    };
    Ok((config, files))
}

fn d_hidden() -> i64 {
    768
}
fn d_intermediate() -> i64 {
    3072
}
fn d_layers() -> i64 {
    12
}
fn d_heads() -> i64 {
    12
}
fn d_channels() -> i64 {
    3
}
fn d_image() -> i64 {
    224
}
fn d_patch() -> i64 {
    32
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_projection() -> i64 {
    512
}
fn d_logit_scale() -> f64 {
    2.6592
}
fn d_text() -> ClipTextConfig {
    ClipTextConfig::base()
}
fn d_vision() -> ClipVisionConfig {
    ClipVisionConfig::base()
}

/// transformers' `CLIPVisionConfig` (field names and defaults as there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_channels")]
    pub num_channels: i64,
    #[serde(default = "d_image")]
    pub image_size: i64,
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl ClipVisionConfig {
    /// transformers' defaults (openai/clip-vit-base-patch32).
    pub fn base() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }

    /// A tiny vision tower for tests (the fixture's shape).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 64,
            patch_size: 16,
            ..Self::base()
        }
    }

    pub fn validate(&self) -> Result<Activation> {
        let act = Activation::parse(&self.hidden_act).context("CLIP vision config: hidden_act")?;
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_channels", self.num_channels),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
        ];
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            bail!("CLIP vision config: {name} = {v} must be ≥ 1");
        }
        if self.num_hidden_layers < 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!("CLIP vision config: bad num_hidden_layers / num_attention_heads");
        }
        use crate::models::{check_positive, check_range, MAX_DEPTH, MAX_WIDTH};
        const WHAT: &str = "CLIP vision config";
        for (key, v, max) in [
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("num_channels", self.num_channels, MAX_WIDTH),
            (
                "image_size",
                self.image_size,
                crate::io::image::MAX_SIDE as i64,
            ),
            ("num_hidden_layers", self.num_hidden_layers, MAX_DEPTH),
        ] {
            check_range(WHAT, key, v, 0, max)?;
        }
        check_range(WHAT, "patch_size", self.patch_size, 1, self.image_size)?;
        check_positive(WHAT, "layer_norm_eps", self.layer_norm_eps)?;
        Ok(act)
    }

    /// A lower bound on the weight count (patch and position embeddings, attention and MLP
    /// matrices).
    pub fn min_params(&self) -> u128 {
        use crate::models::params;
        let (h, i, p) = (self.hidden_size, self.intermediate_size, self.patch_size);
        let per_layer = params(&[4, h, h]).saturating_add(params(&[2, h, i]));
        let grid = self.image_size / p.max(1);
        params(&[self.num_channels, p, p, h])
            .saturating_add(params(&[grid, grid, h]))
            .saturating_add(per_layer.saturating_mul(self.num_hidden_layers.max(0) as u128))
    }
}

/// transformers' `CLIPConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipConfig {
    #[serde(default = "d_text")]
    pub text_config: ClipTextConfig,
    #[serde(default = "d_vision")]
    pub vision_config: ClipVisionConfig,
    #[serde(default = "d_projection")]
    pub projection_dim: i64,
    #[serde(default = "d_logit_scale")]
    pub logit_scale_init_value: f64,
}

impl ClipConfig {
    /// Checks both towers and the projection, each message naming its key.
    pub fn validate(&self) -> Result<()> {
        self.text_config.validate()?;
        self.vision_config.validate()?;
        crate::models::check_range(
            "CLIP config",
            "projection_dim",
            self.projection_dim,
            1,
            crate::models::MAX_WIDTH,
        )?;
        if !self.logit_scale_init_value.is_finite() {
            bail!(
                "CLIP config: logit_scale_init_value must be a finite number, got {}",
                self.logit_scale_init_value
            );
        }
        Ok(())
    }

    /// A lower bound on the weight count of both towers and the projections.
    pub fn min_params(&self) -> u128 {
        let widths = self.text_config.hidden_size + self.vision_config.hidden_size;
        self.text_config
            .min_params()
            .saturating_add(self.vision_config.min_params())
            .saturating_add(crate::models::params(&[self.projection_dim, widths]))
    }

    /// A tiny CLIPModel for tests (the fixture's shape, tiny-b's 1000-token vocabulary).
    pub fn tiny() -> Self {
        Self {
            text_config: ClipTextConfig {
                vocab_size: 1000,
                hidden_size: 24,
                intermediate_size: 40,
                num_attention_heads: 3,
                bos_token_id: 998,
                eos_token_id: 999,
                pad_token_id: 0,
                ..ClipTextConfig::tiny()
            },
            vision_config: ClipVisionConfig::tiny(),
            projection_dim: 16,
            logit_scale_init_value: d_logit_scale(),
        }
    }
}

/// `CLIPEncoderLayer` without the causal mask.
#[derive(Debug)]
struct VisionLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: nn::LayerNorm,
    layer_norm2: nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: i64,
    act: Activation,
}

impl VisionLayer {
    fn new(vs: nn::Path, cfg: &ClipVisionConfig, act: Activation) -> Self {
        let (c, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let at = &vs / "self_attn";
        Self {
            q_proj: Linear::new(&at / "q_proj", c, c, true),
            k_proj: Linear::new(&at / "k_proj", c, c, true),
            v_proj: Linear::new(&at / "v_proj", c, c, true),
            out_proj: Linear::new(&at / "out_proj", c, c, true),
            layer_norm1: layer_norm(&vs / "layer_norm1", c, eps),
            layer_norm2: layer_norm(&vs / "layer_norm2", c, eps),
            fc1: Linear::new(&vs / "mlp" / "fc1", c, i, true),
            fc2: Linear::new(&vs / "mlp" / "fc2", i, c, true),
            heads: cfg.num_attention_heads,
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.layer_norm1.forward(x);
        let h = self_attention(&self.q_proj, &self.k_proj, &self.v_proj, &h, self.heads);
        let x = x + self.out_proj.forward(&h);
        let h = self
            .act
            .apply(&self.fc1.forward(&self.layer_norm2.forward(&x)));
        &x + self.fc2.forward(&h)
    }
}

/// `CLIPVisionTransformer` (`vision_model`).
#[derive(Debug)]
pub struct ClipVisionModel {
    pub config: ClipVisionConfig,
    /// `[hidden]`
    class_embedding: Tensor,
    /// `[1 + N, hidden]`
    position_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<VisionLayer>,
    post_layernorm: nn::LayerNorm,
}

impl ClipVisionModel {
    /// Builds the tower directly under `vs` (pass `root / "vision_model"` for hub keys).
    pub fn new(vs: nn::Path, cfg: &ClipVisionConfig) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        let act = cfg.validate()?;
        let c = cfg.hidden_size;
        let grid = cfg.image_size / cfg.patch_size;
        let emb = &vs / "embeddings";
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let p = cfg.patch_size;
        let conf = nn::ConvConfig {
            stride: p,
            bias: false,
            ..Default::default()
        };
        Ok(Self {
            config: cfg.clone(),
            class_embedding: emb.var("class_embedding", &[c], init),
            position_embedding: (&emb / "position_embedding").var(
                "weight",
                &[1 + grid * grid, c],
                init,
            ),
            patch_embedding: nn::conv2d(&emb / "patch_embedding", cfg.num_channels, c, p, conf),
            pre_layrnorm: layer_norm(&vs / "pre_layrnorm", c, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| VisionLayer::new(&vs / "encoder" / "layers" / i, cfg, act))
                .collect(),
            post_layernorm: layer_norm(&vs / "post_layernorm", c, cfg.layer_norm_eps),
        })
    }

    /// `pooler_output` `[B, hidden]`: `post_layernorm(last_hidden_state[:, 0])`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let x = self.hidden_state(pixel_values, self.layers.len())?;
        Ok(self.post_layernorm.forward(&x.select(1, 0)))
    }

    /// transformers' `hidden_states[layers]` `[B, 1 + N, hidden]`: the state after the first
    /// `layers` encoder layers (0 = `pre_layrnorm(embeddings)`; all layers = `last_hidden_state`;
    /// IP-Adapter-Plus takes `hidden_states[-2]`, i.e. `num_hidden_layers - 1`). No
    /// `post_layernorm` (that only touches the pooled CLS state).
    pub fn hidden_state(&self, pixel_values: &Tensor, layers: usize) -> Result<Tensor> {
        if layers > self.layers.len() {
            bail!(
                "CLIP vision: hidden state {layers} asked of a {}-layer tower",
                self.layers.len()
            );
        }
        let (s, ch) = (self.config.image_size, self.config.num_channels);
        let b = match pixel_values.size()[..] {
            [b, c, h, w] if c == ch && h == s && w == s => b,
            ref other => {
                bail!("CLIP vision input must be [B, {ch}, {s}, {s}] pixel values, got {other:?}")
            }
        };
        let x = pixel_values.to_device(self.class_embedding.device());
        // [B, C, H, W] → [B, hidden, h, w] → [B, N, hidden]
        let x = self
            .patch_embedding
            .forward(&x)
            .flatten(2, 3)
            .transpose(1, 2);
        let c = self.config.hidden_size;
        // [hidden] → [B, 1, hidden]
        let cls = self
            .class_embedding
            .view([1, 1, c])
            .expand([b, 1, c], false);
        // [B, 1 + N, hidden] (+ [1 + N, hidden] broadcast)
        let mut x = self
            .pre_layrnorm
            .forward(&(Tensor::cat(&[cls, x], 1) + &self.position_embedding));
        for layer in &self.layers[..layers] {
            x = layer.forward(&x);
        }
        Ok(x)
    }
}

fn d_vision_projection() -> i64 {
    512
}

/// transformers' `CLIPVisionConfig` as a `CLIPVisionModelWithProjection` folder's config.json
/// holds it: the tower's fields plus `projection_dim`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipVisionWithProjectionConfig {
    #[serde(flatten)]
    pub vision: ClipVisionConfig,
    #[serde(default = "d_vision_projection")]
    pub projection_dim: i64,
}

/// transformers' `CLIPVisionModelWithProjection` (IP-Adapter's image encoder): `vision_model`
/// and `visual_projection` (no bias), hub keys `vision_model.…`, `visual_projection.weight`.
#[derive(Debug)]
pub struct ClipVisionModelWithProjection {
    pub config: ClipVisionWithProjectionConfig,
    pub vision_model: ClipVisionModel,
    visual_projection: Linear,
}

impl ClipVisionModelWithProjection {
    pub fn new(vs: nn::Path, cfg: &ClipVisionWithProjectionConfig) -> Result<Self> {
        if cfg.projection_dim < 1 {
            bail!("CLIP vision config: projection_dim must be ≥ 1");
        }
        let vision_model = ClipVisionModel::new(&vs / "vision_model", &cfg.vision)?;
        let _rng = crate::util::rng_lock();
        Ok(Self {
            config: cfg.clone(),
            vision_model,
            visual_projection: Linear::new(
                &vs / "visual_projection",
                cfg.vision.hidden_size,
                cfg.projection_dim,
                false,
            ),
        })
    }

    /// Loads a `CLIPVisionModelWithProjection` folder (`config.json` + `model.safetensors`)
    /// strictly. A full `CLIPModel` folder (a `vision_config` inside) is refused by name.
    pub fn load(dir: &Path, device: Device) -> Result<(Self, nn::VarStore)> {
        let (raw, files): (serde_json::Value, _) = open_hf_folder(dir, "CLIP vision")?;
        if raw.get("vision_config").is_some() || raw.get("text_config").is_some() {
            bail!(
                "{}: config.json is a CLIPModel config (text and vision towers); an image encoder \
                 folder holds a CLIPVisionModelWithProjection (model_type \"clip_vision_model\")",
                dir.display()
            );
        }
        let config: ClipVisionWithProjectionConfig = serde_json::from_value(raw)
            .with_context(|| format!("{}/config.json: not a CLIP vision config", dir.display()))?;
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(vs.root(), &config)?;
        crate::io::safetensors::load_strict(
            &mut vs,
            &files,
            &["vision_model.embeddings.position_ids"],
        )
        .with_context(|| format!("{}: weights do not match config.json", dir.display()))?;
        vs.freeze();
        Ok((model, vs))
    }

    /// `image_embeds` `[B, projection_dim]`: `visual_projection(pooler_output)`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        Ok(self
            .visual_projection
            .forward(&self.vision_model.forward(pixel_values)?))
    }
}

/// `CLIPModel`: both towers and their projections.
#[derive(Debug)]
pub struct ClipModel {
    pub config: ClipConfig,
    pub text_model: ClipTextModel,
    /// `vision_model.…` and `visual_projection` (the same keys as a
    /// `CLIPVisionModelWithProjection`).
    pub vision: ClipVisionModelWithProjection,
    text_projection: Linear,
}

impl ClipModel {
    /// Builds the model under `vs` with the hub key names.
    pub fn new(vs: nn::Path, cfg: &ClipConfig) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        if cfg.projection_dim < 1 {
            bail!("CLIP config: projection_dim must be ≥ 1");
        }
        let _ = vs.var(
            "logit_scale",
            &[],
            nn::Init::Const(cfg.logit_scale_init_value),
        );
        Ok(Self {
            config: cfg.clone(),
            text_model: ClipTextModel::new_at(&vs / "text_model", &cfg.text_config)?,
            vision: ClipVisionModelWithProjection::new(
                vs.clone(),
                &ClipVisionWithProjectionConfig {
                    vision: cfg.vision_config.clone(),
                    projection_dim: cfg.projection_dim,
                },
            )?,
            text_projection: Linear::new(
                &vs / "text_projection",
                cfg.text_config.hidden_size,
                cfg.projection_dim,
                false,
            ),
        })
    }

    /// Loads a `CLIPModel` folder (`config.json` + `model.safetensors`) strictly.
    pub fn load(dir: &Path, device: Device) -> Result<(Self, nn::VarStore)> {
        let (config, files): (ClipConfig, _) = open_hf_folder(dir, "CLIP")?;
        config.validate()?;
        crate::io::safetensors::check_size_budget(&files, config.min_params(), "CLIP config.json")?;
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(vs.root(), &config)?;
        let ignore = [
            "text_model.embeddings.position_ids",
            "vision_model.embeddings.position_ids",
        ];
        crate::io::safetensors::load_strict(&mut vs, &files, &ignore)
            .with_context(|| format!("{}: weights do not match config.json", dir.display()))?;
        vs.freeze();
        Ok((model, vs))
    }

    /// `image_embeds` `[B, projection_dim]` (unnormalized) of `pixel_values`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision.image_embeds(pixel_values)
    }

    /// `text_embeds` `[B, projection_dim]` (unnormalized) of token ids `[B, L]`: the final
    /// state at the EOS token (`argmax(ids)` for the legacy `eos_token_id == 2` configs, else
    /// the first `eos_token_id`), projected.
    pub fn text_embeds(&self, ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text_model.forward(ids)?;
        let pooled = self.text_model.pool(&hidden, ids)?;
        Ok(self.text_projection.forward(&pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_shapes_names_and_eos_pooling() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ClipConfig::tiny();
        let m = ClipModel::new(vs.root(), &cfg).unwrap();
        let px = Tensor::randn([2, 3, 64, 64], tch::kind::FLOAT_CPU);
        assert_eq!(m.image_embeds(&px).unwrap().size(), vec![2, 16]);
        assert!(m.image_embeds(&px.narrow(2, 0, 32)).is_err());
        // Padding after the EOS token does not change the pooled state (causal attention).
        let a = Tensor::from_slice(&[998i64, 5, 6, 999]).unsqueeze(0);
        let b = Tensor::from_slice(&[998i64, 5, 6, 999, 0, 0]).unsqueeze(0);
        let (ea, eb) = (m.text_embeds(&a).unwrap(), m.text_embeds(&b).unwrap());
        assert_eq!(ea.size(), vec![1, 16]);
        assert!(ea.allclose(&eb, 1e-5, 1e-6, false));
        assert!(m
            .text_embeds(&Tensor::from_slice(&[998i64, 5]).unsqueeze(0))
            .is_err());
        let vars = vs.variables();
        for k in [
            "logit_scale",
            "visual_projection.weight",
            "text_projection.weight",
            "vision_model.embeddings.class_embedding",
            "vision_model.embeddings.patch_embedding.weight",
            "vision_model.pre_layrnorm.weight",
            "vision_model.encoder.layers.1.self_attn.out_proj.bias",
            "text_model.final_layer_norm.bias",
        ] {
            assert!(vars.contains_key(k), "{k}");
        }
        assert!(!vars.contains_key("vision_model.embeddings.patch_embedding.bias"));
    }
}
