use super::{ApiQuery, AppState};
use crate::error::Result;
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::{ApiError, EventPage, EventQuery};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new().route("/v1/events", get(list))
}

/// Read the event log, oldest first. Without `after`: the newest events.
/// With `after`: the oldest events past that cursor; pass each answer's
/// `next` as the following request's `after` to see every event exactly
/// once, in order. Add `wait_seconds` to wait for new events (a long poll).
#[utoipa::path(get, path = "/v1/events", params(EventQuery),
    responses((status = 200, body = EventPage), (status = 400, body = ApiError)))]
pub async fn list(state: AppState, ApiQuery(q): ApiQuery<EventQuery>) -> Result<Json<EventPage>> {
    Ok(Json(state.event_list(&q).await?))
}
