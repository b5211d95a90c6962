//! The service's shared state, behind one short-held lock: the job table and its bounded FIFO
//! queue, the subject cache (LoRA bytes keyed by a hash of the images, LRU-bounded by count
//! and bytes), counters for `/api/system`, and the event channel every SSE client reads.
//! Handlers only touch this (never a tensor); the worker thread owns the models.
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use super::params::{Defaults, JobLimits, JobParams};
use super::store::Store;

/// `n` bytes from the OS's random source (ids and random seeds); falls back to a hash of the
/// time and a counter where /dev/urandom cannot be read.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut out))
        .is_ok();
    if !ok {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = Sha256::new();
        h.update(format!("{:?}", SystemTime::now()));
        h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        let d = h.finalize();
        for (o, b) in out.iter_mut().zip(d.iter().cycle()) {
            *o = *b;
        }
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new job id: 128 random bits in hex (unguessable, so only who was told an id can act on it).
pub fn new_job_id() -> String {
    hex(&random_bytes::<16>())
}

/// Ids are 32 lower-case hex digits; anything else is unknown (and never becomes a path).
pub fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Configurable bounds of the service.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Jobs waiting (not counting the running one); a full queue answers 503.
    pub queue_capacity: usize,
    pub max_subjects: usize,
    pub max_cache_bytes: usize,
    /// Finished jobs kept in the table (oldest forgotten first).
    pub max_finished_jobs: usize,
    /// In-memory result PNG bytes kept (without --state-dir), oldest jobs dropped first.
    pub max_result_bytes: usize,
    pub max_image_bytes: usize,
    pub max_upload_bytes: usize,
    pub max_images: usize,
    pub max_json_bytes: usize,
    pub job: JobLimits,
}

/// One cached subject: its LoRA in both file formats.
#[derive(Debug, Clone)]
pub struct Subject {
    pub id: String,
    pub images: usize,
    pub lora_ms: f64,
    pub peft: Arc<Vec<u8>>,
    pub kohya: Arc<Vec<u8>>,
    pub created: f64,
    last_used: u64,
}

impl Subject {
    pub fn new(id: String, images: usize, lora_ms: f64, peft: Vec<u8>, kohya: Vec<u8>) -> Self {
        Self {
            id,
            images,
            lora_ms,
            peft: Arc::new(peft),
            kohya: Arc::new(kohya),
            created: now_secs(),
            last_used: 0,
        }
    }

    pub fn bytes(&self) -> usize {
        self.peft.len() + self.kohya.len()
    }

    pub fn json(&self) -> Value {
        json!({
            "subject_id": self.id,
            "images": self.images,
            "lora_ms": self.lora_ms,
            "lora_bytes": self.peft.len(),
            "created": self.created,
            "lora_url": format!("/api/subjects/{}/lora.safetensors?format=peft", self.id),
            "lora_url_kohya": format!("/api/subjects/{}/lora.safetensors?format=kohya", self.id),
        })
    }
}

/// The LRU subject cache.
#[derive(Debug, Default)]
pub struct SubjectCache {
    map: HashMap<String, Subject>,
    tick: u64,
    bytes: usize,
    pub hits: u64,
    pub misses: u64,
    /// Uploads that joined a personalization already under way.
    pub coalesced: u64,
    pub evictions: u64,
}

impl SubjectCache {
    pub fn get(&mut self, id: &str) -> Option<Subject> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(id).map(|s| {
            s.last_used = tick;
            s.clone()
        })
    }

    /// Inserts (or refreshes) a subject, then evicts least recently used ones beyond the bounds
    /// (the newest always stays).
    pub fn insert(&mut self, mut s: Subject, max_entries: usize, max_bytes: usize) {
        self.tick += 1;
        s.last_used = self.tick;
        if let Some(old) = self.map.remove(&s.id) {
            self.bytes -= old.bytes();
        }
        self.bytes += s.bytes();
        let id = s.id.clone();
        self.map.insert(id.clone(), s);
        while self.map.len() > 1 && (self.map.len() > max_entries || self.bytes > max_bytes) {
            let Some(victim) = self
                .map
                .values()
                .filter(|v| v.id != id)
                .min_by_key(|v| v.last_used)
                .map(|v| v.id.clone())
            else {
                break;
            };
            self.remove(&victim);
            self.evictions += 1;
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Subject> {
        let s = self.map.remove(id)?;
        self.bytes -= s.bytes();
        Some(s)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Error,
    Canceled,
}

impl JobState {
    pub fn finished(self) -> bool {
        matches!(self, Self::Done | Self::Error | Self::Canceled)
    }
}

/// A result image: in memory, or a file under `--state-dir`.
#[derive(Debug, Clone)]
pub enum ImageData {
    Mem(Arc<Vec<u8>>),
    Disk(PathBuf),
}

#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub params: JobParams,
    /// The subject's PEFT LoRA bytes, taken when the job was accepted (a later eviction or
    /// delete of the subject does not affect it).
    pub lora: Option<Arc<Vec<u8>>>,
    pub state: JobState,
    pub step: usize,
    pub total: usize,
    pub images: Vec<ImageData>,
    pub error: Option<String>,
    pub created: f64,
    pub started: Option<f64>,
    pub finished: Option<f64>,
    pub cancel: Arc<AtomicBool>,
}

impl Job {
    pub fn image_urls(&self) -> Vec<String> {
        (0..self.images.len())
            .map(|n| format!("/api/jobs/{}/images/{n}.png", self.id))
            .collect()
    }

    fn result_bytes(&self) -> usize {
        self.images
            .iter()
            .map(|i| match i {
                ImageData::Mem(b) => b.len(),
                ImageData::Disk(_) => 0,
            })
            .sum()
    }

    /// The job as `GET /api/jobs/{id}` shows it (`position`: 1 = next to run, 0 = not waiting).
    pub fn json(&self, position: usize) -> Value {
        json!({
            "job_id": self.id,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "position": position,
            "images": self.image_urls(),
            "error": self.error,
            "params": self.params,
            "kind": if self.params.kappas.is_some() { "sweep" } else { "generate" },
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        })
    }
}

/// What the worker reports once the models are loaded.
#[derive(Debug, Clone, Serialize)]
pub struct ModelsInfo {
    pub device: String,
    pub threads: i32,
    pub base: String,
    pub hypernet: String,
    pub family: String,
    pub lora_sites: usize,
    pub lora_rank: i64,
    pub defaults: Defaults,
}

/// An event for SSE clients: its type names the SSE event, its data is JSON with `type` and
/// `job_id`.
#[derive(Debug, Clone)]
pub struct Event {
    pub kind: &'static str,
    pub job_id: String,
    pub data: Value,
}

#[derive(Debug, Default)]
pub struct Inner {
    pub jobs: HashMap<String, Job>,
    /// Finished jobs, oldest first (for retention).
    pub finished: VecDeque<String>,
    pub queue: VecDeque<String>,
    pub running: Option<String>,
    pub subjects: SubjectCache,
    /// Subjects being personalized, with everyone waiting for them: concurrent uploads of the
    /// same images share one hypernetwork call.
    pub pending: HashMap<String, Vec<SubjectWaiter>>,
}

/// Where a personalized subject (or the reason it failed) is delivered.
pub type SubjectWaiter = tokio::sync::oneshot::Sender<Result<Subject, String>>;

impl Inner {
    /// 1-based place in the queue; 0 when not waiting.
    pub fn position(&self, id: &str) -> usize {
        self.queue.iter().position(|j| j == id).map_or(0, |p| p + 1)
    }
}

/// Counters shown by `/api/system`.
#[derive(Debug, Default)]
pub struct Counters {
    pub hypernet_calls: AtomicU64,
    pub jobs_accepted: AtomicU64,
    pub jobs_rejected_full: AtomicU64,
    pub jobs_done: AtomicU64,
    pub jobs_canceled: AtomicU64,
    pub jobs_failed: AtomicU64,
}

pub struct Shared {
    pub limits: Limits,
    pub inner: Mutex<Inner>,
    pub events: broadcast::Sender<Event>,
    pub counters: Counters,
    pub models: OnceLock<ModelsInfo>,
    /// Set once on SIGINT/SIGTERM: the running job stops at its next step.
    pub shutdown: AtomicBool,
    pub store: Option<Store>,
    /// A key of the loaded hypernetwork that subject ids hash in (ids differ across models).
    pub model_key: OnceLock<[u8; 32]>,
    pub started: f64,
}

impl Shared {
    pub fn new(limits: Limits, store: Option<Store>) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self {
            limits,
            inner: Mutex::new(Inner::default()),
            events,
            counters: Counters::default(),
            models: OnceLock::new(),
            shutdown: AtomicBool::new(false),
            store,
            model_key: OnceLock::new(),
            started: now_secs(),
        }
    }

    /// Sends an event to every SSE client (none listening is fine).
    pub fn emit(&self, kind: &'static str, job_id: &str, mut data: Value) {
        if let Some(obj) = data.as_object_mut() {
            obj.insert("type".into(), kind.into());
            obj.insert("job_id".into(), job_id.into());
        }
        let _ = self.events.send(Event {
            kind,
            job_id: job_id.to_string(),
            data,
        });
    }

    /// The subject id of these image files: SHA-256 over the model key and every image's bytes
    /// (length-prefixed, in order), first 128 bits in hex.
    pub fn subject_id(&self, images: &[Vec<u8>]) -> String {
        let mut h = Sha256::new();
        h.update(b"loracast-subject-v1");
        h.update(self.model_key.get().copied().unwrap_or_default());
        for img in images {
            h.update((img.len() as u64).to_le_bytes());
            h.update(img);
        }
        hex(&h.finalize()[..16])
    }

    /// A cached subject, from memory or (with `--state-dir`) from disk.
    pub fn subject(&self, id: &str) -> Option<Subject> {
        if let Some(s) = self.inner.lock().subjects.get(id) {
            return Some(s);
        }
        let s = self.store.as_ref()?.load_subject(id)?;
        let mut inner = self.inner.lock();
        inner.subjects.insert(
            s.clone(),
            self.limits.max_subjects,
            self.limits.max_cache_bytes,
        );
        Some(s)
    }

    /// Records a job as finished and forgets the oldest finished ones beyond the bounds.
    pub fn retire(&self, inner: &mut Inner, id: &str) {
        inner.finished.push_back(id.to_string());
        let mut mem: usize = inner.jobs.values().map(Job::result_bytes).sum();
        while inner.finished.len() > self.limits.max_finished_jobs
            || (mem > self.limits.max_result_bytes && inner.finished.len() > 1)
        {
            let Some(old) = inner.finished.pop_front() else {
                break;
            };
            if let Some(j) = inner.jobs.remove(&old) {
                mem -= j.result_bytes();
            }
        }
    }
}
