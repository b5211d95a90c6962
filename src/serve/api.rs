//! The HTTP API (issue #19): routes, request reading with JSON errors for every bad input, and
//! the SSE event stream. Handlers only read and write [`Shared`] under its short lock, decode
//! uploads on the blocking pool, and hand libtorch work to the worker over a bounded channel;
//! none of them waits on a tensor.
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

use super::error::{ApiError, ApiResult};
use super::params::parse_job;
use super::state::{now_secs, valid_id, ImageData, Job, JobState, Shared, Subject};
use super::worker::Command;
use crate::io::preprocess::RgbImage;

#[derive(Clone)]
pub struct App {
    pub shared: Arc<Shared>,
    pub tx: SyncSender<Command>,
    pub shutdown: watch::Receiver<bool>,
}

/// Every route, with the JSON body limit and the larger upload limit on `/api/subjects`.
pub fn router(app: App) -> Router {
    // The hard limit is twice the upload limit: between the two, read_images drains the body
    // and answers 413 as JSON; beyond it the connection is cut.
    let upload_limit = app.shared.limits.max_upload_bytes.saturating_mul(2);
    let json_limit = app.shared.limits.max_json_bytes;
    Router::new()
        .route("/", get(super::web::index))
        .route("/app.js", get(super::web::script))
        .route("/style.css", get(super::web::style))
        .route("/api/health", get(health))
        .route("/api/system", get(system))
        .route("/api/events", get(events))
        .route(
            "/api/subjects",
            axum::routing::post(post_subject).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route(
            "/api/subjects/{id}",
            get(get_subject).delete(delete_subject),
        )
        .route("/api/subjects/{id}/lora.safetensors", get(get_lora))
        .route("/api/jobs", get(list_jobs).post(post_job))
        .route("/api/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/api/jobs/{id}/images/{file}", get(get_image))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(json_limit))
        .with_state(app)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint").hint("see GET /api/system")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

async fn health(State(app): State<App>) -> Json<Value> {
    Json(json!({
        "ok": true,
        "ready": app.shared.models.get().is_some(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `VmRSS` and `VmHWM` (peak) of this process in bytes, from /proc (Linux).
pub fn rss() -> (Option<u64>, Option<u64>) {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return (None, None);
    };
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn system(State(app): State<App>) -> Json<Value> {
    let s = &app.shared;
    let c = &s.counters;
    let (queue, running, cache) = {
        let inner = s.inner.lock();
        let cache = json!({
            "entries": inner.subjects.len(),
            "bytes": inner.subjects.bytes(),
            "max_entries": s.limits.max_subjects,
            "max_bytes": s.limits.max_cache_bytes,
            "hits": inner.subjects.hits,
            "misses": inner.subjects.misses,
            "coalesced": inner.subjects.coalesced,
            "evictions": inner.subjects.evictions,
            "hypernet_calls": c.hypernet_calls.load(Ordering::Relaxed),
        });
        (inner.queue.len(), inner.running.clone(), cache)
    };
    let (rss, peak) = rss();
    let models = s.models.get();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "device": models.map(|m| m.device.clone()),
        "threads": models.map(|m| m.threads),
        "models": models,
        "defaults": models.map(|m| &m.defaults),
        "queue": {"length": queue, "capacity": s.limits.queue_capacity, "running": running},
        "cache": cache,
        "jobs": {
            "accepted": c.jobs_accepted.load(Ordering::Relaxed),
            "rejected_full": c.jobs_rejected_full.load(Ordering::Relaxed),
            "done": c.jobs_done.load(Ordering::Relaxed),
            "canceled": c.jobs_canceled.load(Ordering::Relaxed),
            "failed": c.jobs_failed.load(Ordering::Relaxed),
        },
        "limits": s.limits,
        "state_dir": s.store.as_ref().map(|st| st.dir().display().to_string()),
        "memory": {"rss_bytes": rss, "peak_rss_bytes": peak},
        "uptime_s": now_secs() - s.started,
    }))
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// An upload's image bytes → RGB, with the CLI's checks (PNG or JPEG, the decoder's size
/// limits, at least 16×16); `field` names it in errors.
fn decode_upload(bytes: &[u8], field: &str) -> ApiResult<RgbImage> {
    let png = bytes.starts_with(b"\x89PNG\r\n\x1a\n");
    let jpeg = bytes.starts_with(&[0xFF, 0xD8, 0xFF]);
    if !png && !jpeg {
        return Err(
            ApiError::unsupported(format!("{field} is not a PNG or JPEG image"))
                .field(field)
                .hint("upload PNG or JPEG files"),
        );
    }
    let (w, h, data) = crate::io::image::decode_rgb8(bytes, field).map_err(|e| {
        let msg = e.to_string();
        let err = if msg.contains("more than loracast decodes") {
            ApiError::too_large(msg)
        } else {
            ApiError::invalid(field, msg)
        };
        err.field(field)
    })?;
    let img = RgbImage::new(w, h, data).map_err(|e| ApiError::invalid(field, e.to_string()))?;
    crate::hypernet::check_image_size(&img)
        .map_err(|e| ApiError::invalid(field, format!("{field}: {e}")))?;
    Ok(img)
}

fn multipart_error(
    e: axum::extract::multipart::MultipartError,
    limits: &super::state::Limits,
) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        multipart_too_large(limits)
    } else {
        ApiError::bad_request(format!("malformed multipart body: {}", e.body_text()))
    }
}

async fn post_subject(
    State(app): State<App>,
    headers: HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> ApiResult<Response> {
    let limits = &app.shared.limits;
    if !content_type(&headers).starts_with("multipart/form-data") {
        return Err(
            ApiError::unsupported("POST /api/subjects takes multipart/form-data")
                .hint("send the images as form fields named \"images\""),
        );
    }
    let mp = mp.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let files = read_images(mp, limits).await?;
    let shared = app.shared.clone();
    let id = shared.subject_id(&files);
    // Same images → same id: a cached subject costs no hypernetwork call.
    let cached = {
        let shared = shared.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || shared.subject(&id))
            .await
            .map_err(|e| ApiError::internal(&e.into()))?
    };
    if let Some(s) = cached {
        shared.inner.lock().subjects.hits += 1;
        let mut body = s.json();
        body["cached"] = true.into();
        return Ok((StatusCode::OK, Json(body)).into_response());
    }
    let images = tokio::task::spawn_blocking(move || {
        files
            .iter()
            .enumerate()
            .map(|(i, b)| decode_upload(b, &format!("images[{i}]")))
            .collect::<ApiResult<Vec<_>>>()
    })
    .await
    .map_err(|e| ApiError::internal(&e.into()))??;
    // One hypernetwork call per subject: a concurrent upload of the same images waits for the
    // call already under way.
    let (reply, answer) = tokio::sync::oneshot::channel();
    let leader = {
        let mut inner = shared.inner.lock();
        match inner.pending.get_mut(&id) {
            Some(waiters) => {
                waiters.push(reply);
                inner.subjects.coalesced += 1;
                false
            }
            None => {
                inner.pending.insert(id.clone(), vec![reply]);
                inner.subjects.misses += 1;
                true
            }
        }
    };
    if leader {
        let cmd = Command::Subject {
            id: id.clone(),
            images,
        };
        let refused = match app.tx.try_send(cmd) {
            Ok(()) => None,
            Err(TrySendError::Full(_)) => Some(("the worker has too many subjects waiting", 1)),
            Err(TrySendError::Disconnected(_)) => Some(("the server is shutting down", 5)),
        };
        if let Some((why, secs)) = refused {
            let waiters = shared.inner.lock().pending.remove(&id).unwrap_or_default();
            for w in waiters {
                let _ = w.send(Err(why.to_string()));
            }
            return Err(ApiError::busy(why, secs));
        }
    }
    let subject: Subject = match answer.await {
        Ok(Ok(s)) => s,
        Ok(Err(msg)) if msg.contains("too many subjects") => return Err(ApiError::busy(msg, 1)),
        Ok(Err(msg)) if msg == super::worker::SHUTTING_DOWN => return Err(ApiError::busy(msg, 5)),
        Ok(Err(msg)) => return Err(ApiError::invalid("images", msg)),
        Err(_) => return Err(ApiError::busy("the server is shutting down", 5)),
    };
    let mut body = subject.json();
    body["cached"] = false.into();
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The image files of an upload form (fields `images`), each within `max_image_bytes`, all
/// within `max_upload_bytes`, at most `max_images`. After the first error the rest of the
/// body is read and dropped (up to the route's hard limit), so that the client, still sending,
/// receives the JSON error instead of a reset connection.
async fn read_images(mut mp: Multipart, limits: &super::state::Limits) -> ApiResult<Vec<Vec<u8>>> {
    let mut files: Vec<Vec<u8>> = Vec::new();
    let mut total = 0usize;
    let mut seen_field = false;
    let mut failed: Option<ApiError> = None;
    let no_images = || {
        ApiError::invalid("images", "send 1 to 16 images of the subject")
            .hint("form fields named \"images\" holding PNG or JPEG files")
    };
    loop {
        let mut field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            // A form with no part at all (only the closing boundary).
            Err(_) if !seen_field => return Err(no_images()),
            Err(e) => return Err(failed.unwrap_or_else(|| multipart_error(e, limits))),
        };
        seen_field = true;
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().unwrap_or("").to_string();
        let label = format!("images[{}]", files.len());
        if failed.is_none() && !matches!(name.as_str(), "images" | "image" | "images[]") {
            failed = Some(
                ApiError::invalid(&name, format!("unknown form field {name:?}"))
                    .hint("send the images as form fields named \"images\""),
            );
        }
        let mut buf = Vec::new();
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    total += chunk.len();
                    if failed.is_some() {
                        continue;
                    }
                    if total > limits.max_upload_bytes {
                        failed = Some(multipart_too_large(limits));
                    } else if buf.len() + chunk.len() > limits.max_image_bytes {
                        failed = Some(
                            ApiError::too_large(format!(
                                "{label} is larger than {} bytes",
                                limits.max_image_bytes
                            ))
                            .field(label.clone())
                            .hint("serve --max-image-bytes raises the limit"),
                        );
                    } else {
                        buf.extend_from_slice(&chunk);
                    }
                }
                Ok(None) => break,
                Err(e) => return Err(failed.unwrap_or_else(|| multipart_error(e, limits))),
            }
        }
        if failed.is_some() {
            continue;
        }
        // A browser's empty file input: no file name, no bytes.
        if buf.is_empty() && file_name.is_empty() {
            continue;
        }
        if files.len() == limits.max_images {
            failed = Some(ApiError::invalid(
                "images",
                format!("at most {} images per subject", limits.max_images),
            ));
            continue;
        }
        files.push(buf);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if files.is_empty() {
        return Err(no_images());
    }
    Ok(files)
}

fn multipart_too_large(limits: &super::state::Limits) -> ApiError {
    ApiError::too_large(format!(
        "the upload is larger than {} bytes in all",
        limits.max_upload_bytes
    ))
    .field("images")
    .hint("send fewer or smaller images (serve --max-upload-bytes)")
}

async fn lookup_subject(app: &App, id: &str) -> ApiResult<Subject> {
    if !valid_id(id) {
        return Err(ApiError::not_found("subject", id));
    }
    let shared = app.shared.clone();
    let key = id.to_string();
    tokio::task::spawn_blocking(move || shared.subject(&key))
        .await
        .map_err(|e| ApiError::internal(&e.into()))?
        .ok_or_else(|| ApiError::not_found("subject", id))
}

async fn get_subject(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(lookup_subject(&app, &id).await?.json()))
}

async fn delete_subject(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    lookup_subject(&app, &id).await?;
    app.shared.inner.lock().subjects.remove(&id);
    if let Some(store) = app.shared.store.clone() {
        let key = id.clone();
        tokio::task::spawn_blocking(move || store.delete_subject(&key))
            .await
            .map_err(|e| ApiError::internal(&e.into()))?;
    }
    Ok(Json(json!({"deleted": id})))
}

async fn get_lora(
    State(app): State<App>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let format = q.get("format").map_or("peft", String::as_str);
    if !matches!(format, "peft" | "kohya") {
        return Err(ApiError::invalid(
            "format",
            format!("format must be peft or kohya, got {format:?}"),
        ));
    }
    let s = lookup_subject(&app, &id).await?;
    let bytes = match format {
        "kohya" => s.kohya,
        _ => s.peft,
    };
    let name = format!(
        "attachment; filename=\"loracast-{}-{format}.safetensors\"",
        &id[..12]
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        bytes.as_ref().clone(),
    )
        .into_response())
}

async fn post_job(
    State(app): State<App>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let shared = &app.shared;
    let limit = shared.limits.max_json_bytes;
    if !content_type(&headers).starts_with("application/json") {
        return Err(
            ApiError::unsupported("POST /api/jobs takes application/json")
                .hint("send Content-Type: application/json"),
        );
    }
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            ApiError::too_large(format!("the JSON body is larger than {limit} bytes"))
        }
        _ => ApiError::bad_request(e.body_text()),
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let models = shared
        .models
        .get()
        .ok_or_else(|| ApiError::busy("the models are still loading", 2))?;
    let params = parse_job(&value, &models.defaults, &shared.limits.job)?;
    let lora = match &params.subject_id {
        Some(sid) => Some(
            lookup_subject(&app, sid)
                .await
                .map_err(|e| {
                    e.field("subject_id")
                        .hint("upload the images with POST /api/subjects first")
                })?
                .peft,
        ),
        None => None,
    };
    if shared.shutdown.load(Ordering::SeqCst) {
        return Err(ApiError::busy("the server is shutting down", 5));
    }
    let id = super::state::new_job_id();
    let total = params.total_steps();
    let position = {
        let mut inner = shared.inner.lock();
        if inner.queue.len() >= shared.limits.queue_capacity {
            shared
                .counters
                .jobs_rejected_full
                .fetch_add(1, Ordering::Relaxed);
            let wait = (inner.queue.len() as u64 + 1).min(30);
            return Err(ApiError::busy(
                format!("the queue is full ({} jobs waiting)", inner.queue.len()),
                wait,
            )
            .hint("retry after the Retry-After seconds"));
        }
        inner.jobs.insert(
            id.clone(),
            Job {
                id: id.clone(),
                params,
                lora,
                state: JobState::Queued,
                step: 0,
                total,
                images: Vec::new(),
                error: None,
                created: now_secs(),
                started: None,
                finished: None,
                cancel: Default::default(),
            },
        );
        inner.queue.push_back(id.clone());
        inner.queue.len()
    };
    shared
        .counters
        .jobs_accepted
        .fetch_add(1, Ordering::Relaxed);
    shared.emit("queued", &id, json!({"position": position, "total": total}));
    // A nudge only: the worker also polls the queue.
    let _ = app.tx.try_send(Command::Wake);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"job_id": id, "position": position, "url": format!("/api/jobs/{id}")})),
    )
        .into_response())
}

async fn list_jobs(State(app): State<App>) -> Json<Value> {
    let inner = app.shared.inner.lock();
    let mut jobs: Vec<&Job> = inner.jobs.values().collect();
    jobs.sort_by(|a, b| b.created.total_cmp(&a.created));
    let list: Vec<Value> = jobs
        .iter()
        .take(100)
        .map(|j| j.json(inner.position(&j.id)))
        .collect();
    Json(json!({"jobs": list}))
}

async fn get_job(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let inner = app.shared.inner.lock();
    let job = inner
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError::not_found("job", &id))?;
    Ok(Json(job.json(inner.position(&id))))
}

async fn cancel_job(State(app): State<App>, Path(id): Path<String>) -> ApiResult<Response> {
    let shared = &app.shared;
    let mut inner = shared.inner.lock();
    let state = inner
        .jobs
        .get(&id)
        .map(|j| j.state)
        .ok_or_else(|| ApiError::not_found("job", &id))?;
    match state {
        JobState::Queued => {
            inner.queue.retain(|j| *j != id);
            if let Some(j) = inner.jobs.get_mut(&id) {
                j.state = JobState::Canceled;
                j.finished = Some(now_secs());
            }
            shared.retire(&mut inner, &id);
            drop(inner);
            shared
                .counters
                .jobs_canceled
                .fetch_add(1, Ordering::Relaxed);
            shared.emit("canceled", &id, json!({"reason": "canceled"}));
            Ok(Json(json!({"job_id": id, "state": "canceled"})).into_response())
        }
        JobState::Running => {
            if let Some(j) = inner.jobs.get(&id) {
                j.cancel.store(true, Ordering::SeqCst);
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"job_id": id, "state": "canceling"})),
            )
                .into_response())
        }
        done => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {id} has already finished ({})",
                json!(done).as_str().unwrap_or("")
            ),
        )),
    }
}

async fn get_image(
    State(app): State<App>,
    Path((id, file)): Path<(String, String)>,
) -> ApiResult<Response> {
    let missing = || ApiError::not_found("image", &format!("{id}/{file}"));
    let n: usize = file
        .strip_suffix(".png")
        .and_then(|n| n.parse().ok())
        .ok_or_else(missing)?;
    let image = {
        let inner = app.shared.inner.lock();
        let job = inner
            .jobs
            .get(&id)
            .ok_or_else(|| ApiError::not_found("job", &id))?;
        job.images.get(n).cloned().ok_or_else(missing)?
    };
    let bytes = match image {
        ImageData::Mem(b) => b.as_ref().clone(),
        ImageData::Disk(p) => tokio::fs::read(&p).await.map_err(|_| missing())?,
    };
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (
                header::CACHE_CONTROL,
                "private, max-age=31536000, immutable",
            ),
        ],
        bytes,
    )
        .into_response())
}

type EventState = (
    broadcast::Receiver<super::state::Event>,
    watch::Receiver<bool>,
    Option<String>,
    bool,
);

/// One SSE stream of every job's events (`?job=ID`: that job's only); the first event,
/// `ready`, says the stream is live. It ends when the server shuts down.
async fn events(
    State(app): State<App>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let state: EventState = (
        app.shared.events.subscribe(),
        app.shutdown.clone(),
        q.get("job").cloned(),
        false,
    );
    let stream =
        futures_util::stream::unfold(state, |(mut rx, mut shut, filter, greeted)| async move {
            if !greeted {
                let e = SseEvent::default()
                    .event("ready")
                    .data(json!({"type": "ready"}).to_string());
                return Some((Ok(e), (rx, shut, filter, true)));
            }
            loop {
                if *shut.borrow() {
                    return None;
                }
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(ev) => {
                            if filter.as_ref().is_some_and(|f| *f != ev.job_id) {
                                continue;
                            }
                            let e = SseEvent::default().event(ev.kind).data(ev.data.to_string());
                            return Some((Ok(e), (rx, shut, filter, true)));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let e = SseEvent::default()
                                .event("lagged")
                                .data(json!({"type": "lagged", "missed": n}).to_string());
                            return Some((Ok(e), (rx, shut, filter, true)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                    _ = shut.changed() => return None,
                }
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
