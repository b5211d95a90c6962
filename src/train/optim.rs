//! AdamW with decoupled weight decay, step for step as `torch.optim.AdamW` (single-tensor path):
//! `p ← p·(1 − lr·wd)`, `m ← m + (1−β₁)(g − m)`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
//! Written here (not tch's C++ optimizer) so its state can be checkpointed and resumed exactly.
use anyhow::{bail, Result};
use tch::{nn::VarStore, Kind, Tensor};

use crate::io::safetensors::SafeTensorsFile;

#[derive(Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Optimizer steps taken (t in the bias corrections).
    pub t: i64,
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Optimizes every trainable variable of `vs` (sorted by name).
    pub fn new(vs: &VarStore, weight_decay: f64) -> Self {
        let mut params: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            params,
            m,
            v,
        }
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|(_, p)| p.numel()).sum()
    }

    /// The optimized parameters, sorted by name (shallow handles).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| (n.clone(), p.shallow_clone()))
            .collect()
    }

    /// The defined gradients, in parameter order (aliases: writing them writes the gradients).
    pub fn grads(&self) -> Vec<Tensor> {
        self.params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .collect()
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let grads: Vec<Tensor> = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .collect();
        if grads.is_empty() {
            return 0.0;
        }
        let total = Tensor::stack(
            &grads
                .iter()
                .map(|g| g.pow_tensor_scalar(2).sum(Kind::Float))
                .collect::<Vec<_>>(),
            0,
        )
        .sum(Kind::Float)
        .sqrt()
        .double_value(&[]);
        if total > max_norm && total.is_finite() {
            let factor = max_norm / (total + 1e-6);
            tch::no_grad(|| {
                for mut g in grads {
                    let _ = g.g_mul_scalar_(factor);
                }
            });
        }
        total
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2_sqrt = (1.0 - self.beta2.powi(self.t as i32)).sqrt();
        tch::no_grad(|| {
            for (((_, p), m), v) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let _ = m.lerp_(&g, 1.0 - self.beta1);
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.g_add_(&(g.square() * (1.0 - self.beta2)));
                let denom = v.sqrt() / bc2_sqrt + self.eps;
                let _ = p.g_sub_(&(&*m / denom * (lr / bc1)));
            }
        });
    }

    /// The moment buffers, named `adam_m.<param>` / `adam_v.<param>`, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let names = self.params.iter().map(|(n, _)| n);
        names
            .clone()
            .zip(&self.m)
            .map(|(n, t)| (format!("adam_m.{n}"), t.shallow_clone()))
            .chain(
                names
                    .zip(&self.v)
                    .map(|(n, t)| (format!("adam_v.{n}"), t.shallow_clone())),
            )
            .collect()
    }

    /// Restores the moment buffers written by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, file: &SafeTensorsFile, t: i64) -> Result<()> {
        for (((name, p), m), v) in self.params.iter().zip(&mut self.m).zip(&mut self.v) {
            for (prefix, buf) in [("adam_m", m), ("adam_v", v)] {
                let saved = file.tensor(&format!("{prefix}.{name}"), Kind::Float)?;
                if saved.size() != p.size() {
                    bail!(
                        "checkpoint {prefix}.{name} has shape {:?}, expected {:?}",
                        saved.size(),
                        p.size()
                    );
                }
                tch::no_grad(|| buf.copy_(&saved.to_device(p.device())));
            }
        }
        self.t = t;
        Ok(())
    }
}
