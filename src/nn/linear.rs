//! `nn.Linear` with diffusers/transformers key names, and the one LoRA seam.
//!
//! `forward_lora(x, Some(delta))` computes `x Wᵀ + b + scale_b · (x A_bᵀ) B_bᵀ` per batch row
//! (PEFT's `result + lora_B(lora_A(x)) * scaling`, but with per-sample A/B/scale).
use tch::{nn, Tensor};

use crate::lora::LoraDelta;

#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vs: nn::Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let bound = 1.0 / (in_features as f64).sqrt();
        let uniform = crate::util::init(nn::Init::Uniform {
            lo: -bound,
            up: bound,
        });
        let weight = vs.var("weight", &[out_features, in_features], uniform);
        let bias = bias.then(|| vs.var("bias", &[out_features], uniform));
        Self { weight, bias }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// The LoRA seam: base projection plus an optional per-sample low-rank delta.
    pub fn forward_lora(&self, x: &Tensor, lora: Option<&LoraDelta>) -> Tensor {
        let y = self.forward(x);
        match lora {
            None => y,
            Some(delta) => y + delta.apply(x),
        }
    }
}

impl nn::Module for Linear {
    fn forward(&self, xs: &Tensor) -> Tensor {
        Linear::forward(self, xs)
    }
}
