use super::{ApiJson, AppState};
use crate::error::Result;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use kumo_api::{ApiError, Host, UpdateHost};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/v1/hosts", get(list))
        .route("/v1/hosts/{name}", get(show).patch(update).delete(delete))
        .route("/v1/hosts/{name}/disable", post(disable))
        .route("/v1/hosts/{name}/enable", post(enable))
}

/// List hosts with capacity, allocation, load and state.
#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = [Host])))]
pub async fn list(state: AppState) -> Json<Vec<Host>> {
    Json(state.host_list().await)
}

/// Show a host.
#[utoipa::path(get, path = "/v1/hosts/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn show(state: AppState, Path(name): Path<String>) -> Result<Json<Host>> {
    Ok(Json(state.host_get(&name).await?))
}

/// Change a host's overcommit ratios.
#[utoipa::path(patch, path = "/v1/hosts/{name}", params(("name" = String, Path)), request_body = UpdateHost,
    responses((status = 200, body = Host), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn update(
    state: AppState,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<UpdateHost>,
) -> Result<Json<Host>> {
    Ok(Json(state.host_update(&name, req).await?))
}

/// Remove a host that has no VMs from the pool.
#[utoipa::path(delete, path = "/v1/hosts/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete(state: AppState, Path(name): Path<String>) -> Result<StatusCode> {
    state.host_delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Take a host out of placement; its VMs keep running.
#[utoipa::path(post, path = "/v1/hosts/{name}/disable", params(("name" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn disable(state: AppState, Path(name): Path<String>) -> Result<Json<Host>> {
    Ok(Json(state.host_set_enabled(&name, false).await?))
}

/// Put a disabled host back into placement.
#[utoipa::path(post, path = "/v1/hosts/{name}/enable", params(("name" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn enable(state: AppState, Path(name): Path<String>) -> Result<Json<Host>> {
    Ok(Json(state.host_set_enabled(&name, true).await?))
}
