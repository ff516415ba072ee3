use super::{ApiJson, ApiPath, AppState};
use crate::error::Result;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::{ApiError, CreateGroup, Group};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/v1/groups", get(list).post(create))
        .route("/v1/groups/{name}", get(show).delete(delete))
}

/// List affinity and anti-affinity groups.
#[utoipa::path(get, path = "/v1/groups", responses((status = 200, body = [Group])))]
pub async fn list(state: AppState) -> Json<Vec<Group>> {
    Json(state.group_list().await)
}

/// Create a group; VMs join it when they are created.
#[utoipa::path(post, path = "/v1/groups", request_body = CreateGroup,
    responses((status = 201, body = Group), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create(
    state: AppState,
    ApiJson(req): ApiJson<CreateGroup>,
) -> Result<(StatusCode, Json<Group>)> {
    Ok((StatusCode::CREATED, Json(state.group_create(req).await?)))
}

/// Show a group.
#[utoipa::path(get, path = "/v1/groups/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Group), (status = 404, body = ApiError)))]
pub async fn show(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Group>> {
    Ok(Json(state.group_get(&name).await?))
}

/// Delete a group no VM belongs to.
#[utoipa::path(delete, path = "/v1/groups/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete(state: AppState, ApiPath(name): ApiPath) -> Result<StatusCode> {
    state.group_delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
