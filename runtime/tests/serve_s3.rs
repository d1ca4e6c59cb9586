//! `imagegen serve` on an S3 store, configured as a deployment configures it
//! (`--store s3://bucket/prefix`, `AWS_*` in the environment). moto's S3-compatible server
//! stands in for S3; the service talks to it through object_store's S3 client, and the
//! tests look at the bucket itself.

mod serve_support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use serve_support::*;

const BUCKET: &str = "imagegen";
const PREFIX: &str = "deploy";

/// A moto S3 server with the bucket made; it stops when dropped (its stdin closes).
struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    fn start() -> S3 {
        let script = workspace_root().join("tests/s3_server.py");
        let mut child = Command::new(python())
            .arg(&script)
            .arg(BUCKET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tests/s3_server.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the S3 server's endpoint line");
        let endpoint = line
            .trim()
            .strip_prefix("endpoint ")
            .unwrap_or_else(|| panic!("no endpoint from the S3 server: {line:?}"))
            .to_string();
        S3 { child, endpoint }
    }

    /// What a deployment sets for the store.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn options(&self) -> Options {
        Options {
            store: Some(format!("s3://{BUCKET}/{PREFIX}")),
            env: self.env(),
            ..Options::default()
        }
    }

    /// The keys under `prefix` (relative to the deployment's prefix), from the bucket.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let url = format!(
            "{}/{BUCKET}?list-type=2&prefix={PREFIX}/{prefix}",
            self.endpoint
        );
        let mut xml = String::new();
        ureq::get(&url)
            .timeout(Duration::from_secs(60))
            .call()
            .expect("listing the bucket")
            .into_reader()
            .read_to_string(&mut xml)
            .unwrap();
        xml.split("<Key>")
            .skip(1)
            .filter_map(|rest| rest.split_once("</Key>"))
            .map(|(key, _)| key.trim_start_matches(&format!("{PREFIX}/")).to_string())
            .collect()
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        let url = format!("{}/{BUCKET}/{PREFIX}/{key}", self.endpoint);
        ureq::put(&url)
            .timeout(Duration::from_secs(60))
            .send_bytes(bytes)
            .expect("putting an object");
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn images_uploads_and_loras_live_in_the_bucket() {
    let s3 = S3::start();
    let server = Server::start("s3", s3.options());
    let a = Some(TOKEN_A);

    // A generation's image is written to the bucket and served from it.
    let job = post_json(&server, "/v1/generations", a, &small("a cat", 2)).json();
    assert_eq!(job["state"], "succeeded", "{job}\n{}", server.log_text());
    let image = &job["result"]["images"][0];
    let png = get(&server, image["url"].as_str().unwrap(), a);
    assert_eq!(png.status, 200);
    assert_eq!(image["sha256"], hex_sha256(&png.body));
    let id = image["id"].as_str().unwrap();
    assert_eq!(
        s3.keys("tenants/alice/images/"),
        [format!("tenants/alice/images/{id}.png")]
    );
    let jpeg = get(&server, &format!("/v1/images/{id}.jpg"), a);
    assert_eq!(
        (jpeg.status, jpeg.header("content-type")),
        (200, Some("image/jpeg"))
    );

    // An upload goes to the bucket, and a generation reads it back from there.
    let upload = post_upload(&server, a, "image/png", &png_image()).json();
    let upload_id = upload["id"].as_str().unwrap().to_string();
    assert!(s3
        .keys("tenants/alice/uploads/")
        .contains(&format!("tenants/alice/uploads/{upload_id}")));
    let mut i2i = small("a cat", 4);
    i2i["image"] = json!({"uploadId": upload_id});
    i2i["strength"] = json!(0.5);
    let r = post_json(&server, "/v1/generations", a, &i2i);
    r.expect(200);
    // A store path the tenant put in the bucket itself.
    s3.put("tenants/alice/photos/p.png", &png_image());
    let mut by_path = small("a cat", 4);
    by_path["image"] = json!({"path": "photos/p.png"});
    by_path["strength"] = json!(0.5);
    let r = post_json(&server, "/v1/generations", a, &by_path);
    r.expect(200);

    // A LoRA uploaded through the API: stored, listed, applied (downloaded for the engine),
    // deleted from the bucket.
    let lora = std::fs::read(lora_fixture()).unwrap();
    let r = post_lora(&server, a, "style-a", &lora);
    r.expect(201);
    let mut with = small("a cat", 3);
    with["loras"] = json!([{"name": "style-a", "weight": 0.8}]);
    let r = post_json(&server, "/v1/generations", a, &with);
    r.expect(200);

    // A LoRA a training Job wrote straight into the bucket is listed from the file.
    s3.put(
        "tenants/alice/loras/from-job/pytorch_lora_weights.safetensors",
        &lora,
    );
    let listed = get(&server, "/v1/loras", a).json();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["from-job", "style-a"]);
    assert_eq!(listed[0]["sha256"], hex_sha256(&lora));
    assert!(s3
        .keys("tenants/alice/loras/from-job/")
        .contains(&"tenants/alice/loras/from-job/info.json".to_string()));

    assert_eq!(delete(&server, "/v1/loras/style-a", a).status, 204);
    assert!(s3.keys("tenants/alice/loras/style-a/").is_empty());
    // Another tenant sees none of it.
    assert_eq!(get(&server, "/v1/loras", Some(TOKEN_B)).json(), json!([]));
}

/// A training through the service on an S3 store: its `imagegen train` child reads the photos
/// from the bucket and writes the LoRA there, and the LoRA then serves generations.
#[test]
fn a_training_reads_and_writes_the_bucket() {
    let s3 = S3::start();
    let server = Server::start("s3-training", s3.options());
    let a = Some(TOKEN_A);
    let upload = post_upload(&server, a, "image/png", &png_image()).json();
    let body = json!({
        "name": "sks-dog",
        "images": [{"uploadId": upload["id"]}, {"base64": base64_encode(&png_image())}],
        "instancePrompt": "a photo of sks dog",
        "steps": 2, "resolution": 64, "rank": 2, "seed": 1,
        "jobId": "train-s3",
    });
    let r = post_json(&server, "/v1/trainings", a, &body);
    r.expect(202);
    let started = std::time::Instant::now();
    let job = loop {
        let job = get(&server, "/v1/trainings/train-s3", a).json();
        if job["state"] == "succeeded" || job["state"] == "failed" {
            break job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the training never ended: {job}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(job["state"], "succeeded", "{job}\n{}", server.log_text());
    let keys = s3.keys("tenants/alice/loras/sks-dog/");
    assert!(
        keys.contains(&"tenants/alice/loras/sks-dog/pytorch_lora_weights.safetensors".into()),
        "{keys:?}"
    );
    assert_eq!(
        get(&server, "/v1/loras", a).json()[0]["sha256"],
        job["training"]["sha256"]
    );
    let mut with = small("a photo of sks dog", 2);
    with["model"] = json!("sks-dog");
    assert_eq!(post_json(&server, "/v1/generations", a, &with).status, 200);
}

fn png_image() -> Vec<u8> {
    serve_support::png(64, 64, false)
}
