use super::AppState;
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::RebalanceStatus;
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new().route("/v1/rebalance", get(show))
}

/// Automatic rebalancing: its settings and what its last pass did.
#[utoipa::path(get, path = "/v1/rebalance", responses((status = 200, body = RebalanceStatus)))]
pub async fn show(state: AppState) -> Json<RebalanceStatus> {
    Json(state.rebalance_status())
}
