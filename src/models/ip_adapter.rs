//! IP-Adapter files as tencent-ailab/h94 ship them, and the models that turn an image into the
//! adapter's image tokens, matching diffusers 0.42.1 (`loaders/ip_adapter.py`,
//! `loaders/unet.py::_convert_ip_adapter_*`, `models/embeddings.py`) and transformers 5.23:
//!
//! - the file: flat safetensors keys `image_proj.*` (the projection) and `ip_adapter.*`
//!   (`{n}.to_k_ip.weight` / `{n}.to_v_ip.weight` per cross-attention, `n` = 1, 3, 5, … over the
//!   UNet's attn2 processors in `attn_processors` order: down → up → mid);
//! - IP-Adapter-Plus: the Resampler (`IPAdapterPlusImageProjection` after diffusers' key
//!   conversion: `latents`, `proj_in`, depth × [attention with q from LN₂(latents) and k/v from
//!   cat(LN₁(x), LN₂(latents)), heads = `to_q` rows / 64, head dim 64, `to_kv` split on dim 0
//!   K first; FeedForward LN → Linear → GELU(erf) → Linear; residuals], `proj_out`, `norm_out`)
//!   over the image encoder's `hidden_states[-2]`;
//! - the plain IP-Adapter: `ImageProjection` (`proj` to N·cross_dim, reshape to N tokens,
//!   LayerNorm) over `image_embeds`;
//! - the image encoder ([`ImageEncoder`]): `CLIPVisionModelWithProjection` from its folder with
//!   the preprocessing diffusers feeds it.
//!
//! Variable names are the file's keys (`image_proj.layers.0.0.to_q.weight`, …).
//! Where loracast accepts more than diffusers: the Resampler depth is what the file has (diffusers
//! hard-codes 4 and fails on others), and a plain adapter's token count is `proj` rows /
//! `norm` width (diffusers hard-codes 4). Other variants (FaceID, FaceID-Plus, Full-Face, the
//! diffusers-internal Plus layout) are refused by name.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{nn, nn::Module, Device, Kind, Tensor};

use super::clip_vision::ClipVisionModelWithProjection;
use super::unet::UNetConfig;
use crate::io::preprocess::{Preprocess, RgbImage, Size};
use crate::io::safetensors::SafeTensorsFile;
use crate::lora::{BlockLoc, TransformerSite};
use crate::nn::{layer_norm, Linear};

/// diffusers fixes the Resampler's head dimension (`dim_head=64`; heads = `to_q` rows / 64).
pub const DIM_HEAD: i64 = 64;
/// `nn.LayerNorm`'s default eps (every LayerNorm of both projections).
const LN_EPS: f64 = 1e-5;

/// One attn2 of the UNet as diffusers numbers it for IP-Adapter weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attn2Slot {
    pub site: TransformerSite,
    /// `n` of `ip_adapter.{n}.to_k_ip.weight` (1, 3, 5, … in processor order).
    pub key_id: usize,
    /// `to_k_ip`/`to_v_ip` output features (diffusers: the block's `block_out_channels`).
    pub hidden: i64,
    /// Their input features (`cross_attention_dim`).
    pub cross: i64,
}

impl Attn2Slot {
    /// The diffusers module path, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub fn module_path(&self) -> String {
        crate::lora::LoraSite {
            transformer: self.site,
            proj: crate::lora::Proj::K,
            in_features: self.cross as usize,
            out_features: self.hidden as usize,
        }
        .module_path()
        .trim_end_matches(".to_k")
        .to_string()
    }
}

/// Every attn2 of the UNet `cfg` builds, numbered as `_convert_ip_adapter_attn_to_diffusers`
/// numbers them: `unet.attn_processors` order (`down_blocks`, then `up_blocks`, then
/// `mid_block`: the order the modules are registered), `key_id` 1, 3, 5, …; sizes from the
/// attn2's `to_k` LoRA site ([`UNetConfig::lora_sites`], which is module order down → mid → up
/// and needs no UNet built).
pub fn attn2_slots(cfg: &UNetConfig) -> Result<Vec<Attn2Slot>> {
    let mut sites: Vec<_> = cfg
        .lora_sites()?
        .into_iter()
        .filter(|s| s.proj == crate::lora::Proj::K)
        .collect();
    // Stable: module order within each of down / up / mid.
    sites.sort_by_key(|s| match s.transformer.loc {
        BlockLoc::Down(_) => 0,
        BlockLoc::Up(_) => 1,
        BlockLoc::Mid => 2,
    });
    Ok(sites
        .iter()
        .enumerate()
        .map(|(i, s)| Attn2Slot {
            site: s.transformer,
            key_id: 2 * i + 1,
            hidden: s.out_features as i64,
            cross: s.in_features as i64,
        })
        .collect())
}

/// The Plus Resampler's hyper-parameters, read from the file's shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResamplerShape {
    /// `num_queries` (`latents` dim 1): image tokens per image.
    pub num_queries: i64,
    /// `hidden_dims` (`latents` dim 2).
    pub hidden: i64,
    /// `embed_dims` (`proj_in` input): the image encoder's hidden size.
    pub embed: i64,
    /// `output_dims` (`proj_out` rows): the UNet's cross-attention width.
    pub output: i64,
    /// Blocks in `layers.*` (diffusers: always 4).
    pub depth: usize,
    pub heads: i64,
    /// FeedForward inner width (`layers.i.1.1` rows; diffusers: 4 × hidden).
    pub ff_inner: i64,
}

/// `layers.{i}`: `0` = PerceiverAttention, `1` = FeedForward (`nn.Sequential` indices).
#[derive(Debug)]
struct ResamplerBlock {
    /// `0.norm1` → diffusers `ln0`, on the image tokens.
    norm1: nn::LayerNorm,
    /// `0.norm2` → `ln1`, on the latents.
    norm2: nn::LayerNorm,
    to_q: Linear,
    /// `[2·inner, hidden]`: K rows first, then V.
    to_kv: Linear,
    to_out: Linear,
    /// `1.0` LayerNorm, `1.1` Linear (GELU after it), `1.3` Linear.
    ff_norm: nn::LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    heads: i64,
}

impl ResamplerBlock {
    fn new(vs: nn::Path, s: &ResamplerShape) -> Self {
        let (d, inner) = (s.hidden, s.heads * DIM_HEAD);
        let (a, f) = (&vs / "0", &vs / "1");
        Self {
            norm1: layer_norm(&a / "norm1", d, LN_EPS),
            norm2: layer_norm(&a / "norm2", d, LN_EPS),
            to_q: Linear::new(&a / "to_q", d, inner, false),
            to_kv: Linear::new(&a / "to_kv", d, 2 * inner, false),
            to_out: Linear::new(&a / "to_out", inner, d, false),
            ff_norm: layer_norm(&f / "0", d, LN_EPS),
            ff_in: Linear::new(&f / "1", d, s.ff_inner, false),
            ff_out: Linear::new(&f / "3", s.ff_inner, d, false),
            heads: s.heads,
        }
    }

    /// `x: [B, T, hidden]` (projected image tokens), `lat: [B, Q, hidden]` → `[B, Q, hidden]`.
    fn forward(&self, x: &Tensor, lat: &Tensor) -> Tensor {
        let (b, q_len, _) = lat.size3().expect("[B, Q, hidden] latents");
        let lat_n = self.norm2.forward(lat);
        // [B, T + Q, hidden]
        let kv_in = Tensor::cat(&[self.norm1.forward(x), lat_n.shallow_clone()], 1);
        let kv_len = kv_in.size()[1];
        let (h, dh) = (self.heads, DIM_HEAD);
        // [B, L, H·Dh] → [B, H, L, Dh]
        let split = |t: &Tensor, l: i64| t.view([b, l, h, dh]).transpose(1, 2);
        let q = split(&self.to_q.forward(&lat_n), q_len);
        // [B, T + Q, 2·H·Dh] → K, V each [B, T + Q, H·Dh] (to_kv.chunk(2, dim=0): K first)
        let kv = self.to_kv.forward(&kv_in).chunk(2, -1);
        let (k, v) = (split(&kv[0], kv_len), split(&kv[1], kv_len));
        let scale = (dh as f64).powf(-0.5);
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            scale,
            false,
        );
        // [B, H, Q, Dh] → [B, Q, H·Dh]
        let o = o.transpose(1, 2).reshape([b, q_len, h * dh]);
        let lat = self.to_out.forward(&o) + lat;
        let ff = self
            .ff_out
            .forward(&self.ff_in.forward(&self.ff_norm.forward(&lat)).gelu("none"));
        ff + lat
    }
}

/// IP-Adapter-Plus's Resampler (`image_proj.*` of a Plus file).
#[derive(Debug)]
pub struct Resampler {
    pub shape: ResamplerShape,
    /// `[1, Q, hidden]`
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<ResamplerBlock>,
    proj_out: Linear,
    norm_out: nn::LayerNorm,
}

impl Resampler {
    /// Builds the Resampler under `vs` (`latents`, `proj_in`, `layers.*`, `proj_out`,
    /// `norm_out`). Trainable inits as IP-Adapter's `Resampler.__init__`: latents ~
    /// N(0, 1)/√hidden, torch's default Linear init, LayerNorm 1/0 (a loaded file overwrites all).
    pub(crate) fn new(vs: nn::Path, s: ResamplerShape) -> Self {
        let _rng = crate::util::rng_lock();
        let latents = crate::util::init(nn::Init::Randn {
            mean: 0.0,
            stdev: (s.hidden as f64).powf(-0.5),
        });
        Self {
            latents: vs.var("latents", &[1, s.num_queries, s.hidden], latents),
            proj_in: Linear::new(&vs / "proj_in", s.embed, s.hidden, true),
            layers: (0..s.depth)
                .map(|i| ResamplerBlock::new(&vs / "layers" / i, &s))
                .collect(),
            proj_out: Linear::new(&vs / "proj_out", s.hidden, s.output, true),
            norm_out: layer_norm(&vs / "norm_out", s.output, LN_EPS),
            shape: s,
        }
    }

    /// `x: [B, T, embed]` (encoder `hidden_states[-2]`) → `[B, Q, output]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = &self.shape;
        let b = match x.size()[..] {
            [b, _, e] if e == s.embed => b,
            ref other => bail!(
                "IP-Adapter-Plus input must be [B, tokens, {}] (image_proj.proj_in.weight), got {other:?}",
                s.embed
            ),
        };
        let x = self
            .proj_in
            .forward(&x.to_device(self.latents.device()).to_kind(Kind::Float));
        // [1, Q, hidden] → [B, Q, hidden]
        let mut lat = self.latents.repeat([b, 1, 1]);
        for block in &self.layers {
            lat = block.forward(&x, &lat);
        }
        Ok(self.norm_out.forward(&self.proj_out.forward(&lat)))
    }
}

/// The plain IP-Adapter's `ImageProjection` (`image_proj.proj`, `image_proj.norm`).
#[derive(Debug)]
pub struct ImageProjection {
    /// `[N·cross, embed]`
    proj: Linear,
    norm: nn::LayerNorm,
    pub num_tokens: i64,
    pub embed: i64,
    pub cross: i64,
}

impl ImageProjection {
    /// `image_embeds: [B, embed]` → `[B, N, cross]`.
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let b = match image_embeds.size()[..] {
            [b, e] if e == self.embed => b,
            ref other => bail!(
                "IP-Adapter input must be [B, {}] image embeds (image_proj.proj.weight), got {other:?}",
                self.embed
            ),
        };
        let x = image_embeds
            .to_device(self.proj.weight.device())
            .to_kind(Kind::Float);
        // [B, N·cross] → [B, N, cross]
        let x = self
            .proj
            .forward(&x)
            .reshape([b, self.num_tokens, self.cross]);
        Ok(self.norm.forward(&x))
    }
}

/// What an adapter's `image_proj` is.
#[derive(Debug)]
pub enum ImageProj {
    Plus(Resampler),
    Plain(ImageProjection),
}

/// An IP-Adapter file, loaded: the projection and the per-attn2 `to_k_ip`/`to_v_ip`.
#[derive(Debug)]
pub struct IpAdapter {
    pub path: PathBuf,
    pub image_proj: ImageProj,
    /// `n` → (`to_k_ip`, `to_v_ip`) weights `[hidden, cross]` as the file has them.
    ip: BTreeMap<usize, (Tensor, Tensor)>,
    /// The loaded file's variables (`None`: the caller's store, [`Self::new_plus`]).
    _vs: Option<nn::VarStore>,
}

fn shape_of(shapes: &BTreeMap<String, Vec<i64>>, key: &str) -> Result<Vec<i64>> {
    shapes
        .get(key)
        .cloned()
        .with_context(|| format!("missing tensor {key}"))
}

fn dims<const N: usize>(shapes: &BTreeMap<String, Vec<i64>>, key: &str) -> Result<[i64; N]> {
    let s = shape_of(shapes, key)?;
    s.as_slice()
        .try_into()
        .ok()
        .with_context(|| format!("tensor {key} has shape {s:?}, expected {N} dimensions"))
}

/// Names a non-IP-Adapter-Plus/plain variant from its `image_proj` keys (diffusers' branches),
/// with what to do about it.
fn variant(keys: &BTreeSet<String>) -> Option<(&'static str, &'static str)> {
    let has = |k: &str| keys.contains(k);
    let unsupported = "is not supported (IP-Adapter and IP-Adapter-Plus only)";
    if keys.iter().any(|k| k.starts_with("perceiver_resampler.")) {
        Some((
            "IP-Adapter FaceID-Plus (image_proj.perceiver_resampler.*)",
            unsupported,
        ))
    } else if has("proj.3.weight") {
        Some((
            "IP-Adapter Full-Face (image_proj.proj.0/proj.3 MLP)",
            unsupported,
        ))
    } else if has("proj.0.weight") {
        Some((
            "IP-Adapter FaceID (image_proj.proj.0/proj.2 MLP + norm)",
            unsupported,
        ))
    } else if keys
        .iter()
        .any(|k| k.contains(".attn.") || k.contains(".ff.") || k.contains(".ln0."))
    {
        Some((
            "IP-Adapter-Plus in diffusers' internal layout (image_proj.layers.N.attn/ln0/ff)",
            "is not supported: save it in the original tencent/h94 layout (layers.N.0.to_q/to_kv/to_out, layers.N.1.0/1/3)",
        ))
    } else {
        None
    }
}

impl IpAdapter {
    /// Reads an IP-Adapter `.safetensors` in the tencent/h94 flat layout, strictly: unknown or
    /// missing keys and shape mismatches are errors naming the key (and both shapes).
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let ctx = || format!("IP-Adapter {}", path.display());
        if path
            .extension()
            .is_some_and(|e| e == "bin" || e == "pt" || e == "pth")
        {
            bail!(
                "IP-Adapter {}: .bin (pickle) files are not read; convert it once with Python: \
                 `sd = torch.load(\"{0}\", map_location=\"cpu\"); safetensors.torch.save_file({{f\"{{g}}.{{k}}\": v for g in (\"image_proj\", \"ip_adapter\") for k, v in sd[g].items()}}, \"OUT.safetensors\")`",
                path.display()
            );
        }
        if !path.is_file() {
            bail!("IP-Adapter {}: no such file", path.display());
        }
        // (The file's own errors name the path.)
        let file = SafeTensorsFile::open(path).context("IP-Adapter file")?;
        let mut shapes = BTreeMap::new();
        let (mut proj_keys, mut ip_keys) = (BTreeSet::new(), BTreeSet::new());
        for (name, view) in file.tensors().tensors() {
            if let Some(k) = name.strip_prefix("image_proj.") {
                proj_keys.insert(k.to_string());
            } else if let Some(k) = name.strip_prefix("ip_adapter.") {
                ip_keys.insert(k.to_string());
            } else {
                bail!(
                    "{}: unexpected tensor {name}: an IP-Adapter file has only image_proj.* and ip_adapter.* keys",
                    ctx()
                );
            }
            let s: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            shapes.insert(name, s);
        }
        if proj_keys.is_empty() || ip_keys.is_empty() {
            bail!(
                "{}: not an IP-Adapter file (needs image_proj.* and ip_adapter.* keys; has {} and {})",
                ctx(),
                proj_keys.len(),
                ip_keys.len()
            );
        }
        if let Some((v, what)) = variant(&proj_keys) {
            bail!("{}: {v} {what}", ctx());
        }
        let mut vs = nn::VarStore::new(device);
        let root = vs.root() / "image_proj";
        let image_proj = if proj_keys.contains("latents") {
            ImageProj::Plus(Resampler::new(
                root,
                Self::plus_shape(&shapes, &proj_keys).with_context(ctx)?,
            ))
        } else if proj_keys.contains("proj.weight") {
            let [rows, embed] = dims::<2>(&shapes, "image_proj.proj.weight").with_context(ctx)?;
            let [cross] = dims::<1>(&shapes, "image_proj.norm.weight").with_context(ctx)?;
            if cross < 1 || rows % cross != 0 {
                bail!(
                    "{}: image_proj.proj.weight has shape [{rows}, {embed}], not a multiple of image_proj.norm.weight's [{cross}] tokens",
                    ctx()
                );
            }
            let _rng = crate::util::rng_lock();
            ImageProj::Plain(ImageProjection {
                proj: Linear::new(&root / "proj", embed, rows, true),
                norm: layer_norm(&root / "norm", cross, LN_EPS),
                num_tokens: rows / cross,
                embed,
                cross,
            })
        } else {
            bail!(
                "{}: unknown image_proj layout (neither IP-Adapter-Plus image_proj.latents nor plain image_proj.proj.weight; first key image_proj.{})",
                ctx(),
                proj_keys.first().map(String::as_str).unwrap_or("")
            );
        };
        let ignore: Vec<String> = ip_keys.iter().map(|k| format!("ip_adapter.{k}")).collect();
        let ignore: Vec<&str> = ignore.iter().map(String::as_str).collect();
        crate::io::safetensors::load_strict(&mut vs, std::slice::from_ref(&file), &ignore)
            .context("IP-Adapter file")?;
        vs.freeze();
        let mut ip = BTreeMap::new();
        for k in &ip_keys {
            let parsed = k.split_once('.').and_then(|(n, rest)| {
                let n: usize = n.parse().ok()?;
                matches!(rest, "to_k_ip.weight" | "to_v_ip.weight").then_some((n, rest))
            });
            let Some((n, rest)) = parsed else {
                bail!(
                    "{}: unexpected tensor ip_adapter.{k} (expected ip_adapter.N.to_k_ip.weight / to_v_ip.weight)",
                    ctx()
                );
            };
            let other = match rest {
                "to_k_ip.weight" => format!("{n}.to_v_ip.weight"),
                _ => format!("{n}.to_k_ip.weight"),
            };
            if !ip_keys.contains(&other) {
                bail!(
                    "{}: missing tensor ip_adapter.{other} (ip_adapter.{k} is there)",
                    ctx()
                );
            }
            if rest == "to_k_ip.weight" {
                let get = |r: &str| {
                    file.tensor(&format!("ip_adapter.{n}.{r}"), Kind::Float)
                        .map(|t| t.to_device(device))
                };
                ip.insert(n, (get("to_k_ip.weight")?, get("to_v_ip.weight")?));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            image_proj,
            ip,
            _vs: Some(vs),
        })
    }

    fn plus_shape(
        shapes: &BTreeMap<String, Vec<i64>>,
        keys: &BTreeSet<String>,
    ) -> Result<ResamplerShape> {
        let [one, num_queries, hidden] = dims::<3>(shapes, "image_proj.latents")?;
        if one != 1 {
            bail!("tensor image_proj.latents has shape [{one}, {num_queries}, {hidden}], expected [1, Q, hidden]");
        }
        let [_, embed] = dims::<2>(shapes, "image_proj.proj_in.weight")?;
        let [output, _] = dims::<2>(shapes, "image_proj.proj_out.weight")?;
        let depth = (0..)
            .take_while(|i| keys.contains(&format!("layers.{i}.0.to_q.weight")))
            .count();
        if depth == 0 {
            bail!("missing tensor image_proj.layers.0.0.to_q.weight");
        }
        let [inner, _] = dims::<2>(shapes, "image_proj.layers.0.0.to_q.weight")?;
        if inner % DIM_HEAD != 0 || inner == 0 {
            bail!(
                "tensor image_proj.layers.0.0.to_q.weight has {inner} rows, not a multiple of the head dim {DIM_HEAD}"
            );
        }
        let [ff_inner, _] = dims::<2>(shapes, "image_proj.layers.0.1.1.weight")?;
        Ok(ResamplerShape {
            num_queries,
            hidden,
            embed,
            output,
            depth,
            heads: inner / DIM_HEAD,
            ff_inner,
        })
    }

    /// A new IP-Adapter-Plus for the UNet `unet` with a Resampler of `shape`, its variables
    /// under `vs` (named as the file's keys, trainable), initialised as IP-Adapter's training
    /// script initialises them: `to_k_ip`/`to_v_ip` copies of each attn2's `to_k`/`to_v`
    /// (tutorial_train_plus.py), the Resampler as [`Resampler::new`].
    pub fn new_plus(
        vs: &nn::Path,
        shape: ResamplerShape,
        unet: &crate::models::unet::UNet2DConditionModel,
    ) -> Result<Self> {
        let slots = attn2_slots(&unet.config)?;
        if let Some(s) = slots.iter().find(|s| s.cross != shape.output) {
            bail!(
                "IP-Adapter-Plus: Resampler output {} ≠ the cross_attention_dim {} of {}",
                shape.output,
                s.cross,
                s.module_path()
            );
        }
        let image_proj = ImageProj::Plus(Resampler::new(vs / "image_proj", shape));
        let frozen = unet.attn2_kv();
        let mut ip = BTreeMap::new();
        for s in &slots {
            let (k, v) = frozen
                .get(&s.site)
                .with_context(|| format!("the UNet has no {}", s.module_path()))?;
            let p = vs / "ip_adapter" / s.key_id;
            let copy = |name: &str, w: &Tensor| {
                let t = (&p / name).var("weight", &w.size(), nn::Init::Const(0.0));
                tch::no_grad(|| t.shallow_clone().copy_(w));
                t
            };
            ip.insert(s.key_id, (copy("to_k_ip", k), copy("to_v_ip", v)));
        }
        Ok(Self {
            path: PathBuf::new(),
            image_proj,
            ip,
            _vs: None,
        })
    }

    /// Writes the adapter in the tencent/h94 flat layout (`image_proj.*`, `ip_adapter.*`), the
    /// layout [`Self::load`] and diffusers' `load_ip_adapter` read; atomically.
    pub fn save(&self, vs: &nn::VarStore, path: &Path, kind: Kind) -> Result<()> {
        let tensors = crate::io::safetensors::sorted_variables(vs);
        let keys = tensors
            .iter()
            .filter(|(n, _)| n.starts_with("image_proj.") || n.starts_with("ip_adapter."))
            .count();
        if keys != tensors.len() || self.ip.is_empty() {
            bail!("IP-Adapter save: the variable store holds more than this adapter");
        }
        crate::io::safetensors::save(&tensors, kind, None, path)
    }

    /// The image tokens `[B, tokens, cross]` of an encoder output, with gradient (training);
    /// [`Self::project`] is the inference form.
    pub fn forward_proj(&self, input: &Tensor) -> Result<Tensor> {
        match &self.image_proj {
            ImageProj::Plus(r) => r.forward(input),
            ImageProj::Plain(p) => p.forward(input),
        }
    }

    /// `"IP-Adapter-Plus"` or `"IP-Adapter"`.
    pub fn kind(&self) -> &'static str {
        match self.image_proj {
            ImageProj::Plus(_) => "IP-Adapter-Plus",
            ImageProj::Plain(_) => "IP-Adapter",
        }
    }

    /// Image tokens per image (Plus: `num_queries`; plain: N).
    pub fn num_tokens(&self) -> i64 {
        match &self.image_proj {
            ImageProj::Plus(r) => r.shape.num_queries,
            ImageProj::Plain(p) => p.num_tokens,
        }
    }

    /// The token width (must be the UNet's `cross_attention_dim`).
    pub fn cross_dim(&self) -> i64 {
        match &self.image_proj {
            ImageProj::Plus(r) => r.shape.output,
            ImageProj::Plain(p) => p.cross,
        }
    }

    /// The `ip_adapter.*` ids the file has (1, 3, 5, … for a well-formed file).
    pub fn key_ids(&self) -> Vec<usize> {
        self.ip.keys().copied().collect()
    }

    /// One line for logs: kind, tokens, widths, depth/heads (and that depth ≠ 4 is beyond diffusers).
    pub fn describe(&self) -> String {
        match &self.image_proj {
            ImageProj::Plus(r) => {
                let s = &r.shape;
                let depth_note = if s.depth == 4 {
                    String::new()
                } else {
                    format!(
                        " (diffusers only loads depth 4; using the file's {})",
                        s.depth
                    )
                };
                format!(
                    "IP-Adapter-Plus: {} tokens × {}, Resampler hidden {}, depth {}{depth_note}, {} heads × {DIM_HEAD}, image features {}, {} attn2 layers",
                    s.num_queries, s.output, s.hidden, s.depth, s.heads, s.embed, self.ip.len()
                )
            }
            ImageProj::Plain(p) => format!(
                "IP-Adapter: {} tokens × {}, image embeds {}, {} attn2 layers",
                p.num_tokens,
                p.cross,
                p.embed,
                self.ip.len()
            ),
        }
    }

    /// Checks the image encoder feeds this adapter: Plus `proj_in` input = encoder
    /// `hidden_size`; plain `proj` input = `projection_dim`. The error names key and shapes.
    pub fn check_encoder(&self, enc: &ImageEncoder) -> Result<()> {
        let c = &enc.model.config;
        let (key, want, have, what) = match &self.image_proj {
            ImageProj::Plus(r) => (
                "image_proj.proj_in.weight",
                [r.shape.hidden, r.shape.embed],
                c.vision.hidden_size,
                "hidden_size",
            ),
            ImageProj::Plain(p) => (
                "image_proj.proj.weight",
                [p.num_tokens * p.cross, p.embed],
                c.projection_dim,
                "projection_dim",
            ),
        };
        if want[1] != have {
            bail!(
                "IP-Adapter {}: tensor {key} has shape {want:?}, but the image encoder {} has {what} {have} (expected [{}, {have}]): this adapter was made for another image encoder",
                self.path.display(),
                enc.dir.display(),
                want[0]
            );
        }
        Ok(())
    }

    /// The image tokens `[B, tokens, cross]` of the encoder output this adapter takes
    /// ([`ImageEncoder::adapter_input`]).
    pub fn project(&self, input: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.forward_proj(input))
    }

    /// `to_k_ip`/`to_v_ip` per attn2 site of the UNet `cfg` builds, numbered as diffusers
    /// numbers them ([`attn2_slots`]). An adapter for another base (token width ≠
    /// `cross_attention_dim`, another layer count or sizes) is an error naming the key and both
    /// shapes.
    pub fn attn_weights(
        &self,
        cfg: &UNetConfig,
    ) -> Result<BTreeMap<TransformerSite, (Tensor, Tensor)>> {
        let ctx = || format!("IP-Adapter {}", self.path.display());
        let slots = attn2_slots(cfg)?;
        let (out_key, out_shape) = match &self.image_proj {
            ImageProj::Plus(r) => (
                "image_proj.proj_out.weight",
                vec![r.shape.output, r.shape.hidden],
            ),
            ImageProj::Plain(p) => ("image_proj.norm.weight", vec![p.cross]),
        };
        if let Some(s) = slots.iter().find(|s| s.cross != self.cross_dim()) {
            bail!(
                "{}: tensor {out_key} has shape {out_shape:?} (image tokens of width {}), but the UNet's cross_attention_dim is {}: this adapter is for another base model",
                ctx(),
                self.cross_dim(),
                s.cross
            );
        }
        let last = slots.last().map(|s| s.key_id).unwrap_or(0);
        let mut out = BTreeMap::new();
        for s in &slots {
            let Some((k, v)) = self.ip.get(&s.key_id) else {
                bail!(
                    "{}: missing tensor ip_adapter.{}.to_k_ip.weight for {} (expected shape [{}, {}]): the UNet has {} cross-attention layers (keys 1, 3, …, {last}), the file {} (largest key {}): this adapter is for another base model",
                    ctx(),
                    s.key_id,
                    s.module_path(),
                    s.hidden,
                    s.cross,
                    slots.len(),
                    self.ip.len(),
                    self.ip.keys().last().copied().unwrap_or(0)
                );
            };
            for (name, t) in [("to_k_ip", k), ("to_v_ip", v)] {
                if t.size() != [s.hidden, s.cross] {
                    bail!(
                        "{}: tensor ip_adapter.{}.{name}.weight has shape {:?}, the UNet's {} expects [{}, {}]: this adapter is for another base model",
                        ctx(),
                        s.key_id,
                        t.size(),
                        s.module_path(),
                        s.hidden,
                        s.cross
                    );
                }
            }
            out.insert(s.site, (k.shallow_clone(), v.shallow_clone()));
        }
        if let Some(extra) = self
            .ip
            .keys()
            .find(|n| !slots.iter().any(|s| s.key_id == **n))
        {
            let t = &self.ip[extra].0;
            bail!(
                "{}: unexpected tensor ip_adapter.{extra}.to_k_ip.weight (shape {:?}): the UNet has {} cross-attention layers (keys 1, 3, …, {last}), the file {}: this adapter is for another base model",
                ctx(),
                t.size(),
                slots.len(),
                self.ip.len()
            );
        }
        Ok(out)
    }
}

/// diffusers' fallback feature extractor: `CLIPImageProcessor(size=image_size,
/// crop_size=image_size)` (shortest edge, bicubic, centre crop, CLIP mean/std; the PIL backend,
/// which is what transformers 5.23 gives without torchvision).
pub fn diffusers_preprocess(image_size: i64) -> Preprocess {
    let s = image_size as u32;
    Preprocess {
        size: Size::ShortestEdge(s),
        crop_size: (s, s),
        ..Preprocess::clip()
    }
}

/// IP-Adapter's image encoder: a `CLIPVisionModelWithProjection` folder and its preprocessing.
#[derive(Debug)]
pub struct ImageEncoder {
    pub dir: PathBuf,
    pub model: ClipVisionModelWithProjection,
    /// From the folder's `preprocessor_config.json` (over [`diffusers_preprocess`]) when it has
    /// one, else [`diffusers_preprocess`]. NB diffusers' `load_ip_adapter` never reads that file
    /// (it always registers the fallback); [`ImageEncoder::use_diffusers_preprocess`] matches it.
    pub preprocess: Preprocess,
    _vs: nn::VarStore,
}

impl ImageEncoder {
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "image encoder {}: no such folder (IP-Adapter files need a CLIPVisionModelWithProjection folder, h94's image_encoder/)",
                dir.display()
            );
        }
        let (model, vs) = ClipVisionModelWithProjection::load(dir, device)?;
        let fallback = diffusers_preprocess(model.config.vision.image_size);
        let preprocess = fallback.from_folder(dir)?;
        let s = model.config.vision.image_size as u32;
        if preprocess.do_center_crop && preprocess.crop_size != (s, s) {
            bail!(
                "{}/preprocessor_config.json: crop_size {:?} does not give the encoder's image_size {s}",
                dir.display(),
                preprocess.crop_size
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            preprocess,
            _vs: vs,
        })
    }

    /// Loads the encoder with the preprocessing diffusers' pipeline gives it for the base
    /// folder `base`: the base's own `feature_extractor/` when it has one (SD1.5 hub folders
    /// do), else `load_ip_adapter`'s `CLIPImageProcessor(size=image_size)` fallback; the
    /// encoder folder's `preprocessor_config.json` is not read (diffusers does not read it).
    pub fn for_base(dir: &Path, base: &Path, device: Device) -> Result<Self> {
        let mut encoder = Self::load(dir, device)?.use_diffusers_preprocess();
        let folder = crate::io::DiffusersFolder::open(base)?;
        let extractor = base.join("feature_extractor");
        if folder.component_class("feature_extractor").is_some() && extractor.is_dir() {
            encoder.preprocess = encoder.preprocess.clone().from_folder(&extractor)?;
        }
        Ok(encoder)
    }

    /// Preprocess as diffusers' pipeline does whatever the folder holds.
    pub fn use_diffusers_preprocess(mut self) -> Self {
        self.preprocess = diffusers_preprocess(self.model.config.vision.image_size);
        self
    }

    /// `pixel_values` `[N, 3, S, S]` of the images.
    pub fn pixel_values(&self, images: &[RgbImage]) -> Result<Tensor> {
        self.preprocess.batch(images)
    }

    /// `hidden_states[-2]` `[N, 1 + patches, hidden]` (IP-Adapter-Plus's input).
    pub fn penultimate(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let l = self.model.config.vision.num_hidden_layers as usize;
        tch::no_grad(|| {
            self.model
                .vision_model
                .hidden_state(pixel_values, l.saturating_sub(1))
        })
    }

    /// `image_embeds` `[N, projection_dim]` (the plain IP-Adapter's input).
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| self.model.image_embeds(pixel_values))
    }

    /// (cond, uncond) encoder outputs for `adapter`, as diffusers' `encode_image`: Plus →
    /// `hidden_states[-2]` of the pixels and of `zeros_like(pixels)` (zeros after
    /// normalisation); plain → `image_embeds` and zeros of its shape.
    pub fn adapter_input(
        &self,
        adapter: &IpAdapter,
        pixel_values: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        match adapter.image_proj {
            ImageProj::Plus(_) => Ok((
                self.penultimate(pixel_values)?,
                self.penultimate(&pixel_values.zeros_like())?,
            )),
            ImageProj::Plain(_) => {
                let e = self.image_embeds(pixel_values)?;
                let z = e.zeros_like();
                Ok((e, z))
            }
        }
    }

    /// (cond, uncond) image tokens `[N, tokens, cross]` of `images` for `adapter`. Several
    /// images of one adapter concatenate their tokens (diffusers' `[[img1, img2]]`): flatten to
    /// `[1, N·tokens, cross]`.
    pub fn image_tokens(
        &self,
        adapter: &IpAdapter,
        images: &[RgbImage],
    ) -> Result<(Tensor, Tensor)> {
        adapter.check_encoder(self)?;
        let px = self.pixel_values(images)?;
        let (c, u) = self.adapter_input(adapter, &px)?;
        Ok((adapter.project(&c)?, adapter.project(&u)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_configs_number_like_diffusers() {
        let sd15 = attn2_slots(&UNetConfig::sd15()).unwrap();
        assert_eq!(sd15.len(), 16);
        assert_eq!(sd15.last().unwrap().key_id, 31);
        assert_eq!(
            sd15[0].module_path(),
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        );
        assert_eq!(
            sd15[15].module_path(),
            "mid_block.attentions.0.transformer_blocks.0.attn2"
        );
        assert_eq!((sd15[6].site.loc, sd15[6].hidden), (BlockLoc::Up(1), 1280));
    }
}
