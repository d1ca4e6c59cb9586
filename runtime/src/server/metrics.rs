//! Prometheus metrics of `GET /metrics`.

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub queue_depth: IntGauge,
    pub job_seconds: HistogramVec,
    pub jobs: IntCounterVec,
    pub denoise_steps_per_second: Gauge,
    pub denoise_steps: IntCounter,
    pub lora_cache_hits: IntCounter,
    pub lora_cache_misses: IntCounter,
    pub http_requests: IntCounterVec,
    pub rejected_queue_full: IntCounter,
    pub batches: IntCounter,
    pub batched_jobs: IntCounter,
    pub resident_memory_bytes: IntGauge,
    pub gpu_memory_bytes: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new_custom(Some("imagegen".into()), None)?;
        let queue_depth = IntGauge::new("queue_depth", "Jobs waiting for the worker")?;
        let job_seconds = HistogramVec::new(
            HistogramOpts::new(
                "job_duration_seconds",
                "Time from submission to the end of a job, by mode and outcome",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            &["mode", "state"],
        )?;
        let jobs = IntCounterVec::new(
            Opts::new("jobs_total", "Finished jobs by state"),
            &["state"],
        )?;
        let denoise_steps_per_second = Gauge::new(
            "denoise_steps_per_second",
            "Denoising throughput of the last job (steps of all its images per second)",
        )?;
        let denoise_steps = IntCounter::new("denoise_steps_total", "Denoising steps run")?;
        let lora_cache_hits = IntCounter::new("lora_cache_hits_total", "LoRAs found loaded")?;
        let lora_cache_misses =
            IntCounter::new("lora_cache_misses_total", "LoRAs loaded from their file")?;
        let http_requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by status"),
            &["status"],
        )?;
        let rejected_queue_full =
            IntCounter::new("rejected_queue_full_total", "Requests refused with 429")?;
        let batches = IntCounter::new(
            "batches_total",
            "UNet batches that ran several compatible jobs together",
        )?;
        let batched_jobs =
            IntCounter::new("batched_jobs_total", "Jobs that ran in a shared UNet batch")?;
        let resident_memory_bytes =
            IntGauge::new("resident_memory_bytes", "Resident set size of the process")?;
        let gpu_memory_bytes = IntGauge::new(
            "gpu_memory_used_bytes",
            "GPU memory in use on the device (nvidia-smi), when serving on CUDA",
        )?;
        for collector in [
            Box::new(queue_depth.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(job_seconds.clone()),
            Box::new(jobs.clone()),
            Box::new(denoise_steps_per_second.clone()),
            Box::new(denoise_steps.clone()),
            Box::new(lora_cache_hits.clone()),
            Box::new(lora_cache_misses.clone()),
            Box::new(http_requests.clone()),
            Box::new(rejected_queue_full.clone()),
            Box::new(batches.clone()),
            Box::new(batched_jobs.clone()),
            Box::new(resident_memory_bytes.clone()),
            Box::new(gpu_memory_bytes.clone()),
        ] {
            registry.register(collector)?;
        }
        Ok(Metrics {
            registry,
            queue_depth,
            job_seconds,
            jobs,
            denoise_steps_per_second,
            denoise_steps,
            lora_cache_hits,
            lora_cache_misses,
            http_requests,
            rejected_queue_full,
            batches,
            batched_jobs,
            resident_memory_bytes,
            gpu_memory_bytes,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        if let Some(rss) = resident_bytes() {
            self.resident_memory_bytes.set(rss as i64);
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// VmRSS of this process (Linux), in bytes.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A GPU's memory in bytes, as nvidia-smi reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuMemory {
    pub used: u64,
    pub free: u64,
    pub total: u64,
}

/// The memory of GPU `index` as nvidia-smi reports it (libtorch's allocator statistics
/// are not exposed by tch), in one call.
pub fn gpu_memory(index: usize) -> Option<GpuMemory> {
    let output = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=memory.used,memory.free,memory.total",
            "--format=csv,noheader,nounits",
            &format!("--id={index}"),
        ])
        .output()
        .ok()?;
    parse_gpu_memory(&String::from_utf8(output.stdout).ok()?)
}

/// `used, free, total` in MiB, one line.
fn parse_gpu_memory(text: &str) -> Option<GpuMemory> {
    let mut mib = text
        .trim()
        .split(',')
        .map(|field| field.trim().parse::<u64>().ok().map(|v| v * 1024 * 1024));
    let memory = GpuMemory {
        used: mib.next()??,
        free: mib.next()??,
        total: mib.next()??,
    };
    mib.next().is_none().then_some(memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_memory_is_read_from_one_line() {
        let mib = 1024 * 1024;
        assert_eq!(
            parse_gpu_memory("1203, 79867, 81559\n"),
            Some(GpuMemory {
                used: 1203 * mib,
                free: 79867 * mib,
                total: 81559 * mib
            })
        );
        assert_eq!(parse_gpu_memory("[N/A], 1, 2"), None);
        assert_eq!(parse_gpu_memory("1, 2"), None);
        assert_eq!(parse_gpu_memory("1, 2, 3\n4, 5, 6"), None);
    }

    #[test]
    fn metrics_render_with_their_names() {
        let m = Metrics::new().unwrap();
        m.queue_depth.set(3);
        m.job_seconds
            .with_label_values(&["text-to-image", "succeeded"])
            .observe(0.5);
        let text = m.render();
        assert!(text.contains("imagegen_queue_depth 3"), "{text}");
        assert!(
            text.contains("imagegen_job_duration_seconds_bucket"),
            "{text}"
        );
    }
}
