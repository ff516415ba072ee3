//! Zones: sites, campuses or racks that fail together.

use super::records::zone_key;
use super::{lookup, now_ms, App, Batch};
use crate::error::Result;
use kumo_api::{validate_name, ApiError, CreateZone, ErrorCode, Zone, DEFAULT_PROJECT};
use uuid::Uuid;

impl super::Inventory {
    /// Fail unless `zone` exists, naming the `field` and the known zones.
    pub fn check_zone(&self, field: &str, zone: &str) -> Result<()> {
        if self.zones.contains_key(zone) {
            return Ok(());
        }
        let known: Vec<_> = self.zones.keys().cloned().collect();
        Err(ApiError::invalid(
            field,
            format!("unknown zone {zone:?}; known zones: {known:?}"),
        )
        .into())
    }
}

impl App {
    pub async fn zone_list(&self) -> Vec<Zone> {
        self.inv.read().await.zones.values().cloned().collect()
    }

    pub async fn zone_get(&self, name: &str) -> Result<Zone> {
        Ok(lookup(&self.inv.read().await.zones, "zone", name)?.clone())
    }

    pub async fn zone_create(&self, req: CreateZone) -> Result<Zone> {
        validate_name("name", &req.name)?;
        let mut inv = self.inv.write().await;
        if inv.zones.contains_key(&req.name) {
            return Err(ApiError::already_exists("zone", &req.name).into());
        }
        let zone = Zone {
            id: Uuid::new_v4(),
            name: req.name,
            project: DEFAULT_PROJECT.to_string(),
            description: req.description,
            created_at: now_ms(),
            power_saving: None,
        };
        let mut batch = Batch::default();
        batch.put(zone_key(&zone.name), &zone);
        batch.event(
            "zone.created",
            format!("zone/{}", zone.name),
            &zone.project,
            "zone created".into(),
        );
        self.commit(&mut inv, batch).await?;
        inv.zones.insert(zone.name.clone(), zone.clone());
        Ok(zone)
    }

    pub async fn zone_delete(&self, name: &str) -> Result<()> {
        let mut inv = self.inv.write().await;
        let zone = lookup(&inv.zones, "zone", name)?.clone();
        let hosts = inv.hosts.values().filter(|h| h.rec.zone == name).count();
        if hosts > 0 {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "name",
                format!("zone {name:?} still has {hosts} host(s); remove them first"),
            )
            .into());
        }
        let mut batch = Batch::default();
        batch.delete(zone_key(name));
        batch.event(
            "zone.deleted",
            format!("zone/{name}"),
            &zone.project,
            "zone deleted".into(),
        );
        self.commit(&mut inv, batch).await?;
        inv.zones.remove(name);
        Ok(())
    }
}
