//! The personalization metrics of the papers (SPEC §2), as the DreamBooth evaluation computes
//! them with transformers: CLIP-I = cosine of the projected CLIP image embeddings of a
//! reference and a generated image, CLIP-T = cosine of the generated image's and the prompt's
//! projected embeddings, DINO = cosine of ViT CLS features (`last_hidden_state[:, 0]` after
//! the final layernorm) of the two images.
//!
//! CLIP preprocessing comes from the CLIP folder's `preprocessor_config.json` (CLIP defaults
//! when absent); DINO uses the DreamBooth protocol ([`Preprocess::dino`]: 256 bicubic, centre
//! crop 224, ImageNet mean/std, for a 224 model).
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use tch::{nn, Device, Kind, Tensor};

use crate::io::preprocess::{Preprocess, RgbImage};
use crate::models::clip_vision::ClipModel;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vit::ViTModel;

/// Row-wise cosine similarity of `[B, D]` embeddings → `[B]` (f64).
pub fn cosine(a: &Tensor, b: &Tensor) -> Tensor {
    let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
    let dims: &[i64] = &[-1];
    let dot = (&a * &b).sum_dim_intlist(dims, false, Kind::Double);
    let na = a.square().sum_dim_intlist(dims, false, Kind::Double).sqrt();
    let nb = b.square().sum_dim_intlist(dims, false, Kind::Double).sqrt();
    dot / (na * nb).clamp_min(1e-8)
}

fn first(t: &Tensor) -> f64 {
    t.double_value(&[0])
}

/// A `CLIPModel` folder with its tokenizer and image processor.
#[derive(Debug)]
pub struct ClipScorer {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub preprocess: Preprocess,
    _vs: nn::VarStore,
}

impl ClipScorer {
    /// Loads `dir` (hub layout: `config.json`, `model.safetensors`, tokenizer files,
    /// optional `preprocessor_config.json`).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let (model, vs) = ClipModel::load(dir, device)?;
        let tokenizer = ClipTokenizer::from_dir(dir)
            .with_context(|| format!("CLIP model folder {}", dir.display()))?;
        let preprocess = Preprocess::clip().from_folder(dir)?;
        Ok(Self {
            model,
            tokenizer,
            preprocess,
            _vs: vs,
        })
    }

    /// Projected image embeddings `[B, projection_dim]`.
    pub fn image_embeds(&self, images: &[RgbImage]) -> Result<Tensor> {
        tch::no_grad(|| self.model.image_embeds(&self.preprocess.batch(images)?))
    }

    /// Projected text embeddings `[B, projection_dim]`.
    pub fn text_embeds(&self, prompts: &[&str]) -> Result<Tensor> {
        tch::no_grad(|| {
            self.model
                .text_embeds(&self.tokenizer.encode_batch(prompts))
        })
    }
}

/// A DINO `ViTModel` folder with the DreamBooth preprocessing.
#[derive(Debug)]
pub struct DinoScorer {
    pub model: ViTModel,
    pub preprocess: Preprocess,
    _vs: nn::VarStore,
}

impl DinoScorer {
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let (model, vs) = ViTModel::load(dir, device)?;
        let preprocess = Preprocess::dino(model.config.image_size as u32);
        Ok(Self {
            model,
            preprocess,
            _vs: vs,
        })
    }

    /// CLS features `[B, hidden]`.
    pub fn features(&self, images: &[RgbImage]) -> Result<Tensor> {
        tch::no_grad(|| Ok(self.model.forward(&self.preprocess.batch(images)?)?.cls()))
    }
}

/// The three scores of one (reference, generated image, prompt) triple.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Scores {
    pub clip_i: f64,
    pub clip_t: f64,
    pub dino: f64,
}

/// CLIP-I, CLIP-T and DINO of `image` against `reference` and `prompt`.
pub fn score(
    clip: &ClipScorer,
    dino: &DinoScorer,
    reference: &RgbImage,
    image: &RgbImage,
    prompt: &str,
) -> Result<Scores> {
    let emb = clip.image_embeds(&[reference.clone(), image.clone()])?;
    let text = clip.text_embeds(&[prompt])?;
    let feats = dino.features(&[reference.clone(), image.clone()])?;
    Ok(Scores {
        clip_i: first(&cosine(&emb.narrow(0, 0, 1), &emb.narrow(0, 1, 1))),
        clip_t: first(&cosine(&emb.narrow(0, 1, 1), &text)),
        dino: first(&cosine(&feats.narrow(0, 0, 1), &feats.narrow(0, 1, 1))),
    })
}
