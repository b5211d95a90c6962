//! transformers 5.23's `ViTModel` (`models/vit/modeling_vit.py`), as google/vit-base-patch16-224-in21k
//! and facebook/dino-vits16 ship it: patch embedding conv, CLS token, learned position
//! embeddings (no interpolation: the input must be `image_size`), pre-LN layers (exact GELU by
//! default, scale `head_dim^-0.5`, no mask), the final `layernorm`, and the optional tanh
//! `pooler`.
//!
//! Variable names are the hub checkpoints' keys: `embeddings.{cls_token, position_embeddings,
//! patch_embeddings.projection}`, `encoder.layer.{i}.attention.attention.{query,key,value}`,
//! `…attention.output.dense`, `…intermediate.dense`, `…output.dense`, `…layernorm_{before,after}`,
//! `layernorm`, `pooler.dense` — optionally under `vit.` (task-head checkpoints).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Device, Tensor};

use crate::nn::{conv2d, layer_norm, Activation, Linear};

fn d_hidden() -> i64 {
    768
}
fn d_layers() -> i64 {
    12
}
fn d_heads() -> i64 {
    12
}
fn d_intermediate() -> i64 {
    3072
}
fn d_act() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-12
}
fn d_image() -> i64 {
    224
}
fn d_patch() -> i64 {
    16
}
fn d_channels() -> i64 {
    3
}
fn d_true() -> bool {
    true
}
fn d_pooler_act() -> String {
    "tanh".into()
}

/// transformers' `ViTConfig` (field names and defaults as there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViTConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image")]
    pub image_size: i64,
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    #[serde(default = "d_channels")]
    pub num_channels: i64,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub pooler_output_size: Option<i64>,
    #[serde(default = "d_pooler_act")]
    pub pooler_act: String,
}

impl ViTConfig {
    /// transformers' defaults (ViT-B/16).
    pub fn base() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }

    /// facebook/dino-vits16 (ViT-S/16).
    pub fn dino_vits16() -> Self {
        Self {
            hidden_size: 384,
            num_attention_heads: 6,
            intermediate_size: 1536,
            layer_norm_eps: 1e-6,
            ..Self::base()
        }
    }

    /// A tiny ViT for tests (the fixture's shape).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 37,
            image_size: 64,
            ..Self::base()
        }
    }

    /// Checks the sizes and returns the activation.
    pub fn validate(&self) -> Result<Activation> {
        let act = Activation::parse(&self.hidden_act).context("ViT config: hidden_act")?;
        if self.pooler_act != "tanh" {
            bail!(
                "ViT config: pooler_act {:?} is not supported (tanh)",
                self.pooler_act
            );
        }
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("image_size", self.image_size),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ];
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            bail!("ViT config: {name} = {v} must be ≥ 1");
        }
        if self.num_hidden_layers < 0 {
            bail!("ViT config: num_hidden_layers must be ≥ 0");
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "ViT config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        use crate::models::{check_positive, check_range, MAX_DEPTH, MAX_WIDTH};
        const WHAT: &str = "ViT config";
        for (key, v, max) in [
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * MAX_WIDTH),
            (
                "image_size",
                self.image_size,
                crate::io::image::MAX_SIDE as i64,
            ),
            ("num_channels", self.num_channels, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_DEPTH),
        ] {
            check_range(WHAT, key, v, 0, max)?;
        }
        check_range(WHAT, "patch_size", self.patch_size, 1, self.image_size)?;
        if let Some(p) = self.pooler_output_size {
            check_range(WHAT, "pooler_output_size", p, 1, MAX_WIDTH)?;
        }
        check_positive(WHAT, "layer_norm_eps", self.layer_norm_eps)?;
        Ok(act)
    }

    /// A lower bound on the weight count (patch projection, position embeddings, attention and
    /// MLP matrices), to compare with a weights file before anything is allocated.
    pub fn min_params(&self) -> u128 {
        use crate::models::params;
        let (h, i, p) = (self.hidden_size, self.intermediate_size, self.patch_size);
        let per_layer = params(&[4, h, h]).saturating_add(params(&[2, h, i]));
        params(&[self.num_channels, p, p, h])
            .saturating_add(params(&[self.grid(), self.grid(), h]))
            .saturating_add(per_layer.saturating_mul(self.num_hidden_layers.max(0) as u128))
    }

    /// Patches per image side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

/// Bidirectional multi-head attention `x: [B, N, C]` with separate q/k/v projections.
pub(crate) fn self_attention(q: &Linear, k: &Linear, v: &Linear, x: &Tensor, heads: i64) -> Tensor {
    let (b, n, c) = x.size3().expect("[B, N, C] activations");
    let dh = c / heads;
    // [B, N, C] → [B, H, N, Dh]
    let split = |t: Tensor| t.view([b, n, heads, dh]).transpose(1, 2);
    let (q, k, v) = (
        split(q.forward(x)),
        split(k.forward(x)),
        split(v.forward(x)),
    );
    let scale = (dh as f64).powf(-0.5);
    let o =
        Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, false, scale, false);
    // [B, H, N, Dh] → [B, N, C]
    o.transpose(1, 2).reshape([b, n, c])
}

/// `ViTLayer` (hub key names).
#[derive(Debug)]
struct ViTLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    intermediate: Linear,
    output: Linear,
    layernorm_before: nn::LayerNorm,
    layernorm_after: nn::LayerNorm,
    heads: i64,
    act: Activation,
}

impl ViTLayer {
    fn new(vs: nn::Path, cfg: &ViTConfig, act: Activation) -> Self {
        let (c, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let att = &vs / "attention" / "attention";
        Self {
            query: Linear::new(&att / "query", c, c, cfg.qkv_bias),
            key: Linear::new(&att / "key", c, c, cfg.qkv_bias),
            value: Linear::new(&att / "value", c, c, cfg.qkv_bias),
            attention_output: Linear::new(&vs / "attention" / "output" / "dense", c, c, true),
            intermediate: Linear::new(&vs / "intermediate" / "dense", c, i, true),
            output: Linear::new(&vs / "output" / "dense", i, c, true),
            layernorm_before: layer_norm(&vs / "layernorm_before", c, eps),
            layernorm_after: layer_norm(&vs / "layernorm_after", c, eps),
            heads: cfg.num_attention_heads,
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.layernorm_before.forward(x);
        let h = self_attention(&self.query, &self.key, &self.value, &h, self.heads);
        let x = x + self.attention_output.forward(&h);
        let h = self
            .act
            .apply(&self.intermediate.forward(&self.layernorm_after.forward(&x)));
        &x + self.output.forward(&h)
    }
}

/// The outputs of [`ViTModel::forward`].
#[derive(Debug)]
pub struct ViTOutput {
    /// `[B, 1 + N, hidden]` after the final layernorm.
    pub last_hidden_state: Tensor,
    /// `[B, pooler_output_size]`, when the model has a pooler.
    pub pooler_output: Option<Tensor>,
}

impl ViTOutput {
    /// The CLS feature `last_hidden_state[:, 0]` `[B, hidden]` (the DINO metric's feature).
    pub fn cls(&self) -> Tensor {
        self.last_hidden_state.select(1, 0)
    }
}

/// `ViTModel`.
#[derive(Debug)]
pub struct ViTModel {
    pub config: ViTConfig,
    /// `[1, 1, hidden]`
    cls_token: Tensor,
    /// `[1, 1 + N, hidden]`
    position_embeddings: Tensor,
    projection: nn::Conv2D,
    layers: Vec<ViTLayer>,
    layernorm: nn::LayerNorm,
    pooler: Option<Linear>,
}

impl ViTModel {
    /// Builds the model under `vs`, with the pooler when `pooler` is set.
    pub fn new(vs: nn::Path, cfg: &ViTConfig, pooler: bool) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        let act = cfg.validate()?;
        let (c, n) = (cfg.hidden_size, cfg.grid() * cfg.grid());
        let emb = &vs / "embeddings";
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let p = cfg.patch_size;
        let proj_vs = &emb / "patch_embeddings" / "projection";
        Ok(Self {
            config: cfg.clone(),
            cls_token: emb.var("cls_token", &[1, 1, c], init),
            position_embeddings: emb.var("position_embeddings", &[1, 1 + n, c], init),
            projection: conv2d(proj_vs, cfg.num_channels, c, p, p, 0),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ViTLayer::new(&vs / "encoder" / "layer" / i, cfg, act))
                .collect(),
            layernorm: layer_norm(&vs / "layernorm", c, cfg.layer_norm_eps),
            pooler: pooler.then(|| {
                let out = cfg.pooler_output_size.unwrap_or(c);
                Linear::new(&vs / "pooler" / "dense", c, out, true)
            }),
        })
    }

    /// Loads an HF folder (`config.json` + `model.safetensors`) strictly. The pooler is built
    /// when the file has `pooler.dense.weight`; keys may sit under `vit.`.
    pub fn load(dir: &Path, device: Device) -> Result<(Self, nn::VarStore)> {
        let (config, files): (ViTConfig, _) = super::clip_vision::open_hf_folder(dir, "ViT")?;
        config.validate()?;
        let names = crate::io::safetensors::tensor_names(&files);
        let prefix = if names.iter().any(|n| n.starts_with("vit.")) {
            "vit."
        } else {
            ""
        };
        let pooler = names
            .iter()
            .any(|n| *n == format!("{prefix}pooler.dense.weight"));
        let pooler_params = match pooler {
            true => crate::models::params(&[
                config.pooler_output_size.unwrap_or(config.hidden_size),
                config.hidden_size,
            ]),
            false => 0,
        };
        let min_params = config.min_params().saturating_add(pooler_params);
        crate::io::safetensors::check_size_budget(&files, min_params, "ViT config.json")?;
        let mut vs = nn::VarStore::new(device);
        let root = match prefix {
            "" => vs.root(),
            _ => vs.root() / "vit",
        };
        let model = Self::new(root, &config, pooler)?;
        // Task heads and the masked-image-modeling token are not part of ViTModel.
        let ignore: Vec<&str> = names
            .iter()
            .filter(|n| !n.starts_with(prefix) || n.ends_with("mask_token"))
            .map(String::as_str)
            .collect();
        crate::io::safetensors::load_strict(&mut vs, &files, &ignore)
            .with_context(|| format!("{}: weights do not match config.json", dir.display()))?;
        vs.freeze();
        Ok((model, vs))
    }

    pub fn device(&self) -> Device {
        self.cls_token.device()
    }

    /// `pixel_values` `[B, C, image_size, image_size]` → outputs.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ViTOutput> {
        let s = self.config.image_size;
        let b = match pixel_values.size()[..] {
            [b, ch, h, w] if ch == self.config.num_channels && h == s && w == s => b,
            ref other => bail!(
                "ViT input must be [B, {}, {s}, {s}] pixel values, got {other:?}",
                self.config.num_channels
            ),
        };
        let x = pixel_values.to_device(self.cls_token.device());
        // [B, C, H, W] → [B, hidden, h, w] → [B, N, hidden]
        let x = self.projection.forward(&x).flatten(2, 3).transpose(1, 2);
        let cls = self
            .cls_token
            .expand([b, 1, self.config.hidden_size], false);
        // [B, 1 + N, hidden]
        let mut x = Tensor::cat(&[cls, x], 1) + &self.position_embeddings;
        for layer in &self.layers {
            x = layer.forward(&x);
        }
        let last_hidden_state = self.layernorm.forward(&x);
        let pooler_output = self
            .pooler
            .as_ref()
            .map(|p| p.forward(&last_hidden_state.select(1, 0)).tanh());
        Ok(ViTOutput {
            last_hidden_state,
            pooler_output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_shapes_and_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ViTConfig::tiny();
        let m = ViTModel::new(vs.root(), &cfg, true).unwrap();
        let out = m
            .forward(&Tensor::randn([2, 3, 64, 64], tch::kind::FLOAT_CPU))
            .unwrap();
        assert_eq!(out.last_hidden_state.size(), vec![2, 17, 32]);
        assert_eq!(out.cls().size(), vec![2, 32]);
        assert_eq!(out.pooler_output.unwrap().size(), vec![2, 32]);
        let vars = vs.variables();
        for k in [
            "embeddings.cls_token",
            "embeddings.patch_embeddings.projection.weight",
            "encoder.layer.1.attention.attention.query.weight",
            "encoder.layer.0.attention.output.dense.bias",
            "encoder.layer.0.intermediate.dense.weight",
            "encoder.layer.0.output.dense.weight",
            "layernorm.weight",
            "pooler.dense.weight",
        ] {
            assert!(vars.contains_key(k), "{k}");
        }
        assert!(m
            .forward(&Tensor::zeros([1, 3, 32, 32], tch::kind::FLOAT_CPU))
            .is_err());
    }
}
