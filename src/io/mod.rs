//! Reading and writing the outside world: diffusers folders, safetensors, images.
pub mod folder;
pub mod image;
pub mod jpeg;
pub mod preprocess;
pub mod safetensors;

pub use folder::DiffusersFolder;

/// The SHA-256 of a file's bytes, lower-case hex (read in 1 MiB chunks: memory stays flat on a
/// multi-GB adapter).
pub fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context as _;
    use sha2::Digest as _;
    use std::io::Read as _;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
