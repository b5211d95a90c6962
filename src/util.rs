//! Small shared helpers: atomic file writes, thread setup.
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Writes `bytes` to `path` via a temp file in the same folder + rename, so a crash never
/// leaves a half-written output.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().ok();
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result
}

/// Uses as many torch threads as physical cores unless the user set one (SPEC §4: more
/// threads than cores doubles step time).
pub fn init_threads() {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return;
    }
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    tch::set_num_threads(n as i32);
}

/// libtorch has one global CPU generator (tch exposes no generator objects). Every seeded
/// sequence of draws (a generation, a training run) holds this lock so concurrent callers in one
/// process cannot interleave their draws; it is re-entrant, so nested seeded work is fine.
/// While a [`LoadingWeights`] guard lives on this thread, the shared layer constructors
/// ([`init`]) fill new weights with zeros instead of drawing their random init: the model is about
/// to be overwritten by a strict load, and SDXL's 2.6 B random draws cost more than reading the
/// file.
pub struct LoadingWeights(bool);

thread_local! {
    static LOADING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl LoadingWeights {
    pub fn begin() -> Self {
        Self(LOADING.with(|l| l.replace(true)))
    }
}

impl Drop for LoadingWeights {
    fn drop(&mut self) {
        LOADING.with(|l| l.set(self.0));
    }
}

/// `init`, or zeros while weights are being loaded ([`LoadingWeights`]).
pub fn init(init: tch::nn::Init) -> tch::nn::Init {
    match LOADING.with(|l| l.get()) {
        true => tch::nn::Init::Const(0.0),
        false => init,
    }
}

pub fn rng_lock() -> parking_lot::ReentrantMutexGuard<'static, ()> {
    static LOCK: parking_lot::ReentrantMutex<()> = parking_lot::ReentrantMutex::new(());
    LOCK.lock()
}

/// `cpu` or `cuda` (the first CUDA device) as a libtorch device.
pub fn parse_device(name: &str) -> Result<tch::Device> {
    match name {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        "cuda" => anyhow::bail!("--device cuda: no CUDA device is available to libtorch"),
        other => anyhow::bail!("--device {other:?}: expected cpu or cuda"),
    }
}
