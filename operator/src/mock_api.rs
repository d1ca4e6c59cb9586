//! A mock Kubernetes API server for tests (tower-test): a client whose requests a test
//! answers one by one, checking each request's method and path.

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

/// The server side of a mock client: the requests it sends, to answer.
pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A client on a mock API server, with `namespace` as its default, and the handle that
/// answers its requests.
pub fn client(namespace: &str) -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, namespace), handle)
}

/// What a request sent: its query string and JSON body (null when it had none).
#[derive(Debug, Clone)]
pub struct Sent {
    pub query: String,
    pub body: Value,
}

/// Answers the next request, which must be `method path`, with `status` and `reply`;
/// returns what the request sent. Panics when no request comes or a different one does.
pub async fn answer(
    handle: &mut Handle,
    method: &Method,
    path: &str,
    status: u16,
    reply: &Value,
) -> Sent {
    let Some((request, respond)) = handle.next_request().await else {
        panic!("expected {method} {path}, but no more calls came");
    };
    let (parts, body) = request.into_parts();
    assert_eq!(
        (&parts.method, parts.uri.path()),
        (method, path),
        "unexpected call"
    );
    let bytes = body.collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(reply).unwrap()))
        .unwrap();
    respond.send_response(response);
    Sent {
        query: parts.uri.query().unwrap_or_default().to_string(),
        body,
    }
}

/// The API server's answer to a failed request.
pub fn api_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason,
           "message": message, "code": code})
}
