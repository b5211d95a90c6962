//! PNDM (diffusers 0.42.1 `PNDMScheduler`): the Runge-Kutta warm-up (`step_prk`, 12 model
//! calls over the first 3 intervals) then linear multistep (`step_plms`); with
//! `skip_prk_steps` it is PLMS from the start, repeating the second timestep once.
use anyhow::{bail, ensure, Result};
use tch::Tensor;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::schedule::{alphas_cumprod, np_linspace, np_round, spaced_timesteps, ZeroSnr};
use super::{alpha_at, Scheduler};

pub struct Pndm {
    timesteps: Vec<f64>,
    /// How many leading entries of `timesteps` are Runge-Kutta steps (0 with skip_prk_steps).
    prk_steps: usize,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    /// `num_train_timesteps // steps`.
    step_ratio: i64,
    prediction_type: PredictionType,
    skip_prk_steps: bool,
    counter: usize,
    ets: Vec<Tensor>,
    cur_model_output: Option<Tensor>,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if cfg.prediction_type == PredictionType::Sample {
            bail!("PNDMScheduler supports prediction_type epsilon or v_prediction, not sample");
        }
        let t_train = cfg.num_train_timesteps;
        // Ascending, as PNDM's `_timesteps`.
        let asc: Vec<i64> = match cfg.timestep_spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (t_train - 1) as f64, steps)
                .into_iter()
                .map(|t| np_round(t) as i64)
                .collect(),
            TimestepSpacing::Leading => (0..steps)
                .map(|i| (i * (t_train / steps) + cfg.steps_offset) as i64)
                .collect(),
            TimestepSpacing::Trailing => spaced_timesteps(cfg, steps)
                .into_iter()
                .rev()
                .map(|t| t as i64 - 1)
                .collect(),
        };
        let n = asc.len();
        let (prk, plms): (Vec<i64>, Vec<i64>) = if cfg.skip_prk_steps {
            // concat(_t[:-1], _t[-2:-1], _t[-1:])[::-1]
            let mut plms = asc[..n - 1].to_vec();
            if n >= 2 {
                plms.push(asc[n - 2]);
            }
            plms.push(asc[n - 1]);
            plms.reverse();
            (vec![], plms)
        } else {
            if n < 4 {
                bail!("PNDM's Runge-Kutta warm-up needs at least 4 steps (got {n}); use skip_prk_steps or another scheduler");
            }
            let half = (t_train / steps / 2) as i64;
            // _t[-4:].repeat(2) + tile([0, half], 4) → [a, a+h, b, b+h, …]; [:-1].repeat(2)[1:-1][::-1]
            let pairs: Vec<i64> = asc[n - 4..].iter().flat_map(|&t| [t, t + half]).collect();
            let rep: Vec<i64> = pairs[..7].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = rep[1..13].to_vec();
            prk.reverse();
            (prk, asc[..n - 3].iter().rev().copied().collect())
        };
        let ac: Vec<f64> = alphas_cumprod(cfg, ZeroSnr::Unsupported)?
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Self {
            prk_steps: prk.len(),
            timesteps: prk.iter().chain(&plms).map(|&t| t as f64).collect(),
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            step_ratio: (t_train / steps) as i64,
            prediction_type: cfg.prediction_type,
            skip_prk_steps: cfg.skip_prk_steps,
            counter: 0,
            ets: vec![],
            cur_model_output: None,
            cur_sample: None,
        })
    }

    fn step_prk(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let c = self.counter;
        let diff_to_prev = if c % 2 == 1 { 0 } else { self.step_ratio / 2 };
        let prev_t = t - diff_to_prev;
        let t = self.timesteps[c / 4 * 4] as i64;
        let mut model_output = model_output.shallow_clone();
        match c % 4 {
            0 => {
                self.cur_model_output = Some(&model_output * (1.0 / 6.0));
                self.ets.push(model_output.shallow_clone());
                self.cur_sample = Some(sample.shallow_clone());
            }
            1 | 2 => {
                let acc = self.cur_model_output.take();
                let add = &model_output * (1.0 / 3.0);
                self.cur_model_output = Some(match acc {
                    Some(acc) => acc + add,
                    None => add,
                });
            }
            _ => {
                let add = &model_output * (1.0 / 6.0);
                model_output = match self.cur_model_output.take() {
                    Some(acc) => acc + add,
                    None => add,
                };
            }
        }
        let cur = self.cur_sample.as_ref().unwrap_or(sample).shallow_clone();
        self.prev_sample(&cur, t, prev_t, &model_output)
    }

    fn step_plms(&mut self, model_output: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.skip_prk_steps && self.ets.len() < 3 {
            bail!("PNDM can only run PLMS steps after 12 Runge-Kutta steps");
        }
        let (mut t, mut prev_t) = (t, t - self.step_ratio);
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.shallow_clone());
        } else {
            prev_t = t;
            t += self.step_ratio;
        }
        let e = |k: usize| &self.ets[self.ets.len() - k];
        let mut sample = sample.shallow_clone();
        let model_output = match (self.ets.len(), self.counter) {
            (1, 0) => {
                self.cur_sample = Some(sample.shallow_clone());
                model_output.shallow_clone()
            }
            (1, 1) => {
                if let Some(cur) = self.cur_sample.take() {
                    sample = cur;
                }
                (model_output + e(1)) / 2.0
            }
            (2, _) => (e(1) * 3.0 - e(2)) / 2.0,
            (3, _) => (e(1) * 23.0 - e(2) * 16.0 + e(3) * 5.0) / 12.0,
            _ => (e(1) * 55.0 - e(2) * 59.0 + e(3) * 37.0 - e(4) * 9.0) * (1.0 / 24.0),
        };
        self.prev_sample(&sample, t, prev_t, &model_output)
    }

    /// Formula (9) of the PNDM paper: x_{t−δ} from x_t and ε.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = alpha_at(&self.alphas_cumprod, t)?;
        let a_prev = if prev_t >= 0 {
            alpha_at(&self.alphas_cumprod, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.prediction_type {
            PredictionType::VPrediction => eps * a_t.sqrt() + sample * b_t.sqrt(),
            _ => eps.shallow_clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        Ok(sample * sample_coeff - eps * (a_prev - a_t) / denom)
    }
}

impl Scheduler for Pndm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, i: usize, sample: &Tensor) -> Result<Tensor> {
        ensure!(
            i == self.counter && i < self.timesteps.len(),
            "PNDM steps must be taken in order: expected step {}, got {i}",
            self.counter
        );
        let t = self.timesteps[i] as i64;
        let out = if self.counter < self.prk_steps && !self.skip_prk_steps {
            self.step_prk(model_output, t, sample)
        } else {
            self.step_plms(model_output, t, sample)
        }?;
        self.counter += 1;
        Ok(out)
    }
}
