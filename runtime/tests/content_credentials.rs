//! C2PA content credentials: images signed with a configured certificate carry a manifest
//! that reads back and validates, in PNG, JPEG and WebP; a changed byte breaks it; a bad
//! certificate or key stops the service at start with one line.

mod serve_support;

use std::process::{Command, Stdio};

use imagegen_runtime::server::credentials::{read, ContentCredentials, ManifestReport};
use imagegen_runtime::server::media::{self, Format};
use serde_json::json;
use serve_support::*;

const TRAINED: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

fn credentials(name: &str) -> (ContentCredentials, std::path::PathBuf) {
    let dir = scratch(name);
    let (cert, key) = c2pa_certificate(&dir);
    (
        ContentCredentials::from_pem_files(&cert, &key).unwrap(),
        dir,
    )
}

/// Valid (the test CA is on no trust list, so not Trusted), with no failure but the
/// untrusted signer, and made by imagegen as trained algorithmic media.
fn assert_signed_by_us(report: &ManifestReport, what: &str) {
    assert_eq!(
        report.state,
        c2pa::ValidationState::Valid,
        "{what}: {:?}",
        report.failures
    );
    assert!(
        report
            .failures
            .iter()
            .all(|code| code == "signingCredential.untrusted"),
        "{what}: {:?}",
        report.failures
    );
    let manifest = &report.manifest;
    assert_eq!(
        manifest["claim_generator_info"][0]["name"], "imagegen",
        "{what}: {manifest}"
    );
    let actions = manifest["assertions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| {
            a["label"]
                .as_str()
                .unwrap_or("")
                .starts_with("c2pa.actions")
        })
        .unwrap_or_else(|| panic!("{what}: no actions in {manifest}"));
    let created = &actions["data"]["actions"][0];
    assert_eq!(created["action"], "c2pa.created", "{what}: {actions}");
    assert_eq!(created["digitalSourceType"], TRAINED, "{what}: {actions}");
}

fn picture() -> image::RgbImage {
    image::RgbImage::from_fn(48, 32, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, 99]))
}

#[test]
fn every_format_carries_a_manifest_that_validates() {
    let (credentials, dir) = credentials("formats");
    assert_eq!(credentials.alg(), c2pa::SigningAlg::Es256);
    let mut png = Vec::new();
    image::DynamicImage::ImageRgb8(picture())
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let signed_png = credentials.sign(&png, Format::Png).unwrap();
    for format in [Format::Png, Format::Jpeg, Format::Webp] {
        let bytes = match format {
            Format::Png => signed_png.clone(),
            other => media::convert(&signed_png, other, Some(&credentials)).unwrap(),
        };
        let what = format.content_type();
        assert_signed_by_us(&read(&bytes, format, None).unwrap(), what);
        // Still an ordinary image of the same pixels, still with the XMP marking.
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded.dimensions(), (48, 32), "{what}");
        if format != Format::Jpeg {
            assert_eq!(decoded, picture(), "{what}: lossless pixels changed");
        }
        if format != Format::Png {
            let marker = b"trainedAlgorithmicMedia</Iptc4xmpExt:DigitalSourceType>";
            assert!(
                bytes.windows(marker.len()).any(|w| w == marker),
                "{what}: XMP marking lost"
            );
        }
    }
    // A reader that trusts the test CA finds the whole chain: Trusted, no failure at all.
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let trusted = read(&signed_png, Format::Png, Some(&ca)).unwrap();
    assert_eq!(trusted.state, c2pa::ValidationState::Trusted, "{trusted:?}");
    assert!(trusted.failures.is_empty(), "{trusted:?}");
    // Without credentials nothing is embedded.
    let plain = media::convert(&signed_png, Format::Jpeg, None).unwrap();
    assert!(read(&plain, Format::Jpeg, None).is_err());
}

#[test]
fn the_key_decides_the_algorithm() {
    let dir = scratch("algorithms");
    for (name, key_alg, expected) in [
        (
            "p384",
            &rcgen::PKCS_ECDSA_P384_SHA384,
            c2pa::SigningAlg::Es384,
        ),
        ("ed25519", &rcgen::PKCS_ED25519, c2pa::SigningAlg::Ed25519),
    ] {
        let (cert, key) = c2pa_certificate_for(&subdir(&dir, name), key_alg);
        let credentials = ContentCredentials::from_pem_files(&cert, &key).unwrap();
        assert_eq!(credentials.alg(), expected, "{name}");
        let signed = credentials
            .sign(&media::encode_jpeg(&picture()).unwrap(), Format::Jpeg)
            .unwrap();
        assert_signed_by_us(&read(&signed, Format::Jpeg, None).unwrap(), name);
    }
}

/// scripts/c2pa-test-cert.sh (openssl), which the README and the kind test use, makes a
/// certificate that signs, and whose chain a reader trusting its CA finds complete.
#[test]
fn the_test_certificate_script_makes_a_working_certificate() {
    let dir = scratch("script-cert");
    let script = workspace_root().join("scripts/c2pa-test-cert.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "{}", script.display());
    let credentials =
        ContentCredentials::from_pem_files(&dir.join("chain.pem"), &dir.join("key.pem")).unwrap();
    assert_eq!(credentials.alg(), c2pa::SigningAlg::Es256);
    let signed = credentials
        .sign(&media::encode_webp(&picture()).unwrap(), Format::Webp)
        .unwrap();
    assert_signed_by_us(&read(&signed, Format::Webp, None).unwrap(), "script");
    let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let trusted = read(&signed, Format::Webp, Some(&ca)).unwrap();
    assert_eq!(trusted.state, c2pa::ValidationState::Trusted, "{trusted:?}");
}

#[test]
fn a_changed_byte_breaks_the_signature() {
    let (credentials, _dir) = credentials("tamper");
    let jpeg = media::encode_jpeg(&picture()).unwrap();
    let signed = credentials.sign(&jpeg, Format::Jpeg).unwrap();
    assert_signed_by_us(&read(&signed, Format::Jpeg, None).unwrap(), "untouched");
    // A byte of the entropy-coded image data, just before the EOI marker.
    let mut tampered = signed.clone();
    let at = tampered.len() - 8;
    tampered[at] ^= 0x55;
    let report = read(&tampered, Format::Jpeg, None).unwrap();
    assert_eq!(report.state, c2pa::ValidationState::Invalid, "{report:?}");
    assert!(
        report
            .failures
            .iter()
            .any(|c| c.contains("dataHash.mismatch")),
        "{:?}",
        report.failures
    );
}

#[test]
fn bad_certificates_and_keys_are_refused() {
    let dir = scratch("bad-keys");
    let (cert, key) = c2pa_certificate(&subdir(&dir, "a"));
    let (_, other_key) = c2pa_certificate(&subdir(&dir, "b"));
    let mismatched = ContentCredentials::from_pem_files(&cert, &other_key).unwrap_err();
    assert!(
        mismatched.contains("C2PA certificate and key"),
        "{mismatched}"
    );
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let error = ContentCredentials::from_pem_files(&garbage, &key).unwrap_err();
    assert!(error.contains("C2PA certificate and key"), "{error}");
    let missing = ContentCredentials::from_pem_files(&dir.join("nope.pem"), &key).unwrap_err();
    assert!(missing.contains("nope.pem"), "{missing}");

    // The service refuses to start: one line, non-zero exit, nothing served unsigned.
    let output = Command::new(env!("CARGO_BIN_EXE_imagegen"))
        .arg("serve")
        .arg("--model")
        .arg(fixtures_dir().join("tiny-sd1"))
        .args(["--listen", "127.0.0.1:0"])
        .args(["--safety", "off", "--device", "cpu"])
        .arg("--c2pa-cert")
        .arg(&cert)
        .arg("--c2pa-key")
        .arg(&other_key)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("C2PA certificate and key"), "{stderr}");
}

#[test]
fn the_service_signs_what_it_serves() {
    let dir = scratch("serve-c2pa");
    let (cert, key) = c2pa_certificate(&dir);
    let server = Server::start(
        "c2pa",
        Options {
            env: vec![
                ("IMAGEGEN_C2PA_CERT".into(), cert.display().to_string()),
                ("IMAGEGEN_C2PA_KEY".into(), key.display().to_string()),
            ],
            ..Options::default()
        },
    );
    let mut body = small("a lighthouse at dusk", 2);
    body["responseFormat"] = json!("b64Json");
    let reply = post_json(&server, "/v1/generations", Some(TOKEN_A), &body);
    let job = reply.expect(200);
    let image = &job["result"]["images"][0];
    let id = image["id"].as_str().unwrap();

    let png = get(&server, &format!("/v1/images/{id}.png"), Some(TOKEN_A)).body;
    assert_signed_by_us(&read(&png, Format::Png, None).unwrap(), "served PNG");
    // The result's sha256 and inline copy are of the signed file.
    assert_eq!(image["sha256"].as_str().unwrap(), hex_sha256(&png));
    let inline = media::decode_base64(image["b64Json"].as_str().unwrap(), "b64", u64::MAX).unwrap();
    assert_eq!(inline, png);
    for (ext, format) in [("jpg", Format::Jpeg), ("webp", Format::Webp)] {
        let reply = get(&server, &format!("/v1/images/{id}.{ext}"), Some(TOKEN_A));
        assert_eq!(reply.status, 200);
        assert_signed_by_us(&read(&reply.body, format, None).unwrap(), ext);
    }
    // The OpenAI endpoint's converted images are signed too.
    let openai = post_json(
        &server,
        "/v1/images/generations",
        Some(TOKEN_A),
        &json!({"prompt": "a fox", "size": "64x64", "response_format": "b64_json",
                "output_format": "webp"}),
    );
    assert_eq!(
        openai.status,
        200,
        "{}",
        String::from_utf8_lossy(&openai.body)
    );
    let b64 = openai.json()["data"][0]["b64_json"]
        .as_str()
        .unwrap()
        .to_string();
    let webp = media::decode_base64(&b64, "b64", u64::MAX).unwrap();
    assert_signed_by_us(&read(&webp, Format::Webp, None).unwrap(), "OpenAI webp");
    // The log says signing is on, once, and nothing else about C2PA.
    let log = server.log_text();
    assert!(
        log.contains("images are signed with C2PA manifests (es256)"),
        "{log}"
    );
    assert!(!log.contains("WARN"), "{log}");
}

fn subdir(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).unwrap();
    sub
}
