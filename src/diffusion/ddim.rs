//! DDIM with η = 0 (diffusers 0.42.1 `DDIMScheduler`: `set_timesteps`, `step`).
use anyhow::{bail, ensure, Result};
use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{alphas_cumprod, np_round, spaced_timesteps, ZeroSnr};
use super::{alpha_at, Scheduler};

pub struct Ddim {
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    /// ᾱ used after the last step (`set_alpha_to_one` → 1, else ᾱ_0).
    final_alpha_cumprod: f64,
    /// `num_train_timesteps // steps`: DDIM's previous timestep is always `t − step_ratio`.
    step_ratio: i64,
    prediction_type: PredictionType,
    clip: Option<f64>,
}

impl Ddim {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if cfg.thresholding {
            bail!(
                "DDIMScheduler: thresholding is not supported (it is meant for pixel-space models)"
            );
        }
        let ac: Vec<f64> = alphas_cumprod(cfg, ZeroSnr::Rescale)?
            .into_iter()
            .map(f64::from)
            .collect();
        let spaced = spaced_timesteps(cfg, steps);
        let timesteps = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => spaced.into_iter().map(np_round).collect(),
            TimestepSpacing::Leading => spaced
                .into_iter()
                .map(|t| t + cfg.steps_offset as f64)
                .collect(),
            TimestepSpacing::Trailing => spaced.into_iter().map(|t| t - 1.0).collect(),
        };
        Ok(Self {
            timesteps,
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            step_ratio: (cfg.num_train_timesteps / steps) as i64,
            prediction_type: cfg.prediction_type,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        ensure!(i < self.timesteps.len(), "DDIM step {i} out of range");
        let t = self.timesteps[i] as i64;
        let prev_t = t - self.step_ratio;
        let a_t = alpha_at(&self.alphas_cumprod, t)?;
        let a_prev = if prev_t >= 0 {
            alpha_at(&self.alphas_cumprod, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let (x0, eps) = match self.prediction_type {
            PredictionType::Epsilon => (
                (sample - model_output * b_t.sqrt()) / a_t.sqrt(),
                model_output.shallow_clone(),
            ),
            PredictionType::Sample => {
                let x0 = model_output.shallow_clone();
                let eps = (sample - &x0 * a_t.sqrt()) / b_t.sqrt();
                (x0, eps)
            }
            PredictionType::VPrediction => (
                sample * a_t.sqrt() - model_output * b_t.sqrt(),
                model_output * a_t.sqrt() + sample * b_t.sqrt(),
            ),
        };
        let x0 = match self.clip {
            Some(r) => x0.clamp(-r, r),
            None => x0,
        };
        // η = 0: no noise, the direction term uses √(1 − ᾱ_prev).
        Ok(x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt())
    }
}
