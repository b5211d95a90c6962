//! `loracast serve [--bind 127.0.0.1:PORT] [--base DIR|toy] [--hypernet FILE|toy]
//! [--token-file F] [--state-dir DIR]`: a thin clap wrapper over [`crate::serve`] (SPEC §7).
//! With no arguments it serves the embedded toy world on 127.0.0.1:7878.
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::serve::params::JobLimits;
use crate::serve::{Limits, ModelPaths, ServeConfig};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (IP:PORT; port 0 picks a free one). A non-loopback address needs --token-file.
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub bind: String,
    /// diffusers-format pipeline folder, or `toy`.
    #[arg(long, default_value = "toy")]
    pub base: PathBuf,
    /// Hypernetwork file, or `toy`.
    #[arg(long, default_value = "toy")]
    pub hypernet: PathBuf,
    /// File holding the bearer token clients must send (required off loopback).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Keep subjects (image hash → LoRA) and finished images here across restarts.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// A host name the page may be reached under, besides IP addresses and localhost (repeatable).
    #[arg(long)]
    pub allow_host: Vec<String>,
    /// Jobs that may wait; a full queue answers 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Subjects kept in memory (least recently used dropped first).
    #[arg(long, default_value_t = 256)]
    pub max_subjects: usize,
    /// Bytes of LoRA files kept in memory.
    #[arg(long, default_value_t = 512 << 20)]
    pub max_cache_bytes: usize,
    /// Largest uploaded image file.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_image_bytes: usize,
    /// Largest upload in all (every image of a subject).
    #[arg(long, default_value_t = 64 << 20)]
    pub max_upload_bytes: usize,
    /// Largest image side a job may ask for.
    #[arg(long, default_value_t = 1024)]
    pub max_side: i64,
    /// Finished jobs remembered (their images too, in memory without --state-dir).
    #[arg(long, default_value_t = 500)]
    pub max_jobs: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// libtorch threads (default: the cores, or OMP_NUM_THREADS). On a machine whose cores are
    /// also busy with other work, 1 avoids stalls of the thread team (measured: hypernetwork
    /// calls of 5–20 ms instead of seconds under the load test).
    #[arg(long)]
    pub threads: Option<i32>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let bind: SocketAddr = args.bind.parse().with_context(|| {
        format!(
            "--bind {:?}: expected IP:PORT, e.g. 127.0.0.1:7878",
            args.bind
        )
    })?;
    if args.queue == 0 || args.max_subjects == 0 || args.max_jobs == 0 {
        anyhow::bail!("--queue, --max-subjects and --max-jobs must be at least 1");
    }
    let token = args
        .token_file
        .as_deref()
        .map(crate::serve::read_token)
        .transpose()?;
    let device = super::parse_device(&args.device)?;
    if let Some(n) = args.threads {
        if n < 1 {
            anyhow::bail!("--threads must be at least 1");
        }
        tch::set_num_threads(n);
    }
    let shown = |p: &PathBuf| p.display().to_string();
    let models = ModelPaths {
        base: crate::toy::resolve_base(&args.base)?,
        hypernet: crate::toy::resolve_hypernet(&args.hypernet)?,
        base_shown: shown(&args.base),
        hypernet_shown: shown(&args.hypernet),
        device,
    };
    let limits = Limits {
        queue_capacity: args.queue,
        max_subjects: args.max_subjects,
        max_cache_bytes: args.max_cache_bytes,
        max_finished_jobs: args.max_jobs,
        max_result_bytes: 256 << 20,
        max_image_bytes: args.max_image_bytes,
        max_upload_bytes: args.max_upload_bytes,
        max_images: 16,
        max_json_bytes: 64 << 10,
        job: JobLimits {
            max_side: args.max_side,
            ..JobLimits::default()
        },
    };
    crate::serve::run(ServeConfig {
        bind,
        models,
        token,
        allow_hosts: args.allow_host,
        state_dir: args.state_dir,
        limits,
    })
}
