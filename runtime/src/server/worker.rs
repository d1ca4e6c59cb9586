//! The engine worker: one OS thread that loads the model and runs every job on it, one at a
//! time (libtorch tensors and the LoRA cache stay on this thread). What follows the
//! denoising loop and the safety check (PNG encoding, C2PA signing, the store upload and
//! answering the job) runs on a second thread, the finisher, so the engine starts the next
//! job as soon as the device is done with this one. It takes a job off the
//! queue only once it holds the device ([`super::device`]): while a training holds it, the
//! jobs stay queued. A check of an uploaded LoRA does not wait for a training: it loads
//! one small file, where waiting could outlast its client.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use imagegen_crds::api::{
    codes, DeviceMemory, ErrorDetail, GenerationResult, ImageResult, WithheldImage,
};
use imagegen_engine::pipelines;
use tch::Device;

use super::jobs::{
    deadline_error, error_detail, random_id, Control, JobKey, JobLora, Pending, Running,
};
use super::load::LoraOwners;
use super::Shared;
use crate::hub::HfHub;
use imagegen_engine::device::{check_device, parse_device, parse_dtype};
use imagegen_engine::image::output::encode_png;
use imagegen_engine::models::controlnet::ControlNetModel;
use imagegen_engine::models::loading::{self, load_controlnet};
use imagegen_engine::pipelines::generate::MaskPrompt;
use imagegen_engine::pipelines::mask_prompt::{load_clipseg, MaskFinder, MaskOptions};
use imagegen_engine::source::{resolve_component, Hub};
use imagegen_engine::Strategy;
use imagegen_engine::{GenerationOutcome, Inputs, LoadOptions, Lora, LoraCache, StableDiffusion};

/// What the worker tells the server once the model is loaded (or failed to load).
pub struct Loaded {
    pub model_name: String,
    pub device: Device,
}

struct Engine {
    model: StableDiffusion,
    loras: LoraCache,
    /// Whose LoRAs the cache holds, published for `GET /v1/load`.
    owners: LoraOwners,
    /// CLIPSeg for mask prompts, loaded on first use.
    finder: Option<MaskFinder>,
    /// The ControlNet of `strategy: canny` (`--controlnet`), loaded on first use.
    controlnet: Option<loading::Loaded<ControlNetModel>>,
    /// The SDXL refiner (`--refiner`), loaded at start.
    refiner: Option<StableDiffusion>,
    /// Where hub ids are fetched from (the model's, and CLIPSeg's on first use).
    hub: Arc<dyn Hub>,
}

/// Runs on the worker thread until the queue shuts down.
pub fn run(shared: Arc<Shared>, loaded: std::sync::mpsc::Sender<Result<Loaded, String>>) {
    let config = &shared.config;
    let engine = (|| -> Result<Engine, String> {
        let device = parse_device(config.device.as_deref(), "device")?;
        check_device(device, "device")?;
        let dtype = parse_dtype(config.dtype.as_deref(), device, "dtype")?;
        let hub = HfHub::shared().map_err(|e| e.to_string())?;
        let mut options = LoadOptions::new(&config.model);
        options.hub = Some(hub.clone());
        options.device = device;
        options.dtype = dtype;
        options.safety = config.safety;
        options.safety_checker = config.safety_checker.clone();
        let model = StableDiffusion::load(&options).map_err(|e| e.to_string())?;
        if let Some(family) = config.family.filter(|f| *f != model.family()) {
            return Err(format!(
                "{} is an {} model, not the {family} the service was told (--family)",
                model.name,
                model.family()
            ));
        }
        let refiner = config
            .refiner
            .as_deref()
            .map(|spec| {
                StableDiffusion::load(&options.for_refiner(spec))
                    .map_err(|e| format!("the refiner {spec}: {e}"))
            })
            .transpose()?;
        Ok(Engine {
            refiner,
            model,
            loras: LoraCache::new(config.lora_cache_bytes as usize),
            owners: LoraOwners::default(),
            finder: None,
            controlnet: None,
            hub,
        })
    })();
    let mut engine = match engine {
        Ok(engine) => {
            let _ = loaded.send(Ok(Loaded {
                model_name: engine.model.name.clone(),
                device: engine.model.device,
            }));
            engine
        }
        Err(message) => {
            let _ = loaded.send(Err(message));
            return;
        }
    };
    let finisher = Finisher::start(shared.clone());
    shared.worker_alive.store(true, Ordering::SeqCst);
    while let Some(pending) = shared.jobs.wait_pending() {
        if let Pending::Control(control) = pending {
            run_control(&engine, control);
            continue;
        }
        // None: a check arrived, or shutdown; the queue says what comes next.
        let Some(_device) = shared.device.inference(|| shared.jobs.has_control()) else {
            continue;
        };
        // None: cancelled or expired while the device was a training's.
        let Some(running) = shared.jobs.try_next() else {
            continue;
        };
        shared.metrics.queue_depth.set(shared.jobs.depth() as i64);
        // Compatible queued jobs join this one in a UNet batch.
        let mut batch = vec![running];
        if let Some(key) = batch[0].work.batch_key.clone() {
            let room = shared
                .config
                .batch_limit
                .saturating_sub(batch[0].work.images);
            if room > 0 {
                let until = Instant::now() + shared.config.batch_window;
                batch.extend(shared.jobs.take_batch_until(&key, room, until));
                shared.metrics.queue_depth.set(shared.jobs.depth() as i64);
            }
        }
        let keys: Vec<JobKey> = batch.iter().map(|r| r.key.clone()).collect();
        // A bug must cost its jobs, not the worker (and with it every later job).
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if batch.len() == 1 {
                run_job(&shared, &mut engine, &finisher, batch.remove(0))
            } else {
                run_batch(&shared, &mut engine, &finisher, batch)
            }
        }));
        if ran.is_err() {
            for key in keys {
                let error = error_detail(codes::INTERNAL, "the job failed unexpectedly", true);
                shared.jobs.finish(&key, Err(error));
            }
        }
    }
    // Every job handed over is answered before the worker counts as stopped.
    finisher.stop();
    shared.worker_alive.store(false, Ordering::SeqCst);
}

/// A generation's images on their way out, with what answering its job needs.
struct Delivery {
    key: JobKey,
    mode: &'static str,
    created: Instant,
    b64: bool,
    outcome: GenerationOutcome,
}

impl Delivery {
    /// Encodes, signs and stores the images, then answers the job; a panic on the way fails
    /// the job (retryable) instead of leaving it running.
    fn answer(self, shared: &Shared) {
        let Delivery {
            key,
            mode,
            created,
            b64,
            outcome,
        } = self;
        let stored = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            store_outcome(shared, &key.0, outcome, b64)
        }))
        .unwrap_or_else(|_| {
            Err(error_detail(
                codes::INTERNAL,
                "storing the images failed",
                true,
            ))
        });
        finish(shared, &key, mode, created, stored);
    }
}

/// The thread that encodes, signs and stores generated images and answers their jobs, in
/// the order the engine finished them. At most [`Finisher::WAITING`] deliveries wait: a
/// slow store then slows the engine rather than filling memory with images.
struct Finisher {
    deliveries: std::sync::mpsc::SyncSender<Delivery>,
    thread: std::thread::JoinHandle<()>,
}

impl Finisher {
    const WAITING: usize = 2;

    fn start(shared: Arc<Shared>) -> Self {
        let (deliveries, received) = std::sync::mpsc::sync_channel::<Delivery>(Self::WAITING);
        let thread = std::thread::Builder::new()
            .name("imagegen-finisher".into())
            .spawn(move || received.into_iter().for_each(|d| d.answer(&shared)))
            .expect("the finisher thread starts");
        Finisher { deliveries, thread }
    }

    /// Hands a finished generation over; waits only while [`Self::WAITING`] are queued.
    fn deliver(&self, shared: &Shared, delivery: Delivery) {
        if let Err(returned) = self.deliveries.send(delivery) {
            // The finisher is gone (it panicked answering a job): answer here instead.
            returned.0.answer(shared);
        }
    }

    /// Waits until every delivery is answered.
    fn stop(self) {
        drop(self.deliveries);
        let _ = self.thread.join();
    }
}

fn run_control(engine: &Engine, control: Control) {
    match control {
        Control::ValidateLora { file, reply } => {
            let result = Lora::load(&file, &engine.model, false)
                .map(|_| ())
                .map_err(|e| e.to_string());
            let _ = reply.send(result);
        }
    }
}

fn run_job(shared: &Shared, engine: &mut Engine, finisher: &Finisher, running: Running) {
    let Running {
        key,
        work,
        cancel,
        deadline,
        created,
    } = running;
    let started = Instant::now();
    let outcome = if Instant::now() >= deadline {
        Err(deadline_error())
    } else {
        generate(shared, engine, &key, &work, &cancel, deadline)
    };
    let steps_done = shared
        .jobs
        .get(&key.0, &key.1)
        .map(|j| j.progress.step)
        .unwrap_or(0);
    record_throughput(shared, engine, steps_done * work.images, started);
    match outcome {
        Ok(outcome) => finisher.deliver(
            shared,
            Delivery {
                key,
                mode: work.mode,
                created,
                b64: work.b64,
                outcome,
            },
        ),
        Err(error) => finish(shared, &key, work.mode, created, Err(error)),
    }
}

fn record_throughput(shared: &Shared, engine: &Engine, image_steps: u32, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    if image_steps > 0 && seconds > 0.0 {
        shared
            .metrics
            .denoise_steps_per_second
            .set(f64::from(image_steps) / seconds);
        shared.metrics.denoise_steps.inc_by(u64::from(image_steps));
    }
    if let Device::Cuda(index) = engine.model.device {
        if let Some(memory) = super::metrics::gpu_memory(index) {
            shared.metrics.gpu_memory_bytes.set(memory.used as i64);
            shared.warm.set_memory(DeviceMemory {
                free_bytes: memory.free,
                total_bytes: memory.total,
            });
        }
    }
}

/// Records a job's end in the metrics, then in the job table (which answers its client).
fn finish(
    shared: &Shared,
    key: &JobKey,
    mode: &str,
    created: Instant,
    outcome: Result<GenerationResult, ErrorDetail>,
) {
    let outcome = outcome.map(super::jobs::Output::Generation);
    // Metrics first: a client answered by `finish` may read them at once.
    let state = match &outcome {
        Ok(_) => "succeeded",
        Err(e) if e.code == codes::CANCELLED => "cancelled",
        Err(_) => "failed",
    };
    shared
        .metrics
        .job_seconds
        .with_label_values(&[mode, state])
        .observe(created.elapsed().as_secs_f64());
    shared.metrics.jobs.with_label_values(&[state]).inc();
    shared.jobs.finish(key, outcome);
}

/// Loads (or finds cached) the LoRAs of `tenant`'s job for the model, then publishes what
/// the cache holds (a load may have evicted others).
fn load_loras(
    shared: &Shared,
    engine: &mut Engine,
    tenant: &str,
    job_loras: &[JobLora],
) -> imagegen_engine::Result<Vec<(Rc<Lora>, f64)>> {
    let mut loras = Vec::new();
    let mut outcome = Ok(());
    for lora in job_loras {
        match engine.loras.get_or_load(&lora.file, &engine.model, false) {
            Ok((loaded, hit)) => {
                if hit {
                    shared.metrics.lora_cache_hits.inc();
                } else {
                    shared.metrics.lora_cache_misses.inc();
                }
                if let Ok(key) = LoraCache::key(&lora.file) {
                    engine.owners.record(key, tenant, &lora.store_path);
                }
                loras.push((loaded, lora.weight));
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    engine.owners.publish(engine.loras.files(), &shared.warm);
    outcome.map(|()| loras)
}

/// Compatible text-to-image jobs in one denoising loop. A member cancelled (or past its
/// deadline) while the batch runs ends cancelled (or failed) when it is done; the loop
/// itself stops only when every member has been stopped.
fn run_batch(shared: &Shared, engine: &mut Engine, finisher: &Finisher, batch: Vec<Running>) {
    let started = Instant::now();
    let (live, expired): (Vec<Running>, Vec<Running>) =
        batch.into_iter().partition(|r| Instant::now() < r.deadline);
    for r in expired {
        finish(
            shared,
            &r.key,
            r.work.mode,
            r.created,
            Err(deadline_error()),
        );
    }
    if live.is_empty() {
        return;
    }
    shared.metrics.batches.inc();
    shared.metrics.batched_jobs.inc_by(live.len() as u64);
    let loras = match load_loras(shared, engine, &live[0].key.0, &live[0].work.loras) {
        Ok(loras) => loras,
        Err(e) => {
            let detail = super::error::ApiError::from_engine(&e).detail;
            for r in &live {
                finish(shared, &r.key, r.work.mode, r.created, Err(detail.clone()));
            }
            return;
        }
    };
    let requests: Vec<_> = live.iter().map(|r| r.work.params.clone()).collect();
    let all_stopped = AtomicBool::new(false);
    let mut steps_done = 0;
    let mut report = |p: imagegen_engine::Progress| {
        steps_done = p.step as u32;
        let now = Instant::now();
        for r in &live {
            shared.jobs.progress(&r.key, p.step as u32, p.total as u32);
            if now >= r.deadline {
                shared.jobs.stop(&r.key, deadline_error());
            }
        }
        if live.iter().all(|r| r.cancel.load(Ordering::SeqCst)) {
            all_stopped.store(true, Ordering::SeqCst);
        }
    };
    let outcomes = pipelines::generate_batch(
        &engine.model,
        &requests,
        &loras,
        &shared.styles,
        &mut report,
        &all_stopped,
    );
    let images: u32 = live.iter().map(|r| r.work.images).sum();
    record_throughput(shared, engine, steps_done * images, started);
    match outcomes {
        Ok(outcomes) => {
            for (r, outcome) in live.iter().zip(outcomes) {
                if r.cancel.load(Ordering::SeqCst) {
                    let reason = shared.jobs.cancel_reason(&r.key);
                    finish(shared, &r.key, r.work.mode, r.created, Err(reason));
                } else {
                    let delivery = Delivery {
                        key: r.key.clone(),
                        mode: r.work.mode,
                        created: r.created,
                        b64: r.work.b64,
                        outcome,
                    };
                    finisher.deliver(shared, delivery);
                }
            }
        }
        Err(e) => {
            for r in &live {
                let detail = engine_error(shared, &r.key, &e);
                finish(shared, &r.key, r.work.mode, r.created, Err(detail));
            }
        }
    }
}

/// A job's error for the engine's: a stopped run ends with the reason it was stopped for.
fn engine_error(shared: &Shared, key: &JobKey, error: &imagegen_engine::Error) -> ErrorDetail {
    match error {
        imagegen_engine::Error::Cancelled => shared.jobs.cancel_reason(key),
        other => super::error::ApiError::from_engine(other).detail,
    }
}

fn generate(
    shared: &Shared,
    engine: &mut Engine,
    key: &JobKey,
    work: &super::jobs::Work,
    cancel: &AtomicBool,
    deadline: Instant,
) -> Result<GenerationOutcome, ErrorDetail> {
    let engine_error = |e: imagegen_engine::Error| engine_error(shared, key, &e);
    let loras = load_loras(shared, engine, &key.0, &work.loras).map_err(engine_error)?;
    if work.mask_prompt.is_some() && engine.finder.is_none() {
        let finder = load_clipseg(
            &shared.config.mask_model,
            Some(engine.hub.as_ref()),
            engine.model.device,
            engine.model.dtype,
        )
        .map_err(|e| {
            error_detail(
                codes::INTERNAL,
                format!("mask prompts need the CLIPSeg model: {e}"),
                false,
            )
        })?;
        engine.finder = Some(finder);
    }
    if work.params.strategy == Some(Strategy::Canny) && engine.controlnet.is_none() {
        engine.controlnet = Some(load_canny_controlnet(shared, engine)?);
    }
    let inputs = Inputs {
        image: work.image.clone(),
        mask: work.mask.clone(),
        controlnet: engine.controlnet.as_ref().map(|c| &c.model),
        refiner: engine.refiner.as_ref(),
        loras,
        mask_prompt: match (&work.mask_prompt, &engine.finder) {
            (Some(prompt), Some(finder)) => Some(MaskPrompt {
                finder,
                prompts: vec![prompt.clone()],
                negative: None,
                // Grown and blurred by the request's maskGrow/maskBlur like a drawn mask.
                options: MaskOptions {
                    grow: 0,
                    blur: 0.0,
                    ..MaskOptions::default()
                },
            }),
            _ => None,
        },
    };
    let mut report = |p: imagegen_engine::Progress| {
        shared.jobs.progress(key, p.step as u32, p.total as u32);
        if Instant::now() >= deadline {
            shared.jobs.stop(key, deadline_error());
        }
    };
    pipelines::generate(
        &engine.model,
        &work.params,
        &inputs,
        &shared.styles,
        &mut report,
        cancel,
    )
    .map_err(engine_error)
}

/// The service's ControlNet (`--controlnet`), fetched through the hub when it is a hub id.
fn load_canny_controlnet(
    shared: &Shared,
    engine: &Engine,
) -> Result<loading::Loaded<ControlNetModel>, ErrorDetail> {
    let unavailable = |message: String| {
        error_detail(
            codes::INTERNAL,
            format!("the canny strategy needs the ControlNet: {message}"),
            false,
        )
    };
    let spec = shared
        .config
        .controlnet
        .as_deref()
        .ok_or_else(|| unavailable("this service has none (--controlnet)".into()))?;
    let dir = resolve_component(spec, Some(engine.hub.as_ref()))
        .map_err(|e| unavailable(e.to_string()))?;
    load_controlnet(&dir, engine.model.device, engine.model.dtype)
        .map_err(|e| unavailable(e.to_string()))
}

/// Encodes the images as PNG (with their metadata and the AI marking) and stores them.
fn store_outcome(
    shared: &Shared,
    tenant: &str,
    outcome: GenerationOutcome,
    b64: bool,
) -> Result<GenerationResult, ErrorDetail> {
    let mut images = Vec::new();
    for generated in &outcome.images {
        let mut png = encode_png(&generated.image, &generated.metadata)
            .map_err(|e| error_detail(codes::INTERNAL, e.to_string(), false))?;
        if let Some(credentials) = &shared.credentials {
            // Signed before hashing and storing: the sha256 in the result is the file's.
            png = credentials
                .sign(&png, super::media::Format::Png)
                .map_err(|e| error_detail(codes::INTERNAL, e, false))?;
        }
        let id = random_id();
        let sha256 = crate::store::hex_sha256(&png);
        let path = crate::store::image_path(tenant, &id);
        let b64_json = b64.then(|| super::media::base64_encode(&png));
        shared
            .runtime
            .block_on(shared.store.put(&path, Bytes::from(png)))
            .map_err(|e| error_detail(codes::INTERNAL, e.to_string(), true))?;
        images.push(ImageResult {
            url: format!("/v1/images/{id}.png"),
            id,
            seed: generated.metadata.seed,
            sha256,
            width: generated.image.width(),
            height: generated.image.height(),
            b64_json,
        });
    }
    let withheld = outcome
        .withheld
        .iter()
        .map(|w| WithheldImage {
            index: w.index as u32,
            seed: w.seed,
            reason: w.reason.clone(),
        })
        .collect();
    Ok(GenerationResult {
        images,
        withheld,
        timings: Default::default(),
    })
}
