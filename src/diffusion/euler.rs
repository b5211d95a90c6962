//! Euler and Euler-ancestral samplers in sigma space (diffusers 0.42.1
//! `EulerDiscreteScheduler` with s_churn = 0, and `EulerAncestralDiscreteScheduler`).
//!
//! Timesteps are float32 values and may be fractional (Karras / exponential sigmas). The
//! ancestral noise comes from the global torch RNG on the CPU (`Tensor::randn`), which draws
//! the same numbers as diffusers' CPU `torch.Generator` passed to the pipeline.
use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::config::{
    FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
    TimestepType,
};
use super::schedule::{
    alphas_cumprod, exponential_sigmas, karras_sigmas, log_sigmas, np_interp, sigma_to_t,
    spaced_timesteps, train_sigmas, ZeroSnr,
};
use super::{begin_index, Scheduler};

pub struct Euler {
    timesteps: Vec<f64>,
    /// Float32 values, one more than the timesteps (the last is the final sigma).
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    /// diffusers' first step index (1 when the first timestep occurs twice).
    begin: usize,
    prediction_type: PredictionType,
    ancestral: bool,
}

impl Euler {
    pub fn new(cfg: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self> {
        if ancestral && cfg.prediction_type == PredictionType::Sample {
            bail!("EulerAncestralDiscreteScheduler does not implement prediction_type sample");
        }
        if !ancestral {
            if cfg.interpolation_type == InterpolationType::LogLinear {
                bail!("EulerDiscreteScheduler: interpolation_type log_linear is not supported");
            }
            if cfg.use_beta_sigmas {
                bail!("use_beta_sigmas is not supported (it needs scipy's beta distribution)");
            }
            let n_kinds = [
                cfg.use_karras_sigmas,
                cfg.use_exponential_sigmas,
                cfg.use_beta_sigmas,
            ]
            .iter()
            .filter(|&&b| b)
            .count();
            if n_kinds > 1 {
                bail!("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be set");
            }
        }
        let ac = alphas_cumprod(cfg, ZeroSnr::RescaleClampLast)?;
        let train = train_sigmas(&ac);
        // Timesteps as the float32 array diffusers builds.
        let spaced = spaced_timesteps(cfg, steps);
        let mut timesteps: Vec<f64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => spaced.iter().map(|&t| t as f32 as f64).collect(),
            TimestepSpacing::Leading => spaced
                .iter()
                .map(|&t| (t as f32 + cfg.steps_offset as f32) as f64)
                .collect(),
            TimestepSpacing::Trailing => spaced.iter().map(|&t| (t as f32 - 1.0) as f64).collect(),
        };
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| np_interp(t, &train)).collect();
        let (first, last) = (sigmas[0], sigmas[sigmas.len() - 1]);
        let (smin, smax) = (
            cfg.sigma_min.unwrap_or(last),
            cfg.sigma_max.unwrap_or(first),
        );
        let mut final_sigma = 0.0;
        if !ancestral {
            let logs = log_sigmas(&train);
            if cfg.use_karras_sigmas || cfg.use_exponential_sigmas {
                sigmas = if cfg.use_karras_sigmas {
                    karras_sigmas(smin, smax, steps)
                } else {
                    exponential_sigmas(smin, smax, steps)
                };
                timesteps = sigmas
                    .iter()
                    .map(|&s| sigma_to_t(s, &logs) as f32 as f64)
                    .collect();
            }
            if cfg.final_sigmas_type == FinalSigmasType::SigmaMin {
                final_sigma = ((1.0 - ac[0]) / ac[0]).sqrt() as f64;
            }
        }
        let sigmas: Vec<f64> = sigmas
            .iter()
            .map(|&s| s as f32 as f64)
            .chain([final_sigma])
            .collect();
        if !ancestral
            && cfg.timestep_type == TimestepType::Continuous
            && cfg.prediction_type == PredictionType::VPrediction
        {
            timesteps = sigmas[..steps]
                .iter()
                .map(|&s| (0.25 * (s as f32).ln()) as f64)
                .collect();
        }
        let max = sigmas.iter().fold(0f32, |m, &s| m.max(s as f32));
        let init_noise_sigma = match cfg.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        };
        Ok(Self {
            begin: begin_index(&timesteps),
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction_type: cfg.prediction_type,
            ancestral,
        })
    }

    fn sigma(&self, k: usize) -> Result<f64> {
        self.sigmas
            .get(k)
            .copied()
            .with_context(|| format!("Euler step index {k} is past the last sigma"))
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// x / √(σ² + 1).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> Tensor {
        let sigma = self.sigmas[(self.begin + i).min(self.sigmas.len() - 1)];
        sample / (sigma * sigma + 1.0).sqrt()
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        let k = self.begin + i;
        let (sigma, sigma_next) = (self.sigma(k)?, self.sigma(k + 1)?);
        let sample = sample.to_kind(Kind::Float);
        let x0 = match self.prediction_type {
            PredictionType::Epsilon => &sample - model_output * sigma,
            PredictionType::VPrediction => {
                model_output * (-sigma / (sigma * sigma + 1.0).sqrt())
                    + &sample / (sigma * sigma + 1.0)
            }
            PredictionType::Sample => model_output.shallow_clone(),
        };
        let derivative = (&sample - x0) / sigma;
        let prev = if self.ancestral {
            let sigma_up =
                (sigma_next.powi(2) * (sigma.powi(2) - sigma_next.powi(2)) / sigma.powi(2)).sqrt();
            let sigma_down = (sigma_next.powi(2) - sigma_up.powi(2)).sqrt();
            let prev = &sample + derivative * (sigma_down - sigma);
            // diffusers' randn_tensor with a CPU generator draws on the CPU.
            let noise = Tensor::randn(model_output.size(), (model_output.kind(), Device::Cpu))
                .to_device(model_output.device());
            prev + noise * sigma_up
        } else {
            &sample + derivative * (sigma_next - sigma)
        };
        Ok(prev.to_kind(model_output.kind()))
    }
}
