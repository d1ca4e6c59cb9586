//! `imagegen serve`: the HTTP service (warp on tokio) in front of one engine worker thread.
//!
//! ```text
//! clients ──HTTP──▶ warp handlers (tokio) ──Jobs (bounded queue, job table)──▶ worker thread
//!                      ▲   SSE / sync waiters ◀── broadcast per job ◀── progress, result ─┘
//!                      └── Store (object_store: file:// or s3://) ◀── PNGs, uploads, LoRAs
//! ```

pub mod archive;
pub mod auth;
pub mod config;
pub mod credentials;
pub mod device;
pub mod error;
pub mod format;
pub mod jobs;
pub mod limits;
pub mod load;
pub mod media;
pub mod metrics;
pub mod openapi;
pub mod reply;
pub mod router;
pub mod routes;
pub mod trainer;
pub mod webhook;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use warp::Filter;

pub use config::{Config, ServeArgs};

/// Trainings that may wait for the one running.
pub const TRAINING_QUEUE: usize = 4;

/// What every handler and the worker share.
pub struct Shared {
    pub config: Config,
    pub jobs: jobs::Jobs,
    /// Trainings, run one at a time by the trainer thread (`imagegen train` children).
    pub trainings: jobs::Jobs<trainer::TrainingWork>,
    pub store: crate::store::Store,
    pub metrics: metrics::Metrics,
    pub auth: auth::Auth,
    pub styles: imagegen_engine::styles::StyleBook,
    /// The tokio runtime, for the worker thread's store writes and webhooks.
    pub runtime: tokio::runtime::Handle,
    pub worker_alive: AtomicBool,
    /// Set once the model is loaded.
    pub model: OnceLock<worker::Loaded>,
    /// Signs every image handed out with a C2PA manifest, when a certificate is configured.
    pub credentials: Option<Arc<credentials::ContentCredentials>>,
    /// Generations or a training: one of them holds the device at a time.
    pub device: device::DeviceGate,
    /// What the worker publishes for `GET /v1/load`.
    pub warm: load::Warm,
}

impl Shared {
    pub fn ready(&self) -> bool {
        self.model.get().is_some()
            && self.worker_alive.load(Ordering::SeqCst)
            && !self.jobs.is_shutting_down()
    }
}

/// Runs the service until SIGTERM or SIGINT; errors are one line.
pub fn run(args: ServeArgs) -> Result<(), String> {
    let config = Config::resolve(&args)?;
    // A certificate that cannot sign stops the service here, before any image is served
    // unsigned.
    let credentials = match &config.c2pa {
        Some((cert, key)) => {
            let credentials = credentials::ContentCredentials::from_pem_files(cert, key)?;
            eprintln!(
                "imagegen: images are signed with C2PA manifests ({})",
                credentials.alg()
            );
            Some(Arc::new(credentials))
        }
        None => None,
    };
    let store = crate::store::Store::open(&config.store)?;
    let styles = imagegen_engine::styles::StyleBook::load(config.styles_file.as_deref())
        .map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("imagegen-http")
        .build()
        .map_err(|e| format!("tokio: {e}"))?;
    let webhooks = webhook::Notifier::new(config.webhook_secret.clone(), runtime.handle().clone());
    let ttl = Duration::from_secs(config.result_ttl_seconds);
    let archive =
        |folder| archive::Archive::new(store.clone(), runtime.handle().clone(), folder, ttl);
    let shared = Arc::new(Shared {
        jobs: jobs::Jobs::new(config.queue_size)
            .with_webhooks(webhooks.clone())
            .with_archive(archive(archive::JOBS_FOLDER)),
        trainings: jobs::Jobs::of_kind(TRAINING_QUEUE, imagegen_crds::api::JobKind::Training)
            .with_webhooks(webhooks)
            .with_archive(archive(archive::TRAININGS_FOLDER)),
        store,
        metrics: metrics::Metrics::new().map_err(|e| format!("metrics: {e}"))?,
        auth: auth::Auth::new(&config.tokens),
        styles,
        runtime: runtime.handle().clone(),
        worker_alive: AtomicBool::new(false),
        model: OnceLock::new(),
        credentials,
        device: device::DeviceGate::new(),
        warm: load::Warm::default(),
        config,
    });
    let result = runtime.block_on(serve(shared));
    // Webhooks still in flight get a bounded time to go out.
    runtime.shutdown_timeout(Duration::from_secs(10));
    result
}

async fn serve(shared: Arc<Shared>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(shared.config.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", shared.config.listen))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!("imagegen: listening on http://{address}");

    let (loaded_tx, loaded_rx) = std::sync::mpsc::channel();
    let worker = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("imagegen-engine".into())
            .spawn(move || worker::run(shared, loaded_tx))
            .map_err(|e| format!("starting the worker: {e}"))?
    };
    let trainer = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("imagegen-trainer".into())
            .spawn(move || trainer::run(shared))
            .map_err(|e| format!("starting the trainer: {e}"))?
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();

    // The model loads while the server already answers /healthz (and 503 on /readyz).
    {
        let shared = shared.clone();
        tokio::spawn(async move {
            let loaded = tokio::task::spawn_blocking(move || loaded_rx.recv()).await;
            match loaded {
                Ok(Ok(Ok(info))) => {
                    eprintln!(
                        "imagegen: model {} loaded on {:?}; ready",
                        info.model_name, info.device
                    );
                    let _ = shared.model.set(info);
                    // Keep the channel open: its closing would read as a stop.
                    let _open = stop_tx;
                    std::future::pending::<()>().await;
                }
                Ok(Ok(Err(message))) => {
                    let _ = stop_tx.send(Err(format!("loading the model: {message}")));
                }
                _ => {
                    let _ = stop_tx.send(Err("the engine worker stopped".into()));
                }
            }
        });
    }
    tokio::spawn(sweeper(shared.clone()));

    let routes = warp::any()
        .and(warp::method())
        .and(warp::path::full())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and(warp::any().map({
            let shared = shared.clone();
            move || shared.clone()
        }))
        .then(router::handle);
    let server = warp::serve(routes)
        .incoming(listener)
        .graceful(async move {
            let _ = http_stop_rx.await;
        })
        .run();
    let server = tokio::spawn(server);

    let outcome = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        result = stop_rx => result.unwrap_or(Ok(())),
    };
    // Stop taking work; queued jobs fail as retryable; the running job finishes.
    eprintln!("imagegen: shutting down");
    shared.jobs.shut_down();
    // A training can take hours: it stops too (retryable), like the queued ones.
    shared.trainings.shut_down();
    // Last: a worker or trainer woken here finds its queue already drained, and stops.
    shared.device.shut_down();
    shared.metrics.queue_depth.set(0);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = worker.join();
        let _ = trainer.join();
    })
    .await;
    // Let waiting clients read their answers, then close.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = http_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    eprintln!("imagegen: stopped");
    outcome
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Expires results past the TTL (images and uploads in the store, finished jobs in
/// memory) and queued jobs past their deadline.
async fn sweeper(shared: Arc<Shared>) {
    let ttl = Duration::from_secs(shared.config.result_ttl_seconds);
    let period = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    // Every second for the queued jobs' deadlines; the rest every `period`.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_store_sweep = std::time::Instant::now();
    loop {
        tick.tick().await;
        shared.jobs.expire_queued();
        shared.metrics.queue_depth.set(shared.jobs.depth() as i64);
        if last_store_sweep.elapsed() < period {
            continue;
        }
        last_store_sweep = std::time::Instant::now();
        shared.jobs.sweep(ttl);
        shared.trainings.sweep(ttl);
        let cutoff = time::OffsetDateTime::now_utc() - ttl;
        let Ok(objects) = shared
            .store
            .list(&object_store::path::Path::from("tenants"))
            .await
        else {
            continue;
        };
        for object in objects {
            let expires = object.location.parts().nth(2).is_some_and(|kind| {
                matches!(
                    kind.as_ref(),
                    "images" | "uploads" | archive::JOBS_FOLDER | archive::TRAININGS_FOLDER
                )
            });
            let modified = object.last_modified.timestamp();
            if expires && modified < cutoff.unix_timestamp() {
                let _ = shared.store.delete(&object.location).await;
            }
        }
    }
}
