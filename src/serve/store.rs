//! `--state-dir DIR`: what survives a restart. `subjects/<id>.{peft,kohya}.safetensors` +
//! `subjects/<id>.json` (written last: a subject exists once its JSON does), and
//! `jobs/<id>/<n>.png` + `jobs/<id>/job.json` (written last, only for finished jobs). Every
//! file goes through [`crate::util::write_atomic`] (temp file + rename), so a crash or a
//! shutdown never leaves a half-written file under a final name. Names are ids the server made
//! (32 hex digits, checked), never client paths.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use super::params::JobParams;
use super::state::{valid_id, ImageData, Job, JobState, Subject};
use crate::util::write_atomic;

#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) the state folder.
    pub fn open(dir: &Path) -> Result<Self> {
        for sub in ["subjects", "jobs"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("--state-dir {}: cannot create {sub}/", dir.display()))?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn subject_path(&self, id: &str, ext: &str) -> PathBuf {
        self.dir.join("subjects").join(format!("{id}.{ext}"))
    }

    pub fn save_subject(&self, s: &Subject) -> Result<()> {
        write_atomic(&self.subject_path(&s.id, "peft.safetensors"), &s.peft)?;
        write_atomic(&self.subject_path(&s.id, "kohya.safetensors"), &s.kohya)?;
        let meta = json!({"images": s.images, "lora_ms": s.lora_ms, "created": s.created});
        write_atomic(
            &self.subject_path(&s.id, "json"),
            serde_json::to_string_pretty(&meta)?.as_bytes(),
        )
    }

    /// A stored subject (`None` when absent or unreadable).
    pub fn load_subject(&self, id: &str) -> Option<Subject> {
        if !valid_id(id) {
            return None;
        }
        let meta: Value =
            serde_json::from_slice(&std::fs::read(self.subject_path(id, "json")).ok()?).ok()?;
        let peft = std::fs::read(self.subject_path(id, "peft.safetensors")).ok()?;
        let kohya = std::fs::read(self.subject_path(id, "kohya.safetensors")).ok()?;
        let mut s = Subject::new(
            id.to_string(),
            meta.get("images")?.as_u64()? as usize,
            meta.get("lora_ms")?.as_f64()?,
            peft,
            kohya,
        );
        s.created = meta.get("created").and_then(Value::as_f64).unwrap_or(0.0);
        Some(s)
    }

    pub fn delete_subject(&self, id: &str) {
        if valid_id(id) {
            // The JSON first: without it the subject no longer exists.
            for ext in ["json", "peft.safetensors", "kohya.safetensors"] {
                std::fs::remove_file(self.subject_path(id, ext)).ok();
            }
        }
    }

    /// Writes a finished job's images, then its record; returns the images as files.
    pub fn save_job(&self, job: &Job, pngs: &[Vec<u8>]) -> Result<Vec<ImageData>> {
        let dir = self.dir.join("jobs").join(&job.id);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut files = Vec::new();
        for (n, png) in pngs.iter().enumerate() {
            let path = dir.join(format!("{n}.png"));
            write_atomic(&path, png)?;
            files.push(ImageData::Disk(path));
        }
        let record = json!({
            "job_id": job.id,
            "params": job.params,
            "images": pngs.len(),
            "total": job.total,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
        });
        write_atomic(
            &dir.join("job.json"),
            serde_json::to_string_pretty(&record)?.as_bytes(),
        )?;
        Ok(files)
    }

    /// Every finished job on disk, oldest first.
    pub fn load_jobs(&self) -> Vec<Job> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("jobs")) else {
            return Vec::new();
        };
        let mut jobs: Vec<Job> = entries
            .flatten()
            .filter_map(|e| {
                let id = e.file_name().to_str()?.to_string();
                if !valid_id(&id) {
                    return None;
                }
                let dir = e.path();
                let rec: Value =
                    serde_json::from_slice(&std::fs::read(dir.join("job.json")).ok()?).ok()?;
                let params: JobParams = params_from_json(rec.get("params")?)?;
                let n = rec.get("images")?.as_u64()? as usize;
                let images: Vec<ImageData> = (0..n)
                    .map(|i| ImageData::Disk(dir.join(format!("{i}.png"))))
                    .collect();
                let total = rec.get("total").and_then(Value::as_u64).unwrap_or(0) as usize;
                Some(Job {
                    id,
                    params,
                    lora: None,
                    state: JobState::Done,
                    step: total,
                    total,
                    images,
                    error: None,
                    created: rec.get("created").and_then(Value::as_f64).unwrap_or(0.0),
                    started: rec.get("started").and_then(Value::as_f64),
                    finished: rec.get("finished").and_then(Value::as_f64),
                    cancel: Default::default(),
                })
            })
            .collect();
        jobs.sort_by(|a, b| {
            a.finished
                .unwrap_or(0.0)
                .total_cmp(&b.finished.unwrap_or(0.0))
        });
        jobs
    }
}

/// [`JobParams`] from its serialized JSON (a stored job record).
fn params_from_json(v: &Value) -> Option<JobParams> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let scheduler = crate::diffusion::SchedulerKind::from_cli_name(v.get("scheduler")?.as_str()?)
        .ok()?
        .cli_name();
    Some(JobParams {
        subject_id: s("subject_id"),
        prompt: s("prompt")?,
        generic_prompt: s("generic_prompt"),
        kappa: v.get("kappa").and_then(Value::as_f64),
        kappas: v
            .get("kappas")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect()),
        negative_prompt: s("negative_prompt"),
        guidance_scale: v.get("guidance_scale")?.as_f64()?,
        lora_scale: v.get("lora_scale").and_then(Value::as_f64).unwrap_or(1.0),
        steps: v.get("steps")?.as_u64()? as usize,
        scheduler,
        seed: v.get("seed")?.as_u64()?,
        width: v.get("width")?.as_i64()?,
        height: v.get("height")?.as_i64()?,
        count: v.get("count")?.as_u64()? as usize,
    })
}
