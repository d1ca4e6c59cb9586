//! Bearer tokens → tenants. Tokens are compared in constant time (over their SHA-256, so
//! that a token's length leaks nothing either).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// The tenant of requests when the service runs without tokens (loopback or --insecure).
pub const OPEN_TENANT: &str = "default";

pub struct Auth {
    /// (tenant, SHA-256 of its token).
    tokens: Vec<(String, [u8; 32])>,
}

impl Auth {
    /// `tokens`: token → tenant.
    pub fn new(tokens: &std::collections::BTreeMap<String, String>) -> Self {
        Auth {
            tokens: tokens
                .iter()
                .map(|(token, tenant)| (tenant.clone(), Sha256::digest(token.as_bytes()).into()))
                .collect(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The tenant an `Authorization` header value belongs to.
    pub fn tenant(&self, authorization: Option<&str>) -> Result<String, ApiError> {
        if self.is_open() {
            return Ok(OPEN_TENANT.to_string());
        }
        let Some(value) = authorization else {
            return Err(ApiError::unauthorized(
                "missing `Authorization: Bearer <token>`",
            ));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| ApiError::unauthorized("the Authorization header is not Bearer"))?
            .trim();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Every entry is compared, whichever matches.
        let mut found: Option<&str> = None;
        for (tenant, expected) in &self.tokens {
            if bool::from(expected.ct_eq(&digest)) {
                found = Some(tenant);
            }
        }
        found
            .map(str::to_string)
            .ok_or_else(|| ApiError::unauthorized("unknown token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_tenants() {
        let mut map = std::collections::BTreeMap::new();
        map.insert("token-aaaa".to_string(), "a".to_string());
        map.insert("token-bbbb".to_string(), "b".to_string());
        map.insert("token-aaa2".to_string(), "a".to_string());
        let auth = Auth::new(&map);
        assert_eq!(auth.tenant(Some("Bearer token-bbbb")).unwrap(), "b");
        assert_eq!(auth.tenant(Some("Bearer token-aaaa")).unwrap(), "a");
        assert_eq!(auth.tenant(Some("Bearer token-aaa2")).unwrap(), "a");
        assert!(auth.tenant(Some("Bearer token-cccc")).is_err());
        assert!(auth.tenant(Some("token-aaaa")).is_err());
        assert!(auth.tenant(None).is_err());
        let open = Auth::new(&Default::default());
        assert_eq!(open.tenant(None).unwrap(), OPEN_TENANT);
    }
}
