//! The models of an SD1.x pipeline, written against diffusers/transformers key names.
pub mod clip_text;
pub mod clip_vision;
pub mod ip_adapter;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vit;
