//! Toy-world fidelity (SPEC §6): subject fidelity = fraction of the reference subject's
//! identity attributes the identity evaluator recovers from an image; prompt fidelity = fraction
//! of the prompt's context attributes the context evaluator finds. Chance levels are exact
//! (`Identity::chance_level`, `Context::chance_level`).
use std::path::Path;

use anyhow::{bail, Context as _, Result};
use tch::{nn, Device, Kind, Tensor};

use super::classifier::{AttributeClassifier, ClassifierConfig};
use crate::data::{Context, Identity};
use crate::io::safetensors::{load_strict, save, SafeTensorsFile};

/// The two shipped evaluators.
pub struct Evaluators {
    pub identity: AttributeClassifier,
    pub context: AttributeClassifier,
    _stores: Vec<nn::VarStore>,
}

pub fn identity_config() -> ClassifierConfig {
    ClassifierConfig::new(&Identity::ATTRIBUTES, crate::data::IMAGE_SIZE as i64)
}

pub fn context_config() -> ClassifierConfig {
    ClassifierConfig::new(&Context::ATTRIBUTES, crate::data::IMAGE_SIZE as i64)
}

impl Evaluators {
    /// Loads `DIR/identity.safetensors` and `DIR/context.safetensors` (configs in their metadata).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let load = |name: &str| -> Result<(AttributeClassifier, nn::VarStore)> {
            let path = dir.join(format!("{name}.safetensors"));
            if !path.is_file() {
                bail!("{}: missing evaluator {name}.safetensors", dir.display());
            }
            let file = SafeTensorsFile::open(&path)?;
            let meta = file.metadata()?.unwrap_or_default();
            let config: ClassifierConfig = meta
                .get("config")
                .and_then(|c| serde_json::from_str(c).ok())
                .with_context(|| {
                    format!("{}: no classifier config in the metadata", path.display())
                })?;
            let mut vs = nn::VarStore::new(device);
            let model = AttributeClassifier::new(vs.root(), &config)?;
            load_strict(&mut vs, std::slice::from_ref(&file), &[])?;
            vs.freeze();
            Ok((model, vs))
        };
        let (identity, a) = load("identity")?;
        let (context, b) = load("context")?;
        if identity.config.heads.len() != Identity::ATTRIBUTES.len()
            || context.config.heads.len() != Context::ATTRIBUTES.len()
        {
            bail!("{}: evaluators for another world", dir.display());
        }
        Ok(Self {
            identity,
            context,
            _stores: vec![a, b],
        })
    }

    /// Per image and attribute: was the reference's identity attribute recovered, was the
    /// prompt's context attribute present. `images: [B, 3, 32, 32]` in [-1, 1].
    pub fn hits(
        &self,
        images: &Tensor,
        reference: &[Identity],
        prompted: &[Context],
    ) -> Result<Vec<(Vec<bool>, Vec<bool>)>> {
        let b = images.size()[0] as usize;
        if reference.len() != b || prompted.len() != b {
            bail!(
                "score: {b} images for {} references and {} prompts",
                reference.len(),
                prompted.len()
            );
        }
        let id = self.identity.predict(images)?;
        let ctx = self.context.predict(images)?;
        Ok((0..b)
            .map(|i| {
                let s = agreement(&id.get(i as i64), &reference[i].labels());
                let p = agreement(&ctx.get(i as i64), &prompted[i].labels());
                (s, p)
            })
            .collect())
    }

    /// Per image: (subject fidelity vs `reference`, prompt fidelity vs `prompted`) = the
    /// fractions of [`Evaluators::hits`].
    pub fn score(
        &self,
        images: &Tensor,
        reference: &[Identity],
        prompted: &[Context],
    ) -> Result<Vec<(f64, f64)>> {
        let frac = |h: &[bool]| h.iter().filter(|&&x| x).count() as f64 / h.len() as f64;
        Ok(self
            .hits(images, reference, prompted)?
            .iter()
            .map(|(s, p)| (frac(s), frac(p)))
            .collect())
    }
}

/// Per position: does `pred` equal `labels`.
fn agreement(pred: &Tensor, labels: &[usize]) -> Vec<bool> {
    labels
        .iter()
        .enumerate()
        .map(|(k, &l)| pred.int64_value(&[k as i64]) == l as i64)
        .collect()
}

/// Saves one trained classifier with its config in the metadata (f16 when `compact`).
pub fn save_classifier(
    model: &AttributeClassifier,
    vs: &nn::VarStore,
    path: &Path,
    compact: bool,
) -> Result<()> {
    let tensors = crate::io::safetensors::sorted_variables(vs);
    let meta = [("config".to_string(), serde_json::to_string(&model.config)?)]
        .into_iter()
        .collect();
    let kind = if compact { Kind::Half } else { Kind::Float };
    save(&tensors, kind, Some(meta), path)
}
