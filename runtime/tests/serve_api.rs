//! Black-box tests of `imagegen serve`: the real binary on the fixture model tiny-sd1.

mod serve_support;

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::json;
use serve_support::*;

const MARK: &[u8] = b"trainedAlgorithmicMedia";

fn has_mark(bytes: &[u8]) -> bool {
    bytes.windows(MARK.len()).any(|w| w == MARK)
}

#[test]
fn generations_jobs_events_and_images() {
    let server = Server::start("gen", Options::default());
    let a = Some(TOKEN_A);

    // Synchronous: 200 and the finished job.
    let reply = post_json(&server, "/v1/generations", a, &small("a cat", 3));
    let job = reply.expect(200);
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["kind"], "generation");
    let image = &job["result"]["images"][0];
    assert_eq!(
        (image["width"].as_u64(), image["height"].as_u64()),
        (Some(64), Some(64))
    );
    assert_eq!(image["seed"], 7);
    assert!(image.get("b64Json").is_none());
    assert!(job["result"]["timings"]["totalSeconds"].as_f64().unwrap() > 0.0);

    // The image, its hash, each format with the AI-generated marking.
    let url = image["url"].as_str().unwrap();
    let png = get(&server, url, a);
    assert_eq!(png.status, 200);
    assert_eq!(png.header("content-type"), Some("image/png"));
    assert_eq!(image["sha256"], hex_sha256(&png.body));
    assert!(has_mark(&png.body), "PNG carries the XMP marking");
    let meta = imagegen_engine::image::output::read_metadata(&png.body).unwrap();
    assert_eq!(meta["prompt"], "a cat");
    let id = image["id"].as_str().unwrap();
    for (ext, ct, format) in [
        ("jpg", "image/jpeg", image::ImageFormat::Jpeg),
        ("webp", "image/webp", image::ImageFormat::WebP),
    ] {
        let r = get(&server, &format!("/v1/images/{id}.{ext}"), a);
        assert_eq!((r.status, r.header("content-type")), (200, Some(ct)));
        let decoded = image::load_from_memory_with_format(&r.body, format).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (64, 64));
        assert!(has_mark(&r.body), "{ext} carries the XMP marking");
    }
    let by_accept = request(
        "GET",
        &server.url(&format!("/v1/images/{id}")),
        a,
        &[("Accept", "image/webp")],
        None,
    );
    assert_eq!(by_accept.header("content-type"), Some("image/webp"));
    let none = request(
        "GET",
        &server.url(&format!("/v1/images/{id}")),
        a,
        &[("Accept", "text/html")],
        None,
    );
    assert_eq!(none.status, 406);
    get(&server, &format!("/v1/images/{id}.gif"), a).error(404);
    // Deleting an image (as the operator does when its resource goes).
    let doomed = post_json(&server, "/v1/generations", a, &small("x", 1)).json();
    let doomed_id = doomed["result"]["images"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        delete(&server, &format!("/v1/images/{doomed_id}"), a).status,
        204
    );
    get(&server, &format!("/v1/images/{doomed_id}.png"), a).error(404);
    delete(&server, &format!("/v1/images/{doomed_id}"), a).error(404);

    // Asynchronous: 202, Location, then the job and its events.
    let mut body = small("a dog", 6);
    body["jobId"] = json!("async-1");
    body["responseFormat"] = json!("b64Json");
    let accepted = post_async(&server, a, &body);
    assert_eq!(accepted.status, 202);
    assert_eq!(accepted.header("location"), Some("/v1/jobs/async-1"));
    assert_eq!(accepted.json()["id"], "async-1");
    let events = sse(&server, a, "async-1");
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.last(), Some(&"succeeded"), "{names:?}");
    assert!(names
        .iter()
        .all(|n| ["queued", "progress", "succeeded"].contains(n)));
    for (name, data) in &events {
        assert_eq!(data["type"], *name);
    }
    let done = wait_job(&server, a, "async-1");
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["progress"]["percent"], 100);
    let b64 = done["result"]["images"][0]["b64Json"].as_str().unwrap();
    let decoded = base64_decode(b64);
    assert_eq!(
        image::guess_format(&decoded).unwrap(),
        image::ImageFormat::Png
    );
    // Events of a finished job: just the end.
    let again = sse(&server, a, "async-1");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].0, "succeeded");
    assert_eq!(again[0].1["job"]["id"], "async-1");

    // A watched job from the start: queued or progress, steps rising, then succeeded.
    let mut long = small("a fox", 30);
    long["jobId"] = json!("watched");
    assert_eq!(post_async(&server, a, &long).status, 202);
    let events = sse(&server, a, "watched");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .filter_map(|(_, d)| d["step"].as_u64())
        .collect();
    assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{steps:?}");
    assert!(steps.iter().any(|s| *s > 0));
    assert_eq!(events.last().unwrap().0, "succeeded");

    // Idempotent job ids: the same request returns the same job; another body is 409.
    let same = post_async(&server, a, &body);
    assert_eq!(same.status, 202);
    assert_eq!(same.json()["id"], "async-1");
    assert_eq!(same.json()["state"], "succeeded", "no second run");
    let mut other = body.clone();
    other["prompt"] = json!("something else");
    let (code, field) = post_async(&server, a, &other).error(409);
    assert_eq!(
        (code.as_str(), field.as_deref()),
        ("conflict", Some("jobId"))
    );

    // Styles.
    let styles = get(&server, "/v1/styles", a).json();
    let style = styles[0]["id"].as_str().unwrap().to_string();
    let mut styled = small("a cat", 2);
    styled["style"] = json!(style);
    assert_eq!(
        post_json(&server, "/v1/generations", a, &styled).status,
        200
    );

    // Image-to-image and inpainting from an upload, base64 and a store path.
    let upload = post_upload(&server, a, "image/png", &serve_support::png(64, 64, false));
    assert_eq!(
        upload.status,
        201,
        "{}",
        String::from_utf8_lossy(&upload.body)
    );
    let upload = upload.json();
    assert_eq!(
        (upload["width"].as_u64(), upload["contentType"].as_str()),
        (Some(64), Some("image/png"))
    );
    let (ct, form) = multipart(&[(
        "file",
        Some("x.png"),
        Some("image/png"),
        &serve_support::png(64, 64, false),
    )]);
    let multi = post_upload(&server, a, &ct, &form);
    assert_eq!(multi.status, 201);
    let mut i2i = small("a cat", 4);
    i2i["image"] = json!({"uploadId": upload["id"]});
    i2i["strength"] = json!(0.5);
    let r = post_json(&server, "/v1/generations", a, &i2i);
    r.expect(200);
    let mut inpaint = small("a cat", 4);
    inpaint["image"] = json!({"base64": base64_encode(&serve_support::png(64, 64, false))});
    inpaint["mask"] = json!({"uploadId": multi.json()["id"]});
    let r = post_json(&server, "/v1/generations", a, &inpaint);
    r.expect(200);
    std::fs::create_dir_all(server.store.join("tenants/alice/photos")).unwrap();
    std::fs::write(
        server.store.join("tenants/alice/photos/p.png"),
        serve_support::png(64, 64, false),
    )
    .unwrap();
    let mut by_path = small("a cat", 3);
    by_path["image"] = json!({"path": "photos/p.png"});
    assert_eq!(
        post_json(&server, "/v1/generations", a, &by_path).status,
        200
    );
    // Our own image URL as an input.
    let mut chained = small("a cat", 3);
    chained["image"] = json!({"url": url});
    assert_eq!(
        post_json(&server, "/v1/generations", a, &chained).status,
        200
    );
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

#[test]
fn every_error_has_its_code_and_status() {
    let server = Server::start(
        "errors",
        Options {
            extra: vec![
                "--max-body-bytes".into(),
                "200000".into(),
                "--queue-size".into(),
                "1".into(),
            ],
            ..Default::default()
        },
    );
    let a = Some(TOKEN_A);
    let gen = "/v1/generations";

    // 401
    assert_eq!(
        post_json(&server, gen, None, &small("x", 1)).error(401).0,
        "unauthorized"
    );
    assert_eq!(
        post_json(&server, gen, Some("wrong-token-123"), &small("x", 1))
            .error(401)
            .0,
        "unauthorized"
    );
    // 400: not JSON, unknown field, missing prompt
    let r = request(
        "POST",
        &server.url(gen),
        a,
        &[("Content-Type", "application/json")],
        Some(b"{not json"),
    );
    assert_eq!(r.error(400).0, "bad_request");
    assert_eq!(
        post_json(&server, gen, a, &json!({"prompt": "x", "stepz": 3}))
            .error(400)
            .0,
        "bad_request"
    );
    assert_eq!(
        post_json(&server, gen, a, &json!({"steps": 3}))
            .error(400)
            .0,
        "bad_request"
    );
    // 415
    let r = request(
        "POST",
        &server.url(gen),
        a,
        &[("Content-Type", "text/plain")],
        Some(b"{}"),
    );
    assert_eq!(r.error(415).0, "unsupported_media_type");
    let r = post_upload(&server, a, "image/png", b"GIF89a not an image");
    assert_eq!(r.error(415).0, "unsupported_media_type");
    // 413
    // Refused from Content-Length alone, before the body is read.
    let answer = head_only(
        &server,
        &format!("POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\nContent-Type: image/png\r\nContent-Length: 300000\r\n\r\n"),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"code\":\"payload_too_large\""),
        "{answer}"
    );
    // A body without a length is cut off at the limit too.
    let big = base64_encode(&vec![0u8; 300_000]);
    let mut inline = small("x", 1);
    inline["image"] = json!({"base64": big});
    let answer = head_only(
        &server,
        &format!("POST /v1/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{inline}\r\n0\r\n\r\n", inline.to_string().len()),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // 422 naming the field
    let p = "x".repeat(3000);
    for (body, field) in [
        (json!({"prompt": "x", "steps": 501}), "steps"),
        (json!({"prompt": "x", "steps": 0}), "steps"),
        (json!({"prompt": "x", "count": 17}), "count"),
        (json!({"prompt": "x", "width": 65}), "width"),
        (json!({"prompt": "x", "height": 4096}), "height"),
        (json!({"prompt": p}), "prompt"),
        (json!({"prompt": ""}), "prompt"),
        (
            json!({"prompt": "x", "negativePrompt": p}),
            "negativePrompt",
        ),
        (json!({"prompt": "x", "style": "no-such-style"}), "style"),
        (json!({"prompt": "x", "scheduler": "nope"}), "scheduler"),
        (
            json!({"prompt": "x", "guidanceScale": 1000.0}),
            "guidanceScale",
        ),
        (json!({"prompt": "x", "jobId": "UPPER"}), "jobId"),
        (
            json!({"prompt": "x", "webhookUrl": "http://evil.example/"}),
            "webhookUrl",
        ),
        (
            json!({"prompt": "x", "image": {"path": "../bob/uploads/x"}}),
            "image",
        ),
        (
            json!({"prompt": "x", "image": {"url": "http://169.254.169.254/latest"}}),
            "image",
        ),
        (json!({"prompt": "x", "image": {"base64": "!!!"}}), "image"),
        (
            json!({"prompt": "x", "loras": [{"name": "a", "weight": 9.0}]}),
            "loras[0].weight",
        ),
        (
            json!({"prompt": "x", "mode": "Inpaint", "steps": 2, "width": 64, "height": 64}),
            "image",
        ),
    ] {
        let (code, got) = post_json(&server, gen, a, &body).error(422);
        assert_eq!(
            (code.as_str(), got.as_deref()),
            ("invalid_field", Some(field)),
            "{body}"
        );
    }
    // Mask and image of different sizes.
    let mut mismatch = small("x", 2);
    mismatch["image"] = json!({"base64": base64_encode(&png(64, 64, false))});
    mismatch["mask"] = json!({"base64": base64_encode(&png(32, 32, false))});
    assert_eq!(
        post_json(&server, gen, a, &mismatch)
            .error(422)
            .1
            .as_deref(),
        Some("mask")
    );
    // 404: job, image, upload, LoRA, model, route
    assert_eq!(get(&server, "/v1/jobs/nope", a).error(404).0, "not_found");
    get(&server, "/v1/images/0123.png", a).error(404);
    let mut missing = small("x", 1);
    missing["image"] = json!({"uploadId": "nope"});
    assert_eq!(
        post_json(&server, gen, a, &missing).error(404).1.as_deref(),
        Some("image")
    );
    let mut lora = small("x", 1);
    lora["loras"] = json!([{"name": "nope"}]);
    assert_eq!(
        post_json(&server, gen, a, &lora).error(404).1.as_deref(),
        Some("loras[0]")
    );
    let mut model = small("x", 1);
    model["model"] = json!("no-such-model");
    assert_eq!(
        post_json(&server, gen, a, &model).error(404).1.as_deref(),
        Some("model")
    );
    get(&server, "/v1/nothing", a).error(404);
    delete(&server, "/v1/loras/nope", a).error(404);
    // 405
    assert_eq!(
        request("PUT", &server.url(gen), a, &[], Some(b"")).status,
        405
    );
    // The served model by name works.
    let mut named = small("x", 1);
    named["model"] = json!("tiny-sd1");
    assert_eq!(post_json(&server, gen, a, &named).status, 200);
    // 409: cancelling a finished job
    let mut done = small("x", 1);
    done["jobId"] = json!("finished");
    assert_eq!(post_json(&server, gen, a, &done).status, 200);
    assert_eq!(
        delete(&server, "/v1/jobs/finished", a).error(409).0,
        "conflict"
    );
    // 429 with Retry-After: one running, one queued (queue of 1), the next refused.
    let mut long = small("x", 500);
    long["jobId"] = json!("long-1");
    assert_eq!(post_async(&server, a, &long).status, 202);
    wait_running(&server, a, "long-1");
    long["jobId"] = json!("long-2");
    assert_eq!(post_async(&server, a, &long).status, 202);
    long["jobId"] = json!("long-3");
    let r = post_async(&server, a, &long);
    assert_eq!(r.error(429).0, "queue_full");
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(r.json()["error"]["retryable"], true);
    delete(&server, "/v1/jobs/long-2", a);
    delete(&server, "/v1/jobs/long-1", a);
    // 504: the deadline passes while running.
    wait_job(&server, a, "long-1");
    let mut slow = small("x", 500);
    slow["deadlineSeconds"] = json!(1);
    let r = post_json(&server, gen, a, &slow);
    assert_eq!(r.error(504).0, "deadline_exceeded");
}

#[test]
fn cancellation_between_steps_and_on_disconnect() {
    let server = Server::start("cancel", Options::default());
    let a = Some(TOKEN_A);
    let mut long = small("x", 500);
    long["jobId"] = json!("c-running");
    assert_eq!(post_async(&server, a, &long).status, 202);
    // Another step count: it cannot join the running job's batch.
    long["jobId"] = json!("c-queued");
    long["steps"] = json!(499);
    assert_eq!(post_async(&server, a, &long).status, 202);
    wait_running(&server, a, "c-running");
    // A queued job is cancelled at once.
    let r = delete(&server, "/v1/jobs/c-queued", a);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "cancelled");
    // A running one stops at the next step.
    let r = delete(&server, "/v1/jobs/c-running", a);
    assert_eq!(r.status, 202);
    let job = wait_job(&server, a, "c-running");
    assert_eq!(job["state"], "cancelled");
    assert!(job["progress"]["step"].as_u64().unwrap() < job["progress"]["total"].as_u64().unwrap());
    assert_eq!(job["error"]["code"], "cancelled");
    let events = sse(&server, a, "c-running");
    assert_eq!(events.last().unwrap().0, "cancelled");

    // A synchronous client that goes away cancels its job.
    let mut body = small("x", 500);
    body["jobId"] = json!("c-disconnect");
    let text = body.to_string();
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    write!(
        stream,
        "POST /v1/generations HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {TOKEN_A}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .unwrap();
    wait_running(&server, a, "c-disconnect");
    drop(stream);
    let job = wait_job(&server, a, "c-disconnect");
    assert_eq!(job["state"], "cancelled", "{job}");
    assert!(job["error"]["message"]
        .as_str()
        .unwrap()
        .contains("disconnect"));
    // The worker is free again.
    assert_eq!(
        post_json(&server, "/v1/generations", a, &small("x", 2)).status,
        200
    );
}

#[test]
fn tenants_see_only_their_own_things() {
    let server = Server::start("tenants", Options::default());
    let (a, b) = (Some(TOKEN_A), Some(TOKEN_B));
    let mut body = small("x", 2);
    body["jobId"] = json!("shared-id");
    let job = post_json(&server, "/v1/generations", a, &body).json();
    let image = job["result"]["images"][0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    let upload = post_upload(&server, a, "image/png", &png(64, 64, false)).json();
    let lora = std::fs::read(lora_fixture()).unwrap();
    let r = request(
        "POST",
        &server.url("/v1/loras?name=alice-style"),
        a,
        &[("Content-Type", "application/octet-stream")],
        Some(&lora),
    );
    r.expect(201);

    assert_eq!(
        get(&server, "/v1/jobs/shared-id", b).error(404).0,
        "not_found"
    );
    get(&server, "/v1/jobs/shared-id/events", b).error(404);
    delete(&server, "/v1/jobs/shared-id", b).error(404);
    get(&server, &image, b).error(404);
    let mut uses_upload = small("x", 1);
    uses_upload["image"] = json!({"uploadId": upload["id"]});
    post_json(&server, "/v1/generations", b, &uses_upload).error(404);
    let mut uses_path = small("x", 1);
    uses_path["image"] = json!({"path": format!("uploads/{}", upload["id"].as_str().unwrap())});
    post_json(&server, "/v1/generations", b, &uses_path).error(404);
    let mut uses_lora = small("x", 1);
    uses_lora["loras"] = json!([{"name": "alice-style"}]);
    post_json(&server, "/v1/generations", b, &uses_lora).error(404);
    assert_eq!(get(&server, "/v1/loras", b).json(), json!([]));
    delete(&server, "/v1/loras/alice-style", b).error(404);
    // Bob may use the same job id for his own job.
    let bobs = post_json(&server, "/v1/generations", b, &body);
    assert_eq!(bobs.status, 200);
    assert_ne!(
        bobs.json()["result"]["images"][0]["id"],
        job["result"]["images"][0]["id"]
    );
    delete(&server, &image, b).error(404);
    // Alice still has all of it.
    assert_eq!(get(&server, &image, a).status, 200);
    assert_eq!(
        get(&server, "/v1/loras", a).json()[0]["name"],
        "alice-style"
    );
}

#[test]
fn loras_upload_list_use_delete() {
    let server = Server::start("loras", Options::default());
    let a = Some(TOKEN_A);
    let lora = std::fs::read(lora_fixture()).unwrap();
    let r = post_lora(&server, a, "style-a", &lora);
    let info = r.expect(201);
    assert_eq!(info["name"], "style-a");
    assert_eq!(info["source"], "upload");
    assert_eq!(info["sizeBytes"].as_u64(), Some(lora.len() as u64));
    // Duplicate name: 409. Not a LoRA: 422, nothing stored.
    let r = post_lora(&server, a, "style-a", &lora);
    assert_eq!(r.error(409).0, "conflict");
    let r = request(
        "POST",
        &server.url("/v1/loras?name=junk"),
        a,
        &[("Content-Type", "application/octet-stream")],
        Some(b"not safetensors"),
    );
    assert_eq!(r.error(422).1.as_deref(), Some("file"));
    let r = request(
        "POST",
        &server.url("/v1/loras?name=../x"),
        a,
        &[("Content-Type", "application/octet-stream")],
        Some(&lora),
    );
    assert_eq!(r.error(422).1.as_deref(), Some("name"));
    let list = get(&server, "/v1/loras", a).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // Used by name in `loras` and as `model`; the weight changes the image.
    let base = post_json(&server, "/v1/generations", a, &small("a cat", 3)).json();
    let mut with = small("a cat", 3);
    with["loras"] = json!([{"name": "style-a", "weight": 1.0}]);
    let styled = post_json(&server, "/v1/generations", a, &with).json();
    assert_eq!(styled["state"], "succeeded");
    assert_ne!(
        base["result"]["images"][0]["sha256"],
        styled["result"]["images"][0]["sha256"]
    );
    let mut as_model = small("a cat", 3);
    as_model["model"] = json!("style-a");
    let by_model = post_json(&server, "/v1/generations", a, &as_model).json();
    let png1 = get(
        &server,
        styled["result"]["images"][0]["url"].as_str().unwrap(),
        a,
    )
    .body;
    let png2 = get(
        &server,
        by_model["result"]["images"][0]["url"].as_str().unwrap(),
        a,
    )
    .body;
    let pixels = |b: &[u8]| image::load_from_memory(b).unwrap().to_rgb8().into_raw();
    assert_eq!(
        pixels(&png1),
        pixels(&png2),
        "model=<lora> is the LoRA at weight 1"
    );
    // By store path (how the operator passes a training's artifact).
    let mut by_path = small("a cat", 3);
    by_path["loras"] =
        json!([{"name": "t", "path": "loras/style-a/pytorch_lora_weights.safetensors"}]);
    assert_eq!(
        post_json(&server, "/v1/generations", a, &by_path).status,
        200
    );
    let hits = metric(&server, "imagegen_lora_cache_hits_total");
    assert!(hits >= 1.0, "LoRA cache hits: {hits}");

    assert_eq!(delete(&server, "/v1/loras/style-a", a).status, 204);
    assert_eq!(get(&server, "/v1/loras", a).json(), json!([]));
    post_json(&server, "/v1/generations", a, &with).error(404);
}

/// A LoRA file that came into the store without the API (a training Job of the operator) is
/// listed from the file itself, hashed once: the description is kept beside it and reused
/// until the file changes.
#[test]
fn a_lora_written_to_the_store_is_described_once() {
    let server = Server::start("lora-described", Options::default());
    let a = Some(TOKEN_A);
    let dir = server.store.join("tenants/alice/loras/direct");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pytorch_lora_weights.safetensors");
    let lora = std::fs::read(lora_fixture()).unwrap();
    std::fs::write(&file, &lora).unwrap();

    let listed = get(&server, "/v1/loras", a).json();
    assert_eq!(listed[0]["name"], "direct");
    assert_eq!(listed[0]["source"], "training");
    assert_eq!(listed[0]["sizeBytes"], lora.len() as u64);
    assert_eq!(listed[0]["sha256"], hex_sha256(&lora));
    assert_eq!(get(&server, "/v1/loras", Some(TOKEN_B)).json(), json!([]));

    // The description is kept: a listing reads it instead of the file.
    let info_file = dir.join("info.json");
    let mut info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&info_file).unwrap()).unwrap();
    assert_eq!(info["sha256"], hex_sha256(&lora));
    info["sha256"] = json!("0".repeat(64));
    std::fs::write(&info_file, info.to_string()).unwrap();
    assert_eq!(
        get(&server, "/v1/loras", a).json()[0]["sha256"],
        "0".repeat(64)
    );

    // A file replaced since is described anew.
    let replaced = b"another LoRA file".to_vec();
    std::fs::write(&file, &replaced).unwrap();
    let listed = get(&server, "/v1/loras", a).json();
    assert_eq!(listed[0]["sha256"], hex_sha256(&replaced));
    assert_eq!(listed[0]["sizeBytes"], replaced.len() as u64);
}

#[test]
fn webhooks_are_signed() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let secret = "webhook-secret-xyz";
    let server = Server::start(
        "webhook",
        Options {
            extra: vec![
                "--webhook-hosts".into(),
                format!("127.0.0.1:{port}"),
                "--webhook-secret".into(),
                secret.into(),
            ],
            ..Default::default()
        },
    );
    let a = Some(TOKEN_A);
    let mut body = small("x", 2);
    body["jobId"] = json!("hooked");
    body["webhookUrl"] = json!(format!("http://127.0.0.1:{port}/hook"));
    assert_eq!(post_async(&server, a, &body).status, 202);
    listener.set_nonblocking(false).unwrap();
    let (mut conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let (head, payload) = read_http_request(&mut conn);
    conn.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    assert!(head.starts_with("POST /hook "), "{head}");
    let signature = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-imagegen-signature")
                .then(|| v.trim().to_string())
        })
        .expect("signature header");
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(&payload);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(signature, format!("sha256={expected}"));
    let job: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        (job["id"].as_str(), job["state"].as_str()),
        (Some("hooked"), Some("succeeded"))
    );
    // Another port of the same host is not on the list.
    body["jobId"] = json!("not-hooked");
    body["webhookUrl"] = json!(format!("http://127.0.0.1:{}/hook", port + 1));
    assert_eq!(
        post_async(&server, a, &body).error(422).1.as_deref(),
        Some("webhookUrl")
    );
}

/// Reads one HTTP/1.1 request with a Content-Length body.
fn read_http_request(conn: &mut std::net::TcpStream) -> (String, Vec<u8>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early");
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while data.len() < end + 4 + length {
                let n = conn.read(&mut buf).unwrap();
                assert!(n > 0, "connection closed early");
                data.extend_from_slice(&buf[..n]);
            }
            return (head, data[end + 4..end + 4 + length].to_vec());
        }
    }
}

#[test]
fn health_metrics_and_openapi() {
    let server = Server::start("health", Options::default());
    assert_eq!(get(&server, "/healthz", None).json()["status"], "ok");
    assert_eq!(get(&server, "/readyz", None).json()["status"], "ready");
    post_json(&server, "/v1/generations", Some(TOKEN_A), &small("x", 2));
    let metrics = String::from_utf8(get(&server, "/metrics", None).body).unwrap();
    for name in [
        "imagegen_queue_depth",
        "imagegen_job_duration_seconds_bucket{mode=\"text-to-image\",state=\"succeeded\"",
        "imagegen_denoise_steps_per_second",
        "imagegen_lora_cache_hits_total",
        "imagegen_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let doc = get(&server, "/openapi.json", None).json();
    assert_eq!(doc["openapi"], "3.1.0");
    // Every route this file exercises is documented.
    for (method, path) in [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("post", "/v1/generations"),
        ("get", "/v1/jobs/{id}"),
        ("delete", "/v1/jobs/{id}"),
        ("get", "/v1/jobs/{id}/events"),
        ("post", "/v1/uploads"),
        ("get", "/v1/images/{id}"),
        ("delete", "/v1/images/{id}"),
        ("get", "/v1/styles"),
        ("get", "/v1/load"),
        ("get", "/v1/loras"),
        ("post", "/v1/loras"),
        ("delete", "/v1/loras/{name}"),
        ("post", "/v1/images/generations"),
        ("post", "/v1/images/edits"),
        ("post", "/v1/trainings"),
        ("get", "/v1/trainings/{id}"),
        ("delete", "/v1/trainings/{id}"),
        ("get", "/v1/trainings/{id}/events"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} not documented"
        );
    }
    assert!(doc["components"]["schemas"]["GenerationRequest"].is_object());
    // ...and every documented operation reaches a handler: neither 405 nor "no route".
    for (path, operations) in doc["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", "no-such-id")
            .replace("{name}", "no-such-name");
        for method in operations.as_object().unwrap().keys() {
            let body = (method == "post").then_some(&b""[..]);
            let reply = request(
                &method.to_uppercase(),
                &server.url(&concrete),
                Some(TOKEN_A),
                &[],
                body,
            );
            let text = String::from_utf8_lossy(&reply.body);
            assert!(
                reply.status != 405 && !text.contains("no route"),
                "{method} {path}: {} {text}",
                reply.status
            );
        }
    }
}

#[test]
fn graceful_shutdown_finishes_the_running_job_and_fails_the_queued_ones() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut server = Server::start(
        "shutdown",
        Options {
            extra: vec!["--webhook-hosts".into(), format!("127.0.0.1:{port}")],
            ..Default::default()
        },
    );
    let a = Some(TOKEN_A);
    // A synchronous running job...
    let base = server.base.clone();
    let running = std::thread::spawn(move || {
        let mut body = small("x", 60);
        body["jobId"] = json!("r-1");
        request(
            "POST",
            &format!("{base}/v1/generations"),
            Some(TOKEN_A),
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    });
    wait_running(&server, a, "r-1");
    // ...and two queued ones, one reporting to a webhook.
    let mut queued = small("x", 60);
    queued["jobId"] = json!("q-1");
    queued["webhookUrl"] = json!(format!("http://127.0.0.1:{port}/hook"));
    assert_eq!(post_async(&server, a, &queued).status, 202);
    let base = server.base.clone();
    let queued_sync = std::thread::spawn(move || {
        let mut body = small("x", 60);
        body["jobId"] = json!("q-2");
        request(
            "POST",
            &format!("{base}/v1/generations"),
            Some(TOKEN_A),
            &[("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    });
    let started = std::time::Instant::now();
    while get(&server, "/v1/jobs/q-2", a).status != 200 {
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(20));
    }
    let hook = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let (_, payload) = read_http_request(&mut conn);
        let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        payload
    });
    let status = server.terminate();
    assert!(status.success(), "{status:?}\n{}", server.log_text());
    let done = running.join().unwrap();
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    assert_eq!(done.json()["state"], "succeeded");
    let failed = queued_sync.join().unwrap();
    let (code, _) = failed.error(503);
    assert_eq!(code, "shutting_down");
    assert_eq!(failed.json()["error"]["retryable"], true);
    let payload = hook.join().unwrap();
    let job: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(job["id"], "q-1");
    assert_eq!(job["state"], "failed");
    assert_eq!(job["error"]["retryable"], true);
    // The job that finished during the shutdown is kept in the store; the retryable
    // failures are not, so that their resubmission runs.
    let kept = server.store.join("tenants/alice/jobs");
    assert!(kept.join("r-1.json").is_file(), "{}", server.log_text());
    assert!(!kept.join("q-1.json").exists() && !kept.join("q-2.json").exists());
}

/// A finished job outlives the process: a new process on the same store answers for it,
/// returns it for the same `jobId` and body instead of running it again, and refuses the
/// same id with another body.
#[test]
fn finished_jobs_outlive_a_restart() {
    let mut first = Server::start("restart", Options::default());
    let a = Some(TOKEN_A);
    let mut body = small("a cat", 2);
    body["jobId"] = json!("kept-1");
    body["responseFormat"] = json!("b64Json");
    let job = post_json(&first, "/v1/generations", a, &body).json();
    assert_eq!(job["state"], "succeeded", "{job}");
    let image = job["result"]["images"][0].clone();
    assert!(image["b64Json"].is_string());
    let record = first.store.join("tenants/alice/jobs/kept-1.json");
    let started = std::time::Instant::now();
    while !record.is_file() {
        assert!(started.elapsed() < Duration::from_secs(120), "never kept");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(first.terminate().success());

    let store = first.store.clone();
    let second = Server::start(
        "restart-2",
        Options {
            store: Some(format!("file://{}", store.display())),
            ..Default::default()
        },
    );
    let again = get(&second, "/v1/jobs/kept-1", a).json();
    assert_eq!(again["state"], "succeeded");
    assert_eq!(again["result"]["images"][0]["id"], image["id"]);
    assert_eq!(again["result"]["images"][0]["sha256"], image["sha256"]);
    assert!(
        again["result"]["images"][0].get("b64Json").is_none(),
        "inline images are not kept"
    );
    let png = get(&second, image["url"].as_str().unwrap(), a);
    assert_eq!(hex_sha256(&png.body), image["sha256"].as_str().unwrap());
    get(&second, "/v1/jobs/kept-1", Some(TOKEN_B)).error(404);
    let events = sse(&second, a, "kept-1");
    assert_eq!(
        events.last().map(|(name, _)| name.as_str()),
        Some("succeeded")
    );
    assert_eq!(
        delete(&second, "/v1/jobs/kept-1", a).error(409).0,
        "conflict"
    );

    // The same id and body: the finished job, not a second run.
    let images = || {
        std::fs::read_dir(store.join("tenants/alice/images"))
            .unwrap()
            .count()
    };
    let before = images();
    let resubmitted = post_json(&second, "/v1/generations", a, &body).json();
    assert_eq!(resubmitted["result"]["images"][0]["id"], image["id"]);
    assert_eq!(images(), before);
    // The same id with another body: a conflict.
    let mut other = body.clone();
    other["prompt"] = json!("a dog");
    let (code, field) = post_json(&second, "/v1/generations", a, &other).error(409);
    assert_eq!(
        (code.as_str(), field.as_deref()),
        ("conflict", Some("jobId"))
    );
}

#[test]
fn open_mode_and_startup_refusals() {
    // Loopback without tokens: open, as tenant "default".
    let server = Server::start(
        "open",
        Options {
            tokens: false,
            ..Default::default()
        },
    );
    assert_eq!(
        post_json(&server, "/v1/generations", None, &small("x", 1)).status,
        200
    );
    drop(server);
    // Any other address without tokens: refused unless --insecure.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args(["serve", "--model", "m", "--listen", "0.0.0.0:0"])
        .env_remove("IMAGEGEN_TOKENS")
        .env_remove("IMAGEGEN_TOKENS_FILE")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without bearer tokens"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // A model that does not load: a one-line error and a non-zero exit.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .args([
            "serve",
            "--model",
            "/nonexistent/model",
            "--listen",
            "127.0.0.1:0",
            "--safety",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("loading the model"));
}

#[test]
fn openai_sdk_against_the_compatible_endpoints() {
    let server = Server::start("openai", Options::default());
    let (image, mask) = edit_inputs(&server);
    let mut python = std::process::Command::new(python());
    python
        .arg(workspace_root().join("tests/serve_openai.py"))
        .args([&format!("{}/v1", server.base), TOKEN_A])
        .arg(&image)
        .arg(&mask);
    run_client(&server, &mut python, "openai ok");
}

/// The OpenAI Node SDK (`tests/clients/node`, installed by `scripts/setup.sh` from its lock
/// file) against the compatible endpoints: generations as base64 and as signed URLs, other
/// formats, edits uploaded as the SDK uploads files, and errors as the SDK's classes.
#[test]
fn openai_node_sdk_against_the_compatible_endpoints() {
    let server = Server::start("openai-node", Options::default());
    assert!(
        workspace_root()
            .join("tests/clients/node/node_modules/openai")
            .is_dir(),
        "the Node SDK is not installed: run scripts/setup.sh"
    );
    let (image, mask) = edit_inputs(&server);
    let mut node = std::process::Command::new("node");
    node.arg(workspace_root().join("tests/clients/node/serve_openai.mjs"))
        .args([&format!("{}/v1", server.base), TOKEN_A])
        .arg(&image)
        .arg(&mask);
    run_client(&server, &mut node, "openai-node ok");
}

/// Spring AI's `OpenAiImageModel` (`examples/spring-ai`, compiled by `scripts/setup.sh`)
/// unchanged but for its base URL and key: the example runs against the service and checks
/// the PNG it gets.
#[test]
fn spring_ai_image_model_against_the_compatible_endpoint() {
    let server = Server::start("spring-ai", Options::default());
    let example = workspace_root().join("examples/spring-ai");
    let classpath = std::fs::read_to_string(example.join("target/classpath.txt"))
        .expect("examples/spring-ai is compiled by scripts/setup.sh");
    let classpath = format!(
        "{}:{}",
        example.join("target/classes").display(),
        classpath.trim()
    );
    let out = server.store.parent().unwrap().join("fox.png");
    let mut java = std::process::Command::new("java");
    java.args([
        "-cp",
        &classpath,
        "com.example.imagegen.ImagegenImageClient",
    ])
    .env("IMAGEGEN_URL", &server.base)
    .env("IMAGEGEN_TOKEN", TOKEN_A)
    .env("IMAGEGEN_MODEL", "dall-e-2")
    .env("IMAGEGEN_SIZE", "64")
    .env("IMAGEGEN_OUT", &out);
    run_client(&server, &mut java, "spring-ai ok");
    let written = image::open(&out).unwrap().to_rgb8();
    assert_eq!(written.dimensions(), (64, 64));
}

/// An RGBA image with a transparent hole and a mask, written beside the server's store,
/// for the clients' edits.
fn edit_inputs(server: &Server) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = server.store.parent().unwrap().to_path_buf();
    let image = dir.join("edit.png");
    std::fs::write(&image, png(64, 64, true)).unwrap();
    let mask = dir.join("mask.png");
    std::fs::write(&mask, png(64, 64, true)).unwrap();
    (image, mask)
}

/// Runs a client program to its end: it must succeed and print `ok_line`; on failure the
/// assertion shows its output and the server's log.
fn run_client(server: &Server, client: &mut std::process::Command, ok_line: &str) {
    let output = client.output().expect("starting the client");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}\nserver:\n{}",
        server.log_text()
    );
    assert!(stdout.contains(ok_line), "{stdout}");
}

#[test]
fn results_expire_after_the_ttl() {
    let server = Server::start(
        "ttl",
        Options {
            extra: vec!["--result-ttl".into(), "1".into()],
            ..Default::default()
        },
    );
    let a = Some(TOKEN_A);
    let mut body = small("x", 1);
    body["jobId"] = json!("short-lived");
    let job = post_json(&server, "/v1/generations", a, &body).json();
    let url = job["result"]["images"][0]["url"]
        .as_str()
        .unwrap()
        .to_string();
    let upload = post_upload(&server, a, "image/png", &png(8, 8, false)).json();
    let started = std::time::Instant::now();
    loop {
        let gone = get(&server, &url, a).status == 404
            && get(&server, "/v1/jobs/short-lived", a).status == 404
            && !server
                .store
                .join("tenants/alice/jobs/short-lived.json")
                .exists()
            && !server
                .store
                .join(format!(
                    "tenants/alice/uploads/{}",
                    upload["id"].as_str().unwrap()
                ))
                .exists();
        if gone {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "results never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn mask_prompt_finds_the_area_to_inpaint() {
    let clipseg = fixtures_dir().join("tiny-clipseg");
    let server = Server::start(
        "mask-prompt",
        Options {
            extra: vec!["--mask-model".into(), clipseg.display().to_string()],
            ..Default::default()
        },
    );
    let a = Some(TOKEN_A);
    // The input the CLI's mask-prompt test uses, where the fixture CLIPSeg finds "a red ball".
    let input = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(input.clone())
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    let body = json!({
        "prompt": "a cat", "steps": 2, "seed": 3,
        "image": {"base64": base64_encode(&bytes)},
        "maskPrompt": "a red ball", "maskBlur": 0, "maskGrow": 0,
    });
    let reply = post_json(&server, "/v1/generations", a, &body);
    let job = reply.expect(200);
    let png = get(
        &server,
        job["result"]["images"][0]["url"].as_str().unwrap(),
        a,
    )
    .body;
    let out = image::load_from_memory(&png).unwrap().to_rgb8();
    assert_eq!(out.dimensions(), (64, 48));
    let kept = out
        .pixels()
        .zip(input.pixels())
        .filter(|(o, i)| o == i)
        .count();
    assert!(
        kept > 0 && kept < 64 * 48,
        "only the found area is repainted ({kept} kept)"
    );
    // A mask prompt needs an image.
    let bad = json!({"prompt": "a cat", "maskPrompt": "a red ball"});
    assert_eq!(
        post_json(&server, "/v1/generations", a, &bad)
            .error(422)
            .1
            .as_deref(),
        Some("maskPrompt")
    );
}

#[test]
fn yaml_config_with_flags_and_environment_on_top() {
    let dir = std::env::temp_dir().join(format!("imagegen-serve-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("serve.yaml");
    // The file's listen address and safety policy lose to the flags the harness passes (a
    // port of 1 would never come up; `block` needs a checker the fixture lacks); its body
    // limit loses to the environment.
    std::fs::write(
        &config,
        "listen: 127.0.0.1:1\nsafety: block\nqueueSize: 4\n\
         tokens:\n  carol: carol-token-0003\n\
         limits:\n  maxSteps: 5\n  maxBodyBytes: 10000000\n",
    )
    .unwrap();
    let server = Server::start(
        "config",
        Options {
            tokens: false,
            extra: vec!["--config".into(), config.display().to_string()],
            env: vec![("IMAGEGEN_MAX_BODY_BYTES".into(), "1000".into())],
            ..Options::default()
        },
    );
    let carol = Some("carol-token-0003");
    assert_eq!(
        post_json(&server, "/v1/generations", carol, &small("x", 5)).status,
        200
    );
    let (code, field) = post_json(&server, "/v1/generations", carol, &small("x", 6)).error(422);
    assert_eq!(
        (code.as_str(), field.as_deref()),
        ("invalid_field", Some("steps"))
    );
    post_json(&server, "/v1/generations", None, &small("x", 1)).error(401);
    post_json(&server, "/v1/generations", Some(TOKEN_A), &small("x", 1)).error(401);
    let r = post_upload(&server, carol, "image/png", &[0u8; 2000]);
    assert_eq!(r.error(413).0, "payload_too_large");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn compatible_queued_requests_share_a_unet_batch() {
    let server = Server::start(
        "batch",
        Options {
            extra: vec!["--batch-limit".into(), "4".into()],
            ..Default::default()
        },
    );
    let a = Some(TOKEN_A);
    // Keep the worker busy while the others queue up.
    let mut blocker = small("x", 150);
    blocker["jobId"] = json!("blocker");
    assert_eq!(post_async(&server, a, &blocker).status, 202);
    wait_running(&server, a, "blocker");
    let mut ids = Vec::new();
    for (i, prompt) in ["a cat", "a dog", "a fox"].iter().enumerate() {
        let mut body = small(prompt, 3);
        body["seed"] = json!(100 + i);
        body["jobId"] = json!(format!("b-{i}"));
        assert_eq!(post_async(&server, a, &body).status, 202);
        ids.push((format!("b-{i}"), body));
    }
    let mut odd = small("a cow", 4);
    odd["jobId"] = json!("odd");
    assert_eq!(post_async(&server, a, &odd).status, 202);
    for (id, body) in &ids {
        let job = wait_job(&server, a, id);
        assert_eq!(job["state"], "succeeded", "{job}");
        let image = &job["result"]["images"][0];
        assert_eq!(image["seed"], body["seed"]);
        // The same request alone gives the same image.
        let mut alone = body.clone();
        alone.as_object_mut().unwrap().remove("jobId");
        let single = post_json(&server, "/v1/generations", a, &alone).json();
        let pixels = |url: &str| {
            image::load_from_memory(&get(&server, url, a).body)
                .unwrap()
                .to_rgb8()
                .into_raw()
        };
        let batched = pixels(image["url"].as_str().unwrap());
        let single = pixels(single["result"]["images"][0]["url"].as_str().unwrap());
        let (close, _) = compare_u8(&batched, &single);
        assert!(close >= 0.999, "{id}: {close}");
    }
    assert_eq!(wait_job(&server, a, "odd")["state"], "succeeded");
    assert_eq!(metric(&server, "imagegen_batches_total"), 1.0);
    assert_eq!(metric(&server, "imagegen_batched_jobs_total"), 3.0);
}

#[test]
fn trainings_run_imagegen_train_and_make_a_lora() {
    let server = Server::start("training", Options::default());
    let (a, b) = (Some(TOKEN_A), Some(TOKEN_B));
    let upload = post_upload(&server, a, "image/png", &png(64, 64, false)).json();
    let body = json!({
        "name": "sks-dog",
        "images": [{"uploadId": upload["id"]}, {"base64": base64_encode(&png(48, 64, false))}],
        "instancePrompt": "a photo of sks dog",
        "steps": 4, "resolution": 64, "rank": 2, "seed": 1,
        "jobId": "train-1",
    });
    let r = post_json(&server, "/v1/trainings", a, &body);
    r.expect(202);
    assert_eq!(r.header("location"), Some("/v1/trainings/train-1"));
    assert_eq!(r.json()["kind"], "training");
    // Progress with the loss, then success with the LoRA.
    let events = sse_at(&server, a, "/v1/trainings/train-1/events");
    let losses: Vec<f64> = events
        .iter()
        .filter_map(|(_, d)| d["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 4, "{events:?}");
    let (name, last) = events.last().unwrap();
    assert_eq!(name, "succeeded", "{last}");
    let job = get(&server, "/v1/trainings/train-1", a).json();
    assert_eq!(job["state"], "succeeded");
    let training = &job["training"];
    assert_eq!(training["lora"], "sks-dog");
    assert_eq!(training["steps"], 4);
    assert_eq!(
        training["path"],
        "loras/sks-dog/pytorch_lora_weights.safetensors"
    );
    let loras = get(&server, "/v1/loras", a).json();
    assert_eq!(loras[0]["name"], "sks-dog");
    assert_eq!(loras[0]["source"], "training");
    assert_eq!(loras[0]["sha256"], training["sha256"]);
    // The LoRA works in a generation, by name and as `model`.
    let mut with = small("a photo of sks dog", 2);
    with["model"] = json!("sks-dog");
    assert_eq!(post_json(&server, "/v1/generations", a, &with).status, 200);
    // Same id and body: the same training; the name is now taken.
    let again = post_json(&server, "/v1/trainings", a, &body);
    assert_eq!(
        (again.status, again.json()["state"].as_str()),
        (202, Some("succeeded"))
    );
    let mut taken = body.clone();
    taken.as_object_mut().unwrap().remove("jobId");
    assert_eq!(
        post_json(&server, "/v1/trainings", a, &taken)
            .error(409)
            .1
            .as_deref(),
        Some("name")
    );
    // Another tenant sees none of it.
    get(&server, "/v1/trainings/train-1", b).error(404);
    get(&server, "/v1/trainings/train-1/events", b).error(404);
    assert_eq!(get(&server, "/v1/loras", b).json(), json!([]));
    // Invalid requests name the field.
    for (patch, field) in [
        (json!({"name": "../x"}), "name"),
        (json!({"images": []}), "images"),
        (json!({"instancePrompt": ""}), "instancePrompt"),
        (json!({"steps": 0}), "steps"),
        (json!({"resolution": 65}), "resolution"),
        (json!({"images": [{"uploadId": "nope"}]}), "images[0]"),
    ] {
        let mut bad = taken.clone();
        bad["name"] = json!("other");
        for (k, v) in patch.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let reply = post_json(&server, "/v1/trainings", a, &bad);
        assert!(
            reply.status == 422 || reply.status == 404,
            "{}",
            reply.status
        );
        assert_eq!(reply.json()["error"]["field"], field, "{bad}");
    }
    // Cancelling a long training stops its process.
    let mut long = taken.clone();
    long["name"] = json!("long");
    long["steps"] = json!(100000);
    long["jobId"] = json!("train-long");
    assert_eq!(post_json(&server, "/v1/trainings", a, &long).status, 202);
    let started = std::time::Instant::now();
    while get(&server, "/v1/trainings/train-long", a).json()["progress"]["step"]
        .as_u64()
        .unwrap_or(0)
        == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the training never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(delete(&server, "/v1/trainings/train-long", a).status, 202);
    let started = std::time::Instant::now();
    loop {
        let job = get(&server, "/v1/trainings/train-long", a).json();
        if job["state"] == "cancelled" {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not cancelled: {job}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(get(&server, "/v1/loras", a)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["name"] != "long"));
}

#[test]
fn canny_runs_with_the_configured_controlnet_and_is_refused_without_one() {
    let a = Some(TOKEN_A);
    let mut canny = small("a lighthouse", 3);
    canny["image"] = json!({"base64": base64_encode(&serve_support::png(64, 64, false))});
    canny["strategy"] = json!("canny");

    let without = Server::start("canny-none", Options::default());
    let (code, field) = post_json(&without, "/v1/generations", a, &canny).error(422);
    assert_eq!(
        (code.as_str(), field.as_deref()),
        ("invalid_field", Some("strategy"))
    );
    drop(without);

    let controlnet = fixtures_dir().join(fixture_index()["controlnet"]["dir"].as_str().unwrap());
    let server = Server::start(
        "canny",
        Options {
            extra: vec!["--controlnet".into(), controlnet.display().to_string()],
            ..Default::default()
        },
    );
    let job = post_json(&server, "/v1/generations", a, &canny).expect(200);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["images"].as_array().map(Vec::len), Some(1));
    // The ControlNet stays loaded for the next canny request.
    let again = post_json(&server, "/v1/generations", a, &canny).expect(200);
    assert_eq!(again["state"], "succeeded", "{again}");
}

/// An SDXL model with its refiner over HTTP: the base-to-refiner hand-off equals diffusers'
/// (the images are lossless PNGs), a service without a refiner refuses a hand-off, and one
/// told another family refuses to start.
#[test]
fn sdxl_serves_with_its_refiner() {
    let a = Some(TOKEN_A);
    let body = json!({"prompt": "a photo of a cat", "negativePrompt": "blurry", "steps": 10,
        "guidanceScale": 5.0, "seed": 80, "highNoiseFraction": 0.8});

    let without = Server::start(
        "sdxl-alone",
        Options {
            model: Some("tiny-sdxl"),
            ..Default::default()
        },
    );
    let (code, field) = post_json(&without, "/v1/generations", a, &body).error(422);
    assert_eq!(
        (code.as_str(), field.as_deref()),
        ("invalid_field", Some("highNoiseFraction"))
    );
    // Without a hand-off the base alone runs, at its native size.
    let mut alone = body.clone();
    alone.as_object_mut().unwrap().remove("highNoiseFraction");
    alone["steps"] = json!(2);
    let job = post_json(&without, "/v1/generations", a, &alone).expect(200);
    assert_eq!(job["result"]["images"][0]["width"], 64, "{job}");
    drop(without);

    let refiner = fixtures_dir().join("tiny-sdxl-refiner");
    let server = Server::start(
        "sdxl",
        Options {
            model: Some("tiny-sdxl"),
            extra: vec![
                "--refiner".into(),
                refiner.display().to_string(),
                "--family".into(),
                "sdxl".into(),
            ],
            ..Default::default()
        },
    );
    let job = post_json(&server, "/v1/generations", a, &body).expect(200);
    assert_eq!(job["state"], "succeeded", "{job}");
    let url = job["result"]["images"][0]["url"].as_str().unwrap();
    let png = get(&server, url, a);
    let decoded = image::load_from_memory(&png.body).unwrap().to_rgb8();
    let reference =
        load_reference(&fixtures_dir().join("references/sdxl/sdxl-base-refiner.safetensors"));
    let want = u8_values(&reference["images_u8"].get(0));
    let (close, worst) = compare_u8(decoded.as_raw(), &want);
    assert!(
        close >= 0.999,
        "{:.3}% within 1/255 (worst {worst})",
        close * 100.0
    );
    drop(server);

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .arg("serve")
        .arg("--model")
        .arg(fixtures_dir().join("tiny-sdxl"))
        .args([
            "--family",
            "sd15",
            "--listen",
            "127.0.0.1:0",
            "--safety",
            "off",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sdxl") && stderr.contains("--family"),
        "{stderr}"
    );
}
