use super::hosts::accepted_if;
use super::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::error::Result;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use kumo_api::{ApiError, CreateZone, DrainParams, DrainPlan, Host, UndrainParams, Zone};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/v1/zones", get(list).post(create))
        .route("/v1/zones/{name}", get(show).delete(delete))
        .route("/v1/zones/{name}/drain", get(drain_status).post(drain))
        .route("/v1/zones/{name}/undrain", post(undrain))
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
pub async fn show(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Zone>> {
    Ok(Json(state.zone_get(&name).await?))
}

/// Delete an empty zone.
#[utoipa::path(delete, path = "/v1/zones/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete(state: AppState, ApiPath(name): ApiPath) -> Result<StatusCode> {
    state.zone_delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Drain every host of a zone (a planned outage): its VMs move live to the
/// hosts the scheduler picks elsewhere, a few at a time; emptied hosts are
/// `maintenance`. Answers with the plan; with `dry_run` only the plan (200),
/// nothing moves; otherwise 202.
#[utoipa::path(post, path = "/v1/zones/{name}/drain", operation_id = "zone_drain",
    params(("name" = String, Path), DrainParams),
    responses((status = 200, description = "dry run: the plan only", body = DrainPlan),
        (status = 202, description = "draining; the plan", body = DrainPlan),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn drain(
    state: AppState,
    ApiPath(name): ApiPath,
    ApiQuery(params): ApiQuery<DrainParams>,
) -> Result<(StatusCode, Json<DrainPlan>)> {
    let dry_run = params.dry_run.unwrap_or(false);
    let plan = state.zone_drain(&name, dry_run).await?;
    Ok((accepted_if(!dry_run), Json(plan)))
}

/// What a zone's drain still has to move, and where each VM would go now.
#[utoipa::path(get, path = "/v1/zones/{name}/drain", operation_id = "zone_drain_status", params(("name" = String, Path)),
    responses((status = 200, body = DrainPlan), (status = 404, body = ApiError)))]
pub async fn drain_status(state: AppState, ApiPath(name): ApiPath) -> Result<Json<DrainPlan>> {
    Ok(Json(state.zone_drain_status(&name).await?))
}

/// Take a zone's drained (or draining) hosts back into placement. With
/// `return`, the VMs the drain moved away come back to the hosts they came
/// from, live (202); otherwise 200. Answers with the undrained hosts.
#[utoipa::path(post, path = "/v1/zones/{name}/undrain", operation_id = "zone_undrain",
    params(("name" = String, Path), UndrainParams),
    responses((status = 200, body = [Host]), (status = 202, description = "VMs return to their hosts", body = [Host]),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn undrain(
    state: AppState,
    ApiPath(name): ApiPath,
    ApiQuery(params): ApiQuery<UndrainParams>,
) -> Result<(StatusCode, Json<Vec<Host>>)> {
    let return_vms = params.return_vms.unwrap_or(false);
    let hosts = state.zone_undrain(&name, return_vms).await?;
    Ok((accepted_if(return_vms), Json(hosts)))
}
