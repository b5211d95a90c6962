//! Noise schedules and samplers, configured from diffusers' `scheduler_config.json`.
//! Schedulers never import models. Schedule values that diffusers keeps in float32 (betas, ᾱ,
//! sigmas, Euler timesteps) are reproduced bit for bit and held as f64; every coefficient is
//! computed in f64; tensors are f32.
//!
//! Matches diffusers 0.42.1 `schedulers/` (DDIM, PNDM, Euler, Euler ancestral, DPM-Solver
//! multistep) and `configuration_utils.py` (`from_config`). The pipeline drives a [`Scheduler`]
//! by loop index: `x_in = scale_model_input(x, i)`, model at `timesteps()[i]`,
//! `x = step(model_output, i, x)`. Training uses [`NoiseSchedule`].
mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod pndm;
mod schedule;

use anyhow::{Context, Result};
use tch::Tensor;

pub use config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, InterpolationType, PredictionType,
    SchedulerConfig, SchedulerKind, SolverType, TimestepSpacing, TimestepType,
};
pub use ddim::Ddim;
pub use dpm_solver::DpmSolver;
pub use euler::Euler;
pub use pndm::Pndm;
pub use schedule::NoiseSchedule;

/// A sampler set up for a fixed number of inference steps.
pub trait Scheduler {
    /// Timesteps passed to the UNet, in order (PNDM with skip_prk_steps repeats one; Euler's
    /// may be fractional). Exactly diffusers' `scheduler.timesteps` values.
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial latents (`randn · init_noise_sigma`).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// diffusers' `scale_model_input` at loop index i (the identity unless a sampler scales).
    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> Tensor {
        sample.shallow_clone()
    }
    /// One step at loop index i: model output (ε / v / x0 per prediction_type) → previous
    /// sample. Steps must be taken in order, each once.
    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor>;
}

/// A `kind` sampler for `steps` inference steps (diffusers' `set_timesteps(steps)`).
pub fn build(
    kind: SchedulerKind,
    cfg: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>> {
    schedule::check_steps(cfg, steps)?;
    let s: Box<dyn Scheduler> = match kind {
        SchedulerKind::Ddim => Box::new(Ddim::new(cfg, steps)?),
        SchedulerKind::Pndm => Box::new(Pndm::new(cfg, steps)?),
        SchedulerKind::Euler => Box::new(Euler::new(cfg, steps, false)?),
        SchedulerKind::EulerAncestral => Box::new(Euler::new(cfg, steps, true)?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolver::new(cfg, steps)?),
    };
    Ok(s)
}

/// ᾱ_t, or an error when t is outside the training schedule.
fn alpha_at(alphas_cumprod: &[f64], t: i64) -> Result<f64> {
    usize::try_from(t)
        .ok()
        .and_then(|t| alphas_cumprod.get(t).copied())
        .with_context(|| {
            format!(
                "timestep {t} is outside the training schedule [0, {})",
                alphas_cumprod.len()
            )
        })
}

/// diffusers' `index_for_timestep` for the first step: index 1 when the first timestep occurs
/// more than once in the schedule, else 0.
fn begin_index(timesteps: &[f64]) -> usize {
    match timesteps.first() {
        Some(t0) if timesteps.iter().filter(|&t| t == t0).count() > 1 => 1,
        _ => 0,
    }
}
