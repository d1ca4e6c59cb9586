//! `imagegen bench`: times a model the way the service runs it, through
//! [`pipelines::generate`](imagegen_engine::pipelines::generate()) (text-to-image, safety
//! off): time to ready, denoising throughput per batch size, peak memory and the LoRA switch. One JSON object goes to
//! stdout, a table to stderr. Nothing here judges the numbers.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use imagegen_crds::GenerationParams;
use imagegen_engine::lora;
use imagegen_engine::pipelines;
use imagegen_engine::styles::StyleBook;
use imagegen_engine::train::{train, MixedPrecision, TrainConfig, TrainerEvent};
use imagegen_engine::{Inputs, Lora, StableDiffusion};
use serde::Serialize;
use tch::{Device, Kind};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A local diffusers folder (safetensors weights).
    #[arg(long)]
    model: PathBuf,
    /// cpu, cuda or cuda:N [default: cuda when available].
    #[arg(long)]
    device: Option<String>,
    /// f32, f16 or bf16 [default: f16 on cuda, f32 on cpu].
    #[arg(long)]
    dtype: Option<String>,
    /// Width and height in pixels.
    #[arg(long, default_value_t = 256)]
    size: u32,
    /// Denoising steps (at least 2: the rate is measured between the first and last step).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(2..))]
    steps: u32,
    /// Batch sizes: images per call, denoised together as one guided UNet batch.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batches: Vec<u32>,
    /// Timed runs per batch size (medians are reported), after one warm-up call.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// A LoRA file or folder: also time fusing it into the model and removing it.
    #[arg(long)]
    lora: Option<PathBuf>,
    /// Also time this many DreamBooth-LoRA training steps (batch 1, rank 4, at --size, on
    /// synthetic images) [default: 0, no training].
    #[arg(long, default_value_t = 0)]
    train_steps: u32,
    #[arg(long, default_value = "a photo of an astronaut riding a horse on mars")]
    prompt: String,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim, pndm, euler, euler-a, dpmpp-2m or dpmpp-2m-karras [default: the model's].
    #[arg(long)]
    scheduler: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct BatchResult {
    pub batch: u32,
    /// Denoising steps per second (one step = one guided UNet call on the whole batch).
    pub steps_per_s: f64,
    /// Wall time of the whole call (text encoding, denoising, VAE decode) per image.
    pub seconds_per_image: f64,
    pub images_per_s: f64,
    pub call_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct LoraResult {
    pub load_seconds: f64,
    /// Fuse into the weights and restore them, median.
    pub switch_seconds: f64,
}

#[derive(Debug, Serialize)]
pub struct TrainingResult {
    pub steps: u32,
    pub resolution: u32,
    pub batch: u32,
    pub rank: i64,
    /// Optimizer steps per second, after the first step.
    pub steps_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub implementation: &'static str,
    pub model: String,
    pub device: String,
    pub dtype: String,
    pub threads: i32,
    pub size: u32,
    pub steps: u32,
    pub runs: u32,
    /// Loading the model from local safetensors until it can generate.
    pub ready_seconds: f64,
    pub batches: Vec<BatchResult>,
    /// The process's resident-set high-water mark (VmHWM), MiB.
    pub peak_rss_mib: Option<f64>,
    pub lora: Option<LoraResult>,
    pub training: Option<TrainingResult>,
}

/// The median of `xs` (the mean of the middle two for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Steps per second from the instants at which each step ended: the steps after the
/// first, over the time they took (leaves out text encoding and the first step's set-up).
pub fn step_rate(step_ends: &[f64]) -> Option<f64> {
    let (first, last) = (step_ends.first()?, step_ends.last()?);
    (step_ends.len() >= 2 && last > first).then(|| (step_ends.len() - 1) as f64 / (last - first))
}

/// `VmHWM` of a `/proc/<pid>/status` text, in MiB.
pub fn peak_rss_mib(status: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "f16",
        Kind::BFloat16 => "bf16",
        _ => "f32",
    }
}

fn sync(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

/// One `generate` call: (call seconds, steps per second).
fn timed_call(
    model: &StableDiffusion,
    params: &GenerationParams,
    styles: &StyleBook,
) -> Result<(f64, f64), String> {
    let device = model.device;
    let cancel = AtomicBool::new(false);
    sync(device);
    let start = Instant::now();
    let mut step_ends = Vec::new();
    let mut progress = |_: imagegen_engine::Progress| {
        sync(device);
        step_ends.push(start.elapsed().as_secs_f64());
    };
    let outcome = pipelines::generate(
        model,
        params,
        &Inputs::default(),
        styles,
        &mut progress,
        &cancel,
    )
    .map_err(|e| e.to_string())?;
    sync(device);
    let seconds = start.elapsed().as_secs_f64();
    if outcome.images.len() != params.count.unwrap_or(1) as usize {
        return Err(format!("expected {:?} images", params.count));
    }
    let rate = step_rate(&step_ends).ok_or("too few denoising steps to time")?;
    Ok((seconds, rate))
}

fn lora_switch(model: &StableDiffusion, path: &Path, runs: u32) -> Result<LoraResult, String> {
    let start = Instant::now();
    let lora = Rc::new(Lora::load(path, model, false).map_err(|e| e.to_string())?);
    sync(model.device);
    let load_seconds = start.elapsed().as_secs_f64();
    let loras = [(lora, 1.0)];
    let mut times = Vec::new();
    for _ in 0..runs + 1 {
        sync(model.device);
        let start = Instant::now();
        let fused = lora::fuse_loras(model, &loras).map_err(|e| e.to_string())?;
        fused.unfuse();
        sync(model.device);
        times.push(start.elapsed().as_secs_f64());
    }
    // The first switch is a warm-up.
    Ok(LoraResult {
        load_seconds,
        switch_seconds: median(&times[1..]),
    })
}

/// Trains a throwaway LoRA on three synthetic images for `steps` steps and times it.
fn training_rate(
    model: &StableDiffusion,
    steps: u32,
    resolution: u32,
) -> Result<TrainingResult, String> {
    let dir = std::env::temp_dir().join(format!("imagegen-bench-train-{}", std::process::id()));
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| e.to_string())?;
    for i in 0..3u32 {
        let image = image::RgbImage::from_fn(resolution, resolution, |x, y| {
            image::Rgb([
                (x * 255 / resolution) as u8,
                (y * 255 / resolution) as u8,
                (80 * i) as u8,
            ])
        });
        image
            .save(images.join(format!("{i}.png")))
            .map_err(|e| e.to_string())?;
    }
    let mut config = TrainConfig::new(
        model.name.clone(),
        vec![images],
        "a photo of sks",
        dir.join("out"),
    );
    config.steps = steps;
    config.resolution = resolution;
    config.seed = 0;
    // The trainer expects the frozen model in its mixed precision's dtype: time the
    // precision the model was loaded in.
    config.mixed_precision = match model.dtype {
        tch::Kind::Half => MixedPrecision::Fp16,
        tch::Kind::BFloat16 => MixedPrecision::Bf16,
        _ => MixedPrecision::No,
    };
    // Timed here as `timed_call` does: the trainer's own `elapsed` is read before the
    // event, so a sync in the callback could not hold it back.
    let device = model.device;
    let mut step_ends = Vec::new();
    sync(device);
    let start = Instant::now();
    let result = train(model, &config, &mut |event| {
        if let TrainerEvent::Step { .. } = event {
            sync(device);
            step_ends.push(start.elapsed().as_secs_f64());
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    result.map_err(|e| e.to_string())?;
    Ok(TrainingResult {
        steps,
        resolution,
        batch: config.batch_size,
        rank: config.rank,
        steps_per_s: step_rate(&step_ends).ok_or("too few training steps to time")?,
    })
}

pub fn run(args: BenchArgs) -> Result<(), String> {
    let device = super::parse_device(args.device.as_deref())?;
    let dtype = super::parse_dtype(args.dtype.as_deref(), device)?;
    if let Some(&bad) = args
        .batches
        .iter()
        .find(|&&b| b == 0 || b > imagegen_engine::pipelines::denoise::MAX_COUNT)
    {
        return Err(format!(
            "batch size {bad} is outside 1..={}",
            imagegen_engine::pipelines::denoise::MAX_COUNT
        ));
    }
    let name = args.model.display().to_string();
    sync(device);
    let start = Instant::now();
    let model =
        StableDiffusion::load_dir(&args.model, &name, device, dtype).map_err(|e| e.to_string())?;
    sync(device);
    let ready_seconds = start.elapsed().as_secs_f64();
    eprintln!("ready in {ready_seconds:.2}s");

    let styles = StyleBook::builtin();
    let params = |count: u32, steps: u32| GenerationParams {
        prompt: args.prompt.clone(),
        width: Some(args.size),
        height: Some(args.size),
        steps: Some(steps),
        guidance_scale: Some(args.guidance),
        scheduler: args.scheduler.clone(),
        seed: Some(42),
        count: Some(count),
        ..Default::default()
    };
    let mut batches = Vec::new();
    for &batch in &args.batches {
        // Warm-up: allocator, kernels' first-call set-up.
        timed_call(&model, &params(batch, 2), &styles)?;
        let mut calls = Vec::new();
        let mut rates = Vec::new();
        for run in 0..args.runs {
            let (seconds, rate) = timed_call(&model, &params(batch, args.steps), &styles)?;
            eprintln!("batch {batch} run {run}: {seconds:.2}s, {rate:.3} steps/s");
            calls.push(seconds);
            rates.push(rate);
        }
        let call_seconds = median(&calls);
        batches.push(BatchResult {
            batch,
            steps_per_s: median(&rates),
            seconds_per_image: call_seconds / f64::from(batch),
            images_per_s: f64::from(batch) / call_seconds,
            call_seconds,
        });
    }
    let lora = args
        .lora
        .as_deref()
        .map(|path| lora_switch(&model, path, args.runs))
        .transpose()?;
    let training = (args.train_steps > 0)
        .then(|| training_rate(&model, args.train_steps, args.size))
        .transpose()?;
    let report = Report {
        implementation: "imagegen",
        model: name,
        device: match device {
            Device::Cuda(index) => format!("cuda:{index}"),
            other => format!("{other:?}").to_lowercase(),
        },
        dtype: dtype_name(dtype).to_string(),
        threads: tch::get_num_threads(),
        size: args.size,
        steps: args.steps,
        runs: args.runs,
        ready_seconds,
        batches,
        peak_rss_mib: std::fs::read_to_string("/proc/self/status")
            .ok()
            .as_deref()
            .and_then(peak_rss_mib),
        lora,
        training,
    };
    eprint!("{}", table(&report));
    println!(
        "{}",
        serde_json::to_string(&report).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// The report as a table for people.
pub fn table(r: &Report) -> String {
    let mut out = format!(
        "{} on {} {} ({} threads), {}x{}, {} steps, median of {}\nready: {:.2}s\n",
        r.implementation,
        r.device,
        r.dtype,
        r.threads,
        r.size,
        r.size,
        r.steps,
        r.runs,
        r.ready_seconds
    );
    out += "batch  steps/s  s/image  images/s\n";
    for b in &r.batches {
        out += &format!(
            "{:>5}  {:>7.3}  {:>7.2}  {:>8.3}\n",
            b.batch, b.steps_per_s, b.seconds_per_image, b.images_per_s
        );
    }
    if let Some(mib) = r.peak_rss_mib {
        out += &format!("peak RSS: {mib:.0} MiB\n");
    }
    if let Some(l) = &r.lora {
        out += &format!(
            "LoRA: load {:.3}s, switch (fuse + unfuse) {:.3}s\n",
            l.load_seconds, l.switch_seconds
        );
    }
    if let Some(t) = &r.training {
        out += &format!(
            "training: {:.3} steps/s ({}x{}, batch {}, rank {}, {} steps)\n",
            t.steps_per_s, t.resolution, t.resolution, t.batch, t.rank, t.steps
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn step_rate_skips_the_first_step() {
        assert_eq!(step_rate(&[1.0, 1.5, 2.0, 2.5, 3.0]), Some(2.0));
        assert_eq!(step_rate(&[1.0]), None);
        assert_eq!(step_rate(&[]), None);
    }

    #[test]
    fn peak_rss_from_proc_status() {
        let status = "Name:\timagegen\nVmPeak:\t 9000 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1024 kB\n";
        assert_eq!(peak_rss_mib(status), Some(2.0));
        assert_eq!(peak_rss_mib("Name:\tx\n"), None);
    }

    #[test]
    fn report_json_shape() {
        let report = Report {
            implementation: "imagegen",
            model: "m".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            threads: 2,
            size: 256,
            steps: 10,
            runs: 3,
            ready_seconds: 1.0,
            batches: vec![BatchResult {
                batch: 1,
                steps_per_s: 2.0,
                seconds_per_image: 5.0,
                images_per_s: 0.2,
                call_seconds: 5.0,
            }],
            peak_rss_mib: Some(100.0),
            lora: None,
            training: None,
        };
        let value = serde_json::to_value(&report).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for key in [
            "ready_seconds",
            "batches",
            "peak_rss_mib",
            "lora",
            "dtype",
            "device",
        ] {
            assert!(keys.contains(&key), "{key} missing");
        }
        assert_eq!(value["batches"][0]["steps_per_s"], 2.0);
        assert!(value["lora"].is_null());
        assert!(table(&report).contains("batch  steps/s"));
    }
}
