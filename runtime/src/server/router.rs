//! The router: warp hands every request to [`handle`], which finds its route in the route
//! table, checks who is calling, and calls the route family's handler. Every error is JSON
//! (`{error:{code,message,field}}`), the OpenAI-compatible routes' in OpenAI's shape.

use std::sync::Arc;

use bytes::Buf;
use futures_util::{Stream, StreamExt};
use imagegen_crds::api::codes;
use warp::http::{HeaderMap, Method, StatusCode};
use warp::reply::Response;

use super::error::ApiError;
use super::reply::Request;
use super::routes::{
    self, generations, images, jobs, loras, openai, service, trainings, Access, Dialect, Endpoint,
    Miss, Verb,
};
use super::Shared;

pub async fn handle<S, B>(
    method: Method,
    path: warp::path::FullPath,
    query: String,
    headers: HeaderMap,
    body: S,
    shared: Arc<Shared>,
) -> Response
where
    S: Stream<Item = Result<B, warp::Error>> + Send + 'static,
    B: Buf + Send,
{
    let request = Request {
        method,
        query,
        headers,
        body: std::sync::Mutex::new(Some(Box::pin(body.map(|chunk| {
            chunk.map(|mut b| {
                let n = b.remaining();
                b.copy_to_bytes(n)
            })
        })))),
        shared: shared.clone(),
    };
    let path = path.as_str();
    let found = routes::find(Verb::of(&request.method), path);
    let dialect = found.as_ref().map_or(Dialect::Native, |(r, _)| r.dialect());
    let response = match found {
        Ok((route, values)) => dispatch(route.endpoint, route.access, &values, request).await,
        Err(Miss::OtherMethods) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            codes::BAD_REQUEST,
            "method not allowed on this path",
        )),
        Err(Miss::NoSuchPath) => Err(ApiError::not_found(format!("no route {path}"))),
    };
    let response = match response {
        Ok(response) => response,
        Err(error) => match dialect {
            Dialect::Native => error.into_response(),
            Dialect::OpenAi => openai::error_response(error),
        },
    };
    shared
        .metrics
        .http_requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        shared.metrics.rejected_queue_full.inc();
    }
    response
}

/// Calls `endpoint`'s handler; `values` are the path's `{name}` segments in order.
async fn dispatch(
    endpoint: Endpoint,
    access: Access,
    values: &[&str],
    mut request: Request,
) -> Result<Response, ApiError> {
    let value = values.first().copied().unwrap_or_default();
    // Public routes' handlers take no tenant.
    let tenant = match access {
        Access::Public => String::new(),
        Access::Token => request.tenant()?,
        Access::TokenOrSignedUrl => match images::signed_url_tenant(&request, value)? {
            Some(tenant) => tenant,
            None => request.tenant()?,
        },
    };
    let shared = request.shared.clone();
    match endpoint {
        Endpoint::Healthz => Ok(service::healthz()),
        Endpoint::Readyz => service::readyz(&shared),
        Endpoint::Metrics => Ok(service::metrics(&shared)),
        Endpoint::OpenApi => Ok(service::openapi()),
        Endpoint::Load => service::load(&shared, &tenant),
        Endpoint::Styles => Ok(service::styles(&shared)),
        Endpoint::CreateGeneration => generations::create(request, tenant).await,
        Endpoint::GetJob => jobs::get(&shared.jobs, &tenant, value, "job").await,
        Endpoint::CancelJob => jobs::cancel(&shared.jobs, &tenant, value).await,
        Endpoint::JobEvents => jobs::events(&shared.jobs, &tenant, value).await,
        Endpoint::CreateTraining => trainings::create(&mut request, &tenant).await,
        Endpoint::GetTraining => jobs::get(&shared.trainings, &tenant, value, "training").await,
        Endpoint::CancelTraining => jobs::cancel(&shared.trainings, &tenant, value).await,
        Endpoint::TrainingEvents => jobs::events(&shared.trainings, &tenant, value).await,
        Endpoint::Upload => images::upload(&mut request, &tenant).await,
        Endpoint::GetImage => images::get(&request, &tenant, value).await,
        Endpoint::DeleteImage => images::delete(&shared, &tenant, value).await,
        Endpoint::ListLoras => loras::list(&shared, &tenant).await,
        Endpoint::CreateLora => loras::create(&mut request, &tenant).await,
        Endpoint::DeleteLora => loras::delete(&shared, &tenant, value).await,
        Endpoint::OpenAiGenerations => openai::generations(request, tenant).await,
        Endpoint::OpenAiEdits => openai::edits(request, tenant).await,
    }
}
