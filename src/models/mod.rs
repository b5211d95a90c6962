//! The models of an SD1.x pipeline, written against diffusers/transformers key names.
pub mod clip_text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
