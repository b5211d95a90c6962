//! Reading and writing the outside world: diffusers folders, safetensors, images.
pub mod folder;
pub mod image;
pub mod jpeg;
pub mod preprocess;
pub mod safetensors;

pub use folder::DiffusersFolder;
