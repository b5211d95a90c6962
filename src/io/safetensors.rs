//! Strict safetensors loading into a `tch::nn::VarStore`.
//!
//! Every variable of the model must be in the file with the same shape, and every tensor of the
//! file must be used (bar an explicit ignore list): errors name the key and both shapes, like
//! diffusers' `load_state_dict(strict=True)` but with one clear line. f32/f16/bf16/f64 files load
//! into the store's kind. Truncated or corrupted files fail in the header check.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{nn::VarStore, Kind, Tensor};

/// A memory-mapped safetensors file whose header has been validated.
pub struct SafeTensorsFile {
    path: PathBuf,
    mmap: Mmap,
}

impl SafeTensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and loracast never writes to files it is reading.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot read {}", path.display()))?;
        SafeTensors::deserialize(&mmap).map_err(|e| {
            anyhow!(
                "{} is not a valid safetensors file ({e}); it may be truncated or corrupted",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> SafeTensors<'_> {
        // Validated in `open`.
        SafeTensors::deserialize(&self.mmap).expect("header validated in open")
    }

    /// Every tensor name in the file, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tensors()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        names.sort();
        names
    }

    /// The `__metadata__` map of the header.
    pub fn metadata(&self) -> Result<Option<std::collections::HashMap<String, String>>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| anyhow!("{}: {e}", self.path.display()))?;
        Ok(meta.metadata().clone())
    }

    /// One tensor as a CPU tensor of `kind` (converted from the file's dtype). The tensor owns
    /// a copy, and the mapped pages it was read from are released from this process's resident
    /// set, so loading a model costs its weights once, not weights + file (SDXL's UNet: 10 GB).
    pub fn tensor(&self, name: &str, kind: Kind) -> Result<Tensor> {
        let st = self.tensors();
        let view = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: no tensor {name:?}", self.path.display()))?;
        let t = view_to_tensor(&view, kind)
            .with_context(|| format!("{}: {name}", self.path.display()))?;
        self.release(view.data());
        Ok(t)
    }

    /// Copies tensor `name` into `dst` (same shape; converted to `dst`'s dtype) straight from the
    /// mapped file, without an intermediate tensor, then releases those pages.
    pub fn copy_into(&self, name: &str, dst: &Tensor) -> Result<()> {
        let st = self.tensors();
        let view = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: no tensor {name:?}", self.path.display()))?;
        let kind =
            file_kind(view.dtype()).with_context(|| format!("{}: {name}", self.path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        if shape != dst.size() {
            bail!(
                "{}: tensor {name} has shape {shape:?}, expected {:?}",
                self.path.display(),
                dst.size()
            );
        }
        let data = view.data();
        let numel: i64 = shape.iter().product();
        if numel > 0 {
            // Row-major strides of `shape`.
            let mut strides = vec![1i64; shape.len()];
            for i in (0..shape.len().saturating_sub(1)).rev() {
                strides[i] = strides[i + 1] * shape[i + 1];
            }
            // SAFETY: `data` holds exactly `numel` elements of `kind` (the header was validated
            // against the file in `open`), the map outlives this borrowed tensor, which is only
            // read by `copy_` and dropped before returning.
            let src = unsafe {
                Tensor::f_from_blob(data.as_ptr(), &shape, &strides, kind, tch::Device::Cpu)
            }
            .map_err(|e| anyhow!("{}: {name}: {e}", self.path.display()))?;
            tch::no_grad(|| dst.shallow_clone().f_copy_(&src))
                .map_err(|e| anyhow!("{}: {name}: {e}", self.path.display()))?;
        }
        self.release(data);
        Ok(())
    }

    /// Drops the mapped pages under `data` (a slice of this map) from the resident set.
    fn release(&self, data: &[u8]) {
        const PAGE: usize = 4096;
        let base = self.mmap.as_ptr() as usize;
        let start = (data.as_ptr() as usize - base) / PAGE * PAGE;
        let end = (data.as_ptr() as usize - base + data.len()).min(self.mmap.len());
        if end > start {
            // SAFETY: a read-only file mapping; MADV_DONTNEED only discards this process's view
            // of the pages (the next access re-reads them from the file), and every tensor read
            // from them was copied first. Failure is harmless (the pages stay resident).
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }
}

/// Every tensor name of a model split over `files`, sorted.
pub fn tensor_names(files: &[SafeTensorsFile]) -> Vec<String> {
    let mut names: Vec<String> = files.iter().flat_map(SafeTensorsFile::names).collect();
    names.sort();
    names
}

fn file_kind(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// Copies a tensor view into a new tensor of `kind`.
pub fn view_to_tensor(view: &safetensors::tensor::TensorView<'_>, kind: Kind) -> Result<Tensor> {
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let t = Tensor::from_data_size(view.data(), &shape, file_kind(view.dtype())?);
    Ok(t.to_kind(kind))
}

/// Loads `files` (one model split over shards, or one file) into `vs`, strictly.
/// Keys listed in `ignore` may be in the file without being used (e.g. a `position_ids` buffer).
pub fn load_strict(vs: &mut VarStore, files: &[SafeTensorsFile], ignore: &[&str]) -> Result<()> {
    load_strict_aliased(vs, files, ignore, &HashMap::new())
}

/// [`load_strict`] where `aliases` maps a variable name to the key a file stores it under
/// (deprecated checkpoint names); a variable is read from its alias when its own key is absent.
pub fn load_strict_aliased(
    vs: &mut VarStore,
    files: &[SafeTensorsFile],
    ignore: &[&str],
    aliases: &HashMap<String, String>,
) -> Result<()> {
    let mut by_key: BTreeMap<String, (usize, Vec<usize>)> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        for (name, view) in f.tensors().tensors() {
            by_key.insert(name, (i, view.shape().to_vec()));
        }
    }
    let where_ = || {
        files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let vars = vs.variables();
    let mut used = BTreeSet::new();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let key = match aliases.get(name) {
            Some(alias) if !by_key.contains_key(name) => alias,
            _ => name,
        };
        let Some((fi, shape)) = by_key.get(key.as_str()) else {
            bail!(
                "{}: missing tensor {name} (expected shape {:?})",
                where_(),
                var.size()
            );
        };
        let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if shape != var.size() {
            bail!(
                "{}: tensor {key} has shape {shape:?}, the model expects {:?}",
                files[*fi].path.display(),
                var.size()
            );
        }
        files[*fi].copy_into(key, var)?;
        used.insert(key.as_str());
    }
    let unexpected: Vec<&String> = by_key
        .keys()
        .filter(|k| !used.contains(k.as_str()) && !ignore.contains(&k.as_str()))
        .collect();
    if let Some(first) = unexpected.first() {
        bail!(
            "{}: unexpected tensor {first} ({} unexpected in all); is this the right model/config?",
            where_(),
            unexpected.len()
        );
    }
    Ok(())
}

/// Writes named tensors (converted to `kind`) to `path` atomically, with optional metadata.
///
/// The bytes are deterministic: header keys and data are in name order (the `safetensors`
/// crate writes metadata in HashMap order), and the header is space-padded to 8 bytes as the
/// reference implementation does.
/// Every variable of `vs`, detached, sorted by name (what a weights file holds).
pub fn sorted_variables(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut tensors: Vec<(String, Tensor)> = tch::no_grad(|| {
        vs.variables()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect()
    });
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

pub fn save(
    tensors: &[(String, Tensor)],
    kind: Kind,
    metadata: Option<std::collections::HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    crate::util::write_atomic(path, &serialize(tensors, kind, metadata)?)
}

/// The safetensors bytes of [`save`].
pub fn serialize(
    tensors: &[(String, Tensor)],
    kind: Kind,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let dtype = match kind {
        Kind::Float => "F32",
        Kind::Half => "F16",
        Kind::BFloat16 => "BF16",
        Kind::Double => "F64",
        Kind::Int64 => "I64",
        Kind::Int => "I32",
        Kind::Uint8 => "U8",
        k => bail!("cannot save tensors of kind {k:?}"),
    };
    let mut sorted: Vec<&(String, Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    if let Some(meta) = metadata {
        let meta: serde_json::Map<String, serde_json::Value> =
            meta.into_iter().map(|(k, v)| (k, v.into())).collect();
        header.insert("__metadata__".into(), meta.into());
    }
    let mut data = Vec::new();
    for (name, t) in sorted {
        if header.contains_key(name) {
            bail!("duplicate tensor name {name}");
        }
        let t = tch::no_grad(|| t.to_device(tch::Device::Cpu).to_kind(kind).contiguous());
        let start = data.len();
        let n = t.numel();
        data.resize(start + n * kind.elt_size_in_bytes(), 0);
        t.copy_data_u8(&mut data[start..], n);
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.size(), "data_offsets": [start, data.len()]}),
        );
    }
    let mut head = serde_json::to_vec(&header)?;
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + head.len() + data.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    Ok(out)
}
