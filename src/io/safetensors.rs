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

/// A safetensors file (memory-mapped, or bytes in memory) whose header has been validated.
pub struct SafeTensorsFile {
    path: PathBuf,
    data: Data,
}

/// Where the bytes of a [`SafeTensorsFile`] live.
enum Data {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Data {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Owned(v) => v,
        }
    }
}

/// Bits per element of a dtype name the `safetensors` crate knows.
fn dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "F64" | "I64" | "U64" | "C64" => 64,
        "F32" | "I32" | "U32" => 32,
        "F16" | "BF16" | "I16" | "U16" => 16,
        "U8" | "I8" | "BOOL" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
        | "F8_E5M2FNUZ" => 8,
        "F6_E2M3" | "F6_E3M2" => 6,
        "F4" => 4,
        _ => return None,
    })
}

/// A JSON object read with duplicate keys reported (serde_json keeps the last one silently).
struct UniqueObject(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueObject, A::Error> {
                let mut seen = BTreeSet::new();
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    if !seen.insert(k.clone()) {
                        return Err(serde::de::Error::custom(format!(
                            "the key {k:?} appears twice"
                        )));
                    }
                    out.push((k, v));
                }
                Ok(UniqueObject(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The end of every message about a damaged file.
const DAMAGED: &str = "it may be truncated or corrupted";

/// Checks a safetensors header before anything is allocated from it, with one short line per
/// problem: the u64 length prefix against the file size, the JSON, duplicate keys, each
/// tensor's dtype (named when unknown), shape (element count overflow) and `data_offsets`
/// against the data actually in the file. `what` names the file in messages.
pub fn check_header(bytes: &[u8], what: &str) -> Result<()> {
    let len = bytes.len() as u64;
    if len < 8 {
        bail!("{what}: {len} bytes is too short for a safetensors file; {DAMAGED}");
    }
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(prefix);
    if n > len - 8 {
        bail!(
            "{what}: the header claims {n} bytes but the file has only {} after the length prefix; {DAMAGED}",
            len - 8
        );
    }
    // n ≤ len − 8, so it fits in usize.
    let head = &bytes[8..8 + n as usize];
    let data_len = len - 8 - n;
    let text = std::str::from_utf8(head).map_err(|e| {
        anyhow!(
            "{what}: the header is not UTF-8 (byte {}); {DAMAGED}",
            e.valid_up_to()
        )
    })?;
    let UniqueObject(entries) = serde_json::from_str(text)
        .map_err(|e| anyhow!("{what}: the header is not a valid JSON object ({e}); {DAMAGED}"))?;
    let mut ranges: Vec<(u64, u64, &str)> = Vec::new();
    for (name, entry) in &entries {
        if name == "__metadata__" {
            let ok = entry.is_null()
                || entry
                    .as_object()
                    .is_some_and(|m| m.values().all(serde_json::Value::is_string));
            if !ok {
                bail!("{what}: __metadata__ must map names to strings");
            }
            continue;
        }
        let bad = |why: String| anyhow!("{what}: tensor {name:?} {why}");
        let obj = entry
            .as_object()
            .ok_or_else(|| bad("is not a JSON object".into()))?;
        let dtype = match obj.get("dtype") {
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(other) => return Err(bad(format!("has dtype {other}, expected a string"))),
            None => return Err(bad("has no dtype".into())),
        };
        let short: String = dtype.chars().take(32).collect();
        let bits =
            dtype_bits(dtype).ok_or_else(|| bad(format!("has unsupported dtype {short:?}")))?;
        let shape = obj
            .get("shape")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| bad("has no shape list".into()))?;
        let mut numel: u64 = 1;
        for d in shape {
            let d = d
                .as_u64()
                .filter(|&d| d <= i64::MAX as u64)
                .ok_or_else(|| bad(format!("has shape entry {d}, expected a size")))?;
            numel = numel
                .checked_mul(d)
                .ok_or_else(|| bad("declares a shape whose element count overflows".into()))?;
        }
        let offsets = obj
            .get("data_offsets")
            .and_then(serde_json::Value::as_array)
            .filter(|a| a.len() == 2)
            .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
            .ok_or_else(|| bad("has no data_offsets [begin, end]".into()))?;
        let (begin, end) = offsets;
        if begin > end || end > data_len {
            return Err(bad(format!(
                "has data_offsets [{begin}, {end}] outside the {data_len} data bytes of the file; {DAMAGED}"
            )));
        }
        let bytes_needed = match numel.checked_mul(bits) {
            Some(b) if b % 8 != 0 => {
                return Err(bad(format!(
                    "has {numel} elements of {dtype}, not a whole number of bytes"
                )))
            }
            Some(b) if b / 8 <= data_len => b / 8,
            _ => {
                return Err(bad(format!(
                "declares {numel} elements, more than the {data_len} data bytes of the file hold"
            )))
            }
        };
        if end - begin != bytes_needed {
            return Err(bad(format!(
                "holds {} bytes but its shape {shape:?} of {dtype} needs {bytes_needed}",
                end - begin
            )));
        }
        ranges.push((begin, end, name));
    }
    ranges.sort();
    let mut at = 0;
    for (begin, end, name) in ranges {
        if begin != at {
            bail!("{what}: tensor {name:?} starts at byte {begin} of the data, expected {at}; {DAMAGED}");
        }
        at = end;
    }
    if at != data_len {
        bail!("{what}: the tensors cover {at} of the {data_len} data bytes; {DAMAGED}");
    }
    Ok(())
}

impl SafeTensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and loracast never writes to files it is reading.
        let mmap = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::validated(path, Data::Mapped(mmap))
    }

    /// A safetensors file already in memory; `path` names it in messages.
    pub fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::validated(path, Data::Owned(bytes))
    }

    fn validated(path: &Path, data: Data) -> Result<Self> {
        check_header(&data, &path.display().to_string())?;
        SafeTensors::deserialize(&data).map_err(|e| {
            let msg: String = e.to_string().chars().take(160).collect();
            anyhow!(
                "{} is not a valid safetensors file ({msg}); it may be truncated or corrupted",
                path.display()
            )
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            data,
        })
    }

    /// Bytes of tensor data after the header.
    pub fn data_bytes(&self) -> u64 {
        let mut prefix = [0u8; 8];
        prefix.copy_from_slice(&self.data[..8]);
        // Validated in `open`: the header fits in the file.
        self.data.len() as u64 - 8 - u64::from_le_bytes(prefix)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> SafeTensors<'_> {
        // Validated in `open`.
        SafeTensors::deserialize(&self.data).expect("header validated in open")
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
        let (_, meta) = SafeTensors::read_metadata(&self.data)
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
        let Data::Mapped(mmap) = &self.data else {
            return;
        };
        let base = mmap.as_ptr() as usize;
        let start = (data.as_ptr() as usize - base) / PAGE * PAGE;
        let end = (data.as_ptr() as usize - base + data.len()).min(mmap.len());
        if end > start {
            // SAFETY: a read-only file mapping; MADV_DONTNEED only discards this process's view
            // of the pages (the next access re-reads them from the file), and every tensor read
            // from them was copied first. Failure is harmless (the pages stay resident).
            let _ = unsafe {
                mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Refuses to build a model whose config implies more weights than `files` hold, before any
/// variable is allocated: `min_params` is a lower bound on the model's element count from its
/// config, counted at one byte each (the smallest dtype loracast reads). `what` names the config.
pub fn check_size_budget(files: &[SafeTensorsFile], min_params: u128, what: &str) -> Result<()> {
    let bytes: u128 = files.iter().map(|f| f.data_bytes() as u128).sum();
    if min_params > bytes {
        let names: Vec<String> = files.iter().map(|f| f.path.display().to_string()).collect();
        bail!(
            "{what} declares at least {min_params} weights but {} holds only {bytes} bytes of tensor data: the config and the weights do not match",
            names.join(", ")
        );
    }
    Ok(())
}

/// Every tensor name of a model split over `files`, sorted.
pub fn tensor_names(files: &[SafeTensorsFile]) -> Vec<String> {
    let mut names: Vec<String> = files.iter().flat_map(SafeTensorsFile::names).collect();
    names.sort();
    names
}

/// The tch kind of a file dtype loracast converts.
fn file_kind(dtype: Dtype) -> Result<Kind> {
    Ok(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        other => bail!(
            "has unsupported dtype {other:?} (loracast reads F32, F16, BF16, F64, I64, I32, U8)"
        ),
    })
}

/// Copies a tensor view into a new tensor of `kind`.
pub fn view_to_tensor(view: &safetensors::tensor::TensorView<'_>, kind: Kind) -> Result<Tensor> {
    // Shapes were checked against the data by `check_header` (each size ≤ i64::MAX).
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    let t = Tensor::f_from_data_size(view.data(), &shape, file_kind(view.dtype())?)?;
    Ok(t.f_to_kind(kind)?)
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
