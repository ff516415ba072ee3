use super::{ApiJson, AppState};
use crate::error::Result;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::{ApiError, CreateJoinToken, JoinToken};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new().route("/v1/join-tokens", get(list).post(create))
}

/// List join tokens (without their secrets).
#[utoipa::path(get, path = "/v1/join-tokens", responses((status = 200, body = [JoinToken])))]
pub async fn list(state: AppState) -> Json<Vec<JoinToken>> {
    Json(state.join_token_list().await)
}

/// Create a join token; the secret is in the response only.
#[utoipa::path(post, path = "/v1/join-tokens", request_body = CreateJoinToken,
    responses((status = 201, body = JoinToken), (status = 400, body = ApiError)))]
pub async fn create(
    state: AppState,
    ApiJson(req): ApiJson<CreateJoinToken>,
) -> Result<(StatusCode, Json<JoinToken>)> {
    Ok((
        StatusCode::CREATED,
        Json(state.join_token_create(req).await?),
    ))
}
