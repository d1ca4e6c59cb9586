//! The route table: every route the service answers, once. The router matches requests
//! against it and `/openapi.json` describes it, so the two cannot drift apart. Each route
//! family's handlers live in a module of its own; none of them imports the router.

pub mod generations;
pub mod images;
pub mod jobs;
pub mod loras;
pub mod openai;
pub mod service;
pub mod trainings;

/// A route's HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    /// Lower case, as OpenAPI writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Delete => "delete",
        }
    }

    pub fn of(method: &warp::http::Method) -> Option<Verb> {
        match *method {
            warp::http::Method::GET => Some(Verb::Get),
            warp::http::Method::POST => Some(Verb::Post),
            warp::http::Method::DELETE => Some(Verb::Delete),
            _ => None,
        }
    }
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone: probes, metrics and this document.
    Public,
    /// A tenant, by its bearer token.
    Token,
    /// A tenant by its token, or anyone holding a URL this service signed.
    TokenOrSignedUrl,
}

/// Which error shape a route answers in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Native,
    OpenAi,
}

/// What a route does; the router dispatches on it and the OpenAPI document describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    OpenApi,
    CreateGeneration,
    GetJob,
    CancelJob,
    JobEvents,
    CreateTraining,
    GetTraining,
    CancelTraining,
    TrainingEvents,
    Upload,
    GetImage,
    DeleteImage,
    Load,
    Styles,
    ListLoras,
    CreateLora,
    DeleteLora,
    OpenAiGenerations,
    OpenAiEdits,
}

/// One route: method and path template (`{name}` matches one path segment).
#[derive(Debug)]
pub struct Route {
    pub verb: Verb,
    pub path: &'static str,
    pub summary: &'static str,
    pub access: Access,
    pub endpoint: Endpoint,
}

impl Route {
    pub fn dialect(&self) -> Dialect {
        match self.endpoint {
            Endpoint::OpenAiGenerations | Endpoint::OpenAiEdits => Dialect::OpenAi,
            _ => Dialect::Native,
        }
    }

    /// The path's values for the template's `{name}` segments, in order, when `path`
    /// (without its query) fits the template.
    pub fn matches<'p>(&self, path: &'p str) -> Option<Vec<&'p str>> {
        let mut template = self.path.trim_start_matches('/').split('/');
        let mut given = path.trim_start_matches('/').split('/');
        let mut values = Vec::new();
        loop {
            match (template.next(), given.next()) {
                (None, None) => return Some(values),
                (Some(t), Some(g)) if t.starts_with('{') && t.ends_with('}') => values.push(g),
                (Some(t), Some(g)) if t == g => {}
                _ => return None,
            }
        }
    }
}

const fn route(
    verb: Verb,
    path: &'static str,
    access: Access,
    endpoint: Endpoint,
    summary: &'static str,
) -> Route {
    Route {
        verb,
        path,
        summary,
        access,
        endpoint,
    }
}

use Access::{Public, Token, TokenOrSignedUrl};
use Verb::{Delete, Get, Post};

/// Every route the service answers.
pub static ROUTES: &[Route] = &[
    route(Get, "/healthz", Public, Endpoint::Healthz, "Liveness"),
    route(
        Get,
        "/readyz",
        Public,
        Endpoint::Readyz,
        "Readiness: model loaded, worker alive",
    ),
    route(
        Get,
        "/metrics",
        Public,
        Endpoint::Metrics,
        "Prometheus metrics",
    ),
    route(
        Get,
        "/openapi.json",
        Public,
        Endpoint::OpenApi,
        "This document",
    ),
    route(
        Post,
        "/v1/generations",
        Token,
        Endpoint::CreateGeneration,
        "Generate images (synchronous; asynchronous with Prefer: respond-async)",
    ),
    route(Get, "/v1/jobs/{id}", Token, Endpoint::GetJob, "A job"),
    route(
        Delete,
        "/v1/jobs/{id}",
        Token,
        Endpoint::CancelJob,
        "Cancel a job (between denoising steps)",
    ),
    route(
        Get,
        "/v1/jobs/{id}/events",
        Token,
        Endpoint::JobEvents,
        "A job's events (Server-Sent Events)",
    ),
    route(
        Post,
        "/v1/trainings",
        Token,
        Endpoint::CreateTraining,
        "Train a DreamBooth LoRA on uploaded photos (runs imagegen train); 202 + Location",
    ),
    route(
        Get,
        "/v1/trainings/{id}",
        Token,
        Endpoint::GetTraining,
        "A training",
    ),
    route(
        Delete,
        "/v1/trainings/{id}",
        Token,
        Endpoint::CancelTraining,
        "Cancel a training",
    ),
    route(
        Get,
        "/v1/trainings/{id}/events",
        Token,
        Endpoint::TrainingEvents,
        "A training's events (Server-Sent Events, with the loss)",
    ),
    route(
        Post,
        "/v1/uploads",
        Token,
        Endpoint::Upload,
        "Upload an input image (raw body or multipart)",
    ),
    route(
        Post,
        "/v1/images/generations",
        Token,
        Endpoint::OpenAiGenerations,
        "OpenAI-compatible image generation",
    ),
    route(
        Post,
        "/v1/images/edits",
        Token,
        Endpoint::OpenAiEdits,
        "OpenAI-compatible image edit (transparent mask pixels are repainted)",
    ),
    route(
        Get,
        "/v1/images/{id}",
        TokenOrSignedUrl,
        Endpoint::GetImage,
        "A generated image: PNG, JPEG or WebP by extension or Accept",
    ),
    route(
        Delete,
        "/v1/images/{id}",
        Token,
        Endpoint::DeleteImage,
        "Delete a generated image",
    ),
    route(
        Get,
        "/v1/load",
        Token,
        Endpoint::Load,
        "How busy this runtime is: queue, running jobs, loaded and queued LoRAs, trainings, \
         device memory (cheap: no device call)",
    ),
    route(Get, "/v1/styles", Token, Endpoint::Styles, "Style presets"),
    route(
        Get,
        "/v1/loras",
        Token,
        Endpoint::ListLoras,
        "The tenant's LoRAs",
    ),
    route(
        Post,
        "/v1/loras",
        Token,
        Endpoint::CreateLora,
        "Upload a LoRA (safetensors)",
    ),
    route(
        Delete,
        "/v1/loras/{name}",
        Token,
        Endpoint::DeleteLora,
        "Delete a LoRA",
    ),
];

/// Why no route takes a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// The path is served, with other methods (405).
    OtherMethods,
    /// No route has the path (404).
    NoSuchPath,
}

/// The route for `verb` on `path`, with its path values.
pub fn find(verb: Option<Verb>, path: &str) -> Result<(&'static Route, Vec<&str>), Miss> {
    let mut miss = Miss::NoSuchPath;
    for route in ROUTES {
        if let Some(values) = route.matches(path) {
            if Some(route.verb) == verb {
                return Ok((route, values));
            }
            miss = Miss::OtherMethods;
        }
    }
    Err(miss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_segment_by_segment() {
        let job = &ROUTES[5];
        assert_eq!(job.path, "/v1/jobs/{id}");
        assert_eq!(job.matches("/v1/jobs/abc"), Some(vec!["abc"]));
        assert_eq!(job.matches("/v1/jobs/abc/events"), None);
        assert_eq!(job.matches("/v1/jobs"), None);
        assert_eq!(job.matches("/v1/loras/abc"), None);
    }

    #[test]
    fn fixed_paths_win_over_templates_and_methods_are_told_apart() {
        let (route, _) = find(Some(Verb::Post), "/v1/images/generations").unwrap();
        assert_eq!(route.endpoint, Endpoint::OpenAiGenerations);
        let (route, values) = find(Some(Verb::Get), "/v1/images/abc.png").unwrap();
        assert_eq!(
            (route.endpoint, values),
            (Endpoint::GetImage, vec!["abc.png"])
        );
        let miss = |verb, path| find(verb, path).map(|_| ()).unwrap_err();
        assert_eq!(miss(Some(Verb::Post), "/v1/images/abc"), Miss::OtherMethods);
        assert_eq!(miss(None, "/healthz"), Miss::OtherMethods);
        assert_eq!(miss(Some(Verb::Get), "/v1/nothing"), Miss::NoSuchPath);
    }

    #[test]
    fn no_two_routes_take_the_same_request() {
        for (i, a) in ROUTES.iter().enumerate() {
            let concrete = a.path.replace("{id}", "x").replace("{name}", "x");
            let (found, _) = find(Some(a.verb), &concrete).unwrap();
            assert!(
                std::ptr::eq(found, a),
                "{} {} is shadowed by {} {}",
                a.verb.as_str(),
                a.path,
                found.verb.as_str(),
                found.path
            );
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.verb == b.verb && a.path == b.path),
                    "{} {} twice",
                    a.verb.as_str(),
                    a.path
                );
            }
        }
    }
}
