use super::{ApiJson, AppState};
use crate::error::Result;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::{ApiError, CreateZone, Zone};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/v1/zones", get(list).post(create))
        .route("/v1/zones/{name}", get(show).delete(delete))
}

/// List zones.
#[utoipa::path(get, path = "/v1/zones", responses((status = 200, body = [Zone])))]
pub async fn list(state: AppState) -> Json<Vec<Zone>> {
    Json(state.zone_list().await)
}

/// Create a zone.
#[utoipa::path(post, path = "/v1/zones", request_body = CreateZone,
    responses((status = 201, body = Zone), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create(
    state: AppState,
    ApiJson(req): ApiJson<CreateZone>,
) -> Result<(StatusCode, Json<Zone>)> {
    Ok((StatusCode::CREATED, Json(state.zone_create(req).await?)))
}

/// Show a zone.
#[utoipa::path(get, path = "/v1/zones/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Zone), (status = 404, body = ApiError)))]
pub async fn show(state: AppState, Path(name): Path<String>) -> Result<Json<Zone>> {
    Ok(Json(state.zone_get(&name).await?))
}

/// Delete an empty zone.
#[utoipa::path(delete, path = "/v1/zones/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete(state: AppState, Path(name): Path<String>) -> Result<StatusCode> {
    state.zone_delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
