//! `loracast serve` (issue #19): personalization as a local service — an HTTP API, an SSE
//! event stream and one web page, on tokio + axum.
//!
//! Shape: one worker thread ([`worker`]) owns the models and runs every libtorch call in
//! order; jobs wait in a bounded FIFO queue (full → 503 with `Retry-After`); HTTP handlers
//! ([`api`]) only touch the shared state ([`state`]) and talk to the worker over a bounded
//! channel. Subjects are cached by a hash of their image bytes (LRU by count and bytes), so
//! the same images never cost a second hypernetwork call. Safety defaults ([`security`]):
//! loopback bind, a bearer token required off loopback, Host/Origin checks, size limits,
//! strict response headers. `--state-dir` keeps subjects and finished images across restarts
//! ([`store`]). SIGINT/SIGTERM stop the running job at its next step, write nothing of it,
//! end the event streams and exit.
pub mod api;
pub mod error;
pub mod params;
pub mod png;
pub mod security;
pub mod state;
pub mod store;
pub mod web;
pub mod worker;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

pub use state::Limits;
pub use worker::ModelPaths;

/// Everything `serve` needs, checked by [`run`].
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub bind: SocketAddr,
    pub models: ModelPaths,
    /// The bearer token (`--token-file`'s content, trimmed).
    pub token: Option<String>,
    pub allow_hosts: Vec<String>,
    pub state_dir: Option<PathBuf>,
    pub limits: Limits,
}

/// Reads a token file: one line of at least 16 characters from `[A-Za-z0-9._~-]` (so it
/// fits a cookie and a header unchanged).
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--token-file {}: cannot read it", path.display()))?;
    let token = text.trim();
    if token.len() < 16
        || !token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
    {
        bail!(
            "--token-file {}: the token must be one line of at least 16 characters from A-Z a-z 0-9 . _ ~ -",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Runs the service until SIGINT/SIGTERM. Prints `listening on http://ADDR/` on stdout once
/// the models are loaded and requests are accepted.
pub fn run(cfg: ServeConfig) -> Result<()> {
    if !cfg.bind.ip().is_loopback() && cfg.token.is_none() {
        bail!(
            "--bind {}: a non-loopback address needs --token-file (anyone on the network could use the service otherwise)",
            cfg.bind
        );
    }
    let store = cfg
        .state_dir
        .as_deref()
        .map(store::Store::open)
        .transpose()?;
    let shared = Arc::new(state::Shared::new(cfg.limits.clone(), store));
    if let Some(store) = &shared.store {
        let mut inner = shared.inner.lock();
        for job in store.load_jobs() {
            let id = job.id.clone();
            inner.jobs.insert(id.clone(), job);
            shared.retire(&mut inner, &id);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("loracast-http")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(cfg, shared))
}

async fn serve(cfg: ServeConfig, shared: Arc<state::Shared>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.bind)
        .await
        .with_context(|| format!("--bind {}: cannot listen there", cfg.bind))?;
    let addr = listener.local_addr()?;
    let (tx, rx) = std::sync::mpsc::sync_channel(64);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let worker = {
        let shared = shared.clone();
        let models = cfg.models.clone();
        std::thread::Builder::new()
            .name("loracast-worker".into())
            .spawn(move || worker::run(models, shared, rx, ready_tx))
            .context("cannot start the worker thread")?
    };
    match ready_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("{e}"),
        Err(_) => bail!("the worker thread stopped while loading the models"),
    }
    let (shut_tx, shut_rx) = tokio::sync::watch::channel(false);
    let app = api::App {
        shared: shared.clone(),
        tx,
        shutdown: shut_rx,
    };
    let guard = Arc::new(security::Guard::new(cfg.token.as_deref(), &cfg.allow_hosts));
    let router =
        api::router(app).layer(axum::middleware::from_fn_with_state(guard, security::guard));
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "loracast serve: listening on http://{addr}/")?;
        if let Some(t) = &cfg.token {
            writeln!(
                out,
                "loracast serve: open http://{addr}/?token={t} once to sign in the page"
            )?;
        }
        out.flush()?;
    }
    let signal_shared = shared.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            eprintln!("loracast serve: shutting down (the running job stops at its next step)");
            signal_shared.shutdown.store(true, Ordering::SeqCst);
            let _ = shut_tx.send(true);
        })
        .await
        .context("the HTTP server failed")?;
    shared.shutdown.store(true, Ordering::SeqCst);
    tokio::task::spawn_blocking(move || worker.join())
        .await
        .ok();
    eprintln!("loracast serve: stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
