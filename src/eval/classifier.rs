//! A small CNN with one softmax head per attribute: the toy world's evaluators.
//!
//! Two instances are trained on ground-truth renders (and their VAE round trips, so generated
//! images are in distribution): the identity evaluator (shape, body colour, pattern, pattern
//! colour, eyes) and the context evaluator (background, position, size, accessory). The final
//! feature map is flattened, not pooled, so absolute position stays visible.
//! Keys: `convs.{i}`, `norms.{i}`, `fc`, `heads.{attribute}`.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

use crate::nn::{conv2d, group_norm, Linear};

/// Architecture of an attribute classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// (attribute name, number of values), one head each.
    pub heads: Vec<(String, usize)>,
    /// Input image side (square RGB in [-1, 1]).
    pub image_size: i64,
    /// Channels of the conv stack; every layer after the first halves the resolution.
    pub channels: Vec<i64>,
    pub hidden: i64,
}

impl ClassifierConfig {
    pub fn new(heads: &[(&str, usize)], image_size: i64) -> Self {
        Self {
            heads: heads.iter().map(|(n, c)| (n.to_string(), *c)).collect(),
            image_size,
            channels: vec![32, 64, 128, 128],
            hidden: 256,
        }
    }

    pub fn tiny() -> Self {
        Self {
            heads: vec![("a".into(), 3), ("b".into(), 2)],
            image_size: 16,
            channels: vec![8, 16],
            hidden: 16,
        }
    }

    fn final_side(&self) -> i64 {
        self.image_size >> (self.channels.len() as i64 - 1)
    }

    pub fn validate(&self) -> Result<()> {
        if self.heads.is_empty() || self.heads.iter().any(|(_, n)| *n < 2) {
            bail!("classifier: every head needs at least 2 classes");
        }
        if self.channels.is_empty()
            || self.final_side() < 1
            || self.channels.iter().any(|c| c % 8 != 0)
        {
            bail!("classifier: channels must be multiples of 8 and leave a ≥ 1 px feature map");
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct AttributeClassifier {
    pub config: ClassifierConfig,
    convs: Vec<nn::Conv2D>,
    norms: Vec<nn::GroupNorm>,
    fc: Linear,
    heads: Vec<Linear>,
}

impl AttributeClassifier {
    pub fn new(vs: nn::Path, config: &ClassifierConfig) -> Result<Self> {
        // Random init draws from the global generator: keep seeded work elsewhere out.
        let _rng = crate::util::rng_lock();
        config.validate()?;
        let mut convs = Vec::new();
        let mut norms = Vec::new();
        let mut cin = 3;
        for (i, &c) in config.channels.iter().enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            convs.push(conv2d(&vs / "convs" / i, cin, c, 3, stride, 1));
            norms.push(group_norm(&vs / "norms" / i, 8, c, 1e-5));
            cin = c;
        }
        let side = config.final_side();
        let fc = Linear::new(&vs / "fc", cin * side * side, config.hidden, true);
        let heads = config
            .heads
            .iter()
            .map(|(name, n)| {
                Linear::new(
                    &vs / "heads" / name.as_str(),
                    config.hidden,
                    *n as i64,
                    true,
                )
            })
            .collect();
        Ok(Self {
            config: config.clone(),
            convs,
            norms,
            fc,
            heads,
        })
    }

    /// `x: [B, 3, S, S]` in [-1, 1] → one `[B, n_k]` logit tensor per head.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let s = self.config.image_size;
        if x.dim() != 4 || x.size()[1..] != [3, s, s] {
            bail!(
                "classifier input must be [B, 3, {s}, {s}], got {:?}",
                x.size()
            );
        }
        let mut h = x.shallow_clone();
        for (conv, norm) in self.convs.iter().zip(&self.norms) {
            h = norm.forward(&conv.forward(&h)).silu();
        }
        // [B, C, s, s] → [B, C·s·s]
        let h = self.fc.forward(&h.flatten(1, -1)).silu();
        Ok(self.heads.iter().map(|head| head.forward(&h)).collect())
    }

    /// Summed cross-entropy over heads; `labels: [B, heads]` (Int64).
    pub fn loss(&self, x: &Tensor, labels: &Tensor) -> Result<(Tensor, Vec<f64>)> {
        let logits = self.forward(x)?;
        let mut total = Tensor::zeros([], (Kind::Float, x.device()));
        let mut accs = Vec::new();
        for (k, l) in logits.iter().enumerate() {
            let y = labels.select(1, k as i64);
            total += l.cross_entropy_for_logits(&y);
            let acc = l
                .argmax(-1, false)
                .eq_tensor(&y)
                .to_kind(Kind::Float)
                .mean(Kind::Float);
            accs.push(acc.double_value(&[]));
        }
        Ok((total, accs))
    }

    /// Predicted class per head: `[B, heads]` (Int64).
    pub fn predict(&self, x: &Tensor) -> Result<Tensor> {
        let logits = tch::no_grad(|| self.forward(x))?;
        let preds: Vec<Tensor> = logits.iter().map(|l| l.argmax(-1, false)).collect();
        Ok(Tensor::stack(&preds, 1))
    }
}
