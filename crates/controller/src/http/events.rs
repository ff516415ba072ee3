use super::{ApiQuery, AppState};
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::{Event, EventQuery};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new().route("/v1/events", get(list))
}

/// The newest events, oldest first.
#[utoipa::path(get, path = "/v1/events", params(EventQuery), responses((status = 200, body = [Event])))]
pub async fn list(state: AppState, ApiQuery(q): ApiQuery<EventQuery>) -> Json<Vec<Event>> {
    Json(state.event_list(&q).await)
}
