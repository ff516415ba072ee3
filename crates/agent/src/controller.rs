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

const IDENTITY: &str = "identity.json";

/// Who this host is to the controller; kept in the data dir.
#[derive(Clone, Serialize, Deserialize)]
struct Identity {
    host_id: Uuid,
    host_token: String,
    agent_secret: String,
}

pub struct Controller {
    url: String,
    http: reqwest::Client,
    identity: std::sync::Mutex<Identity>,
    register: RegisterHost,
}

/// A controller answer that is not a success.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("the controller refused this host's token (was the host removed? restart the agent with --join-token to join again)")]
    Unauthorized,
    #[error("controller: {0}")]
    Api(ApiError),
    #[error("controller unreachable")]
    Http(#[from] reqwest::Error),
    #[error("saving the identity: {0}")]
    Identity(String),
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
        let known: Option<Identity> = match std::fs::read(&path) {
            Ok(b) => Some(serde_json::from_slice(&b).context("reading the identity file")?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let agent_secret = known.as_ref().map_or_else(
            || hex::encode(rand::random::<[u8; 24]>()),
            |i| i.agent_secret.clone(),
        );
        tracing::info!(capacity = %crate::capacity_of(&capacity), driver = %hypervisor.driver, accel = %hypervisor.accel, "host found");
        let c = Controller {
            url: config.controller.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(60))
                .build()?,
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
                Err(e) if known.is_some() => {
                    tracing::warn!(error = %e, "could not update the registration; going on with the saved identity");
                    break;
                }
                Err(e @ CallError::Http(_)) if attempt < 60 => {
                    attempt += 1;
                    tracing::warn!(error = %e, "controller not reachable yet; retrying");
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
        let r: RegisterHostResponse = Self::answer(req.send().await?).await?;
        let identity = Identity {
            host_id: r.host_id,
            host_token: r.host_token,
            agent_secret: self.register.agent_secret.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&identity).expect("identity serializes");
        ledger::write_atomic(data_dir, IDENTITY, &bytes)
            .map_err(|e| CallError::Identity(format!("{e:#}")))?;
        *self.identity.lock().expect("lock") = identity;
        tracing::info!(host_id = %r.host_id, "joined the pool");
        Ok(())
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, CallError> {
        Self::answer(req.bearer_auth(self.token()).send().await?).await
    }

    async fn answer<T: serde::de::DeserializeOwned>(
        resp: reqwest::Response,
    ) -> Result<T, CallError> {
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            return Err(CallError::Unauthorized);
        }
        if !resp.status().is_success() {
            return Err(CallError::Api(resp.json().await?));
        }
        Ok(resp.json().await?)
    }

    pub fn image_url(&self, id: Uuid) -> (String, String) {
        (format!("{}/v1/images/{id}/data", self.url), self.token())
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }
}

pub async fn heartbeats(shared: Arc<Shared>) {
    let mut meter = metrics::LoadMeter::default();
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let hb = Heartbeat {
            load: meter.sample(),
            applied_generation: shared.applied.lock().await.generation,
            vms: vm::statuses(&shared).await,
        };
        let c = &shared.controller;
        let req = c
            .http
            .post(format!("{}/v1/agent/heartbeat", c.url))
            .json(&hb);
        if let Err(e) = c.call::<HeartbeatResponse>(req).await {
            tracing::warn!(error = %e, "heartbeat");
        }
    }
}

pub async fn follow_desired(shared: Arc<Shared>) {
    let mut first = true;
    loop {
        let after = shared.applied.lock().await.generation;
        let c = &shared.controller;
        // The first fetch does not wait: it catches up after a restart.
        let query = if first {
            String::new()
        } else {
            format!("?after={after}&wait_seconds=25")
        };
        let req = c.http.get(format!("{}/v1/agent/desired{query}", c.url));
        match c.call::<DesiredState>(req).await {
            // Any other generation is news: a newer one, or the state of a
            // host that was removed and joined anew under this name.
            Ok(desired) if first || desired.generation != after => {
                first = false;
                if let Err(e) = ledger::store(&shared.config.data_dir, &desired) {
                    tracing::error!(error = %e, "persisting the desired state; not applying it");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                vm::apply(&shared, desired).await;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "fetching the desired state");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
