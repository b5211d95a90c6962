//! A LoRA for one UNet: per typed site, `A ∈ R^{r×in}`, `B ∈ R^{out×r}` and `alpha`, so that
//! `ΔW = (alpha / r) · B·A` (SPEC §2/§5; diffusers-PEFT `lora_A`/`lora_B`, kohya
//! `lora_down`/`lora_up`). Ranks and alphas may differ per site.
//!
//! [`LoraSet::batch`] turns several sets (or none) into the per-sample [`LoraBatch`] of one UNet
//! call: row `i` gets set `i` scaled by its user scale, rows without a set run the base model.
use std::collections::BTreeMap;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use super::{LoraBatch, LoraDelta, LoraSite};

/// The weights of one site.
#[derive(Debug)]
pub struct LoraWeights {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub alpha: f64,
}

impl LoraWeights {
    pub fn rank(&self) -> i64 {
        self.a.size()[0]
    }

    /// `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `ΔW = (alpha/r)·B·A`: `[out, in]`.
    pub fn delta_w(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scale()
    }

    fn shallow_clone(&self) -> Self {
        Self {
            a: self.a.shallow_clone(),
            b: self.b.shallow_clone(),
            alpha: self.alpha,
        }
    }
}

/// A LoRA keyed by site, in module order.
#[derive(Debug, Default)]
pub struct LoraSet {
    pub weights: BTreeMap<LoraSite, LoraWeights>,
}

impl Clone for LoraSet {
    /// Shares the tensors (they are never modified in place).
    fn clone(&self) -> Self {
        Self {
            weights: self
                .weights
                .iter()
                .map(|(s, w)| (*s, w.shallow_clone()))
                .collect(),
        }
    }
}

impl LoraSet {
    /// Checks every site against a UNet's sites, and every tensor's shape and values.
    pub fn validate(&self, sites: &[LoraSite]) -> Result<()> {
        if self.weights.is_empty() {
            bail!("the LoRA has no weights");
        }
        for (site, w) in &self.weights {
            let Some(unet_site) = sites
                .iter()
                .find(|s| s.transformer == site.transformer && s.proj == site.proj)
            else {
                bail!("LoRA targets {site}, which this UNet does not have");
            };
            let (a, b) = (w.a.size(), w.b.size());
            let (i, o) = (unet_site.in_features as i64, unet_site.out_features as i64);
            if a.len() != 2 || b.len() != 2 || a[1] != i || b[0] != o || a[0] != b[1] {
                bail!(
                    "LoRA {site}: lora_A {a:?} / lora_B {b:?} do not fit this UNet (expects [r, {i}] / [{o}, r])"
                );
            }
            let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) == 1;
            if !finite(&w.a) || !finite(&w.b) || !w.alpha.is_finite() {
                bail!("LoRA {site}: weights contain NaN or Inf");
            }
        }
        Ok(())
    }

    /// Total number of LoRA weights (Σ r·(in + out)).
    pub fn num_weights(&self) -> i64 {
        self.weights
            .values()
            .map(|w| w.a.numel() as i64 + w.b.numel() as i64)
            .sum()
    }

    pub fn to_device(&self, device: Device) -> Self {
        Self {
            weights: self
                .weights
                .iter()
                .map(|(s, w)| {
                    let w = LoraWeights {
                        a: w.a.to_device(device).to_kind(Kind::Float),
                        b: w.b.to_device(device).to_kind(Kind::Float),
                        alpha: w.alpha,
                    };
                    (*s, w)
                })
                .collect(),
        }
    }

    /// The per-sample deltas of one UNet call: `rows[i] = Some((set, user_scale))` applies
    /// `user_scale · alpha/r · B·A` to row `i`; `None` runs the base model for that row.
    /// Sets with different ranks at a site are zero-padded to the largest rank.
    pub fn batch(rows: &[Option<(&LoraSet, f64)>]) -> LoraBatch {
        let mut sites: Vec<LoraSite> = rows
            .iter()
            .flatten()
            .flat_map(|(set, _)| set.weights.keys().copied())
            .collect();
        sites.sort();
        sites.dedup();
        let mut batch = LoraBatch::new();
        for site in sites {
            let rank = rows
                .iter()
                .flatten()
                .filter_map(|(set, _)| set.weights.get(&site).map(LoraWeights::rank))
                .max()
                .unwrap_or(0);
            let (i, o) = (site.in_features as i64, site.out_features as i64);
            let (mut a, mut b, mut scale) = (Vec::new(), Vec::new(), Vec::new());
            for row in rows {
                match row.and_then(|(set, s)| set.weights.get(&site).map(|w| (w, s))) {
                    Some((w, user)) => {
                        let pad = rank - w.rank();
                        // [r, in] → [rank, in], [out, r] → [out, rank]
                        a.push(w.a.constant_pad_nd([0, 0, 0, pad]));
                        b.push(w.b.constant_pad_nd([0, pad]));
                        scale.push((w.scale() * user) as f32);
                    }
                    None => {
                        let opts = rows
                            .iter()
                            .flatten()
                            .next()
                            .and_then(|(set, _)| set.weights.values().next())
                            .map(|w| (Kind::Float, w.a.device()))
                            .unwrap_or((Kind::Float, Device::Cpu));
                        a.push(Tensor::zeros([rank, i], opts));
                        b.push(Tensor::zeros([o, rank], opts));
                        scale.push(0.0);
                    }
                }
            }
            let device = a[0].device();
            batch.insert(
                site,
                LoraDelta {
                    // [B, rank, in], [B, out, rank], [B]
                    a: Tensor::stack(&a, 0),
                    b: Tensor::stack(&b, 0),
                    scale: Tensor::from_slice(&scale).to_device(device),
                },
            );
        }
        batch
    }
}
