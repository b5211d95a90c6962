//! The weight decoder of the hypernetwork (paper §4.1 / Fig. 1, the HyperDreamBooth design;
//! SPEC §2): one token per LoRA matrix, learned positional embeddings, a pre-LN transformer
//! decoder (self-attention among the weight tokens, cross-attention to the image tokens, MLP),
//! iterative refinement and one linear head per matrix.
//!
//! Refinement (s rounds, the image encoded once):
//!   z_k = pos + In_m(θ_{k-1})             (θ_0 = 0, fed back through one linear per matrix)
//!   θ_k = θ_{k-1} + Head_m(T(z_k, f))     (T = the decoder layers; f = projected image tokens)
//! Heads of `lora_B` start at zero, heads of `lora_A` at a constant random matrix (weights 0,
//! bias ~ LoRA's kaiming-uniform A init split over the rounds), so the first prediction is
//! exactly ΔW = B·A = 0 while the gradient reaches B (as LoRA's own B = 0 init).
//! Keys: `pos`, `image_norm`, `image_proj`, `weight_in.{m}`, `layers.{l}.*`, `norm_out`,
//! `heads.{m}`.
//!
//! [`ResamplerDecoder`] is the open category's decoder (seed paper §5.2, appendix B.2): the
//! architecture of IP-Adapter-Plus's Resampler ([`crate::models::ip_adapter::Resampler`]: learned
//! queries, here one per LoRA matrix, attending to the image encoder's `hidden_states[-2]` in
//! depth × [perceiver attention, feed-forward], `proj_out` + `norm_out` to the decoder width),
//! then the same one-linear-head-per-matrix output with the same ΔW = 0 init, in one round.
//! Keys: `latents`, `proj_in`, `layers.{l}.{0,1}.*`, `proj_out`, `norm_out`, `heads.{m}`.
use anyhow::{bail, Result};
use tch::{nn, nn::Module, Tensor};

pub use crate::models::ip_adapter::DIM_HEAD;
use crate::models::ip_adapter::{Resampler, ResamplerShape};
use crate::nn::{layer_norm, Activation, Attention, Linear};

/// One matrix the decoder predicts: `rows × cols` values, and whether it is a `lora_B` (zero
/// init) or a `lora_A` (random constant init with fan-in `cols`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatrixSpec {
    pub rows: i64,
    pub cols: i64,
    pub is_b: bool,
}

impl MatrixSpec {
    pub fn numel(&self) -> i64 {
        self.rows * self.cols
    }
}

/// Pre-LN decoder layer: self-attention, cross-attention to the image, GELU MLP.
#[derive(Debug)]
struct DecoderLayer {
    norm1: nn::LayerNorm,
    self_attn: Attention,
    norm2: nn::LayerNorm,
    cross_attn: Attention,
    norm3: nn::LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl DecoderLayer {
    fn new(vs: nn::Path, width: i64, heads: i64, intermediate: i64) -> Self {
        Self {
            norm1: layer_norm(&vs / "norm1", width, 1e-5),
            self_attn: Attention::new(&vs / "self_attn", width, width, heads, width / heads, true),
            norm2: layer_norm(&vs / "norm2", width, 1e-5),
            cross_attn: Attention::new(
                &vs / "cross_attn",
                width,
                width,
                heads,
                width / heads,
                true,
            ),
            norm3: layer_norm(&vs / "norm3", width, 1e-5),
            fc1: Linear::new(&vs / "fc1", width, intermediate, true),
            fc2: Linear::new(&vs / "fc2", intermediate, width, true),
        }
    }

    fn forward(&self, z: &Tensor, image: &Tensor) -> Tensor {
        let h = self.norm1.forward(z);
        let z = z + self.self_attn.forward(&h, None, [None; 3]);
        let z = &z
            + self
                .cross_attn
                .forward(&self.norm2.forward(&z), Some(image), [None; 3]);
        let h = Activation::Gelu.apply(&self.fc1.forward(&self.norm3.forward(&z)));
        &z + self.fc2.forward(&h)
    }
}

/// One linear head per matrix (`heads.{m}`): weights 0; biases 0 for `lora_B`, LoRA's A init
/// (kaiming-uniform, a=√5 → bound 1/√fan_in) split over the rounds for `lora_A`, so the first
/// prediction is ΔW = B·A = 0 while the gradient reaches B.
fn output_heads(vs: nn::Path, matrices: &[MatrixSpec], width: i64, rounds: i64) -> Vec<Linear> {
    matrices
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let p = &vs / i;
            let bias_init = if spec.is_b {
                nn::Init::Const(0.0)
            } else {
                let bound = 1.0 / (spec.cols as f64).sqrt() / rounds as f64;
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                }
            };
            Linear {
                weight: p.var("weight", &[spec.numel(), width], nn::Init::Const(0.0)),
                bias: Some(p.var("bias", &[spec.numel()], bias_init)),
            }
        })
        .collect()
}

fn check_features(image: &Tensor, image_dim: i64) -> Result<i64> {
    match image.size()[..] {
        [b, _, c] if c == image_dim => Ok(b),
        ref other => {
            bail!("hypernetwork: image features must be [B, tokens, {image_dim}], got {other:?}")
        }
    }
}

/// Sizes of the decoder (part of [`super::HypernetConfig`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecoderDims {
    pub image_dim: i64,
    pub width: i64,
    pub layers: i64,
    pub heads: i64,
    pub intermediate: i64,
    pub rounds: i64,
}

/// The weight decoder.
#[derive(Debug)]
pub struct WeightDecoder {
    dims: DecoderDims,
    matrices: Vec<MatrixSpec>,
    /// `[M, W]`
    pos: Tensor,
    image_norm: nn::LayerNorm,
    image_proj: Linear,
    weight_in: Vec<Linear>,
    layers: Vec<DecoderLayer>,
    norm_out: nn::LayerNorm,
    heads: Vec<Linear>,
}

impl WeightDecoder {
    pub fn new(vs: nn::Path, dims: DecoderDims, matrices: &[MatrixSpec]) -> Result<Self> {
        let DecoderDims {
            image_dim,
            width,
            layers,
            heads,
            intermediate,
            rounds,
        } = dims;
        if matrices.is_empty() {
            bail!("hypernetwork: no LoRA matrices to predict");
        }
        if [image_dim, width, heads, intermediate, rounds, layers]
            .iter()
            .any(|&v| v < 1)
            || width % heads != 0
        {
            bail!(
                "hypernetwork decoder: sizes must be ≥ 1 and width divisible by heads ({dims:?})"
            );
        }
        let m = matrices.len() as i64;
        let pos = vs.var(
            "pos",
            &[m, width],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let weight_in = (0..matrices.len())
            .map(|i| Linear::new(&vs / "weight_in" / i, matrices[i].numel(), width, true))
            .collect();
        let layers = (0..layers)
            .map(|l| DecoderLayer::new(&vs / "layers" / l, width, heads, intermediate))
            .collect();
        let heads = output_heads(&vs / "heads", matrices, width, rounds);
        Ok(Self {
            dims,
            matrices: matrices.to_vec(),
            pos,
            image_norm: layer_norm(&vs / "image_norm", image_dim, 1e-5),
            image_proj: Linear::new(&vs / "image_proj", image_dim, width, true),
            weight_in,
            layers,
            norm_out: layer_norm(&vs / "norm_out", width, 1e-5),
            heads,
        })
    }

    pub fn matrices(&self) -> &[MatrixSpec] {
        &self.matrices
    }

    /// `image: [B, N, image_dim]` (the encoder's tokens) → one `[B, rows·cols]` per matrix.
    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        let b = check_features(image, self.dims.image_dim)?;
        // [B, N, image_dim] → [B, N, W]
        let f = self.image_proj.forward(&self.image_norm.forward(image));
        let (kind, device) = (f.kind(), f.device());
        let mut theta: Vec<Tensor> = self
            .matrices
            .iter()
            .map(|s| Tensor::zeros([b, s.numel()], (kind, device)))
            .collect();
        for _ in 0..self.dims.rounds {
            // θ_{k-1} → tokens: M × [B, W] → [B, M, W]
            let fed: Vec<Tensor> = self
                .weight_in
                .iter()
                .zip(&theta)
                .map(|(lin, t)| lin.forward(t))
                .collect();
            let mut z = Tensor::stack(&fed, 1) + self.pos.unsqueeze(0);
            for layer in &self.layers {
                z = layer.forward(&z, &f);
            }
            let z = self.norm_out.forward(&z);
            theta = theta
                .iter()
                .zip(&self.heads)
                .enumerate()
                .map(|(m, (t, head))| t + head.forward(&z.select(1, m as i64)))
                .collect();
        }
        Ok(theta)
    }
}

/// The open-category decoder: IP-Adapter-Plus's Resampler with one query per LoRA matrix
/// (width = the decoder width, heads of [`DIM_HEAD`] = 64 as the Resampler fixes them), then one
/// head per matrix.
#[derive(Debug)]
pub struct ResamplerDecoder {
    image_dim: i64,
    matrices: Vec<MatrixSpec>,
    resampler: Resampler,
    heads: Vec<Linear>,
}

impl ResamplerDecoder {
    pub fn new(vs: nn::Path, dims: DecoderDims, matrices: &[MatrixSpec]) -> Result<Self> {
        let DecoderDims {
            image_dim,
            width,
            layers,
            intermediate,
            ..
        } = dims;
        if matrices.is_empty() {
            bail!("hypernetwork: no LoRA matrices to predict");
        }
        if [image_dim, width, layers, intermediate]
            .iter()
            .any(|&v| v < 1)
            || width % DIM_HEAD != 0
        {
            bail!("hypernetwork resampler decoder: sizes must be ≥ 1 and width a multiple of {DIM_HEAD} ({dims:?})");
        }
        let shape = ResamplerShape {
            num_queries: matrices.len() as i64,
            hidden: width,
            embed: image_dim,
            output: width,
            depth: layers as usize,
            heads: width / DIM_HEAD,
            ff_inner: intermediate,
        };
        Ok(Self {
            image_dim,
            matrices: matrices.to_vec(),
            resampler: Resampler::new(vs.clone(), shape),
            heads: output_heads(&vs / "heads", matrices, width, 1),
        })
    }

    /// `image: [B, N, image_dim]` (the IP-Adapter encoder's `hidden_states[-2]`) → one
    /// `[B, rows·cols]` per matrix.
    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        check_features(image, self.image_dim)?;
        // [B, N, image_dim] → [B, M, W]: query m is matrix m's token
        let z = self.resampler.forward(image)?;
        Ok(self
            .heads
            .iter()
            .enumerate()
            .map(|(m, head)| head.forward(&z.select(1, m as i64)))
            .collect())
    }
}

/// Either decoder, as the config's `decoder.kind` names it.
#[derive(Debug)]
pub enum Decoder {
    Transformer(WeightDecoder),
    Resampler(ResamplerDecoder),
}

impl Decoder {
    pub fn matrices(&self) -> &[MatrixSpec] {
        match self {
            Decoder::Transformer(d) => d.matrices(),
            Decoder::Resampler(d) => &d.matrices,
        }
    }

    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Decoder::Transformer(d) => d.forward(image),
            Decoder::Resampler(d) => d.forward(image),
        }
    }
}
