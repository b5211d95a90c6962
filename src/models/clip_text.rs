//! The CLIP text encoder, transformers 5.23's `CLIPTextModel` (`models/clip/modeling_clip.py`)
//! as SD1.x pipelines use it: token + position embeddings, pre-LayerNorm transformer layers
//! with causal self-attention (the sdpa path: `is_causal=True`, no padding mask, scale
//! `head_dim^-0.5`), then `final_layer_norm`. `forward` returns `last_hidden_state`;
//! [`ClipTextModel::encode`] also taps one of `hidden_states` (SDXL's penultimate layer,
//! `--clip-skip`) and pools at the EOS token. [`ClipTextModelWithProjection`] adds SDXL's
//! `text_encoder_2` head: `text_embeds = text_projection(pooled)`.
//!
//! Variable names are the checkpoint keys of `text_encoder/model.safetensors`: under
//! `text_model.` as in hub checkpoints ([`ClipTextModel::new`]), or unprefixed as transformers 5
//! saves them ([`ClipTextModel::new_at`]); [`ClipTextModel::load`] picks the file's layout.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use crate::io::folder::DiffusersFolder;
use crate::nn::{layer_norm, Activation, Linear};

fn d_vocab() -> i64 {
    49408
}
fn d_hidden() -> i64 {
    512
}
fn d_intermediate() -> i64 {
    2048
}
fn d_layers() -> i64 {
    12
}
fn d_heads() -> i64 {
    8
}
fn d_positions() -> i64 {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_pad() -> i64 {
    1
}
fn d_bos() -> i64 {
    49406
}
fn d_eos() -> i64 {
    49407
}
fn d_projection() -> i64 {
    512
}

/// transformers' `CLIPTextConfig` (field names and defaults as there).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: i64,
    #[serde(default = "d_hidden")]
    pub hidden_size: i64,
    #[serde(default = "d_intermediate")]
    pub intermediate_size: i64,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_positions")]
    pub max_position_embeddings: i64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub attention_dropout: f64,
    #[serde(default = "d_pad")]
    pub pad_token_id: i64,
    #[serde(default = "d_bos")]
    pub bos_token_id: i64,
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    /// `CLIPTextModelWithProjection`'s `text_projection` width.
    #[serde(default = "d_projection")]
    pub projection_dim: i64,
}

impl ClipTextConfig {
    /// transformers' defaults, i.e. what an empty config.json means (openai/clip-vit-base-patch32).
    pub fn base() -> Self {
        serde_json::from_str("{}").expect("all fields have defaults")
    }

    /// Stable Diffusion 1.x's text encoder (openai/clip-vit-large-patch14).
    pub fn sd15() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_attention_heads: 12,
            ..Self::base()
        }
    }

    /// A tiny text encoder for tests (tiny-a's shape).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            ..Self::base()
        }
    }

    pub fn from_json(value: serde_json::Value) -> Result<Self> {
        let cfg: Self = serde_json::from_value(value)
            .map_err(|e| anyhow::anyhow!("text_encoder/config.json: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Upper limits of the sizes and the epsilon, each named by its key.
    fn check_limits(&self) -> Result<()> {
        use crate::models::{check_positive, check_range, MAX_DEPTH, MAX_WIDTH};
        const WHAT: &str = "text_encoder config";
        for (key, v, max) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, 4 * MAX_WIDTH),
            ("num_attention_heads", self.num_attention_heads, MAX_WIDTH),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_WIDTH,
            ),
            ("num_hidden_layers", self.num_hidden_layers, MAX_DEPTH),
        ] {
            check_range(WHAT, key, v, 0, max)?;
        }
        check_positive(WHAT, "layer_norm_eps", self.layer_norm_eps)
    }

    /// A lower bound on the weight count (token and position embeddings, attention and MLP
    /// matrices), to compare with the weights file before anything is allocated.
    pub fn min_params(&self) -> u128 {
        use crate::models::params;
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let per_layer = params(&[4, h, h]).saturating_add(params(&[2, h, i]));
        params(&[self.vocab_size + self.max_position_embeddings, h])
            .saturating_add(per_layer.saturating_mul(self.num_hidden_layers.max(0) as u128))
    }

    /// Checks the sizes and returns the activation.
    pub fn validate(&self) -> Result<Activation> {
        let act = Activation::parse(&self.hidden_act)
            .map_err(|e| anyhow::anyhow!("text_encoder config: hidden_act: {e}"))?;
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
            ("projection_dim", self.projection_dim),
        ];
        if let Some((name, v)) = sizes.iter().find(|(_, v)| *v < 1) {
            bail!("text_encoder config: {name} = {v} must be ≥ 1");
        }
        if self.num_hidden_layers < 0 {
            bail!("text_encoder config: num_hidden_layers must be ≥ 0");
        }
        self.check_limits()?;
        if self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "text_encoder config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Ok(act)
    }
}

/// `CLIPAttention`: q/k/v/out projections with biases.
#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: i64,
}

impl ClipAttention {
    fn new(vs: nn::Path, dim: i64, heads: i64) -> Self {
        Self {
            q_proj: Linear::new(&vs / "q_proj", dim, dim, true),
            k_proj: Linear::new(&vs / "k_proj", dim, dim, true),
            v_proj: Linear::new(&vs / "v_proj", dim, dim, true),
            out_proj: Linear::new(&vs / "out_proj", dim, dim, true),
            heads,
        }
    }

    /// Causal self-attention, `x: [B, L, C]`.
    fn forward(&self, x: &Tensor, b: i64, l: i64, c: i64) -> Tensor {
        let dh = c / self.heads;
        // [B, L, C] → [B, H, L, Dh]
        let split = |t: Tensor| t.view([b, l, self.heads, dh]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let scale = (dh as f64).powf(-0.5);
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            scale,
            false,
        );
        // [B, H, L, Dh] → [B, L, C]
        let o = o.transpose(1, 2).reshape([b, l, c]);
        self.out_proj.forward(&o)
    }
}

/// `CLIPEncoderLayer`: pre-norm attention and MLP, each with a residual.
#[derive(Debug)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: nn::LayerNorm,
    act: Activation,
}

impl ClipEncoderLayer {
    fn new(vs: nn::Path, cfg: &ClipTextConfig, act: Activation) -> Self {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Self {
            self_attn: ClipAttention::new(&vs / "self_attn", c, cfg.num_attention_heads),
            layer_norm1: layer_norm(&vs / "layer_norm1", c, eps),
            fc1: Linear::new(&vs / "mlp" / "fc1", c, cfg.intermediate_size, true),
            fc2: Linear::new(&vs / "mlp" / "fc2", cfg.intermediate_size, c, true),
            layer_norm2: layer_norm(&vs / "layer_norm2", c, eps),
            act,
        }
    }

    fn forward(&self, x: &Tensor, b: i64, l: i64, c: i64) -> Tensor {
        use tch::nn::Module;
        let x = x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x), b, l, c);
        let h = self
            .act
            .apply(&self.fc1.forward(&self.layer_norm2.forward(&x)));
        x + self.fc2.forward(&h)
    }
}

/// `CLIPTextModel` (its `text_model`, a `CLIPTextTransformer`).
#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    /// `[vocab_size, hidden]`
    token_embedding: Tensor,
    /// `[max_position_embeddings, hidden]`
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: nn::LayerNorm,
}

impl ClipTextModel {
    /// Builds the model under `vs / "text_model"` (the hub checkpoints' key names).
    pub fn new(vs: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        Self::new_at(&vs / "text_model", cfg)
    }

    /// Builds the model directly under `vs` (`embeddings.…`, `encoder.…`, `final_layer_norm.…`,
    /// the key names transformers 5 saves `CLIPTextModel` with).
    pub fn new_at(vs: nn::Path, cfg: &ClipTextConfig) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        let act = cfg.validate()?;
        let emb = &vs / "embeddings";
        let init = crate::util::init(nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        });
        let c = cfg.hidden_size;
        Ok(Self {
            config: cfg.clone(),
            token_embedding: (&emb / "token_embedding").var("weight", &[cfg.vocab_size, c], init),
            position_embedding: (&emb / "position_embedding").var(
                "weight",
                &[cfg.max_position_embeddings, c],
                init,
            ),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ClipEncoderLayer::new(&vs / "encoder" / "layers" / i, cfg, act))
                .collect(),
            final_layer_norm: layer_norm(&vs / "final_layer_norm", c, cfg.layer_norm_eps),
        })
    }

    /// Reads `text_encoder/config.json` and `text_encoder/model.safetensors` strictly. Both
    /// key layouts load: `text_model.…` (hub checkpoints, transformers 4) and unprefixed
    /// (transformers 5 saves; it strips the prefix on load). The variables are named as in
    /// the file. An old `embeddings.position_ids` buffer may be present and is ignored.
    pub fn load(folder: &DiffusersFolder, device: Device) -> Result<(Self, nn::VarStore)> {
        let (model, _, vs) = load_component(folder, "text_encoder", false, device)?;
        Ok((model, vs))
    }

    /// `last_hidden_state` `[B, L, hidden]` of token ids `[B, L]` (L ≤ max_position_embeddings).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.run(ids, None)?.1)
    }

    /// `hidden_states[-from_end]` (transformers' `output_hidden_states=True`: index 0 is the
    /// embedding output, index i the output of layer i, no final LayerNorm), the
    /// `last_hidden_state` and the EOS-pooled state `[B, hidden]` of token ids `[B, L]`.
    pub fn encode(&self, ids: &Tensor, from_end: usize) -> Result<ClipTextOutput> {
        let n = self.layers.len() + 1;
        if from_end < 1 || from_end > n {
            bail!(
                "the text encoder has {} hidden states; hidden_states[-{from_end}] does not exist (--clip-skip too large)",
                n
            );
        }
        let (tap, last) = self.run(ids, Some(n - from_end))?;
        let pooled = self.pool(&last, ids)?;
        Ok(ClipTextOutput {
            hidden: tap.unwrap_or_else(|| last.shallow_clone()),
            last_hidden_state: last,
            pooled,
        })
    }

    /// `final_layer_norm` (SD1.x's `--clip-skip` applies it to the tapped hidden state).
    pub fn final_layer_norm(&self, x: &Tensor) -> Tensor {
        use tch::nn::Module;
        self.final_layer_norm.forward(x)
    }

    /// The state at the EOS token of each row (transformers' `pooler_output`): `argmax(ids)` for
    /// the legacy `eos_token_id == 2` configs, else the first `eos_token_id`.
    /// `hidden: [B, L, C]`, `ids: [B, L]` → `[B, C]`.
    pub fn pool(&self, hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_device(hidden.device()).to_kind(Kind::Int64);
        let eos = self.config.eos_token_id;
        let pos = match eos {
            2 => ids.argmax(-1, false),
            _ => {
                let hit = ids.eq(eos).to_kind(Kind::Int);
                if hit
                    .sum_dim_intlist(-1, false, Kind::Int64)
                    .min()
                    .int64_value(&[])
                    < 1
                {
                    bail!("text ids have no end-of-text token {eos}");
                }
                hit.argmax(-1, false)
            }
        };
        let b = ids.size()[0];
        let rows = Tensor::arange(b, (Kind::Int64, hidden.device()));
        // [B, L, C] → [B, C]
        Ok(hidden.index(&[Some(rows), Some(pos)]))
    }

    /// Runs the layers; returns `hidden_states[tap]` if asked and `last_hidden_state`.
    fn run(&self, ids: &Tensor, tap: Option<usize>) -> Result<(Option<Tensor>, Tensor)> {
        let (b, l) = match ids.size()[..] {
            [b, l] => (b, l),
            ref s => bail!("text encoder input must be [B, L] token ids, got shape {s:?}"),
        };
        if !matches!(ids.kind(), Kind::Int64 | Kind::Int) {
            bail!(
                "text encoder input must be integer token ids, got {:?}",
                ids.kind()
            );
        }
        if l > self.config.max_position_embeddings {
            bail!(
                "text encoder input has {l} tokens, the model takes at most {}",
                self.config.max_position_embeddings
            );
        }
        if b * l > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= self.config.vocab_size {
                bail!(
                    "token id {} is outside the text encoder's vocabulary (0..{})",
                    if lo < 0 { lo } else { hi },
                    self.config.vocab_size
                );
            }
        }
        let device = self.token_embedding.device();
        let ids = ids.to_device(device).to_kind(Kind::Int64);
        let positions = Tensor::arange(l, (Kind::Int64, device));
        // [B, L] → [B, L, C] (+ [L, C] broadcast)
        let mut x = Tensor::embedding(&self.token_embedding, &ids, -1, false, false)
            + Tensor::embedding(&self.position_embedding, &positions, -1, false, false);
        let c = self.config.hidden_size;
        let mut tapped = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if tap == Some(i) {
                tapped = Some(x.shallow_clone());
            }
            x = layer.forward(&x, b, l, c);
        }
        if tap == Some(self.layers.len()) {
            tapped = Some(x.shallow_clone());
        }
        Ok((tapped, self.final_layer_norm(&x)))
    }
}

/// [`ClipTextModel::encode`]'s result.
#[derive(Debug)]
pub struct ClipTextOutput {
    /// The tapped `hidden_states[-from_end]` `[B, L, C]`.
    pub hidden: Tensor,
    /// `[B, L, C]`, after `final_layer_norm`.
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the EOS token `[B, C]`.
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`): the text model and a
/// bias-free `text_projection` `[projection_dim, hidden]` of the pooled state (`text_embeds`).
#[derive(Debug)]
pub struct ClipTextModelWithProjection {
    pub text_model: ClipTextModel,
    text_projection: Linear,
}

impl ClipTextModelWithProjection {
    /// Under `vs`: `text_model.…` (or unprefixed, `prefixed = false`) and `text_projection`.
    pub fn new(vs: nn::Path, cfg: &ClipTextConfig, prefixed: bool) -> Result<Self> {
        let text_model = match prefixed {
            true => ClipTextModel::new(vs.clone(), cfg)?,
            false => ClipTextModel::new_at(vs.clone(), cfg)?,
        };
        let _rng = crate::util::rng_lock();
        Ok(Self {
            text_model,
            text_projection: Linear::new(
                &vs / "text_projection",
                cfg.hidden_size,
                cfg.projection_dim,
                false,
            ),
        })
    }

    /// Reads `<component>/config.json` and `<component>/model.safetensors` strictly.
    pub fn load(
        folder: &DiffusersFolder,
        component: &str,
        device: Device,
    ) -> Result<(Self, nn::VarStore)> {
        let (text_model, projection, vs) = load_component(folder, component, true, device)?;
        let text_projection = projection.context("internal error: no text_projection built")?;
        Ok((
            Self {
                text_model,
                text_projection,
            },
            vs,
        ))
    }

    /// [`ClipTextModel::encode`] with `pooled` replaced by `text_embeds`
    /// `[B, projection_dim]`.
    pub fn encode(&self, ids: &Tensor, from_end: usize) -> Result<ClipTextOutput> {
        let out = self.text_model.encode(ids, from_end)?;
        Ok(ClipTextOutput {
            pooled: self.text_projection.forward(&out.pooled),
            ..out
        })
    }
}

/// Loads a CLIP text encoder component in either key layout (`text_model.…` as hub
/// checkpoints and transformers 4 save it, or unprefixed as transformers 5 saves
/// `CLIPTextModel`), with `text_projection` when `projection` is set. An old
/// `embeddings.position_ids` buffer may be present and is ignored.
fn load_component(
    folder: &DiffusersFolder,
    component: &str,
    projection: bool,
    device: Device,
) -> Result<(ClipTextModel, Option<Linear>, nn::VarStore)> {
    let config = ClipTextConfig::from_json(folder.config(component, "config.json")?)
        .map_err(|e| anyhow::anyhow!("{component}: {e:#}"))?;
    let files = folder.weights(component, "model")?;
    crate::io::safetensors::check_size_budget(
        &files,
        config.min_params(),
        &format!("{component}/config.json"),
    )?;
    let prefixed = crate::io::safetensors::tensor_names(&files)
        .iter()
        .any(|n| n.starts_with("text_model."));
    let mut vs = nn::VarStore::new(device);
    let _loading = crate::util::LoadingWeights::begin();
    let (model, proj) = if projection {
        let m = ClipTextModelWithProjection::new(vs.root(), &config, prefixed)?;
        (m.text_model, Some(m.text_projection))
    } else {
        let m = match prefixed {
            true => ClipTextModel::new(vs.root(), &config)?,
            false => ClipTextModel::new_at(vs.root(), &config)?,
        };
        (m, None)
    };
    let ignore = [
        "text_model.embeddings.position_ids",
        "embeddings.position_ids",
    ];
    crate::io::safetensors::load_strict(&mut vs, &files, &ignore)?;
    vs.freeze();
    Ok((model, proj, vs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_forward_shape_and_names() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ClipTextConfig::tiny();
        let model = ClipTextModel::new(vs.root(), &cfg).unwrap();
        let ids = Tensor::from_slice(&[49406i64, 320, 1929, 49407]).repeat([2, 1]);
        let out = model.forward(&ids).unwrap();
        assert_eq!(out.size(), vec![2, 4, cfg.hidden_size]);
        let vars = vs.variables();
        for key in [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.1.self_attn.q_proj.weight",
            "text_model.encoder.layers.0.mlp.fc2.bias",
            "text_model.final_layer_norm.weight",
        ] {
            assert!(vars.contains_key(key), "{key}");
        }
        // 16 per layer + 2 embeddings + 2 final norm.
        assert_eq!(vars.len(), 16 * 2 + 4);
        // Causal: the first position does not see the rest.
        let other = Tensor::from_slice(&[49406i64, 500, 600, 700]).unsqueeze(0);
        let out2 = model.forward(&other).unwrap();
        assert!(out2
            .get(0)
            .get(0)
            .allclose(&out.get(0).get(0), 1e-6, 1e-6, false));
        assert!(model
            .forward(&Tensor::from_slice(&[49408i64]).unsqueeze(0))
            .is_err());
    }
}
