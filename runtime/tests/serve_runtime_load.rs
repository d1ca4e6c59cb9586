//! `GET /v1/load` and the device's turns between generations and trainings, against the
//! real binary on the fixture model tiny-sd1.

mod serve_support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_support::*;

const LORA_A: &str = "loras/style-a/pytorch_lora_weights.safetensors";
const LORA_B: &str = "loras/style-b/pytorch_lora_weights.safetensors";
const LORA_BOB: &str = "loras/bob-style/pytorch_lora_weights.safetensors";

fn load(server: &Server, token: Option<&str>) -> Value {
    get(server, "/v1/load", token).expect(200)
}

/// Polls `check` until it gives a value, failing with `what` after two minutes.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn state(server: &Server, token: Option<&str>, path: &str) -> String {
    get(server, path, token).json()["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// A job that keeps the worker busy until it is cancelled (the most steps a request may
/// ask for, on a larger image than the others).
fn blocker(id: &str) -> Value {
    let mut body = small("busy", 500);
    body["width"] = json!(256);
    body["height"] = json!(256);
    body["jobId"] = json!(id);
    body
}

/// Median and 99th percentile of `n` calls, in microseconds, on one kept-alive connection.
fn latency(server: &Server, path: &str, token: &str, n: usize) -> (f64, f64) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build();
    let url = server.url(path);
    let mut micros: Vec<f64> = (0..n)
        .map(|_| {
            let started = Instant::now();
            let response = agent
                .get(&url)
                .set("Authorization", &format!("Bearer {token}"))
                .call()
                .expect("a load answer");
            let _ = response.into_string();
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    micros.sort_by(f64::total_cmp);
    (micros[n / 2], micros[(n * 99) / 100])
}

#[test]
fn load_reports_the_queue_the_loras_and_the_device() {
    let server = Server::start(
        "load",
        Options {
            extra: vec!["--queue-size".into(), "7".into()],
            ..Default::default()
        },
    );
    let (a, b) = (Some(TOKEN_A), Some(TOKEN_B));
    // Idle, on the CPU: no memory figures, no LoRAs, nothing running; a job is guessed
    // at 1 s until one has run.
    let idle = json!({
        "queued": 0, "queueCapacity": 7, "running": 0, "secondsPerJob": 1.0,
        "trainings": {"running": false, "queued": 0}, "device": "cpu",
    });
    assert_eq!(load(&server, a), idle);
    assert_eq!(get(&server, "/v1/load", None).error(401).0, "unauthorized");
    assert_eq!(
        request("POST", &server.url("/v1/load"), a, &[], Some(b"")).status,
        405
    );
    for path in ["/healthz", "/v1/load"] {
        let (median, p99) = latency(&server, path, TOKEN_A, 200);
        println!("GET {path} on the idle server: median {median:.0} µs, p99 {p99:.0} µs");
    }

    // After a job with a LoRA, it is loaded: for its tenant only.
    let lora = std::fs::read(lora_fixture()).unwrap();
    post_lora(&server, a, "style-a", &lora).expect(201);
    post_lora(&server, a, "style-b", &lora).expect(201);
    post_lora(&server, b, "bob-style", &lora).expect(201);
    let mut with_a = small("a cat", 2);
    with_a["loras"] = json!([{"name": "style-a"}]);
    post_json(&server, "/v1/generations", a, &with_a).expect(200);
    assert_eq!(load(&server, a)["loadedLoras"], json!([LORA_A]));
    assert!(load(&server, b).get("loadedLoras").is_none());
    // A LoRA given by path is reported by that path; one given as `model` by its file.
    let mut by_path = small("a cat", 2);
    by_path["loras"] = json!([{"name": "b", "path": LORA_B}]);
    post_json(&server, "/v1/generations", a, &by_path).expect(200);
    let mut as_model = small("a dog", 2);
    as_model["model"] = json!("bob-style");
    post_json(&server, "/v1/generations", b, &as_model).expect(200);
    assert_eq!(load(&server, a)["loadedLoras"], json!([LORA_A, LORA_B]));
    assert_eq!(load(&server, b)["loadedLoras"], json!([LORA_BOB]));

    // Jobs queued behind a slow one: counted for everyone, their LoRAs for their tenant.
    assert_eq!(post_async(&server, a, &blocker("busy")).status, 202);
    wait_running(&server, a, "busy");
    let mut q1 = small("one", 3);
    q1["jobId"] = json!("q1");
    q1["loras"] = json!([{"name": "style-a"}]);
    let mut q2 = small("two", 4);
    q2["jobId"] = json!("q2");
    q2["loras"] = json!([{"name": "b", "path": LORA_B}, {"name": "style-a", "weight": 0.5}]);
    let mut q3 = small("three", 3);
    q3["jobId"] = json!("q3");
    q3["model"] = json!("bob-style");
    for (token, body) in [(a, &q1), (a, &q2), (b, &q3)] {
        assert_eq!(post_async(&server, token, body).status, 202);
    }
    let (seen_a, seen_b) = (load(&server, a), load(&server, b));
    assert_eq!(
        state(&server, a, "/v1/jobs/busy"),
        "running",
        "the slow job ended before the load was read"
    );
    for seen in [&seen_a, &seen_b] {
        assert_eq!((&seen["queued"], &seen["running"]), (&json!(3), &json!(1)));
    }
    assert_eq!(seen_a["runningJobs"][0]["id"], "busy");
    assert!(seen_a["runningJobs"][0]["progress"]["step"].as_u64() > Some(0));
    assert_eq!(seen_a["queuedLoras"], json!([LORA_A, LORA_B]));
    assert!(seen_b.get("runningJobs").is_none());
    assert_eq!(seen_b["queuedLoras"], json!([LORA_BOB]));
    for (token, id) in [(a, "q1"), (a, "q2"), (b, "q3"), (a, "busy")] {
        delete(&server, &format!("/v1/jobs/{id}"), token);
    }
    wait_job(&server, a, "busy");
    let after = eventually("the load to settle", || {
        let seen = load(&server, a);
        (seen["running"] == 0).then_some(seen)
    });
    assert_eq!(after["queued"], 0);
    assert!(after.get("queuedLoras").is_none());
}

#[test]
fn trainings_and_generations_take_turns_on_the_device() {
    let server = Server::start("device-turns", Options::default());
    let a = Some(TOKEN_A);
    let upload = post_upload(&server, a, "image/png", &png(64, 64, false)).json();
    let training = |id: &str, name: &str, steps: u32| {
        json!({
            "name": name, "images": [{"uploadId": upload["id"]}],
            "instancePrompt": "a photo of sks dog",
            "steps": steps, "resolution": 64, "rank": 2, "seed": 1, "jobId": id,
        })
    };

    // A training submitted while a generation runs waits, queued, for the generation.
    assert_eq!(post_async(&server, a, &blocker("busy")).status, 202);
    wait_running(&server, a, "busy");
    post_json(
        &server,
        "/v1/trainings",
        a,
        &training("t-short", "short", 2),
    )
    .expect(202);
    let seen = load(&server, a);
    let training_state = state(&server, a, "/v1/trainings/t-short");
    assert_eq!(
        state(&server, a, "/v1/jobs/busy"),
        "running",
        "the generation ended before the training was looked at"
    );
    assert_eq!(training_state, "queued");
    assert_eq!(seen["trainings"], json!({"running": false, "queued": 1}));
    assert_eq!(seen["running"], 1);
    // When the generation ends, the training takes the device.
    assert_eq!(delete(&server, "/v1/jobs/busy", a).status, 202);
    eventually("the short training to succeed", || {
        let state = state(&server, a, "/v1/trainings/t-short");
        assert!(
            ["queued", "running", "succeeded"].contains(&state.as_str()),
            "{state}"
        );
        (state == "succeeded").then_some(())
    });

    // While a training holds the device, generations are accepted and stay queued.
    post_json(
        &server,
        "/v1/trainings",
        a,
        &training("t-long", "long", 100_000),
    )
    .expect(202);
    let step = |server: &Server| {
        get(server, "/v1/trainings/t-long", a).json()["progress"]["step"]
            .as_u64()
            .unwrap_or(0)
    };
    let first = eventually("the long training to start", || {
        Some(step(&server)).filter(|s| *s > 0)
    });
    let mut waiting = small("x", 2);
    waiting["jobId"] = json!("waiting");
    assert_eq!(post_async(&server, a, &waiting).status, 202);
    // Seen queued after the training has run on past the submission.
    eventually("the training to make progress", || {
        (step(&server) > first).then_some(())
    });
    let seen = load(&server, a);
    assert_eq!(state(&server, a, "/v1/jobs/waiting"), "queued");
    assert_eq!(state(&server, a, "/v1/trainings/t-long"), "running");
    assert_eq!(seen["trainings"], json!({"running": true, "queued": 0}));
    assert_eq!((&seen["queued"], &seen["running"]), (&json!(1), &json!(0)));
    // When the training ends, the worker takes the queue again.
    assert_eq!(delete(&server, "/v1/trainings/t-long", a).status, 202);
    let job = wait_job(&server, a, "waiting");
    assert_eq!(job["state"], "succeeded", "{job}");
    let idle = eventually("the device to be free", || {
        let seen = load(&server, a);
        (seen["trainings"]["running"] == false).then_some(seen)
    });
    assert_eq!(idle["trainings"], json!({"running": false, "queued": 0}));
}
