//! Affinity and anti-affinity groups: VMs that must (or should) share a
//! host, or keep apart.

use super::records::group_key;
use super::{lookup, now_ms, App, Batch, Inventory};
use crate::error::Result;
use kumo_api::{
    validate_name, ApiError, CreateGroup, ErrorCode, Group, GroupPolicy, DEFAULT_PROJECT,
};
use uuid::Uuid;

impl Inventory {
    /// The scheduler's rules for the named groups; unknown names are an
    /// error naming the known ones.
    pub fn group_rules(&self, names: &[String]) -> Result<Vec<kumo_sched::Group>> {
        names
            .iter()
            .map(|name| {
                let g = self.groups.get(name).ok_or_else(|| {
                    let known: Vec<_> = self.groups.keys().cloned().collect();
                    ApiError::invalid(
                        "groups",
                        format!("unknown group {name:?}; known groups: {known:?}"),
                    )
                })?;
                Ok(kumo_sched::Group {
                    name: g.name.clone(),
                    anti: g.policy == GroupPolicy::AntiAffinity,
                    hard: g.hard,
                })
            })
            .collect()
    }
}

impl App {
    pub async fn group_list(&self) -> Vec<Group> {
        self.inv.read().await.groups.values().cloned().collect()
    }

    pub async fn group_get(&self, name: &str) -> Result<Group> {
        Ok(lookup(&self.inv.read().await.groups, "group", name)?.clone())
    }

    pub async fn group_create(&self, req: CreateGroup) -> Result<Group> {
        validate_name("name", &req.name)?;
        let mut inv = self.inv.write().await;
        if inv.groups.contains_key(&req.name) {
            return Err(ApiError::already_exists("group", &req.name).into());
        }
        let group = Group {
            id: Uuid::new_v4(),
            name: req.name,
            project: DEFAULT_PROJECT.to_string(),
            policy: req.policy,
            hard: req.hard.unwrap_or(true),
            created_at: now_ms(),
        };
        let mut batch = Batch::default();
        batch.put(group_key(&group.name), &group);
        batch.event(
            "group.created",
            format!("group/{}", group.name),
            &group.project,
            format!(
                "{:?} group, {}",
                group.policy,
                if group.hard { "hard" } else { "soft" }
            ),
        );
        self.commit(&mut inv, batch).await?;
        inv.groups.insert(group.name.clone(), group.clone());
        Ok(group)
    }

    pub async fn group_delete(&self, name: &str) -> Result<()> {
        let mut inv = self.inv.write().await;
        let group = lookup(&inv.groups, "group", name)?.clone();
        let members: Vec<_> = inv
            .vms()
            .values()
            .filter(|v| v.groups.iter().any(|g| g == name))
            .map(|v| v.name.clone())
            .collect();
        if !members.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "name",
                format!("group {name:?} still has VM(s) {members:?}"),
            )
            .into());
        }
        let mut batch = Batch::default();
        batch.delete(group_key(name));
        batch.event(
            "group.deleted",
            format!("group/{name}"),
            &group.project,
            "group deleted".into(),
        );
        self.commit(&mut inv, batch).await?;
        inv.groups.remove(name);
        Ok(())
    }
}
