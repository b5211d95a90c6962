//! Per-sample LoRA: the typed sites LoRA attaches to and the deltas that travel through a batch.
//!
//! Paper (hypernet-finetuning-free-personalization §4.1 / SPEC §2): LoRA on `to_q`, `to_k`,
//! `to_v` of every cross-attention (`attn2`) of the UNet, ΔW = scale·B·A with
//! A ∈ R^{r×in} (`lora_A` / `lora_down`) and B ∈ R^{out×r} (`lora_B` / `lora_up`).
//! Unlike diffusers/PEFT (one adapter for the whole batch), every batch row carries its own
//! (A, B, scale), so base rows (scale 0) and personalized rows share one UNet call (HM-CFG).
//! The only place these deltas are applied is [`crate::nn::Linear::forward_lora`].
pub mod format;
pub mod lidb;
mod set;

pub use set::{LoraSet, LoraWeights};

use std::collections::HashMap;
use std::fmt;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Where a transformer block sits in the UNet (diffusers module names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BlockLoc {
    /// `down_blocks.{0}`
    Down(usize),
    /// `mid_block`
    Mid,
    /// `up_blocks.{0}`
    Up(usize),
}

/// One `BasicTransformerBlock`: `<loc>.attentions.{attention}.transformer_blocks.{block}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TransformerSite {
    pub loc: BlockLoc,
    pub attention: usize,
    pub block: usize,
}

/// Which projection of `attn2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Proj {
    Q,
    K,
    V,
}

impl Proj {
    pub const ALL: [Proj; 3] = [Proj::Q, Proj::K, Proj::V];
    /// diffusers' attribute name.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Q => "to_q",
            Proj::K => "to_k",
            Proj::V => "to_v",
        }
    }
}

/// A LoRA target: one attn2 projection of one transformer block, with its matrix shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LoraSite {
    pub transformer: TransformerSite,
    pub proj: Proj,
    /// Input features of the projection (query dim for Q, cross-attention dim for K/V).
    pub in_features: usize,
    /// Output features (inner dim = heads × head dim).
    pub out_features: usize,
}

impl LoraSite {
    /// The diffusers module path, e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q`.
    pub fn module_path(&self) -> String {
        let t = &self.transformer;
        let loc = match t.loc {
            BlockLoc::Down(i) => format!("down_blocks.{i}"),
            BlockLoc::Mid => "mid_block".to_string(),
            BlockLoc::Up(i) => format!("up_blocks.{i}"),
        };
        format!(
            "{loc}.attentions.{}.transformer_blocks.{}.attn2.{}",
            t.attention,
            t.block,
            self.proj.name()
        )
    }
}

impl fmt::Display for LoraSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.module_path())
    }
}

/// ΔW of one linear layer for every row of a batch: `y_b = W x_b + scale_b · B_b A_b x_b`.
///
/// Leading dimension of `a`/`b` is the batch (or 1 to share one LoRA across rows);
/// `scale` is `[B]`, and a row with scale 0 runs the base model.
#[derive(Debug)]
pub struct LoraDelta {
    /// `[B|1, r, in]` (lora_A / lora_down).
    pub a: Tensor,
    /// `[B|1, out, r]` (lora_B / lora_up).
    pub b: Tensor,
    /// `[B]`, already including alpha/r and the user's scale.
    pub scale: Tensor,
}

impl LoraDelta {
    /// Checks the shapes against the site and a batch size.
    pub fn validate(&self, site: &LoraSite, batch: i64) -> Result<()> {
        let (a, b, s) = (self.a.size(), self.b.size(), self.scale.size());
        let ok = a.len() == 3
            && b.len() == 3
            && a[0] == b[0]
            && (a[0] == batch || a[0] == 1)
            && a[1] == b[2]
            && a[2] == site.in_features as i64
            && b[1] == site.out_features as i64
            && s == [batch];
        if !ok {
            bail!(
                "LoRA for {site}: A {a:?}, B {b:?}, scale {s:?} do not fit in={} out={} batch={batch}",
                site.in_features,
                site.out_features
            );
        }
        Ok(())
    }

    /// `scale_b · (x_b A_bᵀ) B_bᵀ` for `x: [B, N, in]` → `[B, N, out]`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        // [B, N, in] @ [B|1, in, r] → [B, N, r] @ [B|1, r, out] → [B, N, out]
        // In the activations' dtype (`--dtype f16|bf16`; a no-op in f32).
        let (a, b) = (self.a.to_kind(x.kind()), self.b.to_kind(x.kind()));
        let h = x.matmul(&a.transpose(-1, -2)).matmul(&b.transpose(-1, -2));
        let n = x.dim();
        let mut shape = vec![-1i64];
        shape.extend(std::iter::repeat_n(1, n - 1));
        let scale = self.scale.to_kind(h.kind());
        h * scale.view(shape.as_slice())
    }
}

/// The per-sample LoRA deltas of one UNet call, keyed by site.
#[derive(Debug, Default)]
pub struct LoraBatch {
    deltas: HashMap<LoraSite, LoraDelta>,
}

impl LoraBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn insert(&mut self, site: LoraSite, delta: LoraDelta) {
        self.deltas.insert(site, delta);
    }
    pub fn get(&self, site: &LoraSite) -> Option<&LoraDelta> {
        self.deltas.get(site)
    }
    pub fn len(&self) -> usize {
        self.deltas.len()
    }
    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }
    pub fn sites(&self) -> impl Iterator<Item = &LoraSite> {
        self.deltas.keys()
    }
    /// Every delta must target one of `sites` and fit a batch of `batch` rows.
    pub fn validate(&self, sites: &[LoraSite], batch: i64) -> Result<()> {
        for (site, delta) in &self.deltas {
            if !sites.contains(site) {
                bail!("LoRA targets {site}, which this UNet does not have");
            }
            delta.validate(site, batch)?;
        }
        Ok(())
    }
}
