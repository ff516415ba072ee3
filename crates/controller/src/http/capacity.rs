use super::{ApiQuery, AppState};
use crate::error::Result;
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::{ApiError, CapacityQuery, CapacityReport};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new().route("/v1/capacity", get(show))
}

/// How many more VMs of a shape fit now, and which resource runs out first.
#[utoipa::path(get, path = "/v1/capacity", params(CapacityQuery),
    responses((status = 200, body = CapacityReport), (status = 400, body = ApiError)))]
pub async fn show(
    state: AppState,
    ApiQuery(q): ApiQuery<CapacityQuery>,
) -> Result<Json<CapacityReport>> {
    Ok(Json(state.capacity(&q).await?))
}
