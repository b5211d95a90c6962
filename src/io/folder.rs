//! A diffusers-format pipeline folder exactly as a hub ships it (SPEC §5):
//! `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
//!
//! Finds each component's config and weights and says clearly what is missing: `.bin`-only
//! components and fp16-variant-only components get an error naming the file and the fix.
//! With a variant (diffusers' `from_pretrained(variant="fp16")`), a component reads
//! `<stem>.<variant>.safetensors` (or its sharded index) and falls back to the plain files
//! where it has no variant files, as diffusers' `variant_compatible_siblings` does.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;

use super::safetensors::SafeTensorsFile;

#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    pub root: PathBuf,
    /// `model_index.json` as JSON.
    pub model_index: serde_json::Value,
    /// Weight-file variant (`fp16`), or `None` for the plain files.
    pub variant: Option<String>,
}

impl DiffusersFolder {
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_variant(root, None)
    }

    /// Opens a folder whose weights are read in the given variant where a component has it.
    pub fn open_variant(root: &Path, variant: Option<&str>) -> Result<Self> {
        if let Some(v) = variant {
            if v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                bail!("--variant must be a name like fp16, got {v:?}");
            }
        }
        if !root.is_dir() {
            bail!("--base {}: no such folder", root.display());
        }
        let index = root.join("model_index.json");
        if !index.is_file() {
            bail!(
                "{}: no model_index.json; expected a diffusers-format pipeline folder",
                root.display()
            );
        }
        let model_index = read_json(&index)?;
        Ok(Self {
            root: root.to_path_buf(),
            model_index,
            variant: variant.map(str::to_string),
        })
    }

    /// `<component>/` which must exist.
    pub fn component(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            bail!("{}: missing component folder {name}/", self.root.display());
        }
        Ok(dir)
    }

    /// The class name model_index.json gives a component, e.g. `["diffusers", "PNDMScheduler"]`.
    pub fn component_class(&self, name: &str) -> Option<String> {
        self.model_index
            .get(name)?
            .as_array()?
            .get(1)?
            .as_str()
            .map(str::to_string)
    }

    /// Parses `<component>/<file>` into `T`.
    pub fn config<T: DeserializeOwned>(&self, component: &str, file: &str) -> Result<T> {
        let path = self.component(component)?.join(file);
        if !path.is_file() {
            bail!("{}: missing {component}/{file}", self.root.display());
        }
        let value = read_json(&path)?;
        serde_json::from_value(value)
            .with_context(|| format!("{}: unreadable config", path.display()))
    }

    /// The safetensors weights of a component: `<stem>.safetensors`, or the shards listed in
    /// `<stem>.safetensors.index.json`. `stem` is `diffusion_pytorch_model` for diffusers
    /// models and `model` for transformers models.
    pub fn weights(&self, component: &str, stem: &str) -> Result<Vec<SafeTensorsFile>> {
        let dir = self.component(component)?;
        // (single file, sharded index) candidates: the variant's first, then the plain ones.
        let mut candidates = Vec::new();
        if let Some(v) = &self.variant {
            candidates.push((
                format!("{stem}.{v}.safetensors"),
                format!("{stem}.safetensors.index.{v}.json"),
            ));
        }
        candidates.push((
            format!("{stem}.safetensors"),
            format!("{stem}.safetensors.index.json"),
        ));
        for (single, index) in &candidates {
            if let Some(files) = self.weights_at(&dir, single, index)? {
                return Ok(files);
            }
        }
        let listing: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let fp16 = format!("{stem}.fp16.safetensors");
        if listing.contains(&fp16) {
            bail!(
                "{component}/ has only the fp16 variant ({fp16}); loracast reads {stem}.safetensors: \
                 pass --variant fp16 (diffusers' variant=\"fp16\"), or copy {component}/{fp16} to {component}/{stem}.safetensors"
            );
        }
        if listing.iter().any(|f| f.ends_with(".bin")) {
            bail!(
                "{component}/ has only PyTorch pickle weights (.bin); loracast reads safetensors only: \
                 convert with diffusers (`pipe.save_pretrained(dir, safe_serialization=True)`)"
            );
        }
        bail!(
            "{}: missing weights {component}/{stem}.safetensors",
            self.root.display()
        )
    }

    /// `dir/single`, or the shards listed in `dir/index`; `None` if neither exists.
    fn weights_at(
        &self,
        dir: &Path,
        single: &str,
        index: &str,
    ) -> Result<Option<Vec<SafeTensorsFile>>> {
        let single = dir.join(single);
        if single.is_file() {
            return Ok(Some(vec![SafeTensorsFile::open(&single)?]));
        }
        let index = dir.join(index);
        if index.is_file() {
            let v = read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no weight_map", index.display()))?;
            let mut shards: Vec<String> = map
                .values()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect();
            shards.sort();
            shards.dedup();
            return shards
                .iter()
                .map(|s| SafeTensorsFile::open(&dir.join(s)))
                .collect::<Result<Vec<_>>>()
                .map(Some);
        }
        Ok(None)
    }
}

pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // diffusers writes Python's bare Infinity/NaN into some configs.
    parse_config_json(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Parses a diffusers JSON file, which Python may write with bare `Infinity`, `-Infinity` and
/// `NaN` (e.g. DPMSolverMultistepScheduler's `"lambda_min_clipped": -Infinity`); those become the
/// strings `"Infinity"`, `"-Infinity"`, `"NaN"`, which `lambda_min_clipped` accepts.
pub fn parse_config_json(text: &str) -> Result<serde_json::Value> {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            in_str = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_str = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str(&format!("\"{tok}\""));
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out).context("invalid JSON")
}

/// The PNG/JPEG files directly in `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().is_some_and(|e| {
                    ["png", "jpg", "jpeg"]
                        .iter()
                        .any(|x| e.eq_ignore_ascii_case(x))
                })
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The folders directly in `dir`, sorted by name.
pub fn list_subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    Ok(out)
}
