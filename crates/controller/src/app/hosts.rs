//! Hosts: registration, heartbeats, desired state and monitoring.
//!
//! A host is `joining` from its registration until its first heartbeat
//! (it takes no VMs before its agent shows it runs), `ready` while
//! heartbeats arrive, `down` once none came for
//! [`App::down_after`], `disabled` when an operator took it out of placement,
//! `draining` while its VMs move away, `maintenance` once drained, and
//! `standby` when power saving emptied it and switched it off (silence is
//! expected then, so it is not `down`).
//! Liveness lives in memory only: after a controller restart every host gets
//! a fresh grace period instead of being declared down for the time the
//! controller itself was away.

use super::pages::{List, Pager};
use super::records::{host_key, HostMode, HostRecord, HOST_RECORD_VERSION};
use super::transitions::{self, HostRequest};
use super::{lookup, now_ms, random_secret, sha256_hex, App, Batch, HostEntry, Inventory};
use crate::error::Result;
use kumo_api::{
    validate_name, ApiError, DesiredState, ErrorCode, Host, HostList, HostListQuery,
    MigrationPhase, MigrationSpec, RegisterHost, RegisterHostResponse, UpdateHost, VmSpec, VmState,
    DEFAULT_PROJECT,
};
use std::time::Duration;
use uuid::Uuid;

/// Shared vCPUs per core a new host may hold (as OpenStack's default
/// `cpu_allocation_ratio`); `kumo host set` changes it.
pub const DEFAULT_CPU_OVERCOMMIT: f64 = 4.0;

impl Inventory {
    pub fn host_view(&self, h: &HostEntry) -> Host {
        let (allocated, vm_count) = self.allocated(&h.rec.name);
        Host {
            id: h.rec.id,
            name: h.rec.name.clone(),
            project: h.rec.project.clone(),
            zone: h.rec.zone.clone(),
            state: h.state(),
            address: h.rec.address.clone(),
            capacity: h.rec.capacity,
            cpu_overcommit: h.rec.cpu_overcommit,
            memory_overcommit: h.rec.memory_overcommit,
            cpu_model: h.rec.cpu_model.clone(),
            labels: h.rec.labels.clone(),
            datastore: h.rec.datastore.clone(),
            allocated,
            hypervisor: h.rec.hypervisor.clone(),
            load: h.live.load,
            last_heartbeat: h.live.last_heartbeat,
            generation: h.rec.generation,
            applied_generation: h.live.applied_generation,
            vm_count,
            created_at: h.rec.created_at,
            standby_since: h.rec.standby_since,
            energy_saved_wh: self.energy_saved_wh(&h.rec),
        }
    }

    /// The host's whole desired state: every VM placed on it (those being
    /// deleted marked so), with its side of any migration, and the VMs
    /// migrating to it.
    pub fn desired_state(&self, h: &HostRecord) -> DesiredState {
        let outgoing = self.vms_on(h.id).map(|v| {
            let migration = v.migration.as_ref().and_then(|m| {
                Some(MigrationSpec::Outgoing {
                    id: m.id,
                    storage: m.storage,
                    uri: m.uri.clone()?,
                    nbd: m.nbd.clone(),
                    downtime_limit_ms: m.downtime_limit_ms,
                    cancel: m.phase == MigrationPhase::Cancelling,
                })
            });
            (v, v.cores.clone(), migration)
        });
        let incoming = self.vms_incoming(h.id).filter_map(|v| {
            let m = v.migration.as_ref()?;
            let spec = MigrationSpec::Incoming {
                id: m.id,
                storage: m.storage,
            };
            Some((v, m.target_cores.clone(), Some(spec)))
        });
        let vms = outgoing
            .chain(incoming)
            .filter_map(|(v, cores, migration)| {
                let image = self.images.values().find(|i| i.id == v.image_id)?;
                Some(VmSpec {
                    id: v.id,
                    name: v.name.clone(),
                    machine: super::machine::for_vm(v, image, cores),
                    power: v.power,
                    reboots: v.reboots,
                    delete: v.state == VmState::Deleting,
                    migration,
                    metadata: v.metadata.clone(),
                })
            })
            .collect();
        DesiredState {
            host_id: h.id,
            generation: h.generation,
            vms,
        }
    }
}

impl App {
    /// A page of the hosts matching the query; paging as in
    /// [`super::pages`]. Errors: a page token that is not this query's
    /// (invalid input naming `page_token`).
    pub async fn host_list(&self, q: &HostListQuery) -> Result<HostList> {
        let filters = (&q.state, &q.zone, &q.name);
        let pager = Pager::new(List::Hosts, q.limit, q.page_token.as_deref(), &filters)?;
        let inv = self.inv.read().await;
        let (items, next) = pager.page(&inv.hosts, q.name.as_deref(), |h| {
            if q.zone.as_ref().is_some_and(|z| *z != h.rec.zone) {
                return None;
            }
            let host = inv.host_view(h);
            q.state.is_none_or(|s| s == host.state).then_some(host)
        });
        Ok(HostList { items, next })
    }

    pub async fn host_get(&self, name: &str) -> Result<Host> {
        let inv = self.inv.read().await;
        Ok(inv.host_view(lookup(&inv.hosts, "host", name)?))
    }

    /// Join a host, or let a known host (same name) join again: it keeps its
    /// id and VMs and gets a new token. `known_host` is the host the caller's
    /// own token belongs to; it needs no join token to re-register itself.
    pub async fn host_register(
        &self,
        req: RegisterHost,
        known_host: Option<&str>,
    ) -> Result<RegisterHostResponse> {
        validate_name("name", &req.name)?;
        let mut inv = self.inv.write().await;
        if known_host.is_some_and(|h| h != req.name) {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "name",
                "name: a host token can only re-register its own host",
            )
            .into());
        }
        if known_host.is_none() && !App::join_token_valid(&inv, &req.join_token) {
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "join_token",
                "join_token: unknown or expired join token; create one with `kumo host token create`",
            )
            .into());
        }
        inv.check_zone("zone", &req.zone)?;
        let address_ok = req.address.is_empty()
            || reqwest::Url::parse(&req.address)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
        if !address_ok {
            return Err(ApiError::invalid(
                "address",
                format!(
                    "{:?} is not an http(s) URL, e.g. http://10.0.0.2:7371",
                    req.address
                ),
            )
            .into());
        }
        if req.capacity.vcpus == 0 {
            return Err(
                ApiError::invalid("capacity.vcpus", "a host needs at least one CPU").into(),
            );
        }
        if req.capacity.memory_mib == 0 {
            return Err(
                ApiError::invalid("capacity.memory_mib", "a host needs some memory").into(),
            );
        }
        let existing = inv.hosts.get(&req.name).map(|h| h.rec.clone());
        // A join token never takes over a name in use: two machines would
        // then run the same VMs. Only the host's own token re-registers it.
        if existing.is_some() && known_host.is_none() {
            return Err(ApiError::already_exists("host", &req.name).into());
        }
        let token = random_secret();
        if let Some(old) = &existing {
            if old.zone != req.zone {
                return Err(ApiError::new(ErrorCode::Conflict, "zone",
                    format!(
                        "zone: host {:?} is registered in zone {:?}; remove it before joining it to {:?}",
                        req.name, old.zone, req.zone
                    ),
                )
                .into());
            }
        }
        let rec = HostRecord {
            version: HOST_RECORD_VERSION,
            id: existing.as_ref().map_or_else(Uuid::new_v4, |o| o.id),
            name: req.name.clone(),
            project: DEFAULT_PROJECT.to_string(),
            zone: req.zone,
            address: req.address,
            capacity: req.capacity,
            cpu_overcommit: existing
                .as_ref()
                .map_or(DEFAULT_CPU_OVERCOMMIT, |o| o.cpu_overcommit),
            memory_overcommit: existing.as_ref().map_or(1.0, |o| o.memory_overcommit),
            cpu_model: req.cpu_model,
            labels: req.labels,
            hypervisor: req.hypervisor,
            datastore: req.datastore,
            mode: existing.as_ref().map_or(HostMode::Active, |o| o.mode),
            after_drain: existing
                .as_ref()
                .map_or(HostMode::Maintenance, |o| o.after_drain),
            welcome_back: existing.as_ref().is_some_and(|o| o.welcome_back),
            standby_since: existing.as_ref().and_then(|o| o.standby_since),
            energy_saved_wh: existing.as_ref().map_or(0.0, |o| o.energy_saved_wh),
            joining: existing.as_ref().is_none_or(|o| o.joining),
            generation: existing.as_ref().map_or(1, |o| o.generation),
            token_sha256: sha256_hex(&token),
            agent_secret: req.agent_secret,
            created_at: existing.as_ref().map_or_else(now_ms, |o| o.created_at),
        };
        let mut batch = Batch::default();
        batch.put_host(rec.clone());
        let (kind, what) = if existing.is_some() {
            ("host.rejoined", "rejoined")
        } else {
            ("host.joined", "joined")
        };
        batch.event(
            kind,
            format!("host/{}", rec.name),
            &rec.project,
            format!(
                "host {what} zone {} with {} CPUs, {} MiB, {} GiB ({} {})",
                rec.zone,
                rec.capacity.vcpus,
                rec.capacity.memory_mib,
                rec.capacity.disk_gib,
                rec.hypervisor.driver,
                rec.hypervisor.accel
            ),
        );
        self.commit(&mut inv, batch).await?;
        if let Some(old) = &existing {
            inv.host_tokens.remove(&old.token_sha256);
        }
        inv.host_tokens
            .insert(rec.token_sha256.clone(), rec.name.clone());
        Ok(RegisterHostResponse {
            host_id: rec.id,
            host_token: token,
        })
    }

    /// The host name a bearer token belongs to.
    pub async fn host_for_token(&self, token: &str) -> Option<String> {
        self.inv
            .read()
            .await
            .host_tokens
            .get(&sha256_hex(token))
            .cloned()
    }

    /// The host's desired state; with `after`, wait up to `wait` for a
    /// generation other than it (long poll), so changes reach agents at once.
    pub async fn host_desired(
        &self,
        host: &str,
        after: Option<u64>,
        wait: Duration,
    ) -> Result<DesiredState> {
        let id = lookup(&self.inv.read().await.hosts, "host", host)?.rec.id;
        if let Some(after) = after {
            let mut rx = self.watch_generation(id);
            // Any other generation than the agent's is news, also an older
            // one (the host was removed and joined anew).
            let _ = tokio::time::timeout(wait, rx.wait_for(|g| *g != after)).await;
        }
        let inv = self.inv.read().await;
        let h = lookup(&inv.hosts, "host", host)?;
        Ok(inv.desired_state(&h.rec))
    }

    pub async fn host_set_enabled(&self, name: &str, enabled: bool) -> Result<Host> {
        let request = if enabled {
            HostRequest::Enable
        } else {
            HostRequest::Disable
        };
        self.host_change(name, request, |rec| {
            let mode = if enabled {
                HostMode::Active
            } else {
                HostMode::Disabled
            };
            if rec.mode == mode {
                return None;
            }
            rec.mode = mode;
            Some(if enabled {
                ("host.enabled", "host enabled: takes new VMs".into())
            } else {
                (
                    "host.disabled",
                    "host disabled: takes no new VMs, its VMs keep running".into(),
                )
            })
        })
        .await
    }

    /// Change a host's overcommit ratios. VMs already placed stay where
    /// they are; new placements follow the new ratios.
    pub async fn host_update(&self, name: &str, req: UpdateHost) -> Result<Host> {
        self.host_change(name, HostRequest::Update, |rec| {
            rec.cpu_overcommit = req.cpu_overcommit.unwrap_or(rec.cpu_overcommit);
            rec.memory_overcommit = req.memory_overcommit.unwrap_or(rec.memory_overcommit);
            Some((
                "host.updated",
                format!(
                    "overcommit: CPU {}x, memory {}x",
                    rec.cpu_overcommit, rec.memory_overcommit
                ),
            ))
        })
        .await
    }

    /// Apply `change` to a host's record if its state accepts `request`
    /// (see [`transitions`]); `change` returns the event to record, or
    /// `None` when nothing changed.
    async fn host_change(
        &self,
        name: &str,
        request: HostRequest,
        change: impl FnOnce(&mut HostRecord) -> Option<(&'static str, String)>,
    ) -> Result<Host> {
        let mut inv = self.inv.write().await;
        let entry = lookup(&inv.hosts, "host", name)?;
        transitions::check_host(name, entry.row(), request)?;
        let mut rec = entry.rec.clone();
        if let Some((kind, msg)) = change(&mut rec) {
            let mut batch = Batch::default();
            batch.put_host(rec.clone());
            batch.event(kind, format!("host/{name}"), &rec.project, msg);
            self.commit(&mut inv, batch).await?;
        }
        let h = lookup(&inv.hosts, "host", name)?;
        Ok(inv.host_view(h))
    }

    pub async fn host_delete(&self, name: &str) -> Result<()> {
        let mut inv = self.inv.write().await;
        let entry = lookup(&inv.hosts, "host", name)?;
        transitions::check_host(name, entry.row(), HostRequest::Delete)?;
        let rec = entry.rec.clone();
        let (_, count) = inv.allocated(&rec.name);
        if count > 0 {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "name",
                format!("host {name:?} still has {count} VM(s); delete or move them first"),
            )
            .into());
        }
        let mut batch = Batch::default();
        batch.delete(host_key(name));
        batch.event(
            "host.removed",
            format!("host/{name}"),
            &rec.project,
            "host removed from the pool".into(),
        );
        self.commit(&mut inv, batch).await?;
        inv.hosts.remove(name);
        inv.sync_host(name);
        inv.host_tokens.remove(&rec.token_sha256);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::app::testing::{HostSpec, TestApp};
    use kumo_api::{ErrorCode, HostState};
    use std::time::Duration;

    /// A new host is joining, takes no VMs until its agent's first
    /// heartbeat, then is ready; the store keeps that it joined.
    #[tokio::test]
    async fn a_new_host_takes_no_vms_until_its_first_heartbeat() {
        let t = TestApp::new(Duration::from_secs(600)).await;
        t.register(HostSpec::new("h1")).await;
        assert_eq!(
            t.app.host_get("h1").await.unwrap().state,
            HostState::Joining
        );
        match t.app.vm_create(TestApp::vm("web", 512)).await {
            Err(crate::Error::Api(e)) => assert_eq!(e.code, ErrorCode::NoValidHost),
            other => panic!("placed on a joining host: {other:?}"),
        }
        t.heartbeat("h1").await;
        assert_eq!(t.app.host_get("h1").await.unwrap().state, HostState::Ready);
        let vm = t.app.vm_create(TestApp::vm("web", 512)).await.unwrap();
        assert_eq!(vm.host, "h1");
        let inv = t.app.inv.read().await;
        assert!(inv.recent_events.iter().any(|e| e.kind == "host.ready"));
        assert!(!inv.hosts["h1"].rec.joining);
    }
}
