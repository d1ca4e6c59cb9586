//! `GET /openapi.json`: an OpenAPI 3.1 document of every route, its bodies' schemas generated
//! by schemars from the `imagegen_crds::api` types.

use imagegen_crds::api::{
    ErrorBody, GenerationRequest, Job, JobEvent, LoraInfo, RuntimeLoad, TrainingRequest, Upload,
};
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

/// A route as the document describes it.
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub public: bool,
}

/// Every route the service answers.
pub const ROUTES: &[Route] = &[
    Route {
        method: "get",
        path: "/healthz",
        summary: "Liveness",
        public: true,
    },
    Route {
        method: "get",
        path: "/readyz",
        summary: "Readiness: model loaded, worker alive",
        public: true,
    },
    Route {
        method: "get",
        path: "/metrics",
        summary: "Prometheus metrics",
        public: true,
    },
    Route {
        method: "get",
        path: "/openapi.json",
        summary: "This document",
        public: true,
    },
    Route {
        method: "post",
        path: "/v1/generations",
        summary: "Generate images (synchronous; asynchronous with Prefer: respond-async)",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/jobs/{id}",
        summary: "A job",
        public: false,
    },
    Route {
        method: "delete",
        path: "/v1/jobs/{id}",
        summary: "Cancel a job (between denoising steps)",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/jobs/{id}/events",
        summary: "A job's events (Server-Sent Events)",
        public: false,
    },
    Route {
        method: "post",
        path: "/v1/trainings",
        summary: "Train a DreamBooth LoRA on uploaded photos (runs imagegen train); 202 + Location",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/trainings/{id}",
        summary: "A training",
        public: false,
    },
    Route {
        method: "delete",
        path: "/v1/trainings/{id}",
        summary: "Cancel a training",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/trainings/{id}/events",
        summary: "A training's events (Server-Sent Events, with the loss)",
        public: false,
    },
    Route {
        method: "post",
        path: "/v1/uploads",
        summary: "Upload an input image (raw body or multipart)",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/images/{id}",
        summary: "A generated image: PNG, JPEG or WebP by extension or Accept",
        public: false,
    },
    Route {
        method: "delete",
        path: "/v1/images/{id}",
        summary: "Delete a generated image",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/load",
        summary: "How busy this runtime is: queue, running jobs, loaded and queued LoRAs, trainings, device memory (cheap: no device call)",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/styles",
        summary: "Style presets",
        public: false,
    },
    Route {
        method: "get",
        path: "/v1/loras",
        summary: "The tenant's LoRAs",
        public: false,
    },
    Route {
        method: "post",
        path: "/v1/loras",
        summary: "Upload a LoRA (safetensors)",
        public: false,
    },
    Route {
        method: "delete",
        path: "/v1/loras/{name}",
        summary: "Delete a LoRA",
        public: false,
    },
    Route {
        method: "post",
        path: "/v1/images/generations",
        summary: "OpenAI-compatible image generation",
        public: false,
    },
    Route {
        method: "post",
        path: "/v1/images/edits",
        summary: "OpenAI-compatible image edit (transparent mask pixels are repainted)",
        public: false,
    },
];

fn content(schema: Value) -> Value {
    json!({ "application/json": { "schema": schema } })
}

fn error_responses(errors: &Value, codes: &[&str]) -> Map<String, Value> {
    codes
        .iter()
        .map(|code| {
            (
                code.to_string(),
                json!({ "description": "error", "content": content(errors.clone()) }),
            )
        })
        .collect()
}

/// The document.
pub fn document() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "#/components/schemas/".into())
        .into_generator();
    let mut schema = |f: fn(&mut schemars::SchemaGenerator) -> schemars::Schema| {
        serde_json::to_value(f(&mut generator)).unwrap_or(Value::Null)
    };
    fn of<T: JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
        g.subschema_for::<T>()
    }
    let generation = schema(of::<GenerationRequest>);
    let training = schema(of::<TrainingRequest>);
    let job = schema(of::<Job>);
    let event = schema(of::<JobEvent>);
    let error = schema(of::<ErrorBody>);
    let upload = schema(of::<Upload>);
    let lora = schema(of::<LoraInfo>);
    let load = schema(of::<RuntimeLoad>);
    let definitions = generator.take_definitions(true);

    let openai_error = json!({
        "type": "object",
        "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}
    });
    let openai_images = json!({
        "type": "object",
        "required": ["created", "data"],
        "properties": {"created": {"type": "integer"}, "data": {"type": "array", "items": {
            "type": "object", "properties": {"b64_json": {"type": "string"}, "url": {"type": "string"}}}}}
    });
    let image_body = json!({
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"}}}}
        }
    });
    let all_errors = [
        "400", "401", "404", "409", "413", "415", "422", "429", "503",
    ];

    let mut paths = Map::new();
    for route in ROUTES {
        let mut op = Map::new();
        op.insert("summary".into(), json!(route.summary));
        op.insert(
            "operationId".into(),
            json!(format!(
                "{}{}",
                route.method,
                route
                    .path
                    .replace(['/', '.', '{', '}'], "_")
                    .trim_matches('_')
            )),
        );
        if route.public {
            op.insert("security".into(), json!([]));
        }
        let mut params: Vec<Value> = route
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if route.path == "/v1/images/{id}" {
            // A URL signed by the service (the OpenAI endpoints' URLs) needs no token.
            for name in ["tenant", "expires", "signature"] {
                params.push(json!({"name": name, "in": "query", "required": false, "schema": {"type": "string"}}));
            }
        }
        if !params.is_empty() {
            op.insert("parameters".into(), Value::Array(params));
        }
        let mut responses = Map::new();
        let ok =
            |description: &str, body: Value| json!({"description": description, "content": body});
        match (route.method, route.path) {
            ("post", "/v1/generations") => {
                op.insert(
                    "requestBody".into(),
                    json!({"required": true, "content": content(generation.clone())}),
                );
                op.insert("parameters".into(), json!([{"name": "Prefer", "in": "header", "schema": {"type": "string", "enum": ["respond-async"]}}]));
                responses.insert("200".into(), ok("the finished job", content(job.clone())));
                responses.insert(
                    "202".into(),
                    ok(
                        "the queued job; Location: /v1/jobs/{id}",
                        content(job.clone()),
                    ),
                );
                responses.extend(error_responses(&error, &all_errors));
            }
            ("get" | "delete", "/v1/jobs/{id}") => {
                responses.insert("200".into(), ok("the job", content(job.clone())));
                responses.extend(error_responses(&error, &["401", "404", "409"]));
            }
            ("post", "/v1/trainings") => {
                op.insert(
                    "requestBody".into(),
                    json!({"required": true, "content": content(training.clone())}),
                );
                responses.insert(
                    "202".into(),
                    ok(
                        "the queued training; Location: /v1/trainings/{id}",
                        content(job.clone()),
                    ),
                );
                responses.extend(error_responses(&error, &all_errors));
            }
            ("get" | "delete", "/v1/trainings/{id}") => {
                responses.insert("200".into(), ok("the training's job", content(job.clone())));
                responses.extend(error_responses(&error, &["401", "404", "409"]));
            }
            ("get", "/v1/jobs/{id}/events" | "/v1/trainings/{id}/events") => {
                responses.insert(
                    "200".into(),
                    ok(
                        "events: `event:` the type, `data:` a JobEvent",
                        json!({"text/event-stream": {"schema": event.clone()}}),
                    ),
                );
                responses.extend(error_responses(&error, &["401", "404"]));
            }
            ("post", "/v1/uploads") => {
                op.insert("requestBody".into(), image_body.clone());
                responses.insert("201".into(), ok("stored", content(upload.clone())));
                responses.extend(error_responses(
                    &error,
                    &["400", "401", "413", "415", "422"],
                ));
            }
            ("get", "/v1/images/{id}") => {
                responses.insert(
                    "200".into(),
                    ok(
                        "the image",
                        json!({"image/png": {}, "image/jpeg": {}, "image/webp": {}}),
                    ),
                );
                responses.extend(error_responses(&error, &["401", "404", "406"]));
            }
            ("get", "/v1/load") => {
                responses.insert("200".into(), ok("the load", content(load.clone())));
                responses.extend(error_responses(&error, &["401", "503"]));
            }
            ("get", "/v1/styles") => {
                responses.insert("200".into(), ok("style presets", content(json!({"type": "array", "items": {"type": "object", "properties": {
                    "id": {"type": "string"}, "name": {"type": "string"}, "prompt": {"type": "string"},
                    "negative_prompt": {"type": "string"}, "postprocess": {"type": "string"}}}}))));
            }
            ("get", "/v1/loras") => {
                responses.insert(
                    "200".into(),
                    ok(
                        "the tenant's LoRAs",
                        content(json!({"type": "array", "items": lora.clone()})),
                    ),
                );
            }
            ("post", "/v1/loras") => {
                op.insert("requestBody".into(), json!({"content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "name": {"type": "string"}, "file": {"type": "string", "format": "binary"}}}}}}));
                responses.insert("201".into(), ok("stored", content(lora.clone())));
                responses.extend(error_responses(
                    &error,
                    &["401", "409", "413", "415", "422"],
                ));
            }
            ("delete", "/v1/images/{id}" | "/v1/loras/{name}") => {
                responses.insert("204".into(), json!({"description": "deleted"}));
                responses.extend(error_responses(&error, &["401", "404"]));
            }
            ("post", "/v1/images/generations") => {
                op.insert("requestBody".into(), json!({"required": true, "content": content(json!({
                    "type": "object", "required": ["prompt"], "properties": {
                        "prompt": {"type": "string"}, "model": {"type": "string"}, "n": {"type": "integer"},
                        "size": {"type": "string", "pattern": "^[0-9]+x[0-9]+$"},
                        "response_format": {"type": "string", "enum": ["url", "b64_json"]},
                        "user": {"type": "string"}}}))}));
                responses.insert("200".into(), ok("images", content(openai_images.clone())));
                responses.extend(error_responses(&openai_error, &all_errors));
            }
            ("post", "/v1/images/edits") => {
                op.insert("requestBody".into(), json!({"required": true, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["image", "prompt"], "properties": {
                        "image": {"type": "string", "format": "binary"}, "mask": {"type": "string", "format": "binary"},
                        "prompt": {"type": "string"}, "model": {"type": "string"}, "n": {"type": "integer"},
                        "size": {"type": "string"}, "response_format": {"type": "string", "enum": ["url", "b64_json"]}}}}}}));
                responses.insert("200".into(), ok("images", content(openai_images.clone())));
                responses.extend(error_responses(&openai_error, &all_errors));
            }
            _ => {
                responses.insert("200".into(), json!({"description": "ok"}));
            }
        }
        op.insert("responses".into(), Value::Object(responses));
        let entry = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        entry[route.method] = Value::Object(op);
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "imagegen", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Self-hosted Stable Diffusion: generations, jobs, uploads, LoRAs and OpenAI-compatible image endpoints."},
        "paths": paths,
        "components": {
            "schemas": definitions,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
        },
        "security": [{"bearer": []}]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_schema_is_in_the_document() {
        let doc = document();
        for route in ROUTES {
            assert!(
                doc["paths"][route.path][route.method].is_object(),
                "{} {}",
                route.method,
                route.path
            );
        }
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for name in [
            "GenerationRequest",
            "Job",
            "ErrorBody",
            "Upload",
            "LoraInfo",
            "RuntimeLoad",
        ] {
            assert!(schemas.contains_key(name), "{name}: {:?}", schemas.keys());
        }
        // Every $ref resolves.
        let text = doc.to_string();
        for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = reference.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "dangling $ref {name}");
        }
    }
}
