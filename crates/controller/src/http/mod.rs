//! The REST API under `/v1`. Handlers only translate HTTP to calls into
//! [`crate::app`]; authentication is one middleware.

mod agent;
mod capacity;
mod events;
mod groups;
mod hosts;
mod images;
mod join_tokens;
mod power;
mod rebalance;
mod vms;
mod zones;

use crate::app::App;
use crate::error::Result;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
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
    /// Nobody yet: only host registration (it carries a join token).
    Anonymous,
}

impl Principal {
    fn host(&self) -> Result<&str> {
        match self {
            Principal::Host(h) => Ok(h),
            _ => Err(unauthorized("this endpoint is for host agents").into()),
        }
    }
}

fn unauthorized(msg: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthorized, msg)
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
        openapi_json,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "OpenAPI document")))]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
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
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            authenticate,
        ))
        .with_state(app)
}

async fn no_route(uri: axum::http::Uri) -> crate::Error {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no endpoint {}; see /v1/openapi.json", uri.path()),
    )
    .into()
}

async fn no_method(method: axum::http::Method, uri: axum::http::Uri) -> crate::Error {
    ApiError::new(
        ErrorCode::InvalidInput,
        format!(
            "{method} is not allowed on {}; see /v1/openapi.json",
            uri.path()
        ),
    )
    .into()
}

/// Bearer-token authentication on every endpoint: the admin token for the
/// API, host tokens for the agent endpoints (and image downloads), nothing
/// but the join token in the body for host registration.
async fn authenticate(State(app): AppState, mut req: Request, next: Next) -> Result<Response> {
    let path = req.uri().path().to_string();
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let principal = match token {
        None if path == "/v1/agent/register" => Principal::Anonymous,
        None => {
            return Err(unauthorized("missing bearer token (Authorization: Bearer <token>)").into())
        }
        Some(t) if constant_time_eq(t.as_bytes(), app.admin_token().as_bytes()) => Principal::Admin,
        Some(t) => match app.host_for_token(t).await {
            Some(host) => Principal::Host(host),
            None => return Err(unauthorized("invalid bearer token").into()),
        },
    };
    let allowed = match &principal {
        Principal::Admin => !path.starts_with("/v1/agent/") || path == "/v1/agent/register",
        Principal::Host(_) => {
            path.starts_with("/v1/agent/")
                || (path.starts_with("/v1/images/") && path.ends_with("/data"))
        }
        Principal::Anonymous => true,
    };
    if !allowed {
        return Err(unauthorized("this token may not call this endpoint").into());
    }
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// JSON bodies whose rejections are our error type, naming what was wrong.
pub struct ApiJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = crate::Error;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("request body: {}", e.body_text()),
            )
            .into()),
        }
    }
}

/// Query strings likewise.
pub struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = crate::Error;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::new(
                ErrorCode::InvalidInput,
                format!("query: {}", e.body_text()),
            )
            .into()),
        }
    }
}

#[cfg(test)]
mod tests {
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
