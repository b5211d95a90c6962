//! The models of an SD1.x pipeline, written against diffusers/transformers key names.
pub mod clip_text;
pub mod clip_vision;
pub mod ip_adapter;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vit;

/// The largest width (channels, hidden size, features) a config may declare: far above any
/// released model, far below sizes whose weights could not be allocated.
pub const MAX_WIDTH: i64 = 1 << 16;
/// The largest layer/block count a config may declare.
pub const MAX_DEPTH: i64 = 1 << 10;

/// `what: key must be ≥ min, got v` / `must be ≤ max`: one line naming the config key.
pub(crate) fn check_range(what: &str, key: &str, v: i64, min: i64, max: i64) -> anyhow::Result<()> {
    if v < min {
        anyhow::bail!("{what}: {key} must be ≥ {min}, got {v}");
    }
    if v > max {
        anyhow::bail!("{what}: {key} must be ≤ {max}, got {v}");
    }
    Ok(())
}

/// A finite positive float config value (epsilons, scale factors).
pub(crate) fn check_positive(what: &str, key: &str, v: f64) -> anyhow::Result<()> {
    if !(v.is_finite() && v > 0.0) {
        anyhow::bail!("{what}: {key} must be a finite number > 0, got {v}");
    }
    Ok(())
}

/// A lower bound on a model's weight count, as an exact (saturating) product of config sizes.
pub(crate) fn params(factors: &[i64]) -> u128 {
    factors
        .iter()
        .fold(1u128, |acc, &f| acc.saturating_mul(f.max(0) as u128))
}
