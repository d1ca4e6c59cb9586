//! Outbound HTTP: webhooks on job completion (signed) and input images by URL, both only
//! to hosts on the deployment's allow-lists.

use std::io::Read;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header carrying `sha256=<hex>` of the HMAC-SHA256 of the body.
pub const SIGNATURE_HEADER: &str = "X-Imagegen-Signature";

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The query string that lets `GET /v1/images/{id}` serve a tenant's image without a
/// token until `expires` (Unix seconds).
pub fn signed_image_query(key: &str, tenant: &str, id: &str, expires: i64) -> String {
    let signature = image_signature(key, tenant, id, expires);
    format!("tenant={tenant}&expires={expires}&signature={signature}")
}

fn image_signature(key: &str, tenant: &str, id: &str, expires: i64) -> String {
    let message = format!("{tenant}/{id}/{expires}");
    signature(key, message.as_bytes())
        .trim_start_matches("sha256=")
        .to_string()
}

/// Checks a signed image query; the tenant it grants.
pub fn verify_image_query(
    key: &str,
    id: &str,
    tenant: &str,
    expires: &str,
    given: &str,
    now: i64,
) -> Option<String> {
    use subtle::ConstantTimeEq;
    let expires: i64 = expires.parse().ok()?;
    if expires < now {
        return None;
    }
    let expected = image_signature(key, tenant, id, expires);
    bool::from(expected.as_bytes().ct_eq(given.as_bytes())).then(|| tenant.to_string())
}

/// The `host` and `host:port` of an http(s) URL.
pub fn url_host(url: &str) -> Option<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host.to_string(),
        _ => authority.clone(),
    };
    Some((host, authority))
}

/// Whether `url` is http(s) to a host (or host:port) on `allowed`.
pub fn allowed(url: &str, allowed: &[String]) -> bool {
    match url_host(url) {
        Some((host, authority)) => allowed.iter().any(|a| a == &host || a == &authority),
        None => false,
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .redirects(0)
        .build()
}

/// POSTs `body` to `url`, signed when a secret is set; retries twice. Blocking.
pub fn deliver(url: &str, body: &[u8], secret: Option<&str>) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(500 * attempt));
        }
        let mut request = agent()
            .post(url)
            .set("Content-Type", "application/json")
            .set("User-Agent", "imagegen-webhook");
        if let Some(secret) = secret {
            request = request.set(SIGNATURE_HEADER, &signature(secret, body));
        }
        match request.send_bytes(body) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Sends finished jobs to their webhooks, signed with the deployment's secret when one is
/// set, on the runtime's blocking pool: never on the thread that finished the job.
#[derive(Clone)]
pub struct Notifier {
    secret: Option<String>,
    runtime: tokio::runtime::Handle,
}

impl Notifier {
    pub fn new(secret: Option<String>, runtime: tokio::runtime::Handle) -> Self {
        Notifier { secret, runtime }
    }

    /// Posts `job` to `url` (retried; a failure is logged, nothing more).
    pub fn send(&self, job: imagegen_crds::api::Job, url: String) {
        let secret = self.secret.clone();
        self.runtime.spawn_blocking(move || {
            let body = match serde_json::to_vec(&job) {
                Ok(body) => body,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook body");
                    return;
                }
            };
            if let Err(e) = deliver(&url, &body, secret.as_deref()) {
                tracing::warn!(url = %url, job = %job.id, error = %e, "webhook not delivered");
            }
        });
    }
}

/// GETs an image from an allow-listed URL, at most `limit` bytes. Blocking.
pub fn fetch(url: &str, limit: u64) -> Result<Vec<u8>, String> {
    let response = agent().get(url).call().map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signed_image_queries_grant_one_image_until_they_expire() {
        let q = signed_image_query("k", "alice", "img1", 100);
        let sig = q.rsplit('=').next().unwrap();
        assert_eq!(
            verify_image_query("k", "img1", "alice", "100", sig, 50).as_deref(),
            Some("alice")
        );
        assert!(verify_image_query("k", "img1", "alice", "100", sig, 101).is_none());
        assert!(verify_image_query("k", "img2", "alice", "100", sig, 50).is_none());
        assert!(verify_image_query("k", "img1", "bob", "100", sig, 50).is_none());
        assert!(verify_image_query("other", "img1", "alice", "100", sig, 50).is_none());
        assert!(verify_image_query("k", "img1", "alice", "200", sig, 50).is_none());
    }

    #[test]
    fn hosts_are_checked_against_the_allow_list() {
        let list = vec![
            "hooks.example.com".to_string(),
            "127.0.0.1:9000".to_string(),
        ];
        assert!(allowed("https://hooks.example.com/a?b", &list));
        assert!(allowed("http://hooks.example.com:8443/a", &list));
        assert!(allowed("http://127.0.0.1:9000/x", &list));
        assert!(!allowed("http://127.0.0.1:9001/x", &list));
        assert!(!allowed("http://evil.com/hooks.example.com", &list));
        assert!(!allowed("http://hooks.example.com@evil.com/", &list));
        assert!(!allowed("file:///etc/passwd", &list));
    }
}
