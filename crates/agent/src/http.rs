//! The agent's own endpoint, called by the controller only where a
//! handshake is needed: the serial console; and the agent's own view of its
//! guests (`GET /v1/status`, an [`AgentStatus`]), for operators and tests
//! looking into a host. Callers present the agent secret the controller
//! learnt when the host joined.

use crate::Shared;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kumo_api::AgentStatus;
use std::sync::Arc;
use uuid::Uuid;

pub async fn serve(shared: Arc<Shared>, listener: tokio::net::TcpListener) {
    let router = Router::new()
        .route("/v1/vms/{id}/console/log", get(console_log))
        .route("/v1/vms/{id}/console", get(console))
        .route("/v1/status", get(status))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, router).await {
        tracing::error!(error = %crate::Chain(&e), "agent endpoint stopped");
    }
}

/// The controller presents the agent secret as a bearer token; compared
/// in constant time.
fn authorized(shared: &Shared, req: &Request) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(kumo_api::bearer_token)
        .is_some_and(|t| {
            constant_time_eq::constant_time_eq(t.as_bytes(), shared.agent_secret.as_bytes())
        })
}

fn refuse(status: StatusCode, msg: &str) -> Response {
    (status, msg.to_string()).into_response()
}

/// The desired state applied last and every VM's status, as the next
/// heartbeat reports them.
async fn status(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    if !authorized(&shared, &req) {
        return refuse(StatusCode::UNAUTHORIZED, "wrong agent secret");
    }
    let applied = shared.applied.lock().await.clone();
    let vms = crate::vm::statuses(&shared).await;
    Json(AgentStatus { applied, vms }).into_response()
}

async fn console_log(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<Uuid>,
    req: Request,
) -> Response {
    if !authorized(&shared, &req) {
        return refuse(StatusCode::UNAUTHORIZED, "wrong agent secret");
    }
    let Some((log, _)) = shared.driver.console_paths(id) else {
        return "(simulated guest: no console)\n".into_response();
    };
    match tokio::fs::read(&log).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned().into_response(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new().into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Upgrade to a raw byte stream joined to the guest's serial socket.
async fn console(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<Uuid>,
    mut req: Request,
) -> Response {
    if !authorized(&shared, &req) {
        return refuse(StatusCode::UNAUTHORIZED, "wrong agent secret");
    }
    let Some((_, sock)) = shared.driver.console_paths(id) else {
        return refuse(StatusCode::CONFLICT, "simulated guests have no console");
    };
    let mut serial = match tokio::net::UnixStream::connect(&sock).await {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                StatusCode::CONFLICT,
                &format!("guest console not available (is the VM running?): {e}"),
            )
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut io, &mut serial).await;
            }
            Err(e) => tracing::warn!(error = %crate::Chain(&e), "console upgrade"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "kumo-console")
        .body(Body::empty())
        .expect("valid response")
}
