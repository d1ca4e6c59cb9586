//! The generated definitions: the chart's copies are current, the schemas are structural,
//! the examples are valid and invalid resources are refused.

use std::path::PathBuf;

use imagegen_crds::{crd_yaml, crds, DiffusionModel, ImageGeneration, LoraTraining};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

fn repo_root() -> PathBuf {
    // Read when the test runs, not when it was built: a test binary reused from another
    // checkout carries that checkout's folder.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().unwrap().to_path_buf()
}

fn crd_for(kind: &str) -> CustomResourceDefinition {
    crds()
        .into_iter()
        .map(|(_, crd)| crd)
        .find(|crd| crd.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no definition of {kind}"))
}

fn open_api_schema(crd: &CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    let schema = version.schema.as_ref().unwrap().open_api_v3_schema.as_ref();
    serde_json::to_value(schema.unwrap()).unwrap()
}

#[test]
fn chart_crds_are_current() {
    let dir = repo_root().join("charts/imagegen/crds");
    for (file, crd) in crds() {
        let committed = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
        assert!(
            committed == crd_yaml(&crd),
            "charts/imagegen/crds/{file} is stale or missing: \
             run `cargo run -p imagegen-crds --bin crdgen -- charts/imagegen/crds`"
        );
    }
}

#[test]
fn names_group_and_subresources() {
    let expected = [
        ("ImageGeneration", "imagegenerations", "imggen"),
        ("LoraTraining", "loratrainings", "loratrain"),
        ("DiffusionModel", "diffusionmodels", "dmodel"),
    ];
    for (kind, plural, short) in expected {
        let crd = crd_for(kind);
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some(&*format!("{plural}.imagegen.dev"))
        );
        assert_eq!(crd.spec.group, "imagegen.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_string()][..])
        );
        assert_eq!(crd.spec.versions.len(), 1);
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        let status = version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref());
        assert!(status.is_some(), "{kind} has no status subresource");
    }
}

#[test]
fn printer_columns() {
    let expected: [(&str, &[&str]); 3] = [
        (
            "ImageGeneration",
            &["Phase", "Progress", "Model", "Mode", "Age"],
        ),
        (
            "LoraTraining",
            &["Phase", "Progress", "Model", "Loss", "Age"],
        ),
        (
            "DiffusionModel",
            &["Family", "Ready", "Replicas", "Endpoint", "Age"],
        ),
    ];
    for (kind, names) in expected {
        let crd = crd_for(kind);
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap();
        let got: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(got, names, "{kind}");
        for column in &columns {
            assert!(column.json_path.starts_with('.'), "{kind} {}", column.name);
        }
        let age = columns.last().unwrap();
        assert_eq!(
            (age.type_.as_str(), age.json_path.as_str()),
            ("date", ".metadata.creationTimestamp")
        );
    }
}

/// Kubernetes' rules for a structural schema (apiextensions.k8s.io/v1 refuses others), plus
/// what the apiserver does not resolve: references and definitions.
fn check_structural(schema: &Value, path: &str, problems: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    for key in [
        "$ref",
        "definitions",
        "$defs",
        "$schema",
        "const",
        "examples",
    ] {
        if obj.contains_key(key) {
            problems.push(format!("{path}: has {key}"));
        }
    }
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&json!(true));
    match obj.get("type").and_then(Value::as_str) {
        Some("object" | "array" | "string" | "integer" | "number" | "boolean") => {}
        Some(other) => problems.push(format!("{path}: type {other}")),
        None if preserve || int_or_string => {}
        None => problems.push(format!("{path}: no type")),
    }
    if obj.get("type").is_some_and(|t| !t.is_string()) {
        problems.push(format!("{path}: type is not one string"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        problems.push(format!("{path}: both properties and additionalProperties"));
    }
    if obj.get("type") == Some(&json!("array")) && !obj.contains_key("items") {
        problems.push(format!("{path}: array without items"));
    }
    if obj.get("uniqueItems") == Some(&json!(true)) {
        problems.push(format!("{path}: uniqueItems"));
    }
    let properties = obj.get("properties").and_then(Value::as_object);
    for junctor in ["allOf", "anyOf", "oneOf", "not"] {
        let Some(value) = obj.get(junctor) else {
            continue;
        };
        let branches: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for (i, branch) in branches.into_iter().enumerate() {
            check_value_validation(
                branch,
                &format!("{path}.{junctor}[{i}]"),
                properties,
                obj,
                problems,
            );
        }
    }
    if let Some(properties) = properties {
        for (name, sub) in properties {
            check_structural(sub, &format!("{path}.{name}"), problems);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(items, &format!("{path}[]"), problems);
    }
    if let Some(additional) = obj.get("additionalProperties").filter(|a| a.is_object()) {
        check_structural(additional, &format!("{path}{{}}"), problems);
    }
}

/// Inside allOf/anyOf/oneOf/not only value validations may appear, on fields that the
/// enclosing schema declares itself.
fn check_value_validation(
    branch: &Value,
    path: &str,
    properties: Option<&serde_json::Map<String, Value>>,
    parent: &serde_json::Map<String, Value>,
    problems: &mut Vec<String>,
) {
    let Some(obj) = branch.as_object() else {
        problems.push(format!("{path}: not an object"));
        return;
    };
    for key in [
        "type",
        "description",
        "default",
        "additionalProperties",
        "nullable",
        "$ref",
    ] {
        if obj.contains_key(key) {
            problems.push(format!("{path}: {key} inside a junctor"));
        }
    }
    for field in obj
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = field.as_str().unwrap_or_default();
        if !properties.is_some_and(|p| p.contains_key(field)) {
            problems.push(format!(
                "{path}: requires {field}, which is not declared outside"
            ));
        }
    }
    if let Some(inner) = obj.get("properties").and_then(Value::as_object) {
        for name in inner.keys() {
            if !properties.is_some_and(|p| p.contains_key(name)) {
                problems.push(format!("{path}: property {name} not declared outside"));
            }
        }
    }
    if obj.contains_key("items") && !parent.contains_key("items") {
        problems.push(format!("{path}: items not declared outside"));
    }
}

#[test]
fn schemas_are_structural() {
    for (file, crd) in crds() {
        let schema = open_api_schema(&crd);
        let mut problems = Vec::new();
        check_structural(&schema, "", &mut problems);
        assert!(problems.is_empty(), "{file}:\n{}", problems.join("\n"));
        // The top level is a plain object: no junctors there.
        for junctor in ["allOf", "anyOf", "oneOf", "not"] {
            assert!(
                schema.get(junctor).is_none(),
                "{file}: {junctor} at the top level"
            );
        }
        assert!(schema["properties"]["spec"].is_object(), "{file}");
        assert!(schema["properties"]["status"].is_object(), "{file}");
        // The merge helper checks that versions agree; it must accept a single one.
        kube::core::crd::merge_crds(vec![crd], "v1alpha1").unwrap();
    }
}

#[test]
fn validation_rules_are_in_the_schema() {
    let rules = |kind: &str| {
        let text = serde_json::to_string(&open_api_schema(&crd_for(kind))).unwrap();
        text.matches("\"rule\":").count()
    };
    assert!(
        rules("ImageGeneration") >= 6,
        "image/mask one-of and mode rules"
    );
    assert!(
        rules("LoraTraining") >= 2,
        "image one-of and prior preservation"
    );
    assert!(
        rules("DiffusionModel") >= 2,
        "source one-of and replica bounds"
    );
}

/// The resource's schema as the apiserver applies it with strict field validation
/// (`kubectl apply --validate=strict`): unknown fields are errors. apiVersion, kind and
/// metadata are checked by the apiserver itself, so they are declared here.
fn strict_validator(kind: &str) -> jsonschema::Validator {
    fn close_objects(schema: &mut Value) {
        let Some(obj) = schema.as_object_mut() else {
            return;
        };
        let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
        if obj.get("type") == Some(&json!("object")) && !preserve && obj.contains_key("properties")
        {
            obj.insert("additionalProperties".into(), json!(false));
        }
        for (key, value) in obj.iter_mut() {
            match key.as_str() {
                "properties" => value
                    .as_object_mut()
                    .unwrap()
                    .values_mut()
                    .for_each(close_objects),
                "items" => close_objects(value),
                _ => {}
            }
        }
    }
    let mut schema = open_api_schema(&crd_for(kind));
    close_objects(&mut schema);
    let properties = schema["properties"].as_object_mut().unwrap();
    properties.insert(
        "apiVersion".into(),
        json!({"enum": ["imagegen.dev/v1alpha1"]}),
    );
    properties.insert("kind".into(), json!({"enum": [kind]}));
    properties.insert("metadata".into(), json!({"type": "object"}));
    jsonschema::draft4::new(&schema).unwrap()
}

fn schema_errors(kind: &str, resource: &Value) -> Vec<String> {
    let validator = strict_validator(kind);
    validator
        .iter_errors(resource)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Typed deserialization refusing unknown fields at the top level too (serde refuses them
/// below it).
fn typed<T: DeserializeOwned>(resource: &Value) -> Result<T, String> {
    let top = resource.as_object().ok_or("not an object")?;
    for key in top.keys() {
        if !["apiVersion", "kind", "metadata", "spec", "status"].contains(&key.as_str()) {
            return Err(format!("unknown field `{key}`"));
        }
    }
    serde_json::from_value(resource.clone()).map_err(|e| e.to_string())
}

fn load_example(name: &str) -> Value {
    let path = repo_root().join("examples").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Both checks, the typed one and the schema's: `Ok` only when both accept it.
fn check(resource: &Value) -> Result<(), String> {
    let kind = resource["kind"].as_str().ok_or("no kind")?;
    let typed_result = match kind {
        "ImageGeneration" => typed::<ImageGeneration>(resource).map(drop),
        "LoraTraining" => typed::<LoraTraining>(resource).map(drop),
        "DiffusionModel" => typed::<DiffusionModel>(resource).map(drop),
        other => return Err(format!("unknown kind {other}")),
    };
    let schema = schema_errors(kind, resource);
    match (typed_result, schema.is_empty()) {
        (Ok(()), true) => Ok(()),
        (Err(e), false) => Err(format!("typed: {e}; schema: {}", schema.join("; "))),
        (Ok(()), false) => Err(format!("typed: ok; schema: {}", schema.join("; "))),
        (Err(e), true) => Err(format!("typed: {e}; schema: ok")),
    }
}

#[test]
fn examples_are_valid() {
    let mut names: Vec<String> = std::fs::read_dir(repo_root().join("examples"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml"))
        .collect();
    names.sort();
    for expected in [
        "avatar.yaml",
        "diffusion-model.yaml",
        "inpaint-with-lora.yaml",
        "lora-training.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "examples/{expected} is missing"
        );
    }
    for name in names {
        check(&load_example(&name)).unwrap_or_else(|e| panic!("examples/{name}: {e}"));
    }
}

#[test]
fn examples_deserialize_to_what_they_say() {
    let avatar: ImageGeneration = typed(&load_example("avatar.yaml")).unwrap();
    assert_eq!(avatar.spec.model_ref.name, "sd15");
    assert_eq!(avatar.spec.params.style.as_deref(), Some("portrait"));
    assert_eq!(avatar.spec.params.count, Some(4));

    let inpaint: ImageGeneration = typed(&load_example("inpaint-with-lora.yaml")).unwrap();
    assert_eq!(inpaint.spec.params.mode, Some(imagegen_crds::Mode::Inpaint));
    assert_eq!(inpaint.spec.loras[0].name, "alice");
    assert_eq!(inpaint.spec.mask_prompt.as_deref(), Some("shirt"));

    let training: LoraTraining = typed(&load_example("lora-training.yaml")).unwrap();
    assert_eq!(training.metadata.name.as_deref(), Some("alice"));
    assert_eq!(training.spec.images.len(), 4);
}

/// Applies `edit` to a copy of an example and expects both checks to refuse it.
fn assert_refused(example: &str, what: &str, edit: impl FnOnce(&mut Value)) {
    let mut resource = load_example(example);
    edit(&mut resource);
    let validator = strict_validator(resource["kind"].as_str().unwrap());
    assert!(
        !validator.is_valid(&resource),
        "{what}: the schema accepted it"
    );
    let typed_result = match resource["kind"].as_str().unwrap() {
        "ImageGeneration" => typed::<ImageGeneration>(&resource).map(drop),
        "LoraTraining" => typed::<LoraTraining>(&resource).map(drop),
        _ => typed::<DiffusionModel>(&resource).map(drop),
    };
    // Ranges are the schema's job alone; shape errors must fail both.
    if !what.starts_with("range:") {
        assert!(typed_result.is_err(), "{what}: serde accepted it");
    }
}

#[test]
fn invalid_resources_are_refused() {
    assert_refused("avatar.yaml", "range: steps 0", |r| {
        r["spec"]["steps"] = json!(0)
    });
    assert_refused("avatar.yaml", "range: count 0", |r| {
        r["spec"]["count"] = json!(0)
    });
    assert_refused("avatar.yaml", "range: width not a multiple of 8", |r| {
        r["spec"]["width"] = json!(500)
    });
    assert_refused("avatar.yaml", "range: unknown scheduler", |r| {
        r["spec"]["scheduler"] = json!("lms")
    });
    assert_refused("avatar.yaml", "range: prompt too long", |r| {
        r["spec"]["prompt"] = json!("x".repeat(2001))
    });
    assert_refused("avatar.yaml", "unknown spec field", |r| {
        r["spec"]["stepz"] = json!(3)
    });
    assert_refused("avatar.yaml", "unknown top-level field", |r| {
        r["extra"] = json!(1)
    });
    assert_refused("avatar.yaml", "no prompt", |r| {
        r["spec"].as_object_mut().unwrap().remove("prompt");
    });
    assert_refused("avatar.yaml", "no modelRef", |r| {
        r["spec"].as_object_mut().unwrap().remove("modelRef");
    });
    assert_refused("avatar.yaml", "lowercase mode", |r| {
        r["spec"]["mode"] = json!("inpaint")
    });
    assert_refused("inpaint-with-lora.yaml", "image with path and url", |r| {
        r["spec"]["image"]["url"] = json!("https://example.com/a.png")
    });
    assert_refused("inpaint-with-lora.yaml", "inline image bytes", |r| {
        r["spec"]["image"] = json!({"data": "iVBORw0KGgo="})
    });
    assert_refused("inpaint-with-lora.yaml", "unknown lora field", |r| {
        r["spec"]["loras"][0]["scale"] = json!(1)
    });
    assert_refused("lora-training.yaml", "range: rank 0", |r| {
        r["spec"]["rank"] = json!(0)
    });
    assert_refused("lora-training.yaml", "range: no images", |r| {
        r["spec"]["images"] = json!([])
    });
    assert_refused("lora-training.yaml", "no instancePrompt", |r| {
        r["spec"].as_object_mut().unwrap().remove("instancePrompt");
    });
    assert_refused("diffusion-model.yaml", "two sources", |r| {
        r["spec"]["source"]["path"] = json!("models/sd15")
    });
    assert_refused("diffusion-model.yaml", "unknown family", |r| {
        r["spec"]["family"] = json!("sd3")
    });
    assert_refused("diffusion-model.yaml", "unknown dtype", |r| {
        r["spec"]["dtype"] = json!("fp16")
    });
}
