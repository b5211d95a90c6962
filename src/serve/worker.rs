//! The one thread that owns the models (the SD pipeline and the hypernetwork) and runs all
//! libtorch work in order: subjects (images → LoRA through [`Hypernetwork::personalize`], as
//! `loracast personalize` does) and jobs from the bounded FIFO queue (through
//! [`StableDiffusion::generate_batch_with`], the pipeline's one denoising loop, with the LoRA
//! read back from its PEFT bytes exactly as `loracast generate --lora FILE` reads a file).
//!
//! A subject never waits for a job: between two denoising steps the step callback serves the
//! subjects that arrived, so an upload costs milliseconds even while an image is being made.
//! The same callback reports progress and stops the loop when the job is cancelled or the
//! server shuts down (nothing of a stopped job is written).
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use tch::Device;

use super::png::encode_png;
use super::state::{now_secs, ImageData, JobState, ModelsInfo, Shared, Subject};
use crate::hypernet::Hypernetwork;
use crate::io::preprocess::RgbImage;
use crate::io::safetensors::{serialize, SafeTensorsFile};
use crate::lora::format::{encode_lora_with, layers_per_block, read_lora_file, LoraFormat};
use crate::lora::LoraSet;
use crate::pipeline::{Family, StableDiffusion};

/// What handlers send the worker.
pub enum Command {
    /// Personalize a subject (decoded, size-checked images), cache (and store) it, and answer
    /// everyone waiting in [`super::state::Inner::pending`].
    Subject { id: String, images: Vec<RgbImage> },
    /// A job was queued.
    Wake,
}

/// Where the models come from.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    pub base: PathBuf,
    pub hypernet: PathBuf,
    /// How `/api/system` names them (`toy` or the paths given).
    pub base_shown: String,
    pub hypernet_shown: String,
    pub device: Device,
}

struct Models {
    pipe: StableDiffusion,
    hyper: Hypernetwork,
    _hyper_vs: tch::nn::VarStore,
    lpb: Option<i64>,
    /// Decoded LoRAs of recent subjects (the job's bytes are the key's content).
    memo: VecDeque<(String, LoraSet)>,
}

const MEMO: usize = 8;

/// The answer to uploads the worker will not serve any more.
pub const SHUTTING_DOWN: &str = "the server is shutting down";

fn load(paths: &ModelPaths, shared: &Shared) -> Result<Models> {
    let pipe = StableDiffusion::load(&paths.base, paths.device)
        .with_context(|| format!("--base {}", paths.base_shown))?;
    let (hyper, vs) = Hypernetwork::load(&paths.hypernet, paths.device)
        .with_context(|| format!("--hypernet {}", paths.hypernet_shown))?;
    hyper.check_base(&pipe.unet.lora_fingerprint())?;
    let mut key = Sha256::new();
    key.update(std::fs::read(&paths.hypernet).context("reading the hypernetwork")?);
    let _ = shared.model_key.set(key.finalize().into());
    let size = pipe.default_size();
    let info = ModelsInfo {
        device: format!("{:?}", paths.device).to_lowercase(),
        threads: tch::get_num_threads(),
        base: paths.base_shown.clone(),
        hypernet: paths.hypernet_shown.clone(),
        family: match pipe.family {
            Family::Sd => "sd".into(),
            Family::Sdxl { .. } => "sdxl".into(),
        },
        lora_sites: pipe.unet.lora_sites().len(),
        lora_rank: hyper.config.decoder.rank,
        defaults: super::params::Defaults {
            guidance_scale: pipe.default_guidance_scale(),
            steps: 50,
            scheduler: pipe.scheduler_kind.cli_name(),
            width: size,
            height: size,
            subject_token: crate::data::captions::DEFAULT_TOKEN,
        },
    };
    let _ = shared.models.set(info);
    let lpb = layers_per_block(&pipe.unet.config);
    warm_up(&pipe, &hyper)?;
    Ok(Models {
        pipe,
        hyper,
        _hyper_vs: vs,
        lpb,
        memo: VecDeque::new(),
    })
}

/// One hypernetwork call and a one-step image before the first request: libtorch's first
/// calls (kernel selection, allocations, pages of its libraries) cost up to seconds, which
/// would otherwise land on the first upload and the first job.
fn warm_up(pipe: &StableDiffusion, hyper: &Hypernetwork) -> Result<()> {
    let side = 64;
    let grey = RgbImage::new(side, side, vec![128; (side * side * 3) as usize])?;
    hyper
        .personalize(&[grey])
        .context("warming up the hypernetwork")?;
    let req = crate::pipeline::GenerateRequest {
        steps: 1,
        guidance_scale: pipe.default_guidance_scale(),
        ..crate::pipeline::GenerateRequest::new("")
    };
    pipe.generate_batch(&req, |_, _| {})
        .context("warming up the pipeline")
        .map(drop)
}

/// Loads the models, reports on `ready`, then serves commands and jobs until the command
/// channel closes or shutdown is flagged.
pub fn run(
    paths: ModelPaths,
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) {
    let mut models = match load(&paths, &shared) {
        Ok(m) => {
            let _ = ready.send(Ok(()));
            m
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            break;
        }
        // Subjects first, then the next job; otherwise wait for either.
        match rx.try_recv() {
            Ok(cmd) => {
                models.command(cmd, &shared);
                continue;
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {}
        }
        if models.next_job(&shared, &rx) {
            continue;
        }
        match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(cmd) => models.command(cmd, &shared),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    // Jobs still waiting are cancelled (nothing was written for them); uploads still waiting
    // are answered.
    let mut inner = shared.inner.lock();
    for (_, waiters) in inner.pending.drain() {
        for w in waiters {
            let _ = w.send(Err(SHUTTING_DOWN.to_string()));
        }
    }
    let waiting: Vec<String> = inner.queue.drain(..).collect();
    for id in waiting {
        if let Some(j) = inner.jobs.get_mut(&id) {
            j.state = JobState::Canceled;
            j.error = Some("the server shut down".into());
        }
        shared.emit("canceled", &id, json!({"reason": "shutdown"}));
    }
}

/// Serves one command with the hypernetwork (also called between denoising steps).
fn serve_command(hyper: &Hypernetwork, lpb: Option<i64>, cmd: Command, shared: &Shared) {
    match cmd {
        Command::Subject { id, images } => {
            let out = personalize(hyper, lpb, id.clone(), &images, shared)
                .and_then(|subject| {
                    if let Some(store) = &shared.store {
                        store.save_subject(&subject)?;
                    }
                    Ok(subject)
                })
                .map_err(|e| {
                    let msg = format!("{e:#}");
                    msg.lines()
                        .next()
                        .unwrap_or("personalization failed")
                        .to_string()
                });
            let waiters = {
                let mut inner = shared.inner.lock();
                if let Ok(subject) = &out {
                    inner.subjects.insert(
                        subject.clone(),
                        shared.limits.max_subjects,
                        shared.limits.max_cache_bytes,
                    );
                }
                inner.pending.remove(&id).unwrap_or_default()
            };
            for w in waiters {
                let _ = w.send(out.clone());
            }
        }
        Command::Wake => {}
    }
}

/// Images → LoRA (the hypernetwork, averaged over the images) → PEFT and kohya bytes.
fn personalize(
    hyper: &Hypernetwork,
    lpb: Option<i64>,
    id: String,
    images: &[RgbImage],
    shared: &Shared,
) -> Result<Subject> {
    let start = Instant::now();
    let set = hyper.personalize(images)?;
    let lora_ms = start.elapsed().as_secs_f64() * 1000.0;
    shared
        .counters
        .hypernet_calls
        .fetch_add(1, Ordering::Relaxed);
    let bytes = |format| -> Result<Vec<u8>> {
        let (tensors, meta) = encode_lora_with(&set, format, lpb)?;
        serialize(&tensors, tch::Kind::Float, Some(meta))
    };
    Ok(Subject::new(
        id,
        images.len(),
        (lora_ms * 100.0).round() / 100.0,
        bytes(LoraFormat::Peft)?,
        bytes(LoraFormat::Kohya)?,
    ))
}

impl Models {
    fn command(&self, cmd: Command, shared: &Shared) {
        serve_command(&self.hyper, self.lpb, cmd, shared);
    }

    /// The LoRA of a job's subject from its PEFT bytes (memoized per subject id).
    fn lora(&mut self, subject: &str, peft: &[u8]) -> Result<LoraSet> {
        if let Some((_, set)) = self.memo.iter().find(|(id, _)| id == subject) {
            return Ok(set.clone());
        }
        let file = SafeTensorsFile::from_bytes(
            std::path::Path::new(&format!("subject {subject}")),
            peft.to_vec(),
        )?;
        let (set, _) = read_lora_file(&file, Some(self.pipe.unet.lora_sites()), self.lpb)?;
        self.memo.push_back((subject.to_string(), set.clone()));
        if self.memo.len() > MEMO {
            self.memo.pop_front();
        }
        Ok(set)
    }

    /// Runs the next queued job, if any; false when the queue is empty.
    fn next_job(&mut self, shared: &Shared, rx: &Receiver<Command>) -> bool {
        let (id, params, lora, cancel) = {
            let mut inner = shared.inner.lock();
            let Some(id) = inner.queue.pop_front() else {
                return false;
            };
            let Some(job) = inner.jobs.get_mut(&id) else {
                return true;
            };
            job.state = JobState::Running;
            job.started = Some(now_secs());
            let out = (
                id.clone(),
                job.params.clone(),
                job.lora.clone(),
                job.cancel.clone(),
            );
            inner.running = Some(id.clone());
            out
        };
        shared.emit("started", &id, json!({"total": params.total_steps()}));
        let result = self.generate(
            &id,
            &params,
            lora.as_deref().map(Vec::as_slice),
            &cancel,
            shared,
            rx,
        );
        let mut inner = shared.inner.lock();
        inner.running = None;
        let (kind, data) = match result {
            Ok(Some(pngs)) => {
                let stored = match (&shared.store, inner.jobs.get_mut(&id)) {
                    (Some(store), Some(job)) => {
                        job.finished = Some(now_secs());
                        store.save_job(job, &pngs)
                    }
                    _ => Ok(pngs
                        .into_iter()
                        .map(|p| ImageData::Mem(Arc::new(p)))
                        .collect()),
                };
                match stored {
                    Ok(images) => {
                        if let Some(job) = inner.jobs.get_mut(&id) {
                            job.images = images;
                            job.state = JobState::Done;
                            job.step = job.total;
                            job.finished = Some(now_secs());
                        }
                        shared.counters.jobs_done.fetch_add(1, Ordering::Relaxed);
                        let urls = inner.jobs.get(&id).map(|j| j.image_urls());
                        ("done", json!({"images": urls}))
                    }
                    Err(e) => self.fail(&mut inner, shared, &id, &e),
                }
            }
            Ok(None) => {
                let reason = match shared.shutdown.load(Ordering::SeqCst) {
                    true => "shutdown",
                    false => "canceled",
                };
                if let Some(job) = inner.jobs.get_mut(&id) {
                    job.state = JobState::Canceled;
                    job.finished = Some(now_secs());
                }
                shared
                    .counters
                    .jobs_canceled
                    .fetch_add(1, Ordering::Relaxed);
                ("canceled", json!({"reason": reason}))
            }
            Err(e) => self.fail(&mut inner, shared, &id, &e),
        };
        shared.retire(&mut inner, &id);
        drop(inner);
        shared.emit(kind, &id, data);
        true
    }

    fn fail(
        &self,
        inner: &mut super::state::Inner,
        shared: &Shared,
        id: &str,
        e: &anyhow::Error,
    ) -> (&'static str, serde_json::Value) {
        let msg = format!("{e:#}");
        let msg = msg
            .lines()
            .next()
            .unwrap_or("generation failed")
            .to_string();
        if let Some(job) = inner.jobs.get_mut(id) {
            job.state = JobState::Error;
            job.error = Some(msg.clone());
            job.finished = Some(now_secs());
        }
        shared.counters.jobs_failed.fetch_add(1, Ordering::Relaxed);
        ("error", json!({"error": msg}))
    }

    /// The job's images as PNG bytes (`None`: stopped by a cancel or shutdown).
    fn generate(
        &mut self,
        id: &str,
        params: &super::params::JobParams,
        lora: Option<&[u8]>,
        cancel: &std::sync::atomic::AtomicBool,
        shared: &Shared,
        rx: &Receiver<Command>,
    ) -> Result<Option<Vec<Vec<u8>>>> {
        let set = match (&params.subject_id, lora) {
            (Some(s), Some(bytes)) => Some(self.lora(s, bytes)?),
            _ => None,
        };
        let runs = params.kappas.as_ref().map_or(1, Vec::len);
        let total = params.total_steps();
        let mut pngs = Vec::new();
        for k in 0..runs {
            let mut req = params.request(k);
            req.lora = set.clone();
            let offset = k * params.steps;
            let out = {
                let (pipe, hyper, lpb) = (&self.pipe, &self.hyper, self.lpb);
                pipe.generate_batch_with(&req, |i, _n| {
                    let step = offset + i;
                    if let Some(j) = shared.inner.lock().jobs.get_mut(id) {
                        j.step = step;
                    }
                    shared.emit("progress", id, json!({"step": step, "total": total}));
                    // Subjects that arrived during this step are served before the next one.
                    while let Ok(cmd) = rx.try_recv() {
                        serve_command(hyper, lpb, cmd, shared);
                    }
                    if cancel.load(Ordering::SeqCst) || shared.shutdown.load(Ordering::SeqCst) {
                        return ControlFlow::Break(());
                    }
                    ControlFlow::Continue(())
                })
            };
            let Some(images) = out? else {
                return Ok(None);
            };
            for n in 0..images.size()[0] {
                let (w, h, rgb) = crate::io::image::to_rgb8(&images.get(n))?;
                let mut meta = serde_json::to_value(params)?;
                if let (Some(ks), Some(obj)) = (&params.kappas, meta.as_object_mut()) {
                    obj.insert("kappa".into(), ks.get(k).copied().into());
                }
                if let Some(obj) = meta.as_object_mut() {
                    obj.insert("index".into(), (pngs.len()).into());
                    obj.insert("job_id".into(), id.into());
                    obj.insert("generator".into(), "loracast serve".into());
                }
                pngs.push(encode_png(
                    w,
                    h,
                    &rgb,
                    &[("parameters", &meta.to_string())],
                )?);
            }
        }
        Ok(Some(pngs))
    }
}
