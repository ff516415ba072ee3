use super::{ApiJson, ApiPath, AppState};
use crate::error::Result;
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::{ApiError, PowerSaving, PowerSavingStatus, Zone};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new().route(
        "/v1/zones/{name}/power-saving",
        get(show).put(set).delete(off),
    )
}

/// A zone's power saving: settings, standby hosts, energy saved.
#[utoipa::path(get, path = "/v1/zones/{name}/power-saving", params(("name" = String, Path)),
    responses((status = 200, body = PowerSavingStatus), (status = 404, body = ApiError)))]
pub async fn show(state: AppState, ApiPath(name): ApiPath) -> Result<Json<PowerSavingStatus>> {
    Ok(Json(state.zone_power_saving_get(&name).await?))
}

/// Turn power saving on for a zone, or change its settings.
#[utoipa::path(put, path = "/v1/zones/{name}/power-saving", params(("name" = String, Path)),
    request_body = PowerSaving,
    responses((status = 200, body = Zone), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn set(
    state: AppState,
    ApiPath(name): ApiPath,
    ApiJson(req): ApiJson<PowerSaving>,
) -> Result<Json<Zone>> {
    Ok(Json(state.zone_power_saving_set(&name, req).await?))
}

/// Turn power saving off: the zone's standby hosts are switched on.
#[utoipa::path(delete, path = "/v1/zones/{name}/power-saving", params(("name" = String, Path)),
    responses((status = 200, body = Zone), (status = 404, body = ApiError)))]
pub async fn off(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Zone>> {
    Ok(Json(state.zone_power_saving_off(&name).await?))
}
