//! Request input, checked against the API document before a handler sees
//! it: JSON bodies ([`ApiJson`]), query strings ([`ApiQuery`]) and path
//! parameters ([`ApiPath`]).
//!
//! A body or query is validated with a JSON Schema validator (the
//! `jsonschema` crate) against the schema the OpenAPI document publishes
//! for it, so what the document says — required fields, types, no unknown
//! fields (`additionalProperties: false`), string lengths, ranges — is
//! exactly what the server enforces: the two cannot drift apart. Only then
//! is the value deserialized. Every refusal is a 400 whose `field` is the
//! path of the offending field (`capacity.vcpus`, `vms[2].message`), with
//! the nearest known field name when an unknown one looks like a misspelling.

use super::ApiDoc;
use crate::error::Result;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::Bytes;
use jsonschema::error::{TypeKind, ValidationErrorKind};
use jsonschema::paths::{Location, LocationSegment};
use jsonschema::{ValidationError, Validator};
use kumo_api::{ApiError, ErrorCode};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use utoipa::{IntoParams, OpenApi, ToSchema};

/// The API document's schemas, and checkers compiled from them on first
/// use.
struct Schemas {
    /// The document's `components`, where every `$ref` points.
    components: Value,
    checkers: Mutex<HashMap<String, Arc<Checker>>>,
}

static SCHEMAS: LazyLock<Schemas> = LazyLock::new(|| {
    let doc = serde_json::to_value(ApiDoc::openapi()).expect("the API document serializes");
    Schemas {
        components: doc["components"].clone(),
        checkers: Mutex::default(),
    }
});

impl Schemas {
    /// The checker cached under `key`, compiled from `schema()` (with the
    /// document's components beside it) the first time.
    fn checker(&self, key: &str, schema: impl FnOnce() -> Value) -> Arc<Checker> {
        let mut cache = self.checkers.lock().expect("checker cache");
        // The common case, on every request: no key to allocate.
        if let Some(checker) = cache.get(key) {
            return checker.clone();
        }
        cache
            .entry(key.to_string())
            .or_insert_with(|| {
                let mut root = schema();
                root["components"] = self.components.clone();
                bound_integer_formats(&mut root);
                let validator = jsonschema::validator_for(&root)
                    .unwrap_or_else(|e| panic!("schema of {key} does not compile: {e}"));
                Arc::new(Checker { validator, root })
            })
            .clone()
    }
}

/// Give integers the range their OpenAPI `format` promises (`int32`,
/// `int64`; OpenAPI 3.1 §4.2), which JSON Schema itself does not check:
/// the server must not take a value the document rules out.
fn bound_integer_formats(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let max = match map.get("format").and_then(Value::as_str) {
                Some("int32") => Some(json!(i32::MAX)),
                Some("int64") => Some(json!(i64::MAX)),
                _ => None,
            };
            if let Some(max) = max {
                map.entry("maximum").or_insert(max);
            }
            map.values_mut().for_each(bound_integer_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integer_formats),
        _ => {}
    }
}

/// One schema, compiled.
struct Checker {
    validator: Validator,
    root: Value,
}

impl Checker {
    /// Check `value`; `whole` names the value as a whole (`body`, `query`)
    /// in errors about its root.
    fn check(&self, value: &Value, whole: &str) -> Result<(), ApiError> {
        match self.validator.validate(value) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.refusal(&e, whole)),
        }
    }

    fn refusal(&self, e: &ValidationError<'_>, whole: &str) -> ApiError {
        let at = |extra: Option<&str>| field_path(e.instance_path(), extra, whole);
        match e.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                let name = unexpected.first().map(String::as_str).unwrap_or_default();
                let known = self.known_properties(e.schema_path());
                ApiError::invalid(&at(Some(name)), unknown_field_message(name, &known))
            }
            ValidationErrorKind::Required { property } => {
                ApiError::invalid(&at(property.as_str()), "is required but missing")
            }
            ValidationErrorKind::OneOfNotValid { context }
            | ValidationErrorKind::AnyOf { context } => {
                // `Option<T>` is `oneOf: [null, T]`: report why it is not a T.
                match context.iter().flatten().find(|c| !is_null_type_error(c)) {
                    Some(inner) => self.refusal(inner, whole),
                    None => ApiError::invalid(&at(None), e.masked()),
                }
            }
            kind => ApiError::invalid(&at(None), describe(kind, e.instance())),
        }
    }

    /// The property names the object schema at `schema_path` (whose last
    /// segment is `additionalProperties`) declares.
    fn known_properties(&self, schema_path: &Location) -> Vec<String> {
        let parent = schema_path
            .as_str()
            .rsplit_once('/')
            .map_or("", |(parent, _)| parent);
        self.root
            .pointer(parent)
            .and_then(|s| s.get("properties"))
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }
}

fn is_null_type_error(e: &ValidationError<'_>) -> bool {
    matches!(
        e.kind(),
        ValidationErrorKind::Type {
            kind: TypeKind::Single(jsonschema::JsonType::Null)
        }
    )
}

/// `capacity.vcpus`, `vms[2].message`; `whole` for the root.
fn field_path(location: &Location, extra: Option<&str>, whole: &str) -> String {
    let mut out = String::new();
    for segment in location.segments() {
        match segment {
            LocationSegment::Index(i) => out.push_str(&format!("[{i}]")),
            LocationSegment::Property(p) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&p);
            }
        }
    }
    if let Some(extra) = extra {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(extra);
    }
    if out.is_empty() {
        whole.to_string()
    } else {
        out
    }
}

/// "unknown field; did you mean `requirements`? Known fields: …."
pub(super) fn unknown_field_message(name: &str, known: &[String]) -> String {
    let nearest = known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d);
    let mut msg = match nearest {
        Some((_, k)) => format!("unknown field; did you mean `{k}`?"),
        None => "unknown field.".to_string(),
    };
    if known.is_empty() {
        msg.push_str(" This takes none.");
    } else {
        msg.push_str(&format!(" Known fields: {}.", known.join(", ")));
    }
    msg
}

/// A short rendering of a value for an error message (never the whole of
/// a megabyte string).
fn short(value: &Value) -> String {
    let s = value.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What was wrong with a value and what is allowed.
fn describe(kind: &ValidationErrorKind, value: &Value) -> String {
    use ValidationErrorKind as K;
    match kind {
        K::Type { kind } => {
            let expected = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(set) => set
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            format!("expected {expected}, got {}", type_name(value))
        }
        K::MaxLength { limit } => format!(
            "is {} characters long; at most {limit} allowed",
            value.as_str().map_or(0, |s| s.chars().count())
        ),
        K::MinLength { limit } => format!("must be at least {limit} character(s) long"),
        K::Maximum { limit } => format!("{} is too large; at most {limit} allowed", short(value)),
        K::Minimum { limit } => format!("{} is too small; at least {limit} allowed", short(value)),
        K::ExclusiveMaximum { limit } => {
            format!("{} is too large; less than {limit} allowed", short(value))
        }
        K::ExclusiveMinimum { limit } => {
            format!("{} is too small; more than {limit} allowed", short(value))
        }
        K::MaxItems { limit } => format!(
            "has {} items; at most {limit} allowed",
            value.as_array().map_or(0, Vec::len)
        ),
        K::MaxProperties { limit } => format!(
            "has {} entries; at most {limit} allowed",
            value.as_object().map_or(0, Map::len)
        ),
        K::Enum { options } => {
            let allowed: Vec<String> = options
                .as_array()
                .map(|o| o.iter().map(Value::to_string).collect())
                .unwrap_or_default();
            format!(
                "{} is not allowed; use one of {}",
                short(value),
                allowed.join(", ")
            )
        }
        K::Pattern { pattern } => format!("{} does not have the form {pattern}", short(value)),
        K::PropertyNames { error } => {
            format!(
                "key {}: {}",
                short(error.instance()),
                describe(error.kind(), error.instance())
            )
        }
        other => format!("{} is not allowed here ({})", short(value), other.keyword()),
    }
}

/// A JSON body checked against the API document's schema for `T`, then
/// deserialized. The body is JSON whatever its `Content-Type` says; one
/// larger than the route's limit (2 MiB by default) is a 413.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned + ToSchema,
    S: Send + Sync,
{
    type Rejection = crate::Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    "body",
                    format!("body: {}", r.body_text()),
                )
            } else {
                ApiError::invalid("body", r.body_text())
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::invalid("body", format!("not valid JSON: {e}")))?;
        let name = T::name();
        SCHEMAS
            .checker(
                &name,
                || json!({ "$ref": format!("#/components/schemas/{name}") }),
            )
            .check(&value, "body")?;
        deserialize(value, "body").map(ApiJson)
    }
}

/// Deserialize a value the schema accepted; what the schema cannot say (a
/// UUID's form, a number's width) still names its field.
fn deserialize<T: DeserializeOwned>(value: Value, whole: &str) -> Result<T> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { whole.to_string() } else { path };
        ApiError::invalid(&field, e.into_inner()).into()
    })
}

/// A query string checked against the parameters the API document lists
/// for `T` (their types, ranges and lengths; no unknown or repeated ones),
/// then deserialized.
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + IntoParams,
    S: Send + Sync,
{
    type Rejection = crate::Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self> {
        let checker = SCHEMAS.checker(std::any::type_name::<T>(), query_schema::<T>);
        let value = query_value(parts.uri.query().unwrap_or(""), &checker.root)?;
        checker.check(&value, "query")?;
        deserialize(value, "query").map(ApiQuery)
    }
}

/// The object schema of a query: one property per parameter.
fn query_schema<T: IntoParams>() -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for p in T::into_params(|| Some(utoipa::openapi::path::ParameterIn::Query)) {
        let p = serde_json::to_value(p).expect("parameters serialize");
        let name = p["name"].as_str().unwrap_or_default().to_string();
        if p["required"] == Value::Bool(true) {
            required.push(Value::String(name.clone()));
        }
        properties.insert(name, p["schema"].clone());
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    })
}

/// The query as a JSON object, each value typed as its parameter's schema
/// says (`true`, `12`), so the same validator that checks bodies checks it.
fn query_value(query: &str, schema: &Value) -> Result<Value, ApiError> {
    let mut object = Map::new();
    for (key, raw) in form_urlencoded::parse(query.as_bytes()) {
        let types = schema["properties"][key.as_ref()]["type"].clone();
        let has =
            |t: &str| types == t || types.as_array().is_some_and(|a| a.iter().any(|x| x == t));
        let value = if has("boolean") && (raw == "true" || raw == "false") {
            Value::Bool(raw == "true")
        } else if has("integer") || has("number") {
            serde_json::from_str::<serde_json::Number>(&raw)
                .map(Value::Number)
                .unwrap_or_else(|_| Value::String(raw.to_string()))
        } else {
            Value::String(raw.to_string())
        };
        if object.insert(key.to_string(), value).is_some() {
            return Err(ApiError::invalid(&key, "is given more than once"));
        }
    }
    Ok(Value::Object(object))
}

/// The longest name a path can carry: names are at most 63 characters,
/// ids 36 (the API document says so of every `{name}`).
pub const MAX_PATH_NAME: usize = 63;

/// A path parameter; one that does not decode (bad percent-encoding, not
/// UTF-8) or is longer than [`MAX_PATH_NAME`] is a 400 naming the parameter.
pub struct ApiPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for ApiPath {
    type Rejection = crate::Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) if v.chars().count() > MAX_PATH_NAME => {
                Err(ApiError::invalid(
                    "name",
                    format!(
                        "is {} characters long; at most {MAX_PATH_NAME} allowed",
                        v.chars().count()
                    ),
                )
                .into())
            }
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::invalid("name", e.body_text()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspellings_find_their_field() {
        let known: Vec<String> = ["name", "requirements", "zone", "groups"]
            .map(String::from)
            .into();
        let msg = unknown_field_message("requirement", &known);
        assert!(msg.contains("did you mean `requirements`?"), "{msg}");
        let msg = unknown_field_message("zones", &known);
        assert!(msg.contains("did you mean `zone`?"), "{msg}");
        let msg = unknown_field_message("colour", &known);
        assert!(!msg.contains("did you mean"), "{msg}");
        assert!(
            msg.contains("Known fields: name, requirements, zone, groups."),
            "{msg}"
        );
    }

    #[test]
    fn body_errors_name_their_field() {
        let v = SCHEMAS.checker(
            "CreateVm",
            || json!({ "$ref": "#/components/schemas/CreateVm" }),
        );
        let check = |body: Value| v.check(&body, "body").unwrap_err();
        let base = json!({"name": "a", "image": "i", "vcpus": 1, "memory_mib": 64});
        let mut misspelt = base.clone();
        misspelt["requirement"] = json!("true");
        let e = check(misspelt);
        assert_eq!(e.field.as_deref(), Some("requirement"), "{e:?}");
        assert!(e.message.contains("`requirements`"), "{e:?}");
        let e = check(json!([null, null]));
        assert_eq!(e.field.as_deref(), Some("body"), "{e:?}");
        assert!(e.message.contains("got an array"), "{e:?}");
        let mut wrong = base.clone();
        wrong["vcpus"] = json!("two");
        assert_eq!(check(wrong).field.as_deref(), Some("vcpus"));
        let mut long = base.clone();
        long["requirements"] = json!("x".repeat(100_000));
        let e = check(long);
        assert_eq!(e.field.as_deref(), Some("requirements"));
        assert!(e.message.len() < 200, "{e:?}");
        let mut missing = base.clone();
        missing.as_object_mut().unwrap().remove("image");
        assert_eq!(check(missing).field.as_deref(), Some("image"));
        let mut policy = base;
        policy["cpu_policy"] = json!("exclusive");
        let e = check(policy);
        assert_eq!(e.field.as_deref(), Some("cpu_policy"), "{e:?}");
        assert!(e.message.contains("\"dedicated\""), "{e:?}");
    }

    #[test]
    fn queries_are_typed_by_their_schema() {
        let checker = SCHEMAS.checker("drain-test", query_schema::<kumo_api::DrainParams>);
        let schema = &checker.root;
        let v = query_value("dry_run=true", schema).unwrap();
        assert_eq!(v, json!({"dry_run": true}));
        let bad = query_value("dry_run=yes", schema).unwrap();
        let e = checker.check(&bad, "query").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("dry_run"), "{e:?}");
        let unknown = query_value("dry-run=true", schema).unwrap();
        let e = checker.check(&unknown, "query").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("dry-run"), "{e:?}");
        assert!(e.message.contains("`dry_run`"), "{e:?}");
        let e = query_value("dry_run=true&dry_run=false", schema).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("dry_run"));
        // u64 in Rust, int64 in the document: the document wins.
        let checker = SCHEMAS.checker("events-test", query_schema::<kumo_api::EventQuery>);
        let huge = query_value("after=9223372036854775808", &checker.root).unwrap();
        let e = checker.check(&huge, "query").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("after"), "{e:?}");
    }
}
