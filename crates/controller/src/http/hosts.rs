use super::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::error::Result;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use kumo_api::{
    ApiError, DrainParams, DrainPlan, Host, HostList, HostListQuery, UndrainParams, UpdateHost,
};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/v1/hosts", get(list))
        .route("/v1/hosts/{name}", get(show).patch(update).delete(delete))
        .route("/v1/hosts/{name}/disable", post(disable))
        .route("/v1/hosts/{name}/enable", post(enable))
        .route("/v1/hosts/{name}/drain", post(drain))
        .route("/v1/hosts/{name}/undrain", post(undrain))
}

/// List hosts by name with capacity, allocation, load and state, filtered.
/// Paged as `GET /v1/vms`.
#[utoipa::path(get, path = "/v1/hosts", params(HostListQuery),
    responses((status = 200, body = HostList), (status = 400, body = ApiError)))]
pub async fn list(state: AppState, ApiQuery(q): ApiQuery<HostListQuery>) -> Result<Json<HostList>> {
    Ok(Json(state.host_list(&q).await?))
}

/// Show a host.
#[utoipa::path(get, path = "/v1/hosts/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn show(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Host>> {
    Ok(Json(state.host_get(&name).await?))
}

/// Change a host's overcommit ratios.
#[utoipa::path(patch, path = "/v1/hosts/{name}", params(("name" = String, Path)), request_body = UpdateHost,
    responses((status = 200, body = Host), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn update(
    state: AppState,
    ApiPath(name): ApiPath,
    ApiJson(req): ApiJson<UpdateHost>,
) -> Result<Json<Host>> {
    Ok(Json(state.host_update(&name, req).await?))
}

/// Remove a host that has no VMs from the pool.
#[utoipa::path(delete, path = "/v1/hosts/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete(state: AppState, ApiPath(name): ApiPath) -> Result<StatusCode> {
    state.host_delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Take a host out of placement; its VMs keep running.
#[utoipa::path(post, path = "/v1/hosts/{name}/disable", params(("name" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn disable(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Host>> {
    Ok(Json(state.host_set_enabled(&name, false).await?))
}

/// Put a disabled host back into placement.
#[utoipa::path(post, path = "/v1/hosts/{name}/enable", params(("name" = String, Path)),
    responses((status = 200, body = Host), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn enable(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Host>> {
    Ok(Json(state.host_set_enabled(&name, true).await?))
}

/// 202 when the call started VM moves that go on in the background (a
/// drain, an undrain with `return`); 200 when it only reports, or is done.
pub(super) fn accepted_if(moving: bool) -> StatusCode {
    if moving {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    }
}

/// Drain a host: it takes no new VMs and its VMs move away live, a few at a
/// time; once empty it is `maintenance`. Answers with the plan: where each
/// VM goes, or why no host can take it. With `dry_run` only the plan (200),
/// nothing moves; otherwise 202.
#[utoipa::path(post, path = "/v1/hosts/{name}/drain", operation_id = "host_drain",
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
    let plan = state.host_drain(&name, dry_run).await?;
    Ok((accepted_if(!dry_run), Json(plan)))
}

/// Take a drained (or draining) host back into placement. With `return`,
/// the VMs its drain moved away come back to it, live (202); otherwise 200.
#[utoipa::path(post, path = "/v1/hosts/{name}/undrain", operation_id = "host_undrain",
    params(("name" = String, Path), UndrainParams),
    responses((status = 200, body = Host), (status = 202, description = "VMs return to the host", body = Host),
        (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn undrain(
    state: AppState,
    ApiPath(name): ApiPath,
    ApiQuery(params): ApiQuery<UndrainParams>,
) -> Result<(StatusCode, Json<Host>)> {
    let return_vms = params.return_vms.unwrap_or(false);
    let host = state.host_undrain(&name, return_vms).await?;
    Ok((accepted_if(return_vms), Json(host)))
}
