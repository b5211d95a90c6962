//! Noise schedules: betas → `alphas_cumprod`, the timestep spacings, sigma helpers, and the
//! training-time [`NoiseSchedule`] (diffusers 0.42.1 `DDPMScheduler.add_noise` / `get_velocity`).
//!
//! diffusers builds betas and `alphas_cumprod` as float32 torch tensors and sigmas / Euler
//! timesteps as float32 numpy arrays; those are computed here exactly as diffusers computes them
//! (libtorch for `linspace`/`cumprod`, the same f32 operations, numpy's `linspace`, `arange`,
//! `round` (half to even) and `interp` algorithms) and stored as f64 holding the f32 values, so
//! timesteps and sigmas are bit-identical. All further arithmetic is f64.
use anyhow::{bail, ensure, Result};
use tch::{Device, Kind, Tensor};

use super::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};

/// How a class treats `rescale_betas_zero_snr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ZeroSnr {
    /// The class has no such parameter (PNDM).
    Unsupported,
    /// Rescale the betas (DDIM, DDPM).
    Rescale,
    /// Rescale, then set the last `alphas_cumprod` to 2⁻²⁴ so the first sigma is finite
    /// (Euler, Euler ancestral, DPM-Solver).
    RescaleClampLast,
}

/// diffusers' `alphas_cumprod` (float32) for a config.
pub(crate) fn alphas_cumprod(cfg: &SchedulerConfig, zero_snr: ZeroSnr) -> Result<Vec<f32>> {
    let t = cfg.num_train_timesteps;
    ensure!(t >= 2, "num_train_timesteps must be at least 2, got {t}");
    let opts = (Kind::Float, Device::Cpu);
    let betas = match (&cfg.trained_betas, cfg.beta_schedule) {
        (Some(b), _) => {
            ensure!(
                b.len() == t,
                "trained_betas has {} values but num_train_timesteps is {t}",
                b.len()
            );
            Tensor::from_slice(&b.iter().map(|&x| x as f32).collect::<Vec<_>>())
        }
        (None, BetaSchedule::Linear) => {
            Tensor::linspace(cfg.beta_start, cfg.beta_end, t as i64, opts)
        }
        (None, BetaSchedule::ScaledLinear) => Tensor::linspace(
            cfg.beta_start.powf(0.5),
            cfg.beta_end.powf(0.5),
            t as i64,
            opts,
        )
        .pow_tensor_scalar(2),
        (None, BetaSchedule::SquaredcosCapV2) => Tensor::from_slice(&betas_for_alpha_bar(t)),
    };
    let rescale = cfg.rescale_betas_zero_snr && zero_snr != ZeroSnr::Unsupported;
    let betas = if rescale {
        rescale_zero_terminal_snr(&betas)
    } else {
        betas
    };
    let ac = (betas.ones_like() - betas).cumprod(0, None::<Kind>);
    let mut ac = Vec::<f32>::try_from(&ac)?;
    if rescale && zero_snr == ZeroSnr::RescaleClampLast {
        if let Some(last) = ac.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(ac)
}

/// The Glide cosine schedule (`betas_for_alpha_bar`, cosine, max_beta 0.999), rounded to f32.
fn betas_for_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1), in float32 like diffusers.
fn rescale_zero_terminal_snr(betas: &Tensor) -> Tensor {
    let n = betas.size()[0];
    let sqrt_ab = (betas.ones_like() - betas).cumprod(0, None::<Kind>).sqrt();
    let (first, last) = (sqrt_ab.get(0), sqrt_ab.get(n - 1));
    let sqrt_ab = (sqrt_ab - &last) * (&first / (&first - &last));
    let ab = sqrt_ab.pow_tensor_scalar(2);
    // [N] → alphas: ab[0], ab[1:] / ab[:-1]
    let alphas = Tensor::cat(
        &[
            ab.narrow(0, 0, 1),
            ab.narrow(0, 1, n - 1) / ab.narrow(0, 0, n - 1),
        ],
        0,
    );
    alphas.ones_like() - alphas
}

/// `((1 - ᾱ) / ᾱ) ** 0.5` in float32, ascending in t.
pub(crate) fn train_sigmas(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// numpy's `round` (half to even).
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.linspace(start, stop, num)` (float64).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = y.last_mut() {
        *last = stop;
    }
    y
}

/// `np.arange(start, stop, step)` with a float step.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    // numpy writes start and start + step, then fills start + i·(buf[1] − buf[0]).
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return x;
    }
    if x < 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (y0, y1) = (fp[j] as f64, fp[j + 1] as f64);
    if x == j as f64 {
        return y0;
    }
    let slope = (y1 - y0) / 1.0;
    let r = slope * (x - j as f64) + y0;
    if r.is_nan() {
        let r = slope * (x - (j + 1) as f64) + y1;
        if r.is_nan() && y0 == y1 {
            return y0;
        }
        return r;
    }
    r
}

/// `np.log` of the float32 training sigmas, as float32 (correctly rounded; numpy's SIMD f32 log
/// may differ in the last bit, which moves Karras/exponential fractional timesteps by ~1e-5).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f64> {
    sigmas
        .iter()
        .map(|&s| (s as f64).ln() as f32 as f64)
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional timestep of a sigma, interpolating `log_sigmas`.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx: the last index with log_sigma - log_sigmas[i] >= 0 (0 if none), ≤ len - 2.
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// The Karras et al. (2022) schedule, rho = 7.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `np.exp(np.linspace(log(sigma_max), log(sigma_min), n))`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), n)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The leading/trailing/linspace timesteps shared by DDIM, PNDM and Euler: descending, before
/// each class's own casts. `linspace` is unrounded here.
pub(crate) fn spaced_timesteps(cfg: &SchedulerConfig, n: usize) -> Vec<f64> {
    let t = cfg.num_train_timesteps;
    match cfg.timestep_spacing {
        TimestepSpacing::Linspace => {
            let mut v = np_linspace(0.0, (t - 1) as f64, n);
            v.reverse();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = t / n;
            (0..n).rev().map(|i| (i * ratio) as f64).collect()
        }
        TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / n as f64))
            .into_iter()
            .map(np_round)
            .collect(),
    }
}

/// The forward (noising) process for training: diffusers' `DDPMScheduler.add_noise` and
/// `get_velocity`, in the samples' dtype and device.
#[derive(Debug)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    /// `[T]` float32 on CPU.
    ac: Tensor,
    prediction_type: PredictionType,
}

impl NoiseSchedule {
    /// From a config resolved for DDPMScheduler ([`SchedulerConfig::for_training`]).
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let ac = alphas_cumprod(cfg, ZeroSnr::Rescale)?;
        Ok(Self {
            alphas_cumprod: ac.iter().map(|&a| a as f64).collect(),
            ac: Tensor::from_slice(&ac),
            prediction_type: cfg.prediction_type,
        })
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// ᾱ_t for t = 0..T.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// (√ᾱ_t, √(1−ᾱ_t)) for `t: [B]` (int64), shaped `[B, 1, …]` to broadcast over `like`.
    fn coefficients(&self, t: &Tensor, like: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = self.num_train_timesteps() as i64;
        ensure!(t.dim() == 1, "timesteps must be [B], got {:?}", t.size());
        let t = t.to_device(Device::Cpu).to_kind(Kind::Int64);
        let (lo, hi) = (t.min().int64_value(&[]), t.max().int64_value(&[]));
        ensure!(
            lo >= 0 && hi < n,
            "timesteps must lie in [0, {n}), got {lo}..={hi}"
        );
        let ac = self
            .ac
            .to_kind(like.kind())
            .index_select(0, &t)
            .to_device(like.device());
        // [B] → [B, 1, …, 1]
        let mut shape = vec![-1i64];
        shape.resize(like.dim().max(1), 1);
        let sqrt_a = ac.sqrt().reshape(&shape[..]);
        let sqrt_1m = (ac.ones_like() - ac).sqrt().reshape(&shape[..]);
        Ok((sqrt_a, sqrt_1m))
    }

    /// x_t = √ᾱ_t · x0 + √(1−ᾱ_t) · ε.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(t, x0)?;
        Ok(a * x0 + s * noise)
    }

    /// v = √ᾱ_t · ε − √(1−ᾱ_t) · x0.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        let (a, s) = self.coefficients(t, x0)?;
        Ok(a * noise - s * x0)
    }

    /// The training target for `prediction_type`: ε, v, or x0.
    pub fn target(&self, x0: &Tensor, noise: &Tensor, t: &Tensor) -> Result<Tensor> {
        match self.prediction_type {
            PredictionType::Epsilon => Ok(noise.shallow_clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, t),
            PredictionType::Sample => Ok(x0.shallow_clone()),
        }
    }
}

/// Errors for `n` inference steps that no sampler can take.
pub(crate) fn check_steps(cfg: &SchedulerConfig, n: usize) -> Result<()> {
    if n == 0 {
        bail!("the number of inference steps must be at least 1");
    }
    if n > cfg.num_train_timesteps {
        bail!(
            "{n} inference steps cannot exceed num_train_timesteps ({})",
            cfg.num_train_timesteps
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 999.0, 4), vec![0.0, 333.0, 666.0, 999.0]);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        assert_eq!(
            np_arange(1000.0, 0.0, -250.0),
            vec![1000.0, 750.0, 500.0, 250.0]
        );
        assert_eq!(np_round(2.5), 2.0);
        assert_eq!(np_interp(1.5, &[1.0, 2.0, 4.0]), 3.0);
        assert_eq!(np_interp(2.0, &[1.0, 2.0, 4.0]), 4.0);
    }

    #[test]
    fn tiny_schedule() {
        let ac = alphas_cumprod(&SchedulerConfig::tiny(), ZeroSnr::Rescale).unwrap();
        assert_eq!(ac.len(), 1000);
        assert!(ac.windows(2).all(|w| w[1] < w[0]));
        let ns = NoiseSchedule::new(&SchedulerConfig::tiny()).unwrap();
        let x0 = Tensor::ones([2, 4, 2, 2], (Kind::Float, Device::Cpu));
        let noise = x0.zeros_like();
        let t = Tensor::from_slice(&[0i64, 999]);
        let xt = ns.add_noise(&x0, &noise, &t).unwrap();
        let expect = (ns.alphas_cumprod()[999] as f32).sqrt() as f64;
        assert!((xt.double_value(&[1, 0, 0, 0]) - expect).abs() < 1e-7);
        assert!(ns
            .add_noise(&x0, &noise, &Tensor::from_slice(&[1000i64, 0]))
            .is_err());
    }
}
