//! Training the hypernetwork end to end through the frozen UNet (paper §4.1, eq. 5; SPEC §2):
//!
//!   L = L_FT(x; θ0 + h(x)) + γ·L_reg(θ0 + h(x)) + λ·‖h(x)‖²
//!
//! 1. Draw a batch of distinct subjects; encode each input image once with the frozen encoder.
//! 2. h(x) → per-sample LoRA (row b of the UNet call carries subject b's predicted weights).
//! 3. L_FT: ε-prediction MSE on the subject's target image (VAE latent mean × scaling factor,
//!    t ~ U{0..T−1}, diffusers' DDPM noising) with its prompt:
//!    - `single` (the paper's setting): input = target, prompt "a sks <class>";
//!    - `cross_view`: input and target are the same subject in different contexts (toy world)
//!      or two different images of it (folders), target prompt = the target's caption with
//!      the token ("a sks creature wearing a hat on grass, …") or "a sks <class>".
//! 4. L_reg (prior preservation, γ > 0): the same MSE with the same predicted LoRA on class
//!    images with their class prompts (toy: renders of other train subjects with their
//!    captions; folders: `--class-data` images with "a <class>").
//! 5. λ·‖h(x)‖²: the squared norm of the predicted update ΔW = (alpha/r)·B·A summed over sites,
//!    averaged over the batch ([`Hypernetwork::squared_norm`]).
//! 6. Unconditional preservation (`null_weight` > 0, loracast's addition): the subject rows
//!    again with the empty prompt and the predicted LoRA, the frozen model's ε as the target,
//!    so the LoRA leaves ε(∅) alone and CFG's (ε(c) − ε(∅)) carries — and amplifies — the subject.
//! 7. HyperDreamBooth (`lidb_targets`, hyperdreambooth §4.2 eq. 2): the decoder predicts LiDB
//!    weights, subjects are drawn from K pre-optimised LiDB subjects ([`super::lidb`]) and
//!    β·‖θ̂ − θ‖² (summed over the predicted numbers, averaged over the batch) is added.
//!
//! 8. Open category (`--ip-adapter`, seed paper §5.2): θ0 = base + IP-Adapter(-Plus). The input
//!    image is encoded once by the adapter's frozen CLIP vision tower (`hidden_states[-2]`),
//!    which feeds both the adapter's projection (the rows' image tokens, at the adapter scale)
//!    and the hypernetwork's decoder; prior rows get the unconditional image, unconditional
//!    preservation rows the unconditional image and text, as CFG's ∅ row at inference.
//!
//! Data: the toy world, `DIR/<subject>/*` folders, or `pairs.jsonl` (Subject200K-style pairs:
//! one JSON object per line, `{"input": PATH, "target": PATH, "caption": TEXT, "class": WORD}`,
//! paths relative to the file's folder; the target prompt is the caption with the token put
//! before the first whole-word `class`, or "a <token> <class>, <caption>" without one).
//!
//! AdamW, constant LR after warm-up, gradient accumulation over `accumulate` micro-batches,
//! progress bar, metrics log, atomic checkpoints, exact resume and the NaN guard come from
//! [`super::train`]. Only the decoder trains; the encoder, text encoder, UNet and VAE are frozen.
//!
//! Data parallel ([`train_hypernet_dist`], issue #18): every rank draws the whole global batch's
//! random choices (subjects, views, timesteps, noise: cheap) from the step's streams and
//! renders, encodes and back-propagates only its [`Shard`] of the rows, so N ranks compute the
//! one-process batch. The noise is drawn in the latents' logical order ([`shard_draws`]).
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use tch::{nn, Device, Kind, Tensor};

use super::lidb::LidbTargetsConfig;
use super::{target_tensor, train_dist, DenoiseRows, LoopConfig, RowImages, StepOutput};
use crate::data::{subject_prompt, Identity, Sample, Split, World, DEFAULT_TOKEN};
use crate::dist::{Dist, Shard};
use crate::hypernet::{DecoderConfig, HypernetConfig, Hypernetwork, IpAdapterBinding};
use crate::io::preprocess::RgbImage;
use crate::models::ip_adapter::{ImageEncoder, IpAdapter};
use crate::models::vit::ViTModel;
use crate::pipeline::StableDiffusion;

/// Where input and target images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataMode {
    /// input = target, prompt "a sks <class>" (the paper's training set-up).
    Single,
    /// input and target: the same subject in another context / another image.
    CrossView,
}

fn d_one() -> i64 {
    1
}
fn d_token() -> String {
    DEFAULT_TOKEN.to_string()
}
fn d_class() -> String {
    "creature".to_string()
}
fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// `configs/toy/hypernet.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HypernetTrainConfig {
    pub decoder: DecoderConfig,
    #[serde(rename = "loop")]
    pub loop_cfg: LoopConfig,
    /// Distinct subjects per micro-batch.
    pub batch: i64,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[serde(default = "d_one")]
    pub accumulate: i64,
    /// λ: weight of ‖h(x)‖².
    pub lambda: f64,
    /// γ: weight of the prior-preservation loss (0 = off).
    #[serde(default)]
    pub gamma: f64,
    pub mode: DataMode,
    #[serde(default = "d_token")]
    pub token: String,
    #[serde(default = "d_class")]
    pub class_word: String,
    /// Seed of the toy world's data stream (ignored for folder data).
    #[serde(default)]
    pub world_seed: u64,
    /// Weight of the unconditional-preservation loss: with the predicted LoRA, ε on the empty
    /// prompt should equal the frozen model's on the same noisy subject rows (0 = off).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub null_weight: f64,
    /// HyperDreamBooth: pre-optimised LiDB subjects and the weight-space loss (toy data only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lidb_targets: Option<LidbTargetsConfig>,
}

impl HypernetTrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.loop_cfg.validate()?;
        if self.batch < 1 || self.accumulate < 1 {
            bail!("batch and accumulate must be ≥ 1");
        }
        if ![self.lambda, self.gamma, self.null_weight]
            .iter()
            .all(|x| x.is_finite() && *x >= 0.0)
        {
            bail!("lambda, gamma and null_weight must be finite and ≥ 0");
        }
        if self.token.trim().is_empty() || self.class_word.trim().is_empty() {
            bail!("token and class_word must not be empty");
        }
        if let Some(t) = &self.lidb_targets {
            t.validate()?;
            if self.decoder.lidb.is_none() {
                bail!("lidb_targets needs a LiDB decoder (set decoder.lidb)");
            }
        }
        Ok(())
    }
}

/// Training images.
pub enum TrainData {
    /// The toy world's train split (held-out identities are never drawn).
    Toy,
    /// `DIR/<subject>/*.png|jpg` (+ optional class images for prior preservation).
    Folder {
        subjects: Vec<(String, Vec<RgbImage>)>,
        class_images: Vec<RgbImage>,
    },
    /// `pairs.jsonl` (Subject200K-style): images read when drawn.
    Pairs {
        pairs: Vec<Pair>,
        class_images: Vec<RgbImage>,
    },
}

/// One line of `pairs.jsonl`: the same subject in two images.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    /// The hypernetwork's (and the IP-Adapter's) input image.
    pub input: PathBuf,
    /// The denoising target.
    pub target: PathBuf,
    /// The target's caption.
    pub caption: String,
    /// The subject's class word ("dog").
    pub class: String,
}

impl Pair {
    /// The target prompt: `token` before the caption's first whole-word `class`, or
    /// "a <token> <class>, <caption>".
    pub fn prompt(&self, token: &str) -> String {
        let words: Vec<&str> = self.caption.split(' ').collect();
        let is_class = |w: &&str| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .eq_ignore_ascii_case(&self.class)
        };
        match words.iter().position(is_class) {
            Some(i) => {
                let mut out = words.clone();
                let with = format!("{token} {}", words[i]);
                out[i] = &with;
                out.join(" ")
            }
            None => format!("a {token} {}, {}", self.class, self.caption),
        }
    }
}

impl TrainData {
    /// Reads a `pairs.jsonl` (checking every line and that its images exist; a bad line is an
    /// error naming its number) and an optional flat folder of class images.
    pub fn from_pairs(path: &Path, class_dir: Option<&Path>) -> Result<Self> {
        let shown = path.display();
        let text = std::fs::read_to_string(path).with_context(|| format!("--data {shown}"))?;
        let root = path.parent().unwrap_or(Path::new("."));
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let n = i + 1;
            let mut p: Pair = serde_json::from_str(line).map_err(|e| {
                anyhow::anyhow!("{shown} line {n}: {e} (expected {{\"input\", \"target\", \"caption\", \"class\"}})")
            })?;
            if p.class.trim().is_empty() || p.class.contains(char::is_whitespace) {
                bail!(
                    "{shown} line {n}: \"class\" must be one word, got {:?}",
                    p.class
                );
            }
            for (key, f) in [("input", &mut p.input), ("target", &mut p.target)] {
                if f.is_absolute() || f.components().any(|c| c == std::path::Component::ParentDir) {
                    bail!(
                        "{shown} line {n}: {key} {} must be a path inside {}",
                        f.display(),
                        root.display()
                    );
                }
                *f = root.join(&*f);
                if !f.is_file() {
                    bail!(
                        "{shown} line {n}: {key} image {}: no such file",
                        f.display()
                    );
                }
            }
            pairs.push(p);
        }
        if pairs.is_empty() {
            bail!("{shown}: no pairs (one JSON object per line)");
        }
        let class_images = match class_dir {
            Some(d) => crate::io::folder::list_images(d)?
                .iter()
                .map(|p| RgbImage::open(p))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };
        Ok(TrainData::Pairs {
            pairs,
            class_images,
        })
    }

    /// Reads `dir/<subject>/` image folders (and a flat folder of class images).
    pub fn from_folders(dir: &Path, class_dir: Option<&Path>, mode: DataMode) -> Result<Self> {
        let images_in = |d: &Path| -> Result<Vec<RgbImage>> {
            crate::io::folder::list_images(d)?
                .iter()
                .map(|p| RgbImage::open(p))
                .collect()
        };
        let dirs = crate::io::folder::list_subdirs(dir)
            .with_context(|| format!("--data {}", dir.display()))?;
        let need = if mode == DataMode::CrossView { 2 } else { 1 };
        let mut subjects = Vec::new();
        for d in dirs {
            let imgs = images_in(&d)?;
            if imgs.len() >= need {
                let name = d
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                subjects.push((name, imgs));
            }
        }
        if subjects.is_empty() {
            bail!(
                "--data {}: no subject folders with at least {need} PNG/JPEG image(s) (expected DIR/<subject>/*.png)",
                dir.display()
            );
        }
        let class_images = match class_dir {
            Some(d) => {
                let v = images_in(d)?;
                if v.is_empty() {
                    bail!("--class-data {}: no PNG/JPEG images", d.display());
                }
                v
            }
            None => Vec::new(),
        };
        Ok(TrainData::Folder {
            subjects,
            class_images,
        })
    }
}

/// One micro-batch: the input images, target images `[B(+B), 3, H, W]` in [-1, 1]
/// (subject rows, then prior rows when γ > 0) and their prompts.
struct MicroBatch {
    inputs: Vec<RgbImage>,
    targets: Tensor,
    prompts: Vec<String>,
    prior_rows: bool,
    /// Indices into the pre-optimised LiDB subjects (when drawn from them).
    picked: Vec<usize>,
}

fn render_rgb(s: &Sample) -> Result<RgbImage> {
    let img = s.render();
    RgbImage::new(img.width as u32, img.height as u32, img.rgb)
}

/// A toy render as a training target `[3, size, size]` in [-1, 1] (resized when the base
/// model's image size differs from the world's).
pub(crate) fn toy_target(s: &Sample, size: i64) -> Result<Tensor> {
    let img = s.render();
    if img.width as i64 == size && img.height as i64 == size {
        return Ok(img.to_tensor());
    }
    target_tensor(
        &RgbImage::new(img.width as u32, img.height as u32, img.rgb)?,
        size,
    )
}

fn micro_batch(
    cfg: &HypernetTrainConfig,
    data: &TrainData,
    size: i64,
    seed: u64,
    pool: Option<&[Identity]>,
    shard: Shard,
) -> Result<MicroBatch> {
    let mut world = World::new(seed);
    let prior = cfg.gamma > 0.0;
    let (mut inputs, mut targets, mut prompts) = (Vec::new(), Vec::new(), Vec::new());
    let (mut prior_targets, mut prior_prompts) = (Vec::new(), Vec::new());
    let mut picked = Vec::new();
    match data {
        TrainData::Toy => {
            let ids = match pool {
                // distinct subjects of the pool (partial Fisher–Yates with the step's stream)
                Some(pool) => {
                    let mut order: Vec<usize> = (0..pool.len()).collect();
                    let n = (cfg.batch as usize).min(pool.len());
                    for i in 0..n {
                        let j = i + world.rng().below(pool.len() - i);
                        order.swap(i, j);
                    }
                    picked = order[..n].to_vec();
                    picked.iter().map(|&k| pool[k]).collect()
                }
                None => world.distinct_identities(Split::Train, cfg.batch as usize),
            };
            // Every rank draws every row (same stream); renders only its own.
            let mine = shard.rows(ids.len(), "subjects")?;
            picked = picked
                .get(mine.clone())
                .map(<[usize]>::to_vec)
                .unwrap_or_default();
            for (row, id) in ids.into_iter().enumerate() {
                let mine = mine.contains(&row);
                let input = world.view(id);
                let (target, prompt) = match cfg.mode {
                    DataMode::Single => (input, format!("a {} {}", cfg.token, cfg.class_word)),
                    DataMode::CrossView => {
                        let t = world.view(id);
                        let p = subject_prompt(&t.context, &cfg.token);
                        (t, p)
                    }
                };
                if mine {
                    inputs.push(render_rgb(&input)?);
                    targets.push(toy_target(&target, size)?);
                    prompts.push(prompt);
                }
                if prior {
                    let other = world.sample(Split::Train);
                    if mine {
                        prior_targets.push(toy_target(&other, size)?);
                        prior_prompts.push(other.context.caption());
                    }
                }
            }
        }
        TrainData::Folder {
            subjects,
            class_images,
        } => {
            let n = (cfg.batch as usize).min(subjects.len());
            let mut order: Vec<usize> = (0..subjects.len()).collect();
            // Fisher–Yates with the step's stream: n distinct subjects.
            for i in (1..order.len()).rev() {
                order.swap(i, world.rng().below(i + 1));
            }
            let mine = shard.rows(n, "subjects")?;
            for (row, &k) in order[..n].iter().enumerate() {
                let mine = mine.contains(&row);
                let imgs = &subjects[k].1;
                let i = world.rng().below(imgs.len());
                let j = match cfg.mode {
                    DataMode::Single => i,
                    DataMode::CrossView => (i + 1 + world.rng().below(imgs.len() - 1)) % imgs.len(),
                };
                if mine {
                    inputs.push(imgs[i].clone());
                    targets.push(target_tensor(&imgs[j], size)?);
                    prompts.push(format!("a {} {}", cfg.token, cfg.class_word));
                }
                if prior {
                    if class_images.is_empty() {
                        bail!("gamma > 0 (prior preservation) needs --class-data");
                    }
                    let c = &class_images[world.rng().below(class_images.len())];
                    if mine {
                        prior_targets.push(target_tensor(c, size)?);
                        prior_prompts.push(format!("a {}", cfg.class_word));
                    }
                }
            }
        }
        TrainData::Pairs {
            pairs,
            class_images,
        } => {
            let n = (cfg.batch as usize).min(pairs.len());
            let mut order: Vec<usize> = (0..pairs.len()).collect();
            // n distinct pairs (partial Fisher–Yates with the step's stream)
            for i in 0..n {
                let j = i + world.rng().below(pairs.len() - i);
                order.swap(i, j);
            }
            let mine = shard.rows(n, "pairs")?;
            for (row, &k) in order[..n].iter().enumerate() {
                let mine = mine.contains(&row);
                let p = &pairs[k];
                if mine {
                    let input = RgbImage::open(&p.input)?;
                    let target = match cfg.mode {
                        DataMode::Single => input.clone(),
                        DataMode::CrossView => RgbImage::open(&p.target)?,
                    };
                    targets.push(target_tensor(&target, size)?);
                    inputs.push(input);
                    prompts.push(p.prompt(&cfg.token));
                }
                if prior {
                    if class_images.is_empty() {
                        bail!("gamma > 0 (prior preservation) needs --class-data");
                    }
                    let c = &class_images[world.rng().below(class_images.len())];
                    if mine {
                        prior_targets.push(target_tensor(c, size)?);
                        prior_prompts.push(format!("a {}", p.class));
                    }
                }
            }
        }
    }
    targets.extend(prior_targets);
    prompts.extend(prior_prompts);
    Ok(MicroBatch {
        inputs,
        targets: Tensor::stack(&targets, 0),
        prompts,
        prior_rows: prior,
        picked,
    })
}

/// Copies a transformers ViT folder's weights into the hypernetwork's `encoder.*` variables.
fn load_encoder(vs: &nn::VarStore, dir: &Path) -> Result<()> {
    let (_vit, evs) = ViTModel::load(dir, Device::Cpu)?;
    let dst = vs.variables();
    tch::no_grad(|| -> Result<()> {
        let mut copied = 0;
        for (name, src) in evs.variables() {
            let name = name.strip_prefix("vit.").unwrap_or(&name);
            if name.starts_with("pooler.") {
                continue;
            }
            let key = format!("encoder.{name}");
            let mut t = dst
                .get(&key)
                .with_context(|| format!("encoder {}: unexpected tensor {name}", dir.display()))?
                .shallow_clone();
            t.copy_(&src);
            copied += 1;
        }
        let expected = dst.keys().filter(|k| k.starts_with("encoder.")).count();
        if copied != expected {
            bail!(
                "encoder {}: {copied} of {expected} tensors found",
                dir.display()
            );
        }
        Ok(())
    })
}

/// The open category's θ0 addition: an IP-Adapter(-Plus) file, its image encoder folder and
/// the adapter scale (default 1.0).
pub struct IpTrain<'a> {
    pub file: &'a Path,
    pub image_encoder: &'a Path,
    pub scale: f64,
}

/// The loaded IP-Adapter side of θ0.
struct Shared {
    adapter: IpAdapter,
    encoder: ImageEncoder,
    weights: crate::models::unet::IpWeights,
    /// The unconditional image's tokens `[1, T, cross]`.
    uncond: Tensor,
    binding: IpAdapterBinding,
}

impl Shared {
    fn load(ip: &IpTrain, base: &Path, sd: &StableDiffusion, device: Device) -> Result<Self> {
        if !ip.scale.is_finite() {
            bail!(
                "--ip-adapter-scale must be a finite number, got {}",
                ip.scale
            );
        }
        let adapter = IpAdapter::load(ip.file, device)?;
        let weights = std::rc::Rc::new(adapter.attn_weights(&sd.unet.config)?);
        let encoder = ImageEncoder::for_base(ip.image_encoder, base, device)?;
        adapter.check_encoder(&encoder)?;
        if !matches!(
            adapter.image_proj,
            crate::models::ip_adapter::ImageProj::Plus(_)
        ) {
            bail!(
                "--ip-adapter {}: the open-category hypernetwork reads an IP-Adapter-Plus's encoder states (hidden_states[-2]); this is a plain IP-Adapter",
                ip.file.display()
            );
        }
        let s = encoder.model.config.vision.image_size;
        let zeros = Tensor::zeros([1, 3, s, s], (Kind::Float, device));
        let states = encoder.penultimate(&zeros)?;
        let uncond = adapter.project(&states)?;
        let binding = IpAdapterBinding {
            sha256: crate::io::sha256_file(ip.file)?,
            hidden_size: states.size()[2],
            tokens: states.size()[1],
            scale: ip.scale,
        };
        Ok(Self {
            adapter,
            encoder,
            weights,
            uncond,
            binding,
        })
    }
}

/// What [`train_hypernet`] needs besides its config.
pub struct HypernetJob<'a> {
    pub base: &'a Path,
    /// The hypernetwork's own frozen ViT folder (closed category)…
    pub encoder: Option<&'a Path>,
    /// … or the IP-Adapter whose encoder it shares (open category).
    pub ip_adapter: Option<IpTrain<'a>>,
    pub data: TrainData,
    pub out: &'a Path,
    pub resume: bool,
    pub device: Device,
}

/// Trains a hypernetwork for `job.base` and writes `out/hypernet.safetensors` (f16).
pub fn train_hypernet(cfg: &HypernetTrainConfig, job: HypernetJob) -> Result<PathBuf> {
    train_hypernet_dist(cfg, job, None)
}

/// [`train_hypernet`] as one rank of a data-parallel group (`None`: alone). Rank 0 writes.
pub fn train_hypernet_dist(
    cfg: &HypernetTrainConfig,
    job: HypernetJob,
    dist: Option<&Dist>,
) -> Result<PathBuf> {
    cfg.validate()?;
    let shard = Shard::of(dist);
    shard.rows(cfg.batch as usize, "subjects (config `batch`)")?;
    let device = job.device;
    let sd = StableDiffusion::load(job.base, device)?;
    let shared = match &job.ip_adapter {
        Some(ip) => Some(Shared::load(ip, job.base, &sd, device)?),
        None => None,
    };
    let (sites, fingerprint) = (sd.unet.lora_sites().to_vec(), sd.unet.lora_fingerprint());
    let hcfg = match (&shared, job.encoder) {
        (Some(sh), None) => {
            HypernetConfig::on_ip_adapter(cfg.decoder, sh.binding.clone(), sites, fingerprint)
        }
        (None, Some(enc)) => {
            let encoder_cfg: crate::models::vit::ViTConfig = {
                let folder_cfg = crate::io::folder::read_json(&enc.join("config.json"))
                    .with_context(|| format!("--encoder {}", enc.display()))?;
                serde_json::from_value(folder_cfg)
                    .with_context(|| format!("--encoder {}: not a ViT config", enc.display()))?
            };
            let pre_path = enc.join("preprocessor_config.json");
            // Without a preprocessor_config.json: transformers' ViT processor at the model's size.
            let preprocess = match pre_path.is_file() {
                true => crate::io::folder::read_json(&pre_path)?,
                false => {
                    let s = encoder_cfg.image_size;
                    serde_json::json!({"size": {"height": s, "width": s}})
                }
            };
            HypernetConfig::new(cfg.decoder, encoder_cfg, preprocess, sites, fingerprint)
        }
        (Some(_), Some(_)) => bail!("--encoder and --ip-adapter exclude each other: an open-category hypernetwork reads the IP-Adapter's image encoder"),
        (None, None) => bail!("give --encoder DIR (the hypernetwork's own ViT) or --ip-adapter FILE (open category)"),
    };
    let hcfg = HypernetConfig {
        lambda: Some(cfg.lambda),
        ..hcfg
    };
    // 7. The pre-optimised LiDB subjects (cached in the run folder).
    let lidb_targets = match &cfg.lidb_targets {
        Some(t) => {
            if !matches!(job.data, TrainData::Toy) {
                bail!("lidb_targets (HyperDreamBooth) is implemented for --data toy only");
            }
            std::fs::create_dir_all(job.out)
                .with_context(|| format!("creating {}", job.out.display()))?;
            let path = job.out.join("lidb_subjects.safetensors");
            // Rank 0 pre-optimises (and caches); the others then read its file.
            let first = dist.is_none_or(|d| d.rank() == 0);
            let mut targets = None;
            if first {
                targets = Some(super::lidb::preoptimize(
                    &sd,
                    &cfg.decoder,
                    t,
                    &cfg.token,
                    &path,
                )?);
            }
            if let Some(d) = dist {
                d.barrier()?;
            }
            let targets = match targets {
                Some(t) => t,
                None => super::lidb::preoptimize(&sd, &cfg.decoder, t, &cfg.token, &path)?,
            };
            Some((targets, t.weight))
        }
        None => None,
    };
    let pool = lidb_targets.as_ref().map(|(t, _)| t.identities.as_slice());
    // 6. The unconditional text (CFG's ∅ row), once (frozen text encoder).
    let c_null = match cfg.null_weight > 0.0 {
        true => Some(tch::no_grad(|| {
            sd.encode_uncond(None, None, &sd.encode_text("", None, None)?)
        })?),
        false => None,
    };
    let _rng = crate::util::rng_lock();
    tch::manual_seed(cfg.loop_cfg.seed as i64);
    let mut vs = nn::VarStore::new(device);
    let hyper = Hypernetwork::new(&vs.root(), &hcfg)?;
    if let Some(enc) = job.encoder {
        load_encoder(&vs, enc)?;
    }
    for (name, t) in vs.variables() {
        if name.starts_with("encoder.") {
            let _ = t.set_requires_grad(false);
        }
    }
    let size = sd.default_size();
    let time_ids = sd.training_time_ids(size);
    let scaling = sd.vae.config().scaling_factor;
    let noise_cfg = crate::diffusion::SchedulerConfig::for_training(&sd.scheduler_json)?;
    let schedule = crate::diffusion::NoiseSchedule::new(&noise_cfg)?;
    let n_train = schedule.num_train_timesteps() as i64;
    let run_cfg = serde_json::json!({"train": cfg, "hypernet": hcfg});
    let acc = cfg.accumulate;
    train_dist(
        &job.out.join("run"),
        &cfg.loop_cfg,
        &run_cfg,
        &mut vs,
        job.resume,
        "hypernet",
        dist,
        |step| {
            let (mut total, mut ft_sum, mut reg_sum, mut prior_sum, mut base_sum) =
                (0.0, 0.0, 0.0, 0.0, 0.0);
            let (mut w_sum, mut null_sum) = (0.0, 0.0);
            for micro in 0..acc {
                let seed = super::step_seed(cfg.world_seed, step * acc as u64 + micro as u64);
                let mb = micro_batch(cfg, &job.data, size, seed, pool, shard)?;
                let b = mb.inputs.len() as i64;
                // 1–2. h(x) → per-sample LoRA; prior rows reuse their subject's prediction.
                // Open category: the adapter's encoder states feed the decoder and the
                // adapter's image tokens [B, T, cross].
                let (theta, tokens) = match &shared {
                    None => (hyper.forward(&hyper.pixel_values(&mb.inputs)?)?, None),
                    Some(sh) => {
                        let px = sh.encoder.pixel_values(&mb.inputs)?.to_device(device);
                        let f = sh.encoder.penultimate(&px)?;
                        (hyper.decode(&f)?, Some(sh.adapter.project(&f)?))
                    }
                };
                // rows: subject, then prior (γ > 0), then unconditional (null_weight > 0)
                let null_rows = c_null.is_some();
                let rows = 1 + mb.prior_rows as i64 + null_rows as i64;
                let theta_rows: Vec<Tensor> = theta.iter().map(|t| t.repeat([rows, 1])).collect();
                let lora = hyper.lora_batch(
                    &theta_rows,
                    &Tensor::ones([rows * b], (Kind::Float, device)),
                )?;
                // 3. Frozen VAE and text encoder(s).
                let (latents, text) = tch::no_grad(|| -> Result<_> {
                    let z = sd.vae.encode(&mb.targets.to_device(device))?.mean * scaling;
                    let texts: Vec<&str> = mb.prompts.iter().map(String::as_str).collect();
                    Ok((z, sd.encode_prompts(&texts)?))
                })?;
                let n = latents.size()[0];
                // The global batch's draws, then this rank's rows of each block.
                let blocks = 1 + mb.prior_rows as i64;
                let (t, noise) = shard_draws(&latents, blocks, shard, n_train, device)?;
                let (noisy, target) = (
                    schedule.add_noise(&latents, &noise, &t)?,
                    schedule.target(&latents, &noise, &t)?,
                );
                let mut dn = DenoiseRows::new(noisy, t, &text, target, time_ids.as_ref());
                if let (Some(sh), Some(tokens)) = (&shared, tokens) {
                    // subject rows: the input's tokens; prior rows: the unconditional image
                    let prior = sh.uncond.repeat([n - b, 1, 1]);
                    dn.image = Some(RowImages {
                        tokens: Tensor::cat(&[tokens, prior], 0),
                        uncond: sh.uncond.shallow_clone(),
                        scale: sh.binding.scale,
                        weights: sh.weights.clone(),
                    });
                }
                // Diagnostic: the frozen θ0 on the same noisy subject rows (ΔW = 0).
                let l_base = tch::no_grad(|| -> Result<f64> {
                    let p0 = dn.eps(&sd, 0, b, None)?;
                    Ok((p0 - dn.target.narrow(0, 0, b))
                        .square()
                        .mean(Kind::Float)
                        .double_value(&[]))
                })?;
                base_sum += l_base;
                if let Some(cn) = &c_null {
                    // 6. The subject rows with the empty prompt; target: the frozen model's ε.
                    dn.append_null_rows(&sd, cn, b)?;
                }
                let pred = dn.eps(&sd, 0, rows * b, Some(&lora))?;
                // [rows·B, C, h, w] → per-row MSE [rows·B]
                let per_row =
                    (pred - &dn.target)
                        .square()
                        .flatten(1, -1)
                        .mean_dim(1, false, Kind::Float);
                let l_ft = per_row.narrow(0, 0, b).mean(Kind::Float);
                // 5. λ‖h(x)‖²
                let reg = hyper.squared_norm(&theta)?.mean(Kind::Float);
                let mut loss = &l_ft + &reg * cfg.lambda;
                if let Some((targets, beta)) = &lidb_targets {
                    // 7. β‖θ̂ − θ‖²: per matrix [B, numel] → summed over numbers and matrices
                    let mut w = Tensor::zeros([], (Kind::Float, device));
                    for (pred_m, target_m) in theta.iter().zip(targets.select(&mb.picked)) {
                        w += (pred_m - target_m.to_device(device))
                            .square()
                            .sum_dim_intlist([1].as_slice(), false, Kind::Float)
                            .mean(Kind::Float);
                    }
                    w_sum += w.double_value(&[]);
                    loss += w * *beta;
                }
                if mb.prior_rows {
                    // 4. γ·L_reg
                    let l_prior = per_row.narrow(0, b, b).mean(Kind::Float);
                    prior_sum += l_prior.double_value(&[]);
                    loss += l_prior * cfg.gamma;
                }
                if null_rows {
                    // 6. unconditional preservation
                    let l_null = per_row.narrow(0, (rows - 1) * b, b).mean(Kind::Float);
                    null_sum += l_null.double_value(&[]);
                    loss += l_null * cfg.null_weight;
                }
                let loss = loss / acc as f64;
                total += loss.double_value(&[]);
                ft_sum += l_ft.double_value(&[]);
                reg_sum += reg.double_value(&[]);
                if !total.is_finite() {
                    break;
                }
                loss.backward();
            }
            let k = acc as f64;
            let mut metrics = vec![
                ("l_ft", ft_sum / k),
                ("l_base", base_sum / k),
                ("norm_sq", reg_sum / k),
            ];
            if cfg.gamma > 0.0 {
                metrics.push(("l_prior", prior_sum / k));
            }
            if lidb_targets.is_some() {
                metrics.push(("l_weight", w_sum / k));
            }
            if cfg.null_weight > 0.0 {
                metrics.push(("l_null", null_sum / k));
            }
            Ok(StepOutput {
                loss: Tensor::from(total),
                metrics,
            })
        },
    )
    .context("training the hypernetwork")?;
    let out = job.out.join("hypernet.safetensors");
    if dist.is_none_or(|d| d.rank() == 0) {
        hyper.save(&vs, &out, true)?;
    }
    Ok(out)
}

/// Timesteps and noise of this rank's latent rows `[blocks·b, C, h, w]` (`blocks` = subject
/// rows, then prior rows): drawn for the global batch `[blocks·b·world, …]` in the one-process
/// order, then this rank's `b` rows of each block (one process: all of them).
///
/// The noise is drawn in the latents' logical (row-major NCHW) order, not in their memory
/// order as `randn_like` would: the layout the convolution backend gives the VAE's latents
/// depends on the batch size (on this CPU build channels-last for 2+ rows, contiguous for 1),
/// so memory-order noise would change with how the batch is split.
fn shard_draws(
    latents: &Tensor,
    blocks: i64,
    shard: Shard,
    n_train: i64,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let mut shape = latents.size();
    if shape[0] % blocks != 0 {
        bail!("{} latent rows do not split into {blocks} blocks", shape[0]);
    }
    let b = shape[0] / blocks;
    let b_global = b * shard.world as i64;
    shape[0] = blocks * b_global;
    let t = Tensor::randint(n_train, [shape[0]], (Kind::Int64, device));
    let noise = Tensor::randn(shape.as_slice(), (latents.kind(), device));
    if shard.is_full() {
        return Ok((t, noise));
    }
    let first = shard.rank as i64 * b;
    let rows: Vec<i64> = (0..blocks)
        .flat_map(|k| (0..b).map(move |i| k * b_global + first + i))
        .collect();
    let rows = Tensor::from_slice(&rows).to_device(device);
    Ok((t.index_select(0, &rows), noise.index_select(0, &rows)))
}
