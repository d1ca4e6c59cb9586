//! A bounded load test of `imagegen serve` and its HTTP overhead, on the tiny fixture model.
//! Numbers are printed (run with --nocapture); the assertions are about correctness: every
//! request gets its image or a 429, none is lost or duplicated, memory stays bounded.

mod serve_support;

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use imagegen_engine::pipelines;
use serde_json::json;
use serve_support::*;

const CLIENTS: usize = 50;
const PER_CLIENT: usize = 4;
const STEPS: u32 = 2;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

fn request_body(job_id: &str) -> serde_json::Value {
    let mut body = small("a lighthouse at dusk", STEPS);
    body["jobId"] = json!(job_id);
    body
}

/// Engine call alone vs the same request through HTTP, sequentially, same model and steps.
/// Returns how many images it had the service generate (warm-ups included).
fn overhead(server: &Server) -> usize {
    const RUNS: usize = 30;
    // The server runs libtorch on one thread (OMP_NUM_THREADS=1): so does this process.
    tch::set_num_threads(1);
    let model = imagegen_engine::StableDiffusion::load_dir(
        &fixtures_dir().join("tiny-sd1"),
        "tiny-sd1",
        tch::Device::Cpu,
        tch::Kind::Float,
    )
    .unwrap();
    let styles = imagegen_engine::styles::StyleBook::builtin();
    let params: imagegen_engine::GenerationParams =
        serde_json::from_value(small("a lighthouse at dusk", STEPS)).unwrap();
    let cancel = AtomicBool::new(false);
    let mut engine = Vec::new();
    for i in 0..RUNS + 2 {
        let started = Instant::now();
        let outcome = pipelines::generate(
            &model,
            &params,
            &imagegen_engine::Inputs::default(),
            &styles,
            &mut |_| {},
            &cancel,
        )
        .unwrap();
        assert_eq!(outcome.images.len(), 1);
        if i >= 2 {
            engine.push(started.elapsed().as_secs_f64());
        }
    }
    let mut http = Vec::new();
    let mut worker = Vec::new();
    for i in 0..RUNS + 2 {
        let started = Instant::now();
        let reply = post_json(
            server,
            "/v1/generations",
            Some(TOKEN_A),
            &small("a lighthouse at dusk", STEPS),
        );
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(reply.status, 200);
        if i >= 2 {
            http.push(elapsed);
            worker.push(
                reply.json()["result"]["timings"]["inferenceSeconds"]
                    .as_f64()
                    .unwrap(),
            );
        }
    }
    let (engine, http, worker) = (median_of(engine), median_of(http), median_of(worker));
    println!(
        "overhead (tiny-sd1, 64x64, {STEPS} steps, CPU, 1 thread, median of {RUNS}): \
         engine call {:.1} ms, worker job (engine + PNG + store) {:.1} ms, \
         HTTP end-to-end {:.1} ms; HTTP over the engine call {:+.1} ms, \
         HTTP over the worker's own time {:+.1} ms",
        engine * 1e3,
        worker * 1e3,
        http * 1e3,
        (http - engine) * 1e3,
        (http - worker) * 1e3
    );
    RUNS + 2
}

#[test]
fn bounded_load_every_request_answered_once() {
    let server = Server::start(
        "load",
        Options {
            extra: vec!["--queue-size".into(), "16".into()],
            ..Default::default()
        },
    );
    let earlier = overhead(&server);
    let rss_before = server.rss();

    let started = Instant::now();
    let results: Vec<(String, u16, f64, serde_json::Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let server = &server;
                scope.spawn(move || {
                    let mut out = Vec::new();
                    for n in 0..PER_CLIENT {
                        let id = format!("load-{client}-{n}");
                        let t = Instant::now();
                        let reply =
                            post_json(server, "/v1/generations", Some(TOKEN_A), &request_body(&id));
                        let seconds = t.elapsed().as_secs_f64();
                        let body = reply.json();
                        out.push((id, reply.status, seconds, body));
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();

    let mut ok_latencies = Vec::new();
    let mut rejected = 0;
    let mut images = HashSet::new();
    for (id, status, seconds, body) in &results {
        match status {
            200 => {
                assert_eq!(body["id"], id.as_str(), "the answer is this request's job");
                assert_eq!(body["state"], "succeeded");
                let image = body["result"]["images"][0]["id"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert!(images.insert(image), "an image answered twice");
                ok_latencies.push(*seconds);
            }
            429 => {
                assert_eq!(body["error"]["code"], "queue_full");
                rejected += 1;
                // A refused request left no job behind.
                get(&server, &format!("/v1/jobs/{id}"), Some(TOKEN_A)).error(404);
            }
            other => panic!("request {id}: unexpected status {other}: {body}"),
        }
    }
    assert_eq!(
        results.len(),
        CLIENTS * PER_CLIENT,
        "every request was answered"
    );
    assert!(!ok_latencies.is_empty());
    // Every delivered image is in the store, and nothing else was generated.
    let stored = std::fs::read_dir(server.store.join("tenants/alice/images"))
        .unwrap()
        .count();
    assert_eq!(
        stored,
        ok_latencies.len() + earlier,
        "stored images = answered images"
    );
    let metrics = String::from_utf8(get(&server, "/metrics", None).body).unwrap();
    assert!(
        metrics.contains("imagegen_queue_depth 0"),
        "the queue drained"
    );
    let metric = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("0")
            .to_string()
    };
    println!(
        "batching: {} UNet batches ran {} of the jobs",
        metric("imagegen_batches_total"),
        metric("imagegen_batched_jobs_total")
    );

    ok_latencies.sort_by(f64::total_cmp);
    println!(
        "load: {} requests from {CLIENTS} clients (queue 16, tiny-sd1 64x64, {STEPS} steps, CPU): \
         {:.1} s, {:.1} images/s, {} succeeded, {rejected} refused with 429, \
         latency of successes p50 {:.0} ms, p99 {:.0} ms",
        results.len(),
        wall,
        ok_latencies.len() as f64 / wall,
        ok_latencies.len(),
        percentile(&ok_latencies, 0.5) * 1e3,
        percentile(&ok_latencies, 0.99) * 1e3,
    );

    // Memory: a second identical round leaves the resident size where the first did.
    let rss_after_first = server.rss();
    for round in 0..2 {
        std::thread::scope(|scope| {
            for client in 0..CLIENTS {
                let server = &server;
                scope.spawn(move || {
                    for n in 0..PER_CLIENT {
                        let id = format!("again-{round}-{client}-{n}");
                        let status =
                            post_json(server, "/v1/generations", Some(TOKEN_A), &request_body(&id))
                                .status;
                        assert!(status == 200 || status == 429, "{status}");
                    }
                });
            }
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    let rss_after = server.rss();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "memory: RSS {:.0} MiB before the load, {:.0} MiB after it, {:.0} MiB after two more rounds",
        mib(rss_before),
        mib(rss_after_first),
        mib(rss_after)
    );
    assert!(
        rss_after < rss_after_first + 64 * 1024 * 1024,
        "RSS grew from {:.0} to {:.0} MiB over two more rounds",
        mib(rss_after_first),
        mib(rss_after)
    );
}
