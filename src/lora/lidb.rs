//! Lightweight DreamBooth (LiDB; hyperdreambooth §4.1, eq. 1): a LoRA whose factors live in a
//! small random subspace of the LoRA weight space.
//!
//! The paper writes `ΔW x = A_aux A_train B_train B_aux x` with `A_aux ∈ R^{n×a}`,
//! `B_aux ∈ R^{b×m}` frozen random with orthogonal vectors and only `A_train ∈ R^{a×r}`,
//! `B_train ∈ R^{r×b}` learned (a = 100, b = 50, r = 1 on SD). In PEFT's layout
//! (`lora_A [r, in]`, `lora_B [out, r]`, ΔW = scale·B·A) that is, per site,
//!
//!   lora_A = T_A · P_A   with T_A `[r, a]` trained, P_A `[a, in]` frozen, orthonormal rows;
//!   lora_B = P_B · T_B   with T_B `[b, r]` trained, P_B `[out, b]` frozen, orthonormal columns;
//!
//! a and b are clamped to the site's `in`/`out` (the toy UNet's layers are narrow); r and alpha
//! are the LoRA's own (the finetuning or hypernetwork config's). The bases are a pure function
//! of the seed and the sites (Gaussian draws from [`crate::data::Rng`], Gram–Schmidt in f64 on
//! the CPU), so files store only the [`LidbConfig`] and every reader rebuilds the same bases.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use super::LoraSite;
use crate::data::Rng;

/// LiDB's subspace sizes a (input side) and b (output side) and the seed of its frozen bases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LidbConfig {
    pub a: i64,
    pub b: i64,
    pub seed: u64,
}

impl LidbConfig {
    /// The paper's SD setting (with rank 1): a = 100, b = 50.
    pub fn paper() -> Self {
        Self {
            a: 100,
            b: 50,
            seed: 0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.a < 1 || self.b < 1 {
            bail!("LiDB: a and b must be ≥ 1 (got a={}, b={})", self.a, self.b);
        }
        Ok(())
    }

    /// (a, b) at one site: the subspace sizes clamped to its input and output widths.
    pub fn dims(&self, site: &LoraSite) -> (i64, i64) {
        (
            self.a.min(site.in_features as i64),
            self.b.min(site.out_features as i64),
        )
    }
}

/// `k` orthonormal vectors of length `n` (k ≤ n) as rows `[k, n]`: Gaussian draws from `rng`,
/// Gram–Schmidt in f64 (re-drawing a vector that falls into the span, which has probability 0).
fn orthonormal_rows(k: usize, n: usize, rng: &mut Rng) -> Vec<Vec<f64>> {
    let mut gaussian = || {
        // Box–Muller from two uniforms in (0, 1].
        let u1 = 1.0 - rng.unit() as f64;
        let u2 = rng.unit() as f64;
        (-2.0 * u1.max(1e-300).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    let mut rows: Vec<Vec<f64>> = Vec::with_capacity(k);
    while rows.len() < k {
        let mut v: Vec<f64> = (0..n).map(|_| gaussian()).collect();
        for _pass in 0..2 {
            for r in &rows {
                let dot: f64 = v.iter().zip(r).map(|(x, y)| x * y).sum();
                v.iter_mut().zip(r).for_each(|(x, y)| *x -= dot * y);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 1e-6 {
            rows.push(v.into_iter().map(|x| x / norm).collect());
        }
    }
    rows
}

/// The frozen bases of every site: `P_A [a, in]` and `P_B [out, b]`.
#[derive(Debug)]
pub struct LidbBasis {
    pub config: LidbConfig,
    pub sites: Vec<LoraSite>,
    /// Per site: (P_A `[a, in]`, P_B `[out, b]`), f32.
    pub bases: Vec<(Tensor, Tensor)>,
}

impl LidbBasis {
    /// The bases for `sites` (a pure function of `config.seed` and the sites, in order).
    pub fn new(config: LidbConfig, sites: &[LoraSite], device: Device) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(crate::data::rng::mix64(config.seed ^ 0x11DB));
        let to_tensor = |rows: Vec<Vec<f64>>, k: i64, n: i64| {
            let flat: Vec<f32> = rows.into_iter().flatten().map(|x| x as f32).collect();
            Tensor::from_slice(&flat).view([k, n]).to_device(device)
        };
        let bases = sites
            .iter()
            .map(|s| {
                let (a, b) = config.dims(s);
                let (i, o) = (s.in_features as i64, s.out_features as i64);
                let pa = to_tensor(orthonormal_rows(a as usize, i as usize, &mut rng), a, i);
                // orthonormal columns: the transpose of b orthonormal rows of length out
                let pb = to_tensor(orthonormal_rows(b as usize, o as usize, &mut rng), b, o).tr();
                (pa, pb.contiguous())
            })
            .collect();
        Ok(Self {
            config,
            sites: sites.to_vec(),
            bases,
        })
    }

    /// Site `i`'s LoRA factors from its trained ones (any leading batch dims):
    /// T_A `[…, r, a]` → `lora_A = T_A·P_A […, r, in]`; T_B `[…, b, r]` → `lora_B = P_B·T_B […, out, r]`.
    pub fn expand(&self, i: usize, t_a: &Tensor, t_b: &Tensor) -> (Tensor, Tensor) {
        let (pa, pb) = &self.bases[i];
        let (pa, pb) = (
            pa.to_device(t_a.device()).to_kind(t_a.kind()),
            pb.to_device(t_b.device()).to_kind(t_b.kind()),
        );
        (t_a.matmul(&pa), pb.matmul(t_b))
    }
}
