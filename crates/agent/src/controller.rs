//! Talking to the controller: joining, heartbeats, and following the
//! host's desired state (a long poll, so changes arrive at once).

use crate::{ledger, metrics, vm, Config, Shared};
use anyhow::{bail, Context};
use kumo_api::{
    ApiError, DesiredState, Heartbeat, HeartbeatResponse, HypervisorInfo, RegisterHost,
    RegisterHostResponse, Resources,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub(crate) const IDENTITY: &str = "identity.json";

/// Who this host is to the controller; kept in the data dir.
#[derive(Clone, Serialize, Deserialize)]
struct Identity {
    host_id: Uuid,
    host_token: String,
    agent_secret: String,
}

/// One HTTP client (and connection pool) for every agent of the process:
/// thousands of simulated hosts share a few connections.
fn shared_http() -> &'static reqwest::Client {
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    HTTP.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client")
    })
}

pub struct Controller {
    url: String,
    http: reqwest::Client,
    identity: std::sync::Mutex<Identity>,
    register: RegisterHost,
}

/// Why a call to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("the controller refused this host's token (was the host removed? restart the agent with --join-token to join again)")]
    Unauthorized,
    /// The controller answered with an error: its status and kumo's error
    /// body ([`ApiError`]).
    #[error("the controller answered {status}: {error}")]
    Refused {
        status: reqwest::StatusCode,
        error: ApiError,
    },
    /// An error status without kumo's error body (a proxy in between, or
    /// a controller of another version).
    #[error("the controller answered {status}: {body}")]
    Status {
        status: reqwest::StatusCode,
        body: String,
    },
    /// No answer: connecting failed, or the connection broke or timed out.
    #[error("controller unreachable")]
    Unreachable(#[source] reqwest::Error),
    /// A success whose body is not what was asked for.
    #[error("reading the controller's answer")]
    Answer(#[source] reqwest::Error),
    /// A step on this host after the call.
    #[error("{what}")]
    Local {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
}

impl CallError {
    /// The controller refused the request itself (a 4xx other than a
    /// refused token): asking again will not help.
    pub fn is_refusal(&self) -> bool {
        match self {
            CallError::Refused { status, .. } | CallError::Status { status, .. } => {
                status.is_client_error()
            }
            _ => false,
        }
    }
}

impl Controller {
    /// Load the identity, or join with the join token.
    pub async fn connect(
        config: &Config,
        address: &str,
        capacity: Resources,
        hypervisor: HypervisorInfo,
    ) -> anyhow::Result<(Controller, String)> {
        let path = config.data_dir.join(IDENTITY);
        let known: Option<Identity> = match tokio::fs::read(&path).await {
            Ok(b) => Some(serde_json::from_slice(&b).context("reading the identity file")?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let agent_secret = known.as_ref().map_or_else(
            || hex::encode(rand::random::<[u8; 24]>()),
            |i| i.agent_secret.clone(),
        );
        tracing::info!(vcpus = capacity.vcpus, memory_mib = capacity.memory_mib, disk_gib = capacity.disk_gib, driver = %hypervisor.driver, accel = %hypervisor.accel, "host found");
        let c = Controller {
            url: config.controller.trim_end_matches('/').to_string(),
            http: shared_http().clone(),
            identity: std::sync::Mutex::new(known.clone().unwrap_or(Identity {
                host_id: Uuid::nil(),
                host_token: String::new(),
                agent_secret: agent_secret.clone(),
            })),
            register: RegisterHost {
                join_token: config.join_token.clone().unwrap_or_default(),
                name: config.name.clone(),
                zone: config.zone.clone(),
                address: address.to_string(),
                agent_secret: agent_secret.clone(),
                capacity,
                hypervisor,
                cpu_model: metrics::cpu_model(),
                labels: config.labels.clone(),
                datastore: config.datastore.as_ref().map(|d| d.name.clone()),
            },
        };
        if known.is_none() && config.join_token.is_none() {
            bail!("this host has not joined yet: pass --join-token (create one with `kumo host token create`)");
        }
        // Join, or tell the controller what this host is now (capacity,
        // hypervisor and address may have changed since it joined).
        let mut attempt = 0;
        loop {
            match c.join(&config.data_dir).await {
                Ok(()) => break,
                // The controller forgot this host (it was removed): an
                // operator who restarts the agent with a join token wants it
                // to join anew.
                Err(CallError::Unauthorized)
                    if !c.token().is_empty() && config.join_token.is_some() =>
                {
                    tracing::warn!("the controller refused this host's token; joining anew with the join token");
                    c.identity.lock().expect("lock").host_token.clear();
                }
                // The controller refuses this host as it is now (another
                // zone, a name taken by another host, a removed host
                // without a join token): running on with what it knew
                // before would report stale capacity, so stop and say why.
                Err(e) if e.is_refusal() || matches!(e, CallError::Unauthorized) => {
                    return Err(anyhow::Error::new(e)
                        .context("the controller refused to register this host"));
                }
                Err(e) if known.is_some() => {
                    tracing::warn!(error = %crate::Chain(&e), "could not update the registration; going on with the saved identity");
                    break;
                }
                Err(e @ CallError::Unreachable(_)) if attempt < 60 => {
                    attempt += 1;
                    tracing::warn!(error = %crate::Chain(&e), "controller not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok((c, agent_secret))
    }

    pub fn host_id(&self) -> Uuid {
        self.identity.lock().expect("lock").host_id
    }

    fn token(&self) -> String {
        self.identity.lock().expect("lock").host_token.clone()
    }

    async fn join(&self, data_dir: &std::path::Path) -> Result<(), CallError> {
        let mut req = self
            .http
            .post(format!("{}/v1/agent/register", self.url))
            .json(&self.register);
        let token = self.token();
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        let resp = req.send().await.map_err(CallError::Unreachable)?;
        let r: RegisterHostResponse = Self::answer(resp).await?;
        let identity = Identity {
            host_id: r.host_id,
            host_token: r.host_token,
            agent_secret: self.register.agent_secret.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&identity).expect("identity serializes");
        ledger::write_atomic(data_dir.join(IDENTITY), bytes)
            .await
            .map_err(|source| CallError::Local {
                what: "saving the identity",
                source,
            })?;
        *self.identity.lock().expect("lock") = identity;
        tracing::info!(host_id = %r.host_id, "joined the pool");
        Ok(())
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, CallError> {
        let resp = req
            .bearer_auth(self.token())
            .send()
            .await
            .map_err(CallError::Unreachable)?;
        Self::answer(resp).await
    }

    /// The answer's body as `T`, or why there is none.
    async fn answer<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
    ) -> Result<T, CallError> {
        Self::success(resp)
            .await?
            .json()
            .await
            .map_err(CallError::Answer)
    }

    /// The answer if it is a success, else why not: an error status carries
    /// the controller's own message when the body is kumo's error.
    async fn success(resp: reqwest::Response) -> Result<reqwest::Response, CallError> {
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(CallError::Unauthorized);
        }
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.bytes().await.map_err(CallError::Unreachable)?;
        Err(match serde_json::from_slice::<ApiError>(&body) {
            Ok(error) => CallError::Refused { status, error },
            Err(_) => CallError::Status {
                status,
                body: kumo_api::bounded_message(String::from_utf8_lossy(&body).into_owned()),
            },
        })
    }

    /// The bytes of image `id` (`GET /v1/images/{id}/data`), as a stream
    /// to read.
    pub async fn image(&self, id: Uuid) -> Result<reqwest::Response, CallError> {
        let req = self
            .http
            .get(format!("{}/v1/images/{id}/data", self.url))
            .bearer_auth(self.token());
        Self::success(req.send().await.map_err(CallError::Unreachable)?).await
    }
}

pub async fn heartbeats(shared: Arc<Shared>) {
    let mut meter = metrics::LoadMeter::default();
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Without a long poll, the heartbeat answer tells of new states; the
    // first round catches up after a restart.
    let mut first = !shared.config.long_poll;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.report_now.notified() => {}
        }
        let applied = shared.applied.lock().await.generation;
        let mut vms = vm::statuses(&shared).await;
        // A heartbeat the controller refuses would leave the host `down`.
        for vm in &mut vms {
            vm.message = vm.message.take().map(kumo_api::bounded_message);
            if let Some(m) = &mut vm.migration {
                m.message = m.message.take().map(kumo_api::bounded_message);
            }
        }
        // Simulated hosts report their guests' simulated load, not the
        // machine's they share.
        let load = shared
            .driver
            .simulated_load(&vms, shared.controller.register.capacity.vcpus)
            .unwrap_or_else(|| meter.sample());
        let hb = Heartbeat {
            load,
            applied_generation: applied,
            vms,
        };
        let c = &shared.controller;
        let req = c
            .http
            .post(format!("{}/v1/agent/heartbeat", c.url))
            .json(&hb);
        match c.call::<HeartbeatResponse>(req).await {
            Ok(answer) if !shared.config.long_poll && (first || answer.generation != applied) => {
                match sync_desired(&shared, None, first).await {
                    Ok(()) => first = false,
                    Err(e) => {
                        tracing::warn!(error = %crate::Chain(&e), "fetching the desired state")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %crate::Chain(&e), "heartbeat"),
        }
    }
}

/// Follow the desired state with a long poll, so changes arrive at once.
pub async fn follow_desired(shared: Arc<Shared>) {
    // The first fetch does not wait: it catches up after a restart.
    let mut first = true;
    loop {
        let wait = (!first).then_some(25);
        match sync_desired(&shared, wait, first).await {
            Ok(()) => first = false,
            Err(e) => {
                tracing::warn!(error = %crate::Chain(&e), "fetching the desired state");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Fetch the desired state (with `wait`, a long poll of that many seconds
/// for a generation other than the applied one) and, when it is news or
/// `force`, persist it in the ledger and apply it.
async fn sync_desired(
    shared: &Arc<Shared>,
    wait: Option<u64>,
    force: bool,
) -> Result<(), CallError> {
    let after = shared.applied.lock().await.generation;
    let c = &shared.controller;
    let query = wait.map_or(String::new(), |w| {
        format!("?after={after}&wait_seconds={w}")
    });
    let desired: DesiredState = c
        .call(c.http.get(format!("{}/v1/agent/desired{query}", c.url)))
        .await?;
    // Any other generation is news: a newer one, or the state of a host
    // that was removed and joined anew under this name.
    if force || desired.generation != after {
        ledger::store(&shared.config.data_dir, &desired)
            .await
            .map_err(|source| CallError::Local {
                what: "persisting the desired state",
                source,
            })?;
        vm::apply(shared, desired).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use axum::routing::get;

    /// A server answering `/refused` with kumo's error body, `/proxy` with
    /// a bare error page and `/ok` with a heartbeat answer.
    async fn server() -> String {
        let refused = ApiError::new(
            kumo_api::ErrorCode::Conflict,
            "zone",
            "zone: host \"h1\" is registered in zone \"z1\"",
        );
        let router = axum::Router::new()
            .route(
                "/refused",
                get(move || async move { (StatusCode::CONFLICT, axum::Json(refused)) }),
            )
            .route(
                "/proxy",
                get(|| async { (StatusCode::BAD_GATEWAY, "bad gateway") }),
            )
            .route(
                "/ok",
                get(|| async { axum::Json(HeartbeatResponse { generation: 5 }) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        url
    }

    async fn call(url: &str) -> Result<HeartbeatResponse, CallError> {
        let resp = shared_http()
            .get(url)
            .send()
            .await
            .map_err(CallError::Unreachable)?;
        Controller::answer(resp).await
    }

    /// A refusal carries the status and the controller's message; an
    /// error page its status and text; "unreachable" only when no answer
    /// came.
    #[tokio::test]
    async fn failed_calls_say_what_the_controller_answered() {
        let url = server().await;
        assert_eq!(call(&format!("{url}/ok")).await.unwrap().generation, 5);

        let e = call(&format!("{url}/refused")).await.unwrap_err();
        assert!(e.is_refusal());
        assert_eq!(
            e.to_string(),
            "the controller answered 409 Conflict: zone: host \"h1\" is registered in zone \"z1\""
        );
        let e = call(&format!("{url}/proxy")).await.unwrap_err();
        assert!(!e.is_refusal(), "a 5xx may pass");
        assert_eq!(
            e.to_string(),
            "the controller answered 502 Bad Gateway: bad gateway"
        );

        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = call(&format!("http://127.0.0.1:{port}/ok"))
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Unreachable(_)), "{e:?}");
        // The log line names the cause under "unreachable".
        let logged = crate::Chain(&e).to_string();
        assert!(logged.starts_with("controller unreachable: "), "{logged}");
        assert!(
            logged.len() > "controller unreachable: ".len() + 10,
            "{logged}"
        );
    }
}
