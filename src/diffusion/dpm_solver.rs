//! DPM-Solver multistep (diffusers 0.42.1 `DPMSolverMultistepScheduler`): DPM-Solver++ 2M is
//! `algorithm_type` dpmsolver++, `solver_order` 2, `solver_type` midpoint; also orders 1 and 3,
//! the heun solver, dpmsolver (noise prediction) and sde-dpmsolver++, whose noise comes from
//! the global torch RNG on the CPU like diffusers' CPU generator.
use std::collections::VecDeque;

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind, Tensor};

use super::config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing,
};
use super::schedule::{
    alphas_cumprod, exponential_sigmas, karras_sigmas, log_sigmas, np_arange, np_interp,
    np_linspace, np_round, sigma_to_t, train_sigmas, ZeroSnr,
};
use super::{begin_index, Scheduler};

pub struct DpmSolver {
    timesteps: Vec<f64>,
    /// Float32 values, one more than the timesteps.
    sigmas: Vec<f64>,
    begin: usize,
    order: usize,
    algorithm: AlgorithmType,
    solver_type: SolverType,
    prediction_type: PredictionType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    /// Converted model outputs (x0 or ε) of the last `order` steps, oldest first.
    model_outputs: VecDeque<Tensor>,
    lower_order_nums: usize,
    counter: usize,
}

/// (α_t, σ_t) of a sigma: α = 1/√(σ²+1), σ_t = σ·α; and λ = log α − log σ_t.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl DpmSolver {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        validate(cfg)?;
        let t_train = cfg.num_train_timesteps;
        let ac = alphas_cumprod(cfg, ZeroSnr::RescaleClampLast)?;
        // λ_t in float32, searched (ascending) for lambda_min_clipped.
        let clipped = ac
            .iter()
            .filter(|&&a| {
                let l = (a.sqrt() as f64).ln() as f32 - ((1.0 - a).sqrt() as f64).ln() as f32;
                (l as f64) < cfg.lambda_min_clipped
            })
            .count();
        let last = t_train - clipped;
        let mut timesteps: Vec<f64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => {
                let v = np_linspace(0.0, last as f64 - 1.0, steps + 1);
                v.iter().rev().take(steps).map(|&t| np_round(t)).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = last / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + cfg.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                np_arange(last as f64, 0.0, -(t_train as f64 / steps as f64))
                    .into_iter()
                    .map(|t| np_round(t) - 1.0)
                    .collect()
            }
        };
        ensure!(
            !timesteps.is_empty(),
            "DPM-Solver: no timesteps for {steps} steps"
        );
        let train = train_sigmas(&ac);
        let logs = log_sigmas(&train);
        let round = cfg.beta_schedule != BetaSchedule::SquaredcosCapV2;
        let (smin, smax) = (
            cfg.sigma_min.unwrap_or(train[0] as f64),
            cfg.sigma_max.unwrap_or(train[t_train - 1] as f64),
        );
        let to_t = |s: &[f64], round: bool| -> Vec<f64> {
            s.iter()
                .map(|&s| sigma_to_t(s, &logs))
                .map(|t| if round { np_round(t) } else { t })
                .collect()
        };
        let sigmas: Vec<f64> = if cfg.use_karras_sigmas {
            let s = karras_sigmas(smin, smax, steps);
            timesteps = to_t(&s, round);
            s
        } else if cfg.use_lu_lambdas {
            let (lmin, lmax) = (logs[0], logs[t_train - 1]);
            let s: Vec<f64> = np_linspace(0.0, 1.0, steps)
                .into_iter()
                .map(|r| (lmax + r * (lmin - lmax)).exp())
                .collect();
            timesteps = to_t(&s, round);
            s
        } else if cfg.use_exponential_sigmas {
            let s = exponential_sigmas(smin, smax, steps);
            timesteps = to_t(&s, false);
            s
        } else {
            timesteps.iter().map(|&t| np_interp(t, &train)).collect()
        };
        let final_sigma = match cfg.final_sigmas_type {
            FinalSigmasType::SigmaMin => ((1.0 - ac[0]) / ac[0]).sqrt() as f64,
            FinalSigmasType::Zero => 0.0,
        };
        // torch.from_numpy(timesteps).to(int64) truncates toward zero.
        let timesteps: Vec<f64> = timesteps.iter().map(|&t| t.trunc()).collect();
        Ok(Self {
            begin: begin_index(&timesteps),
            timesteps,
            sigmas: sigmas
                .iter()
                .map(|&s| s as f32 as f64)
                .chain([final_sigma])
                .collect(),
            order: cfg.solver_order,
            algorithm: cfg.algorithm_type,
            solver_type: cfg.solver_type,
            prediction_type: cfg.prediction_type,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_zero: cfg.final_sigmas_type == FinalSigmasType::Zero,
            model_outputs: VecDeque::new(),
            lower_order_nums: 0,
            counter: 0,
        })
    }

    fn sigma(&self, k: usize) -> Result<f64> {
        self.sigmas
            .get(k)
            .copied()
            .with_context(|| format!("DPM-Solver step index {k} is past the last sigma"))
    }

    fn plus_plus(&self) -> bool {
        matches!(
            self.algorithm,
            AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus
        )
    }

    /// `convert_model_output`: x0 for the ++ variants, ε for dpmsolver.
    fn convert(&self, m: &Tensor, x: &Tensor, k: usize) -> Result<Tensor> {
        let (a, s, _) = alpha_sigma_lambda(self.sigma(k)?);
        Ok(match (self.plus_plus(), self.prediction_type) {
            (true, PredictionType::Epsilon) => (x - m * s) / a,
            (true, PredictionType::Sample) | (false, PredictionType::Epsilon) => m.shallow_clone(),
            (true, PredictionType::VPrediction) => x * a - m * s,
            (false, PredictionType::Sample) => (x - m * a) / s,
            (false, PredictionType::VPrediction) => m * a + x * s,
        })
    }

    fn first_order(&self, x: &Tensor, noise: Option<&Tensor>, k: usize) -> Result<Tensor> {
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigma(k + 1)?);
        let (a_s, s_s, l_s) = alpha_sigma_lambda(self.sigma(k)?);
        let h = l_t - l_s;
        let d0 = &self.model_outputs[self.model_outputs.len() - 1];
        Ok(match (self.algorithm, noise) {
            (AlgorithmType::DpmSolverPlusPlus, _) => {
                x * (s_t / s_s) - d0 * (a_t * ((-h).exp() - 1.0))
            }
            (AlgorithmType::DpmSolver, _) => x * (a_t / a_s) - d0 * (s_t * (h.exp() - 1.0)),
            (AlgorithmType::SdeDpmSolverPlusPlus, Some(z)) => {
                x * (s_t / s_s * (-h).exp())
                    + d0 * (a_t * (1.0 - (-2.0 * h).exp()))
                    + z * (s_t * (1.0 - (-2.0 * h).exp()).sqrt())
            }
            _ => bail!("DPM-Solver: unsupported algorithm {:?}", self.algorithm),
        })
    }

    fn second_order(&self, x: &Tensor, noise: Option<&Tensor>, k: usize) -> Result<Tensor> {
        ensure!(k >= 1, "DPM-Solver second-order update at the first step");
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigma(k + 1)?);
        let (a_s0, s_s0, l_s0) = alpha_sigma_lambda(self.sigma(k)?);
        let (_, _, l_s1) = alpha_sigma_lambda(self.sigma(k - 1)?);
        let n = self.model_outputs.len();
        let (m0, m1) = (&self.model_outputs[n - 1], &self.model_outputs[n - 2]);
        let (h, h0) = (l_t - l_s0, l_s0 - l_s1);
        let r0 = h0 / h;
        let d1 = (m0 - m1) * (1.0 / r0);
        let midpoint = self.solver_type == SolverType::Midpoint;
        Ok(match (self.algorithm, noise) {
            (AlgorithmType::DpmSolverPlusPlus, _) => {
                let c = a_t * ((-h).exp() - 1.0);
                let base = x * (s_t / s_s0) - m0 * c;
                if midpoint {
                    base - d1 * (0.5 * c)
                } else {
                    base + d1 * (a_t * (((-h).exp() - 1.0) / h + 1.0))
                }
            }
            (AlgorithmType::DpmSolver, _) => {
                let c = s_t * (h.exp() - 1.0);
                let base = x * (a_t / a_s0) - m0 * c;
                if midpoint {
                    base - d1 * (0.5 * c)
                } else {
                    base - d1 * (s_t * ((h.exp() - 1.0) / h - 1.0))
                }
            }
            (AlgorithmType::SdeDpmSolverPlusPlus, Some(z)) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let base = x * (s_t / s_s0 * (-h).exp()) + m0 * (a_t * e2);
                let d1c = if midpoint {
                    0.5 * (a_t * e2)
                } else {
                    a_t * (e2 / (-2.0 * h) + 1.0)
                };
                base + d1 * d1c + z * (s_t * e2.sqrt())
            }
            _ => bail!("DPM-Solver: unsupported algorithm {:?}", self.algorithm),
        })
    }

    fn third_order(&self, x: &Tensor, noise: Option<&Tensor>, k: usize) -> Result<Tensor> {
        ensure!(
            k >= 2,
            "DPM-Solver third-order update before the third step"
        );
        let (a_t, s_t, l_t) = alpha_sigma_lambda(self.sigma(k + 1)?);
        let (a_s0, s_s0, l_s0) = alpha_sigma_lambda(self.sigma(k)?);
        let (_, _, l_s1) = alpha_sigma_lambda(self.sigma(k - 1)?);
        let (_, _, l_s2) = alpha_sigma_lambda(self.sigma(k - 2)?);
        let n = self.model_outputs.len();
        let (m0, m1, m2) = (
            &self.model_outputs[n - 1],
            &self.model_outputs[n - 2],
            &self.model_outputs[n - 3],
        );
        let (h, h0, h1) = (l_t - l_s0, l_s0 - l_s1, l_s1 - l_s2);
        let (r0, r1) = (h0 / h, h1 / h);
        let d1_0 = (m0 - m1) * (1.0 / r0);
        let d1_1 = (m1 - m2) * (1.0 / r1);
        let d1 = &d1_0 + (&d1_0 - &d1_1) * (r0 / (r0 + r1));
        let d2 = (&d1_0 - &d1_1) * (1.0 / (r0 + r1));
        Ok(match (self.algorithm, noise) {
            (AlgorithmType::DpmSolverPlusPlus, _) => {
                let em = (-h).exp() - 1.0;
                x * (s_t / s_s0) - m0 * (a_t * em) + d1 * (a_t * (em / h + 1.0))
                    - d2 * (a_t * ((em + h) / (h * h) - 0.5))
            }
            (AlgorithmType::DpmSolver, _) => {
                let ep = h.exp() - 1.0;
                x * (a_t / a_s0)
                    - m0 * (s_t * ep)
                    - d1 * (s_t * (ep / h - 1.0))
                    - d2 * (s_t * ((ep - h) / (h * h) - 0.5))
            }
            (AlgorithmType::SdeDpmSolverPlusPlus, Some(z)) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                x * (s_t / s_s0 * (-h).exp())
                    + m0 * (a_t * e2)
                    + d1 * (a_t * (e2 / (-2.0 * h) + 1.0))
                    + d2 * (a_t * ((e2 - 2.0 * h) / (2.0 * h).powi(2) - 0.5))
                    + z * (s_t * e2.sqrt())
            }
            _ => bail!("DPM-Solver: unsupported algorithm {:?}", self.algorithm),
        })
    }
}

fn validate(cfg: &SchedulerConfig) -> Result<()> {
    if cfg.thresholding {
        bail!("DPMSolverMultistepScheduler: thresholding is not supported (it is meant for pixel-space models)");
    }
    if cfg.use_beta_sigmas {
        bail!("use_beta_sigmas is not supported (it needs scipy's beta distribution)");
    }
    if cfg.use_flow_sigmas {
        bail!("use_flow_sigmas (flow-matching models) is not supported");
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
    if let Some(v @ ("learned" | "learned_range")) = cfg.variance_type.as_deref() {
        bail!(
            "DPMSolverMultistepScheduler: variance_type {v:?} (learned variance) is not supported"
        );
    }
    if !(1..=3).contains(&cfg.solver_order) {
        bail!(
            "DPMSolverMultistepScheduler: solver_order must be 1, 2 or 3, got {}",
            cfg.solver_order
        );
    }
    if cfg.algorithm_type == AlgorithmType::SdeDpmSolver {
        bail!("algorithm_type sde-dpmsolver (deprecated in diffusers) is not supported; use sde-dpmsolver++");
    }
    if cfg.algorithm_type == AlgorithmType::DpmSolver
        && cfg.final_sigmas_type == FinalSigmasType::Zero
    {
        bail!(
            "final_sigmas_type zero is not supported for algorithm_type dpmsolver; use sigma_min"
        );
    }
    Ok(())
}

impl Scheduler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        ensure!(
            i == self.counter,
            "DPM-Solver steps must be taken in order: expected step {}, got {i}",
            self.counter
        );
        let n = self.timesteps.len();
        let k = self.begin + i;
        let lower_final = k == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_zero);
        let lower_second = k + 2 == n && self.lower_order_final && n < 15;
        let m = self.convert(model_output, sample, k)?;
        if self.model_outputs.len() == self.order {
            self.model_outputs.pop_front();
        }
        self.model_outputs.push_back(m);
        let x = sample.to_kind(Kind::Float);
        let noise = (self.algorithm == AlgorithmType::SdeDpmSolverPlusPlus).then(|| {
            Tensor::randn(model_output.size(), (Kind::Float, Device::Cpu))
                .to_device(model_output.device())
        });
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_final {
            self.first_order(&x, noise.as_ref(), k)
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_second {
            self.second_order(&x, noise.as_ref(), k)
        } else {
            self.third_order(&x, noise.as_ref(), k)
        }?;
        self.lower_order_nums = (self.lower_order_nums + 1).min(self.order);
        self.counter += 1;
        Ok(prev.to_kind(model_output.kind()))
    }
}
