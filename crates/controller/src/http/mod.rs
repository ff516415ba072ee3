//! The REST API under `/v1`. Handlers only translate HTTP to calls into
//! [`crate::app`]; who may call what is the table in [`auth`]; request
//! input is checked against the API document in [`input`].

mod agent;
mod auth;
mod capacity;
mod events;
mod groups;
mod hosts;
mod images;
mod input;
mod join_tokens;
mod power;
mod rebalance;
mod vms;
mod zones;

use crate::app::App;
use crate::error::Result;
use auth::Documented;
use axum::extract::{Request, State};
use axum::http::{Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
pub use input::{ApiJson, ApiPath, ApiQuery};
use kumo_api::{ApiError, ErrorCode};
use std::sync::Arc;
use utoipa::OpenApi;

pub type AppState = State<Arc<App>>;

/// Who is calling.
#[derive(Clone, Debug)]
pub enum Principal {
    Admin,
    /// An agent, by host name.
    Host(String),
    /// No token: public routes and host registration (with a join token).
    Anonymous,
}

impl Principal {
    fn host(&self) -> Result<&str> {
        match self {
            Principal::Host(h) => Ok(h),
            _ => Err(ApiError::new(
                ErrorCode::Forbidden,
                "authorization",
                "authorization: this endpoint is for host agents",
            )
            .into()),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "kumo", description = "kumo private IaaS cloud API"),
    paths(
        zones::list, zones::create, zones::show, zones::delete,
        zones::drain, zones::drain_status, zones::undrain,
        hosts::list, hosts::show, hosts::update, hosts::delete, hosts::disable, hosts::enable,
        hosts::drain, hosts::undrain,
        join_tokens::list, join_tokens::create,
        images::list, images::import, images::show, images::delete, images::data,
        vms::list, vms::create, vms::show, vms::delete, vms::start, vms::stop, vms::reboot,
        vms::migrate, vms::migrate_cancel,
        vms::console_log, vms::console,
        events::list,
        groups::list, groups::create, groups::show, groups::delete,
        capacity::show,
        rebalance::show,
        power::show, power::set, power::off,
        agent::register, agent::heartbeat, agent::desired,
        health, openapi_json,
    ),
    modifiers(&Documented),
)]
pub struct ApiDoc;

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "OpenAPI document")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Whether the controller serves requests (for load balancers and probes).
#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = kumo_api::Health)))]
async fn health() -> Json<kumo_api::Health> {
    Json(kumo_api::Health {
        status: "ok".into(),
    })
}

/// The longest request URI served, bytes: room for every documented query
/// parameter at its longest, percent-encoded (4096 characters of 4-byte
/// UTF-8 are 48 KiB). Longer ones get a 414 with kumo's error body. (hyper
/// itself refuses request heads that do not fit its read buffer, about
/// 400 KiB, and URIs over 64 KiB, the most the `http` crate parses, with an
/// empty 414 or 431.)
pub const MAX_URI_BYTES: usize = 60 * 1024;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi_json))
        .merge(zones::routes())
        .merge(hosts::routes())
        .merge(join_tokens::routes())
        .merge(images::routes())
        .merge(vms::routes())
        .merge(events::routes())
        .merge(groups::routes())
        .merge(capacity::routes())
        .merge(rebalance::routes())
        .merge(power::routes())
        .merge(agent::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::guard,
        ))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(axum::middleware::from_fn(limit_uri))
        .with_state(app)
}

async fn limit_uri(req: Request, next: Next) -> Response {
    // Measured without rendering the URI: its parts' lengths.
    let uri = req.uri();
    let len = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    if len > MAX_URI_BYTES {
        return crate::Error::from(ApiError::new(
            ErrorCode::UriTooLong,
            "uri",
            format!("uri: {len} bytes long; at most {MAX_URI_BYTES} allowed"),
        ))
        .into_response();
    }
    next.run(req).await
}

async fn no_route(uri: Uri) -> crate::Error {
    ApiError::new(
        ErrorCode::NotFound,
        "uri",
        format!("uri: no endpoint {}; see /v1/openapi.json", uri.path()),
    )
    .into()
}

/// 405; axum adds the `Allow` header listing the methods the route has
/// (RFC 9110 §15.5.6).
async fn no_method(method: Method, uri: Uri) -> crate::Error {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "method",
        format!(
            "method: {method} is not allowed on {}; see /v1/openapi.json",
            uri.path()
        ),
    )
    .into()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Strings of `schema` (refs followed) that have no `maxLength` and are
    /// neither an enum nor a UUID (fixed length, parsed), by path.
    fn unbounded(doc: &Value, schema: &Value, at: &str, out: &mut Vec<String>, depth: usize) {
        if depth > 8 {
            return;
        }
        if let Some(r) = schema["$ref"].as_str() {
            let target = doc
                .pointer(r.trim_start_matches('#'))
                .expect("ref resolves");
            return unbounded(doc, target, at, out, depth + 1);
        }
        let types = &schema["type"];
        let is = |t: &str| types == t || types.as_array().is_some_and(|a| a.iter().any(|x| x == t));
        let bounded = schema.get("maxLength").is_some()
            || schema.get("enum").is_some()
            || schema["format"] == "uuid";
        if is("string") && !bounded {
            out.push(at.to_string());
        }
        for key in ["oneOf", "anyOf", "allOf"] {
            for s in schema[key].as_array().into_iter().flatten() {
                unbounded(doc, s, at, out, depth + 1);
            }
        }
        for (name, s) in schema["properties"].as_object().into_iter().flatten() {
            unbounded(doc, s, &format!("{at}.{name}"), out, depth + 1);
        }
        for key in ["items", "additionalProperties", "propertyNames"] {
            if schema[key].is_object() {
                unbounded(doc, &schema[key], &format!("{at}.{key}"), out, depth + 1);
            }
        }
    }

    /// Every string a request can carry, in a body or a query, has a
    /// documented maximum length (which the server enforces, since it
    /// checks input against this document).
    #[test]
    fn every_request_string_has_a_maximum_length() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(super::ApiDoc::openapi()).unwrap();
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let at = format!("{method} {path}");
                let body = &op["requestBody"]["content"]["application/json"]["schema"];
                unbounded(&doc, body, &format!("{at} body"), &mut out, 0);
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["in"] == "query" {
                        let name = p["name"].as_str().unwrap();
                        unbounded(&doc, &p["schema"], &format!("{at} ?{name}"), &mut out, 0);
                    }
                }
            }
        }
        assert!(out.is_empty(), "strings without maxLength: {out:#?}");
    }

    /// The committed OpenAPI document matches the code; regenerate with
    /// `KUMO_UPDATE_OPENAPI=1 cargo test -p kumod openapi`.
    #[test]
    fn openapi_is_committed() {
        use utoipa::OpenApi;
        let doc = super::ApiDoc::openapi()
            .to_pretty_json()
            .expect("serializes")
            + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi/kumo.json");
        if std::env::var_os("KUMO_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &doc).expect("write openapi/kumo.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == doc,
            "openapi/kumo.json is out of date; run KUMO_UPDATE_OPENAPI=1 cargo test -p kumod openapi"
        );
    }
}
