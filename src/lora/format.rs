//! LoRA files in and out: diffusers-PEFT, older diffusers, kohya (A1111/ComfyUI) and kohya with
//! LDM-layout names (SPEC §5), matched to diffusers 0.42.1's `load_lora_weights` and peft 0.21.
//!
//! Alpha, per format (ΔW = alpha/r · B·A):
//! - PEFT / old diffusers: the `lora_adapter_metadata` header entry (JSON of the `LoraConfig`,
//!   keys prefixed `unet.`): `r`/`lora_alpha` (peft defaults 8/8 for absent fields), then
//!   `rank_pattern`/`alpha_pattern` resolved per module as peft's `get_pattern_key` does (first
//!   key `k` in file order with `(.*\.)?(k)$` matching the module path), `use_rslora` (scale
//!   alpha/√r). Without metadata alpha = r.
//! - kohya: the 0-dim `<name>.alpha` tensor per module; missing → alpha = r.
//!
//! Writing keeps ΔW: PEFT files store A and B untouched with `rank_pattern`/`alpha_pattern` for the
//! modules that differ from the most common rank/alpha; kohya files get one alpha value for all
//! modules (diffusers applies only the most common alpha of a kohya file), and the ratio
//! `alpha_i / alpha` is folded into `lora_up` of modules whose alpha differs. Output bytes are a
//! function of the set alone (sorted keys and metadata, f32).
mod keys;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use regex::Regex;
use safetensors::Dtype;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use tch::{Kind, Tensor};

use super::{LoraSet, LoraSite, LoraWeights};
use crate::io::safetensors::{save, view_to_tensor, SafeTensorsFile};
use crate::models::unet::{PerBlock, UNetConfig};
use keys::{Family, Role, SiteKey};

/// diffusers' file name inside a LoRA folder.
pub const LORA_WEIGHT_NAME: &str = "pytorch_lora_weights.safetensors";
/// diffusers' header metadata entry holding the `LoraConfig` JSON.
pub const LORA_ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// A LoRA file layout. [`write_lora`] writes `Peft` and `Kohya`; all four are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// diffusers-PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`.
    Peft,
    /// Older diffusers: `unet.<module>.lora.down.weight`, `….processor.to_q_lora.down.weight`.
    DiffusersOld,
    /// kohya/A1111/ComfyUI with diffusers module names: `lora_unet_<module>.lora_down.weight`.
    Kohya,
    /// kohya with LDM names: `lora_unet_input_blocks_<n>_1_…`.
    KohyaLdm,
}

impl LoraFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Peft => "peft",
            Self::DiffusersOld => "diffusers-old",
            Self::Kohya => "kohya",
            Self::KohyaLdm => "kohya-ldm",
        }
    }

    /// A `--to` value: `peft`, `kohya` (diffusers-layout module names) or `kohya-ldm` (the
    /// LDM/SGM block names sd-scripts writes, e.g. for SDXL).
    pub fn from_cli_name(name: &str) -> Result<Self> {
        match name {
            "peft" | "diffusers" => Ok(Self::Peft),
            "kohya" => Ok(Self::Kohya),
            "kohya-ldm" | "kohya-sgm" => Ok(Self::KohyaLdm),
            other => bail!("unknown LoRA format {other:?}: expected peft, kohya or kohya-ldm"),
        }
    }

    fn from_family(f: Family) -> Self {
        match f {
            Family::Peft => Self::Peft,
            Family::DiffusersOld => Self::DiffusersOld,
            Family::Kohya => Self::Kohya,
            Family::KohyaLdm => Self::KohyaLdm,
        }
    }
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the alphas of a file came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlphaSource {
    /// The `lora_adapter_metadata` header entry (PEFT / old diffusers).
    Metadata,
    /// kohya `.alpha` tensors, one per module.
    Tensors,
    /// kohya `.alpha` tensors for some modules; the others use alpha = r.
    Partial,
    /// None in the file: alpha = r (scale 1).
    Rank,
}

impl AlphaSource {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Metadata => "from the lora_adapter_metadata header",
            Self::Tensors => "from the .alpha tensors",
            Self::Partial => "from .alpha tensors where present, alpha = rank elsewhere",
            Self::Rank => "none in the file: alpha = rank",
        }
    }
}

/// What [`read_lora`] found besides the weights.
#[derive(Clone, Debug)]
pub struct LoraFileInfo {
    /// The file read (a folder resolves to `DIR/pytorch_lora_weights.safetensors`).
    pub path: PathBuf,
    pub format: LoraFormat,
    pub alpha_source: AlphaSource,
    /// The weights' dtype in the file (`F32`, `F16`, `BF16`, or `mixed`).
    pub dtype: String,
    /// Keys carry diffusers' `unet.` prefix (diffusers formats only).
    pub unet_prefix: bool,
    pub num_tensors: usize,
}

/// A folder means `DIR/pytorch_lora_weights.safetensors` (diffusers' convention).
pub fn resolve_lora_path(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(LORA_WEIGHT_NAME)
    } else {
        path.to_path_buf()
    }
}

/// Layers per block of a UNet config for LDM-layout names; `None` when blocks differ.
pub fn layers_per_block(config: &UNetConfig) -> Option<i64> {
    match &config.layers_per_block {
        PerBlock::One(n) => Some(*n),
        PerBlock::Each(v) => v.first().copied().filter(|n| v.iter().all(|m| m == n)),
    }
}

/// The tensors of one site as found in the file.
#[derive(Default)]
struct Parts {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, f64)>,
}

/// The grammar of LoRA tensor names (for the fuzzers and mutation tests): `Ok` with the site
/// and role of the parsed key, or `Err` saying why the key is not supported.
pub fn parse_key_debug(key: &str, layers_per_block: i64) -> Result<String, String> {
    keys::parse_key(key, layers_per_block).map(|k| format!("{:?} {:?}", k.site, k.role))
}

/// The key [`read_lora`] would read back for a parsed key, in the file's own family where
/// loracast writes it (PEFT or kohya): `None` for families loracast only reads.
pub fn regenerate_key(key: &str, layers_per_block: i64) -> Option<String> {
    let k = keys::parse_key(key, layers_per_block).ok()?;
    match (k.family, k.role) {
        (Family::Peft, Role::Alpha) => None,
        (Family::Peft, role) => Some(keys::peft_key(&k.site, role)),
        (Family::Kohya, role) => Some(keys::kohya_key(&k.site, role)),
        _ => None,
    }
}

/// Reads a LoRA file (or `DIR/pytorch_lora_weights.safetensors`) in any supported format.
///
/// With `unet_sites`, every module must be one of them with matching shapes (errors name the
/// key and both shapes) and the set's sites are the UNet's; without, in/out features come from
/// the tensors. `layers_per_block` maps LDM-layout names (default 2, SD1.x). Weights are f32.
pub fn read_lora(
    path: &Path,
    unet_sites: Option<&[LoraSite]>,
    layers_per_block: Option<i64>,
) -> Result<(LoraSet, LoraFileInfo)> {
    if path.is_dir() && !path.join(LORA_WEIGHT_NAME).is_file() {
        bail!("LoRA folder {} has no {LORA_WEIGHT_NAME}", path.display());
    }
    let path = resolve_lora_path(path);
    if !path.is_file() {
        bail!("LoRA file {} does not exist", path.display());
    }
    read_lora_file(&SafeTensorsFile::open(&path)?, unet_sites, layers_per_block)
}

/// [`read_lora`] on an opened (or in-memory) safetensors file.
pub fn read_lora_file(
    file: &SafeTensorsFile,
    unet_sites: Option<&[LoraSite]>,
    layers_per_block: Option<i64>,
) -> Result<(LoraSet, LoraFileInfo)> {
    let path = file.path().to_path_buf();
    let p = path.display();
    let st = file.tensors();
    let names = file.names();
    if names.is_empty() {
        bail!("{p}: the file holds no tensors");
    }
    let lpb = layers_per_block.unwrap_or(2);

    let mut family: Option<(Family, bool, &str)> = None;
    let mut dtypes: Vec<Dtype> = Vec::new();
    let mut sites: BTreeMap<SiteKey, Parts> = BTreeMap::new();
    for name in &names {
        let key = keys::parse_key(name, lpb)
            .map_err(|why| anyhow!("{p}: unsupported LoRA key {name:?}: {why}"))?;
        match family {
            None => family = Some((key.family, key.prefixed, name)),
            Some((f, prefixed, first)) => {
                if f != key.family {
                    bail!(
                        "{p}: mixes LoRA formats: {first:?} is {} but {name:?} is {}",
                        LoraFormat::from_family(f),
                        LoraFormat::from_family(key.family)
                    );
                }
                if prefixed != key.prefixed {
                    bail!("{p}: mixes keys with and without the \"unet.\" prefix ({first:?}, {name:?})");
                }
            }
        }
        let view = st
            .tensor(name)
            .map_err(|e| anyhow!("{p}: cannot read {name:?}: {e}"))?;
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            bail!(
                "{p}: {name:?} has dtype {:?}, expected a float tensor",
                view.dtype()
            );
        }
        let t = view_to_tensor(&view, Kind::Float).with_context(|| format!("{p}: {name}"))?;
        let parts = sites.entry(key.site).or_default();
        let taken = match key.role {
            Role::Down => parts.down.replace((name.clone(), t)).map(|(k, _)| k),
            Role::Up => parts.up.replace((name.clone(), t)).map(|(k, _)| k),
            Role::Alpha => {
                if t.numel() != 1 {
                    bail!(
                        "{p}: alpha {name:?} has shape {:?}, expected a scalar",
                        t.size()
                    );
                }
                let a = t.reshape([-1]).double_value(&[0]);
                if !a.is_finite() {
                    bail!("{p}: alpha {name:?} is {a}, not a finite number");
                }
                parts.alpha.replace((name.clone(), a)).map(|(k, _)| k)
            }
        };
        if key.role != Role::Alpha {
            dtypes.push(view.dtype());
        }
        if let Some(other) = taken {
            bail!("{p}: {other:?} and {name:?} name the same LoRA tensor");
        }
    }
    let (family, prefixed, _) = family.context("no keys")?;
    let format = LoraFormat::from_family(family);

    let metadata = match family {
        Family::Peft | Family::DiffusersOld => {
            let prefix = if prefixed { "unet." } else { "" };
            file.metadata()?
                .and_then(|m| m.get(LORA_ADAPTER_METADATA_KEY).cloned())
                .filter(|raw| !raw.is_empty())
                .map(|raw| PeftMeta::parse(&raw, prefix))
                .transpose()
                .with_context(|| format!("{p}: header entry {LORA_ADAPTER_METADATA_KEY}"))?
        }
        Family::Kohya | Family::KohyaLdm => None,
    };

    let mut set = LoraSet::default();
    let mut with_alpha = 0;
    for (site_key, parts) in sites {
        let module = keys::module_path(&site_key);
        let (down_name, up_name) = role_names(family);
        let (kd, a, ku, b) = match (parts.down, parts.up) {
            (Some((kd, a)), Some((ku, b))) => (kd, a, ku, b),
            (Some((k, _)), None) => {
                bail!("{p}: {k:?} has no matching {up_name} tensor for {module}")
            }
            (None, Some((k, _))) => {
                bail!("{p}: {k:?} has no matching {down_name} tensor for {module}")
            }
            (None, None) => {
                let k = parts.alpha.map(|(k, _)| k).unwrap_or_default();
                bail!("{p}: alpha {k:?} has no {down_name}/{up_name} weights for {module}")
            }
        };
        let (sa, sb) = (a.size(), b.size());
        if sa.len() != 2 {
            bail!("{p}: {kd:?} has shape {sa:?}, expected a matrix [rank, in_features]");
        }
        if sb.len() != 2 {
            bail!("{p}: {ku:?} has shape {sb:?}, expected a matrix [out_features, rank]");
        }
        let rank = sa[0];
        if rank == 0 || sb[1] != rank {
            bail!("{p}: rank mismatch for {module}: {kd:?} is {sa:?} but {ku:?} is {sb:?} (A is [rank, in], B is [out, rank])");
        }
        let site = match unet_sites {
            None => LoraSite {
                transformer: site_key.0,
                proj: site_key.1,
                in_features: sa[1] as usize,
                out_features: sb[0] as usize,
            },
            Some(unet_sites) => {
                let Some(s) = unet_sites
                    .iter()
                    .find(|s| (s.transformer, s.proj) == site_key)
                else {
                    bail!("{p}: {kd:?} targets {module}, which this UNet does not have; is the LoRA for another model?");
                };
                let (i, o) = (s.in_features as i64, s.out_features as i64);
                if sa[1] != i {
                    bail!("{p}: {kd:?} has shape {sa:?} but this UNet's {module} needs [{rank}, {i}]; is the LoRA for another model?");
                }
                if sb[0] != o {
                    bail!("{p}: {ku:?} has shape {sb:?} but this UNet's {module} needs [{o}, {rank}]; is the LoRA for another model?");
                }
                *s
            }
        };
        for (k, t) in [(&kd, &a), (&ku, &b)] {
            if t.isfinite().all().int64_value(&[]) != 1 {
                bail!("{p}: {k:?} contains NaN or Inf values");
            }
        }
        let alpha = match (&metadata, parts.alpha) {
            (_, Some((_, alpha))) => {
                with_alpha += 1;
                alpha
            }
            (Some(meta), None) => meta
                .alpha_for(&module, rank, &kd)
                .map_err(|e| anyhow!("{p}: {e}"))?,
            (None, None) => rank as f64,
        };
        set.weights.insert(site, LoraWeights { a, b, alpha });
    }

    let alpha_source = match (&metadata, with_alpha) {
        (Some(_), _) => AlphaSource::Metadata,
        (None, 0) => AlphaSource::Rank,
        (None, n) if n == set.weights.len() => AlphaSource::Tensors,
        _ => AlphaSource::Partial,
    };
    dtypes.sort_by_key(|d| format!("{d:?}"));
    dtypes.dedup();
    let dtype = match dtypes.as_slice() {
        [one] => format!("{one:?}"),
        _ => "mixed".into(),
    };
    let info = LoraFileInfo {
        path: path.clone(),
        format,
        alpha_source,
        dtype,
        unet_prefix: prefixed,
        num_tensors: names.len(),
    };
    Ok((set, info))
}

/// How a format calls A and B in messages.
fn role_names(f: Family) -> (&'static str, &'static str) {
    match f {
        Family::Peft => ("lora_A", "lora_B"),
        Family::DiffusersOld => ("lora.down", "lora.up"),
        Family::Kohya | Family::KohyaLdm => ("lora_down", "lora_up"),
    }
}

/// The `LoraConfig` fields of `lora_adapter_metadata` that decide ranks and scales.
struct PeftMeta {
    r: i64,
    lora_alpha: f64,
    /// In file order, compiled as peft matches them.
    rank_pattern: Vec<(String, Regex, i64)>,
    alpha_pattern: Vec<(String, Regex, f64)>,
    use_rslora: bool,
}

impl PeftMeta {
    /// Parses the JSON, keeping the entries whose key starts with `prefix` (diffusers filters
    /// `unet.`); absent fields take peft's `LoraConfig` defaults.
    fn parse(raw: &str, prefix: &str) -> Result<Self> {
        let OrderedMap(entries) =
            serde_json::from_str(raw).map_err(|e| anyhow!("not a JSON object: {e}"))?;
        let mut meta = Self {
            r: 8,
            lora_alpha: 8.0,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            use_rslora: false,
        };
        for (key, value) in entries {
            let Some(field) = key.strip_prefix(prefix) else {
                continue;
            };
            let bad = || anyhow!("{key} = {} is not valid", value.to_json());
            match field {
                "r" => meta.r = value.as_json().and_then(|v| v.as_i64()).ok_or_else(bad)?,
                "lora_alpha" => {
                    meta.lora_alpha = value.as_json().and_then(|v| v.as_f64()).ok_or_else(bad)?
                }
                "use_rslora" => meta.use_rslora = value.as_bool().ok_or_else(bad)?,
                "use_dora" if value.as_bool() == Some(true) => {
                    bail!("DoRA (use_dora) is not supported")
                }
                "lora_bias" if value.as_bool() == Some(true) => {
                    bail!("LoRA biases (lora_bias) are not supported")
                }
                "rank_pattern" | "alpha_pattern" => {
                    let pairs = match value {
                        MetaValue::Object(pairs) => pairs,
                        MetaValue::Json(serde_json::Value::Null) => Vec::new(),
                        _ => return Err(bad()),
                    };
                    for (pattern, v) in pairs {
                        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$"))
                            .map_err(|_| anyhow!("{key}: {pattern:?} is not a supported regex"))?;
                        let bad = || anyhow!("{key}: {pattern:?} has value {v}, expected a number");
                        if field == "rank_pattern" {
                            let r = v.as_i64().ok_or_else(bad)?;
                            meta.rank_pattern.push((pattern, re, r));
                        } else {
                            let a = v.as_f64().ok_or_else(bad)?;
                            meta.alpha_pattern.push((pattern, re, a));
                        }
                    }
                }
                _ => {}
            }
        }
        if meta.r <= 0 || !meta.lora_alpha.is_finite() {
            bail!(
                "r = {} and lora_alpha = {} are not valid",
                meta.r,
                meta.lora_alpha
            );
        }
        Ok(meta)
    }

    /// The effective alpha (`scale·rank`) of one module, checking the rank peft would create.
    fn alpha_for(&self, module: &str, rank: i64, key: &str) -> Result<f64> {
        let r = self
            .rank_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.r, |p| p.2);
        if r != rank {
            bail!("{key:?} has rank {rank} but the lora_adapter_metadata gives {module} r = {r}");
        }
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(_, re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |p| p.2);
        if !alpha.is_finite() {
            bail!("lora_adapter_metadata gives {module} a non-finite alpha {alpha}");
        }
        Ok(if self.use_rslora {
            // peft: scaling = alpha / √r; LoraWeights::scale is alpha / r.
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        })
    }
}

/// A JSON value of the metadata: objects keep their key order (peft matches patterns in order).
enum MetaValue {
    Object(Vec<(String, serde_json::Value)>),
    Json(serde_json::Value),
}

impl MetaValue {
    fn as_json(&self) -> Option<&serde_json::Value> {
        match self {
            Self::Json(v) => Some(v),
            Self::Object(_) => None,
        }
    }
    fn as_bool(&self) -> Option<bool> {
        self.as_json().and_then(|v| v.as_bool())
    }
    fn to_json(&self) -> String {
        match self {
            Self::Json(v) => v.to_string(),
            Self::Object(_) => "{…}".into(),
        }
    }
}

/// A JSON object whose values are [`MetaValue`]s, in file order.
struct OrderedMap(Vec<(String, MetaValue)>);

/// A JSON object as `(key, value)` pairs in file order.
struct OrderedPairs(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for OrderedMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedMap;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedMap, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = if key.ends_with("_pattern") {
                        match map.next_value::<Option<OrderedPairs>>()? {
                            Some(OrderedPairs(p)) => MetaValue::Object(p),
                            None => MetaValue::Json(serde_json::Value::Null),
                        }
                    } else {
                        MetaValue::Json(map.next_value()?)
                    };
                    out.push((key, value));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for OrderedPairs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OrderedPairs;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedPairs, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(OrderedPairs(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Writes `set` as `format` (`Peft` or `Kohya`) to `path` (a folder means
/// `DIR/pytorch_lora_weights.safetensors`), atomically, f32, keeping ΔW.
pub fn write_lora(set: &LoraSet, format: LoraFormat, path: &Path) -> Result<()> {
    write_lora_with(set, format, None, path)
}

/// [`write_lora`] with the UNet's `layers_per_block` for LDM/SGM block names (default 2, the
/// SD1.x and SDXL value).
pub fn write_lora_with(
    set: &LoraSet,
    format: LoraFormat,
    layers_per_block: Option<i64>,
    path: &Path,
) -> Result<()> {
    let (tensors, metadata) = encode_lora_with(set, format, layers_per_block)?;
    save(
        &tensors,
        Kind::Float,
        Some(metadata),
        &resolve_lora_path(path),
    )
}

/// Named tensors and header metadata of a LoRA file.
pub type EncodedLora = (Vec<(String, Tensor)>, HashMap<String, String>);

/// The tensors and header metadata [`write_lora`] writes.
pub fn encode_lora(set: &LoraSet, format: LoraFormat) -> Result<EncodedLora> {
    encode_lora_with(set, format, None)
}

/// [`encode_lora`] with `layers_per_block` for [`LoraFormat::KohyaLdm`] names (default 2).
pub fn encode_lora_with(
    set: &LoraSet,
    format: LoraFormat,
    layers_per_block: Option<i64>,
) -> Result<EncodedLora> {
    let own_sites: Vec<LoraSite> = set.weights.keys().copied().collect();
    set.validate(&own_sites)?;
    let key = |s: &LoraSite| -> SiteKey { (s.transformer, s.proj) };
    let mut tensors = Vec::new();
    match format {
        LoraFormat::Peft => {
            let r = most_common(set.weights.values().map(LoraWeights::rank)).unwrap_or(1);
            let alpha = most_common(set.weights.values().map(|w| w.alpha)).unwrap_or(1.0);
            let (mut rank_pattern, mut alpha_pattern) =
                (serde_json::Map::new(), serde_json::Map::new());
            let mut targets = Vec::new();
            for (site, w) in &set.weights {
                let k = key(site);
                let module = keys::module_path(&k);
                if w.rank() != r {
                    rank_pattern.insert(format!("^{module}"), w.rank().into());
                }
                if w.alpha != alpha {
                    alpha_pattern.insert(format!("^{module}"), json_number(w.alpha));
                }
                tensors.push((keys::peft_key(&k, Role::Down), w.a.to_kind(Kind::Float)));
                tensors.push((keys::peft_key(&k, Role::Up), w.b.to_kind(Kind::Float)));
                targets.push(serde_json::Value::from(module));
            }
            // diffusers writes json.dumps(config, indent=2, sort_keys=True); serde_json's map is
            // sorted and its pretty printer indents by 2.
            let config = serde_json::json!({
                "unet.alpha_pattern": alpha_pattern,
                "unet.bias": "none",
                "unet.lora_alpha": json_number(alpha),
                "unet.lora_bias": false,
                "unet.r": r,
                "unet.rank_pattern": rank_pattern,
                "unet.target_modules": targets,
                "unet.use_dora": false,
                "unet.use_rslora": false,
            });
            let json = serde_json::to_string_pretty(&config)?;
            let meta = HashMap::from([
                ("format".to_string(), "pt".to_string()),
                (LORA_ADAPTER_METADATA_KEY.to_string(), json),
            ]);
            Ok((tensors, meta))
        }
        LoraFormat::Kohya | LoraFormat::KohyaLdm => {
            let lpb = layers_per_block.unwrap_or(2);
            let name = |k: &SiteKey, role| match format {
                LoraFormat::KohyaLdm => keys::kohya_ldm_key(k, role, lpb),
                _ => keys::kohya_key(k, role),
            };
            // One alpha for every module (diffusers uses only the most common one); modules with
            // another alpha get alpha_i / alpha folded into lora_up.
            let nonzero = set.weights.values().map(|w| w.alpha).filter(|a| *a != 0.0);
            let common = most_common(nonzero).unwrap_or(0.0) as f32;
            for (site, w) in &set.weights {
                let k = key(site);
                let factor = if common == 0.0 {
                    1.0
                } else {
                    w.alpha / common as f64
                };
                let up = if factor == 1.0 {
                    w.b.to_kind(Kind::Float)
                } else {
                    (w.b.to_kind(Kind::Double) * factor).to_kind(Kind::Float)
                };
                tensors.push((name(&k, Role::Down), w.a.to_kind(Kind::Float)));
                tensors.push((name(&k, Role::Up), up));
                tensors.push((name(&k, Role::Alpha), Tensor::from(common)));
            }
            Ok((
                tensors,
                HashMap::from([("format".to_string(), "pt".to_string())]),
            ))
        }
        other => bail!("cannot write LoRA format {other}: write peft, kohya or kohya-ldm"),
    }
}

/// Integral values as JSON integers (peft's `lora_alpha: int`), others as floats.
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::Value::from(x as i64)
    } else {
        serde_json::Value::from(x)
    }
}

/// The most frequent value; ties go to the one seen first.
fn most_common<T: PartialEq + Copy>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(u, _)| *u == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    let max = counts.iter().map(|c| c.1).max()?;
    counts.into_iter().find(|c| c.1 == max).map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP_Q: &str = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q";

    #[test]
    fn metadata_patterns_resolve_in_file_order() {
        // Not sorted: peft takes the first matching key in the file's order.
        let raw = format!(
            r#"{{"unet.r": 2, "unet.lora_alpha": 6, "unet.alpha_pattern": {{"{UP_Q}": 5, "to_q": 1.5}},
                "unet.rank_pattern": {{"^up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v": 3}},
                "text_encoder.r": 99}}"#
        );
        let m = PeftMeta::parse(&raw, "unet.").unwrap();
        assert_eq!(m.alpha_for(UP_Q, 2, "k").unwrap(), 5.0);
        let down_q = UP_Q.replace("up_blocks", "down_blocks");
        assert_eq!(m.alpha_for(&down_q, 2, "k").unwrap(), 1.5);
        // "to_q" must match a whole segment, not a suffix of one.
        assert_eq!(
            m.alpha_for(&UP_Q.replace("to_q", "xto_q"), 2, "k").unwrap(),
            6.0
        );
        let up_v = UP_Q.replace("to_q", "to_v");
        assert_eq!(m.alpha_for(&up_v, 3, "k").unwrap(), 6.0);
        let e = m
            .alpha_for(&down_q.replace("to_q", "to_v"), 3, "k")
            .unwrap_err();
        assert!(e.to_string().contains("r = 2"), "{e}");
    }

    #[test]
    fn metadata_defaults_prefix_and_rslora() {
        // peft's LoraConfig defaults (r 8, lora_alpha 8); other components' keys are ignored.
        let m = PeftMeta::parse(r#"{"unet.r": 4, "lora_alpha": 2}"#, "unet.").unwrap();
        assert_eq!(m.alpha_for(UP_Q, 4, "k").unwrap(), 8.0);
        let m = PeftMeta::parse(r#"{"r": 4, "lora_alpha": 2}"#, "").unwrap();
        assert_eq!(m.alpha_for(UP_Q, 4, "k").unwrap(), 2.0);
        // rsLoRA: scale = alpha / √r, i.e. effective alpha = alpha·√r.
        let m = PeftMeta::parse(
            r#"{"unet.r": 4, "unet.lora_alpha": 3, "unet.use_rslora": true}"#,
            "unet.",
        )
        .unwrap();
        assert_eq!(m.alpha_for(UP_Q, 4, "k").unwrap(), 6.0);
        for bad in [
            r#"{"unet.use_dora": true}"#,
            r#"{"unet.lora_bias": true}"#,
            r#"{"unet.r": "two"}"#,
            r#"{"unet.alpha_pattern": {"(?<=x)": 1}}"#,
            "[1, 2]",
        ] {
            assert!(PeftMeta::parse(bad, "unet.").is_err(), "{bad}");
        }
    }

    #[test]
    fn most_common_prefers_the_first_on_ties() {
        assert_eq!(most_common([3, 2, 2, 3, 1].into_iter()), Some(3));
        assert_eq!(most_common([1.5, 2.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(most_common(std::iter::empty::<i64>()), None);
    }
}
