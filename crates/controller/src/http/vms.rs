use super::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::error::Result;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use kumo_api::{ApiError, ConsoleLog, CreateVm, ErrorCode, MigrateVm, Vm, VmList, VmListQuery};
use std::sync::Arc;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route("/v1/vms", get(list).post(create))
        .route("/v1/vms/{name}", get(show).delete(delete))
        .route("/v1/vms/{name}/start", post(start))
        .route("/v1/vms/{name}/stop", post(stop))
        .route("/v1/vms/{name}/reboot", post(reboot))
        .route("/v1/vms/{name}/migrate", post(migrate))
        .route("/v1/vms/{name}/migrate/cancel", post(migrate_cancel))
        .route("/v1/vms/{name}/console/log", get(console_log))
        .route("/v1/vms/{name}/console", get(console))
}

/// List VMs by name, filtered. With `limit`, one page: pass the answer's
/// `next` as `page_token` (with the same filters) for the next; without it,
/// every matching VM in one answer.
#[utoipa::path(get, path = "/v1/vms", params(VmListQuery),
    responses((status = 200, body = VmList), (status = 400, body = ApiError)))]
pub async fn list(
    state: AppState,
    ApiQuery(q): ApiQuery<VmListQuery>,
) -> Result<impl axum::response::IntoResponse> {
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        state.vm_list_json(&q).await?,
    ))
}

/// Create a VM: placed on a host at once, started unless `start` is false.
#[utoipa::path(post, path = "/v1/vms", request_body = CreateVm,
    responses((status = 201, body = Vm), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create(
    state: AppState,
    ApiJson(req): ApiJson<CreateVm>,
) -> Result<(StatusCode, Json<Vm>)> {
    Ok((StatusCode::CREATED, Json(state.vm_create(req).await?)))
}

/// Show a VM.
#[utoipa::path(get, path = "/v1/vms/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Vm), (status = 404, body = ApiError)))]
pub async fn show(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Vm>> {
    Ok(Json(state.vm_get(&name).await?))
}

/// Delete a VM; it is `deleting` until its host confirms it is gone.
#[utoipa::path(delete, path = "/v1/vms/{name}", params(("name" = String, Path)),
    responses((status = 202, body = Vm), (status = 404, body = ApiError)))]
pub async fn delete(state: AppState, ApiPath(name): ApiPath) -> Result<(StatusCode, Json<Vm>)> {
    Ok((StatusCode::ACCEPTED, Json(state.vm_delete(&name).await?)))
}

/// Start a stopped (or failed) VM.
#[utoipa::path(post, path = "/v1/vms/{name}/start", params(("name" = String, Path)),
    responses((status = 202, body = Vm), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn start(state: AppState, ApiPath(name): ApiPath) -> Result<(StatusCode, Json<Vm>)> {
    Ok((StatusCode::ACCEPTED, Json(state.vm_start(&name).await?)))
}

/// Stop a VM: ACPI shutdown, then a hard stop after the host's timeout.
#[utoipa::path(post, path = "/v1/vms/{name}/stop", params(("name" = String, Path)),
    responses((status = 202, body = Vm), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn stop(state: AppState, ApiPath(name): ApiPath) -> Result<(StatusCode, Json<Vm>)> {
    Ok((StatusCode::ACCEPTED, Json(state.vm_stop(&name).await?)))
}

/// Reboot a running VM.
#[utoipa::path(post, path = "/v1/vms/{name}/reboot", params(("name" = String, Path)),
    responses((status = 202, body = Vm), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn reboot(state: AppState, ApiPath(name): ApiPath) -> Result<(StatusCode, Json<Vm>)> {
    Ok((StatusCode::ACCEPTED, Json(state.vm_reboot(&name).await?)))
}

/// Move a VM to another host, live if it runs, cold if it is stopped (the
/// scheduler chooses unless `to` names one). Follow `migration` on the VM; `last_migration` says how
/// it ended.
#[utoipa::path(post, path = "/v1/vms/{name}/migrate", params(("name" = String, Path)), request_body = MigrateVm,
    responses((status = 202, body = Vm), (status = 400, body = ApiError), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn migrate(
    state: AppState,
    ApiPath(name): ApiPath,
    ApiJson(req): ApiJson<MigrateVm>,
) -> Result<(StatusCode, Json<Vm>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(state.vm_migrate(&name, req).await?),
    ))
}

/// Cancel a VM's migration: it keeps running where it was.
#[utoipa::path(post, path = "/v1/vms/{name}/migrate/cancel", params(("name" = String, Path)),
    responses((status = 202, body = Vm), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn migrate_cancel(
    state: AppState,
    ApiPath(name): ApiPath,
) -> Result<(StatusCode, Json<Vm>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(state.vm_migrate_cancel(&name).await?),
    ))
}

/// What the guest has written to its serial console.
#[utoipa::path(get, path = "/v1/vms/{name}/console/log", params(("name" = String, Path)),
    responses((status = 200, body = ConsoleLog), (status = 404, body = ApiError),
        (status = 409, description = "the VM runs on a simulated host, which has no console", body = ApiError),
        (status = 502, body = ApiError)))]
pub async fn console_log(state: AppState, ApiPath(name): ApiPath) -> Result<Json<ConsoleLog>> {
    Ok(Json(state.vm_console_log(&name).await?))
}

/// The interactive serial console: an HTTP upgrade (`Upgrade: kumo-console`)
/// to a raw byte stream, relayed to the VM's host.
#[utoipa::path(get, path = "/v1/vms/{name}/console", params(("name" = String, Path)),
    responses((status = 101, description = "switched to the console byte stream"), (status = 404, body = ApiError),
        (status = 409, description = "the VM runs on a simulated host, which has no console", body = ApiError),
        (status = 502, body = ApiError)))]
pub async fn console(
    state: AppState,
    ApiPath(name): ApiPath,
    mut req: Request,
) -> Result<Response> {
    let wants_upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("kumo-console"));
    if !wants_upgrade {
        return Err(ApiError::invalid(
            "upgrade",
            "the console is a byte stream: send `Connection: upgrade` and `Upgrade: kumo-console` \
             (or use `kumo vm console`, or GET .../console/log for the log)",
        )
        .into());
    }
    let (vm, address, secret) = state.vm_agent(&name).await?;
    let unavailable = |e: &dyn std::fmt::Display| {
        ApiError::server(
            ErrorCode::HostUnavailable,
            format!("host {}: console: {e}", vm.host),
        )
    };
    let upstream = state
        .agent_http
        .get(format!("{address}/v1/vms/{}/console", vm.id))
        .bearer_auth(secret)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "kumo-console")
        .send()
        .await
        .map_err(|e| unavailable(&e))?;
    if upstream.status() != StatusCode::SWITCHING_PROTOCOLS {
        let status = upstream.status();
        let text = upstream.text().await.unwrap_or_default();
        return Err(unavailable(&format!("{status}: {text}")).into());
    }
    let mut upstream = upstream.upgrade().await.map_err(|e| unavailable(&e))?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(client) => {
                let mut client = hyper_util::rt::TokioIo::new(client);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Err(e) => tracing::warn!(error = %crate::error::Chain(&e), "console upgrade"),
        }
    });
    Ok(Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "kumo-console")
        .body(Body::empty())
        .expect("valid response"))
}
