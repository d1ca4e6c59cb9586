//! C2PA content credentials: when the deployment configures a certificate and key, every image
//! the service hands out carries a manifest signed with them, saying that it was created by
//! a trained algorithm (IPTC `trainedAlgorithmicMedia`, the same claim as the XMP marking)
//! and by which software. Stored PNGs are signed once, when they are written; JPEG and WebP
//! are signed after each conversion, since a conversion makes a new asset.
//!
//! Signing stays inside the process: no time-stamp authority and no remote manifests, so a
//! signature never waits on the network.

use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;

use c2pa::{BoxedSigner, Builder, Context, Reader, SigningAlg, ValidationState};

use super::format::Format;
use imagegen_engine::image::output::DIGITAL_SOURCE_TYPE;

/// The algorithms tried against a key, in order: the key's type decides which one works.
const ALGORITHMS: [SigningAlg; 5] = [
    SigningAlg::Es256,
    SigningAlg::Es384,
    SigningAlg::Es512,
    SigningAlg::Ps256,
    SigningAlg::Ed25519,
];

/// A signer built from a certificate chain and its private key.
pub struct ContentCredentials {
    signer: BoxedSigner,
    alg: SigningAlg,
    context: Arc<Context>,
}

impl std::fmt::Debug for ContentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContentCredentials")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl ContentCredentials {
    /// Reads PEM files: the certificate chain (signing certificate first) and the private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, String> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path).map_err(|e| format!("C2PA {what} {}: {e}", path.display()))
        };
        Self::from_pem(&read(cert, "certificate")?, &read(key, "key")?)
    }

    /// Finds the algorithm the key signs with and proves the pair works by signing a small
    /// image and validating it, so a wrong or mismatched pair stops the service at start
    /// rather than failing every image later.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<Self, String> {
        let context = Arc::new(context()?);
        let mut errors = Vec::new();
        for alg in ALGORITHMS {
            let signer = match c2pa::create_signer::from_keys(cert, key, alg, None) {
                Ok(signer) => signer,
                Err(e) => {
                    errors.push(format!("{alg}: {e}"));
                    continue;
                }
            };
            let credentials = ContentCredentials {
                signer,
                alg,
                context: context.clone(),
            };
            match credentials.probe() {
                Ok(()) => return Ok(credentials),
                Err(e) => errors.push(format!("{alg}: {e}")),
            }
        }
        Err(format!(
            "C2PA certificate and key: no signature algorithm works with them ({})",
            errors.join("; ")
        ))
    }

    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// `bytes` (an encoded image of `format`) with a signed manifest embedded.
    pub fn sign(&self, bytes: &[u8], format: Format) -> Result<Vec<u8>, String> {
        let mut builder = Builder::from_shared_context(&self.context)
            .with_definition(definition())
            .map_err(|e| format!("C2PA manifest: {e}"))?;
        let mut source = Cursor::new(bytes);
        let mut signed = Cursor::new(Vec::with_capacity(bytes.len() + 16 * 1024));
        builder
            .sign(
                self.signer.as_ref(),
                format.content_type(),
                &mut source,
                &mut signed,
            )
            .map_err(|e| format!("C2PA signing: {e}"))?;
        Ok(signed.into_inner())
    }

    fn probe(&self) -> Result<(), String> {
        let image = image::RgbImage::from_pixel(8, 8, image::Rgb([90, 120, 200]));
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(image)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| e.to_string())?;
        let signed = self.sign(&png, Format::Png)?;
        let report = read(&signed, Format::Png, None)?;
        if report.state == ValidationState::Invalid {
            return Err(format!(
                "the signed probe image does not validate: {}",
                report.failures.join(", ")
            ));
        }
        Ok(())
    }
}

/// What a reader finds in an image: the validation state, the failure codes, and the
/// active manifest as JSON.
#[derive(Debug)]
pub struct ManifestReport {
    pub state: ValidationState,
    pub failures: Vec<String>,
    pub manifest: serde_json::Value,
}

/// Reads and validates the manifest embedded in `bytes`; with `trust_anchors` (a PEM bundle
/// of root certificates) a signer that chains up to one of them is Trusted, not just Valid.
pub fn read(
    bytes: &[u8],
    format: Format,
    trust_anchors: Option<&str>,
) -> Result<ManifestReport, String> {
    let mut context = context()?;
    if let Some(anchors) = trust_anchors {
        context = context
            .with_settings(serde_json::json!({ "trust": { "user_anchors": anchors } }))
            .map_err(|e| format!("C2PA trust anchors: {e}"))?;
    }
    let reader = Reader::from_shared_context(&Arc::new(context))
        .with_stream(format.content_type(), Cursor::new(bytes))
        .map_err(|e| format!("C2PA manifest: {e}"))?;
    let failures = reader
        .validation_results()
        .and_then(|r| r.active_manifest())
        .map(|m| m.failure().iter().map(|s| s.code().to_string()).collect())
        .unwrap_or_default();
    let manifest = match reader.active_manifest() {
        Some(m) => serde_json::to_value(m).map_err(|e| e.to_string())?,
        None => serde_json::Value::Null,
    };
    Ok(ManifestReport {
        state: reader.validation_state(),
        failures,
        manifest,
    })
}

/// Settings for both sides: nothing fetched from the network, and no thumbnail (the
/// manifest vouches for the image itself; a copy of it inside would only add bytes).
fn context() -> Result<Context, String> {
    Context::new()
        .with_settings(serde_json::json!({
            "verify": { "remote_manifest_fetch": false, "ocsp_fetch": false },
            "builder": { "thumbnail": { "enabled": false } },
        }))
        .map_err(|e| format!("C2PA settings: {e}"))
}

/// The manifest: made by this software, as a trained algorithm's output.
fn definition() -> serde_json::Value {
    let agent = serde_json::json!({ "name": "imagegen", "version": env!("CARGO_PKG_VERSION") });
    serde_json::json!({
        "claim_generator_info": [agent],
        "assertions": [{
            "label": "c2pa.actions",
            "data": { "actions": [{
                "action": "c2pa.created",
                "digitalSourceType": DIGITAL_SOURCE_TYPE,
                "softwareAgent": agent,
            }]},
        }],
    })
}
