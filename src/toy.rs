//! The shipped toy-world weights (issue 4/5, SPEC §6): where they live and how the CLI names
//! them (`--base toy`, `--hypernet toy`, `--evaluators toy`). Everything under
//! `assets/toy/` was trained here by the commands in `docs/TOY.md`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The name that selects a shipped toy-world asset on the command line.
pub const NAME: &str = "toy";

/// `assets/` of this checkout, or `$LORACAST_ASSETS`.
pub fn assets_dir() -> PathBuf {
    crate::train::base::assets_dir()
}

fn shipped(rel: &str, what: &str) -> Result<PathBuf> {
    let path = assets_dir().join("toy").join(rel);
    if !path.exists() {
        bail!(
            "the toy-world {what} is not in this checkout ({} is missing)",
            path.display()
        );
    }
    Ok(path)
}

/// `toy` → the shipped asset `rel` (named `what` in errors); anything else is a path.
fn resolve(arg: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    match arg.to_str() {
        Some(NAME) => shipped(rel, what),
        _ => Ok(arg.to_path_buf()),
    }
}

/// `toy` → the shipped base model folder; anything else is a path.
pub fn resolve_base(arg: &Path) -> Result<PathBuf> {
    resolve(arg, "base", "base model")
}

/// `toy` → the shipped hypernetwork file; anything else is a path.
pub fn resolve_hypernet(arg: &Path) -> Result<PathBuf> {
    resolve(arg, "hypernet.safetensors", "hypernetwork")
}

/// `toy` → the shipped hypernetwork's twin trained with λ > 0, the same recipe and budget
/// (issue 5's λ comparison; the shipped default has λ = 0); anything else is a path.
pub fn resolve_hypernet_regularized(arg: &Path) -> Result<PathBuf> {
    resolve(
        arg,
        "hypernet-regularized.safetensors",
        "regularized (λ > 0) hypernetwork",
    )
}

/// `toy` → the shipped HyperDreamBooth (LiDB) hypernetwork (issue 6); anything else is a path.
pub fn resolve_hyperdreambooth(arg: &Path) -> Result<PathBuf> {
    resolve(
        arg,
        "hyperdreambooth.safetensors",
        "HyperDreamBooth hypernetwork",
    )
}

/// `toy` → the shipped evaluators folder; anything else is a path.
pub fn resolve_evaluators(arg: &Path) -> Result<PathBuf> {
    resolve(arg, "evaluators", "evaluators")
}

/// `toy` → the shipped toy IP-Adapter-Plus (issue 17; its image encoder is `image_encoder/`
/// beside it, h94's layout); anything else is a path.
pub fn resolve_ip_adapter(arg: &Path) -> Result<PathBuf> {
    resolve(arg, "ip_adapter/ip_adapter.safetensors", "IP-Adapter-Plus")
}

/// `toy` → the shipped open-category hypernetwork (issue 17: trained on top of the toy
/// IP-Adapter-Plus, sharing its image encoder); anything else is a path.
pub fn resolve_hypernet_open(arg: &Path) -> Result<PathBuf> {
    resolve(
        arg,
        "hypernet-open.safetensors",
        "open-category hypernetwork",
    )
}
