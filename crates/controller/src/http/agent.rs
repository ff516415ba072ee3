//! Endpoints for host agents.

use super::{ApiJson, ApiQuery, AppState, Principal};
use crate::error::Result;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use kumo_api::{
    ApiError, DesiredQuery, DesiredState, Heartbeat, HeartbeatResponse, RegisterHost,
    RegisterHostResponse,
};
use std::sync::Arc;
use std::time::Duration;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/heartbeat", post(heartbeat))
        .route("/v1/agent/desired", get(desired))
}

/// Join the pool with a join token, or (with the host's own token) report
/// fresh capacity, hypervisor and address after an agent restart.
#[utoipa::path(post, path = "/v1/agent/register", request_body = RegisterHost,
    responses((status = 200, body = RegisterHostResponse), (status = 400, body = ApiError), (status = 401, body = ApiError)))]
pub async fn register(
    state: AppState,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<RegisterHost>,
) -> Result<Json<RegisterHostResponse>> {
    let known = match &who {
        Principal::Host(h) => Some(h.as_str()),
        _ => None,
    };
    Ok(Json(state.host_register(req, known).await?))
}

/// Report liveness, load and the VMs the host runs.
#[utoipa::path(post, path = "/v1/agent/heartbeat", request_body = Heartbeat,
    responses((status = 200, body = HeartbeatResponse), (status = 401, body = ApiError)))]
pub async fn heartbeat(
    state: AppState,
    Extension(who): Extension<Principal>,
    ApiJson(hb): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatResponse>> {
    Ok(Json(state.host_heartbeat(who.host()?, hb).await?))
}

/// The host's desired state; `after` makes it a long poll.
#[utoipa::path(get, path = "/v1/agent/desired", params(DesiredQuery),
    responses((status = 200, body = DesiredState), (status = 401, body = ApiError)))]
pub async fn desired(
    state: AppState,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<DesiredQuery>,
) -> Result<Json<DesiredState>> {
    let wait = Duration::from_secs(q.wait_seconds.unwrap_or(30));
    Ok(Json(state.host_desired(who.host()?, q.after, wait).await?))
}
