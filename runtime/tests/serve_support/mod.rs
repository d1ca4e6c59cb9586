//! Black-box helpers for the `imagegen serve` tests: start the real binary on a fixture
//! model on a free port with a temporary store, and talk HTTP to it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TOKEN_A: &str = "token-tenant-a-0001";
pub const TOKEN_B: &str = "token-tenant-b-0002";

#[path = "../../../engine/tests/common/mod.rs"]
mod common;
// Each test file uses some of these.
#[allow(unused_imports)]
pub use common::{
    compare_u8, fixture_index, fixtures_dir, load_reference, python, u8_values, workspace_root,
};

/// A LoRA file of the fixture model tiny-sd1.
pub fn lora_fixture() -> PathBuf {
    let index = fixture_index();
    fixtures_dir().join(index["lora"]["files"]["lora-a"].as_str().unwrap())
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub store: PathBuf,
    pub log: PathBuf,
}

pub struct Options {
    pub tokens: bool,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The store URL; `None`: a fresh folder, `Server::store`.
    pub store: Option<String>,
    /// The fixture model served; `None`: tiny-sd1.
    pub model: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            tokens: true,
            extra: vec![],
            env: vec![],
            store: None,
            model: None,
        }
    }
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "imagegen-serve-test-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Server {
    pub fn start(name: &str, options: Options) -> Server {
        let dir = scratch(name);
        let store = dir.join("store");
        let log = dir.join("server.log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_imagegen"));
        command
            .arg("serve")
            .arg("--model")
            .arg(fixtures_dir().join(options.model.unwrap_or("tiny-sd1")))
            // The server picks a free port and prints it: a port picked here and bound later
            // could be taken in between by a client connection of a test beside this one.
            .args(["--listen", "127.0.0.1:0"])
            .args(["--safety", "off", "--device", "cpu"])
            .arg("--store")
            .arg(
                options
                    .store
                    .clone()
                    .unwrap_or_else(|| format!("file://{}", store.display())),
            )
            .args(&options.extra)
            .env_remove("IMAGEGEN_TOKENS")
            .env_remove("IMAGEGEN_TOKENS_FILE")
            .env("HF_HUB_OFFLINE", "1")
            // Several servers share the machine's cores in a test run.
            .env("OMP_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        if options.tokens {
            command.env("IMAGEGEN_TOKENS", format!("alice:{TOKEN_A},bob:{TOKEN_B}"));
        }
        for (k, v) in &options.env {
            command.env(k, v);
        }
        let child = command.spawn().expect("starting imagegen serve");
        let mut server = Server {
            child,
            base: String::new(),
            store,
            log,
        };
        server.base = server.wait_address();
        server.wait_ready();
        server
    }

    /// The base URL from the server's `listening on` line.
    fn wait_address(&mut self) -> String {
        let started = Instant::now();
        loop {
            let log = self.log_text();
            if let Some(url) = log
                .lines()
                .find_map(|l| l.strip_prefix("imagegen: listening on "))
            {
                return url.trim().to_string();
            }
            let exited = self.child.try_wait().unwrap();
            assert!(
                exited.is_none() && started.elapsed() < Duration::from_secs(120),
                "the server never listened ({exited:?}); log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&self) {
        let started = Instant::now();
        loop {
            if let Ok(r) = ureq::get(&format!("{}/readyz", self.base))
                .timeout(Duration::from_secs(2))
                .call()
            {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "server not ready after 120 s; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "server did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// RSS of the server process in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, headers (lowercase names) and body.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}), status {}: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the status (showing the body when it differs) and returns the JSON body.
    pub fn expect(&self, status: u16) -> serde_json::Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }

    /// Asserts the error shape and returns (code, field).
    pub fn error(&self, status: u16) -> (String, Option<String>) {
        assert_eq!(
            self.status,
            status,
            "expected {status}, got {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        let v = self.json();
        let e = &v["error"];
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        (
            e["code"].as_str().expect("error.code").to_string(),
            e["field"].as_str().map(str::to_string),
        )
    }
}

pub fn request(
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Reply {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(300));
    if let Some(token) = token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    for (k, v) in headers {
        req = req.set(k, v);
    }
    let result = match body {
        Some(body) => req.send_bytes(body),
        None => req.call(),
    };
    let response = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let headers = response
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = response.header(&n).unwrap_or("").to_string();
            (n, v)
        })
        .collect();
    let mut body = Vec::new();
    response.into_reader().read_to_end(&mut body).unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

pub fn get(server: &Server, path: &str, token: Option<&str>) -> Reply {
    request("GET", &server.url(path), token, &[], None)
}

pub fn delete(server: &Server, path: &str, token: Option<&str>) -> Reply {
    request("DELETE", &server.url(path), token, &[], None)
}

pub fn post_json(
    server: &Server,
    path: &str,
    token: Option<&str>,
    body: &serde_json::Value,
) -> Reply {
    request(
        "POST",
        &server.url(path),
        token,
        &[("Content-Type", "application/json")],
        Some(body.to_string().as_bytes()),
    )
}

pub fn post_async(server: &Server, token: Option<&str>, body: &serde_json::Value) -> Reply {
    request(
        "POST",
        &server.url("/v1/generations"),
        token,
        &[
            ("Content-Type", "application/json"),
            ("Prefer", "respond-async"),
        ],
        Some(body.to_string().as_bytes()),
    )
}

/// A small, fast request for the tiny model.
pub fn small(prompt: &str, steps: u32) -> serde_json::Value {
    serde_json::json!({"prompt": prompt, "steps": steps, "width": 64, "height": 64, "seed": 7})
}

/// One part of a form: (name, filename, content type, bytes).
pub type FormPart<'a> = (&'a str, Option<&'a str>, Option<&'a str>, &'a [u8]);

/// multipart/form-data: the content type and the body.
pub fn multipart(parts: &[FormPart]) -> (String, Vec<u8>) {
    let boundary = "imagegen-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, filename, content_type, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{name}\"");
        if let Some(f) = filename {
            disposition.push_str(&format!("; filename=\"{f}\""));
        }
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(ct) = content_type {
            body.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Sends only the head of a request (no body) and reads the whole answer: how a server
/// that refuses by Content-Length answers.
pub fn head_only(server: &Server, head: &str) -> String {
    use std::io::{Read, Write};
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    // Written from another thread: the server may answer (and stop reading) first.
    let mut writer = stream.try_clone().unwrap();
    let head = head.to_string();
    std::thread::spawn(move || {
        let _ = writer.write_all(head.as_bytes());
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).to_string()
}

/// Waits for a job to reach a finished state.
pub fn wait_job(server: &Server, token: Option<&str>, id: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let job = get(server, &format!("/v1/jobs/{id}"), token).json();
        if ["succeeded", "failed", "cancelled"].contains(&job["state"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "job {id} never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the job is running.
pub fn wait_running(server: &Server, token: Option<&str>, id: &str) {
    let started = Instant::now();
    loop {
        let job = get(server, &format!("/v1/jobs/{id}"), token).json();
        if job["state"] == "running" && job["progress"]["step"].as_u64().unwrap_or(0) > 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "job {id} never started: {job}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a job's SSE stream to its end: (event name, data JSON) pairs.
pub fn sse(server: &Server, token: Option<&str>, id: &str) -> Vec<(String, serde_json::Value)> {
    sse_at(server, token, &format!("/v1/jobs/{id}/events"))
}

/// Reads the SSE stream at `path` to its end.
pub fn sse_at(
    server: &Server,
    token: Option<&str>,
    path: &str,
) -> Vec<(String, serde_json::Value)> {
    let mut req = ureq::get(&server.url(path)).timeout(Duration::from_secs(300));
    if let Some(token) = token {
        req = req.set("Authorization", &format!("Bearer {token}"));
    }
    let response = req.call().expect("events");
    assert!(response
        .header("content-type")
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let reader = BufReader::new(response.into_reader());
    let mut events = Vec::new();
    let mut name = String::new();
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("event:") {
            name = n.trim().to_string();
        } else if let Some(d) = line.strip_prefix("data:") {
            events.push((name.clone(), serde_json::from_str(d.trim()).unwrap()));
        }
    }
    events
}

/// A PNG of the given size (a gradient), optionally with a transparent square.
pub fn png(width: u32, height: u32, hole: bool) -> Vec<u8> {
    let image = image::RgbaImage::from_fn(width, height, |x, y| {
        let inside = hole && x >= width / 4 && x < width / 2 && y >= height / 4 && y < height / 2;
        image::Rgba([
            (x * 255 / width.max(1)) as u8,
            (y * 255 / height.max(1)) as u8,
            90,
            if inside { 0 } else { 255 },
        ])
    });
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgba8(image)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// `POST /v1/loras` of `bytes` as the LoRA `name`, the way a client uploads one (multipart).
pub fn post_lora(server: &Server, token: Option<&str>, name: &str, bytes: &[u8]) -> Reply {
    let (ct, form) = multipart(&[
        ("name", None, None, name.as_bytes()),
        (
            "file",
            Some("pytorch_lora_weights.safetensors"),
            Some("application/octet-stream"),
            bytes,
        ),
    ]);
    request(
        "POST",
        &server.url("/v1/loras"),
        token,
        &[("Content-Type", &ct)],
        Some(&form),
    )
}

pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Hex SHA-256, computed here rather than with the runtime's own helper under test.
pub fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of the first `/metrics` line starting with `line_start` (a name, or a name
/// and its labels); 0 when there is none.
pub fn metric(server: &Server, line_start: &str) -> f64 {
    let text = String::from_utf8(get(server, "/metrics", None).body).unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.split_whitespace().last())
        .map_or(0.0, |v| v.parse().unwrap())
}

/// `POST /v1/uploads` with a raw body.
pub fn post_upload(server: &Server, token: Option<&str>, content_type: &str, body: &[u8]) -> Reply {
    request(
        "POST",
        &server.url("/v1/uploads"),
        token,
        &[("Content-Type", content_type)],
        Some(body),
    )
}

/// A C2PA signing certificate for tests: a leaf (digitalSignature, emailProtection) issued by
/// a throwaway CA, as C2PA's certificate profile requires (a self-signed leaf is refused).
/// Writes `chain.pem` (leaf, then CA), `key.pem` and `ca.pem` into `dir` and returns the paths
/// of the first two.
pub fn c2pa_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    c2pa_certificate_for(dir, &rcgen::PKCS_ECDSA_P256_SHA256)
}

/// [`c2pa_certificate`] with a signing key of another algorithm.
pub fn c2pa_certificate_for(
    dir: &std::path::Path,
    alg: &'static rcgen::SignatureAlgorithm,
) -> (PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(DnType::CommonName, "imagegen test CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "imagegen tests");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "imagegen test signer");
    leaf.distinguished_name
        .push(DnType::OrganizationName, "imagegen tests");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    leaf.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(alg).unwrap();
    let leaf = leaf.signed_by(&key, &ca).unwrap();
    let (chain, key_path) = (dir.join("chain.pem"), dir.join("key.pem"));
    std::fs::write(&chain, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    (chain, key_path)
}
