//! Who may call what: [`ROUTES`] is the one table of every route and the
//! principals allowed on it. The [`guard`] middleware enforces it after
//! routing (by the matched route, never by matching paths loosely), and
//! [`Documented`] writes it into the API document's `security` and error
//! responses, so the document says what the server does.
//!
//! A request names its principal with `Authorization: Bearer <token>` (the
//! scheme is case-insensitive, RFC 9110 §11.1): the admin token, or a
//! host's token. Secrets are compared in constant time.

use super::input::unknown_field_message;
use super::{ApiDoc, AppState, Principal};
use crate::error::Result;
use axum::extract::{MatchedPath, Request};
use axum::http::header::{self, AUTHORIZATION};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use kumo_api::{ApiError, ErrorCode};
use std::collections::HashMap;
use std::sync::LazyLock;
use utoipa::openapi::path::ParameterIn;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
use utoipa::OpenApi;

/// Which principals may call a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token: health and the API document.
    Public,
    /// The admin token only.
    Admin,
    /// A host agent's token only.
    Host,
    /// The admin token or a host's token (image downloads).
    AdminOrHost,
    /// Host registration: anyone (the join token is in the body), or a
    /// host re-registering itself with its own token.
    Join,
}

impl Access {
    fn allows(self, who: &Principal) -> bool {
        matches!(
            (self, who),
            (Access::Public | Access::Join, _)
                | (Access::Admin | Access::AdminOrHost, Principal::Admin)
                | (Access::Host | Access::AdminOrHost, Principal::Host(_))
        )
    }

    /// The API document's `security` for the route: which of the bearer
    /// schemes it takes (an empty requirement: none needed).
    fn security(self) -> Vec<SecurityRequirement> {
        let admin = || SecurityRequirement::new(ADMIN_SCHEME, Vec::<String>::new());
        let host = || SecurityRequirement::new(HOST_SCHEME, Vec::<String>::new());
        match self {
            Access::Public => vec![],
            Access::Admin => vec![admin()],
            Access::Host => vec![host()],
            Access::AdminOrHost => vec![admin(), host()],
            Access::Join => vec![SecurityRequirement::default(), host()],
        }
    }
}

const ADMIN_SCHEME: &str = "admin_token";
const HOST_SCHEME: &str = "host_token";

use Access::*;

/// Every route of the API, by method and path template, with who may call
/// it. A route missing here is refused to everyone (and a test fails).
pub const ROUTES: &[(&str, &str, Access)] = &[
    ("GET", "/v1/health", Public),
    ("GET", "/v1/openapi.json", Public),
    ("GET", "/v1/zones", Admin),
    ("POST", "/v1/zones", Admin),
    ("GET", "/v1/zones/{name}", Admin),
    ("DELETE", "/v1/zones/{name}", Admin),
    ("GET", "/v1/zones/{name}/drain", Admin),
    ("POST", "/v1/zones/{name}/drain", Admin),
    ("POST", "/v1/zones/{name}/undrain", Admin),
    ("GET", "/v1/zones/{name}/power-saving", Admin),
    ("PUT", "/v1/zones/{name}/power-saving", Admin),
    ("DELETE", "/v1/zones/{name}/power-saving", Admin),
    ("GET", "/v1/hosts", Admin),
    ("GET", "/v1/hosts/{name}", Admin),
    ("PATCH", "/v1/hosts/{name}", Admin),
    ("DELETE", "/v1/hosts/{name}", Admin),
    ("POST", "/v1/hosts/{name}/disable", Admin),
    ("POST", "/v1/hosts/{name}/enable", Admin),
    ("POST", "/v1/hosts/{name}/drain", Admin),
    ("POST", "/v1/hosts/{name}/undrain", Admin),
    ("GET", "/v1/join-tokens", Admin),
    ("POST", "/v1/join-tokens", Admin),
    ("GET", "/v1/images", Admin),
    ("POST", "/v1/images", Admin),
    ("GET", "/v1/images/{name}", Admin),
    ("DELETE", "/v1/images/{name}", Admin),
    ("GET", "/v1/images/{name}/data", AdminOrHost),
    ("GET", "/v1/vms", Admin),
    ("POST", "/v1/vms", Admin),
    ("GET", "/v1/vms/{name}", Admin),
    ("DELETE", "/v1/vms/{name}", Admin),
    ("POST", "/v1/vms/{name}/start", Admin),
    ("POST", "/v1/vms/{name}/stop", Admin),
    ("POST", "/v1/vms/{name}/reboot", Admin),
    ("POST", "/v1/vms/{name}/migrate", Admin),
    ("POST", "/v1/vms/{name}/migrate/cancel", Admin),
    ("GET", "/v1/vms/{name}/console/log", Admin),
    ("GET", "/v1/vms/{name}/console", Admin),
    ("GET", "/v1/events", Admin),
    ("GET", "/v1/groups", Admin),
    ("POST", "/v1/groups", Admin),
    ("GET", "/v1/groups/{name}", Admin),
    ("DELETE", "/v1/groups/{name}", Admin),
    ("GET", "/v1/capacity", Admin),
    ("GET", "/v1/rebalance", Admin),
    ("POST", "/v1/agent/register", Join),
    ("POST", "/v1/agent/heartbeat", Host),
    ("GET", "/v1/agent/desired", Host),
];

/// What the guard knows of a route: who may call it, the query parameters
/// the document lists for it, and whether it takes a body.
struct Rule {
    access: Access,
    query: Vec<String>,
    takes_body: bool,
}

static RULES: LazyLock<HashMap<(Method, &'static str), Rule>> = LazyLock::new(|| {
    let doc = serde_json::to_value(ApiDoc::openapi()).expect("the API document serializes");
    ROUTES
        .iter()
        .map(|&(method, path, access)| {
            let op = &doc["paths"][path][method.to_ascii_lowercase()];
            let query = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "query")
                .filter_map(|p| p["name"].as_str().map(String::from))
                .collect();
            let takes_body = op.get("requestBody").is_some();
            let method = Method::from_bytes(method.as_bytes()).expect("a valid method");
            let rule = Rule {
                access,
                query,
                takes_body,
            };
            ((method, path), rule)
        })
        .collect()
});

/// The token of `Authorization: Bearer <token>`, if the header is there;
/// an error if it is there but not a bearer token.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        if headers.contains_key(AUTHORIZATION) {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "authorization",
                "authorization: give one Authorization header, not several",
            )
            .into());
        }
        return Ok(None);
    };
    let malformed = || {
        ApiError::new(
            ErrorCode::Unauthorized,
            "authorization",
            "authorization: expected `Authorization: Bearer <token>`",
        )
    };
    let value = value.to_str().map_err(|_| malformed())?;
    match kumo_api::bearer_token(value) {
        Some(token) => Ok(Some(token)),
        None => Err(malformed().into()),
    }
}

/// Runs after routing, on every route: find the route's rule, find out who
/// calls, refuse who may not (401 without or with a wrong token, 403 with
/// a valid token of the wrong kind), then refuse what the operation does
/// not take: a body (400), an encoded body (415), an unknown query
/// parameter (400).
pub async fn guard(state: AppState, mut req: Request, next: Next) -> Result<Response> {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let forbidden = |msg: &str| ApiError::new(ErrorCode::Forbidden, "authorization", msg);
    // HEAD is served by the GET handler (RFC 9110 §9.3.2), under its rule.
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    let Some(rule) = RULES.get(&(method, path.as_str())) else {
        return Err(forbidden("authorization: this route has no access rule").into());
    };
    let principal = if rule.access == Access::Public {
        Principal::Anonymous
    } else {
        match bearer(req.headers())? {
            None => Principal::Anonymous,
            Some(t)
                if constant_time_eq::constant_time_eq(
                    t.as_bytes(),
                    state.admin_token().as_bytes(),
                ) =>
            {
                Principal::Admin
            }
            Some(t) => match state.host_for_token(t).await {
                Some(host) => Principal::Host(host),
                None => {
                    return Err(ApiError::new(
                        ErrorCode::Unauthorized,
                        "authorization",
                        "authorization: invalid bearer token",
                    )
                    .into())
                }
            },
        }
    };
    if !rule.access.allows(&principal) {
        return Err(match principal {
            Principal::Anonymous => ApiError::new(
                ErrorCode::Unauthorized,
                "authorization",
                "authorization: missing bearer token (Authorization: Bearer <token>)",
            ),
            Principal::Admin => forbidden("authorization: this endpoint is for host agents"),
            Principal::Host(_) => {
                forbidden("authorization: a host token may not call this endpoint")
            }
        }
        .into());
    }
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if has_body && !rule.takes_body {
        return Err(ApiError::invalid("body", "this endpoint takes no body").into());
    }
    let encoded = req
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if has_body && encoded {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "content-encoding",
            "content-encoding: bodies are read as sent; send them without a Content-Encoding",
        )
        .into());
    }
    for (key, _) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        if !rule.query.iter().any(|q| *q == key) {
            return Err(ApiError::invalid(&key, unknown_field_message(&key, &rule.query)).into());
        }
    }
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// Writes [`ROUTES`] into the API document: the two bearer schemes, each
/// operation's `security`, the length of path names ([`super::ApiPath`]'s
/// limit), and the error responses every operation can
/// give whatever its handler does — 400 (unknown query parameters, bad
/// input), 401 and 403 where a token is needed, 413 and 415 where there
/// is a body,
/// 414 (URI too long).
pub struct Documented;

impl utoipa::Modify for Documented {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        for scheme in [ADMIN_SCHEME, HOST_SCHEME] {
            components.add_security_scheme(
                scheme,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ApiError")))
                        .build(),
                )
                .build()
        };
        for (path, item) in api.paths.paths.iter_mut() {
            let ops = [
                ("GET", item.get.as_mut()),
                ("POST", item.post.as_mut()),
                ("PUT", item.put.as_mut()),
                ("PATCH", item.patch.as_mut()),
                ("DELETE", item.delete.as_mut()),
            ];
            for (method, op) in ops {
                let Some(op) = op else { continue };
                for p in op.parameters.iter_mut().flatten() {
                    if p.parameter_in == ParameterIn::Path {
                        p.schema = Some(
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .min_length(Some(1))
                                .max_length(Some(super::input::MAX_PATH_NAME))
                                .into(),
                        );
                    }
                }
                let access = ROUTES
                    .iter()
                    .find(|(m, p, _)| *m == method && p == path)
                    .map(|(_, _, a)| *a)
                    .unwrap_or_else(|| panic!("{method} {path} is missing from auth::ROUTES"));
                op.security = Some(access.security());
                let responses = &mut op.responses.responses;
                let mut add = |status: &str, description: &str| {
                    responses
                        .entry(status.to_string())
                        .or_insert_with(|| error(description).into());
                };
                add("400", "Bad input: the `field` names what was wrong");
                if access != Access::Public {
                    add("401", "Missing or invalid bearer token");
                    add("403", "The token may not call this endpoint");
                }
                if op.request_body.is_some() {
                    add("413", "The body is larger than the endpoint accepts");
                    add("415", "The body has a Content-Encoding");
                }
                add("414", "The URI is too long");
            }
        }
    }
}
