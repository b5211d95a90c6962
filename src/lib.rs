//! loracast: finetuning-free personalization of Stable Diffusion via hypernetworks.
//!
//! Data flow, one folder per stage:
//! `io` (diffusers folders, safetensors, images) → `models` (CLIP tokenizer/text encoder,
//! UNet, VAE) → `hypernet` (images → LoRA weights) → `lora` (the per-sample LoRA seam on attn2 q/k/v) → `diffusion` (noise schedules
//! and samplers) → `pipeline` (the explicit denoising loop with CFG) → `cli`.
pub mod cli;
pub mod data;
pub mod diffusion;
pub mod dist;
pub mod eval;
pub mod fuzzing;
pub mod hypernet;
pub mod io;
pub mod lora;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod serve;
pub mod toy;
pub mod train;

pub mod util;
