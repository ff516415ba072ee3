//! The cluster as the scheduler sees it: every host's capacity, what is
//! placed on it and which groups its VMs belong to, updated incrementally as
//! hosts and VMs come and go — never rebuilt per request.
//!
//! CPU model: a host has `capacity.vcpus` physical cores. A VM with
//! [`CpuPolicy::Dedicated`] gets whole cores of its own (never shared with
//! another VM); shared vCPUs run on the remaining cores, overcommitted by the
//! host's `cpu_overcommit` ratio. Memory is overcommitted by
//! `memory_overcommit` (1.0: none); disk is never overcommitted.

use crate::expr::{Context, Expr, ParseError, Value};
use kumo_api::Resources;
pub use kumo_api::{CpuPolicy, PlacementPolicy as Policy};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A host as the scheduler knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct HostInfo {
    pub name: String,
    pub zone: String,
    /// Physical cores, memory and disk.
    pub capacity: Resources,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub cpu_model: String,
    /// `kvm` or `tcg`: a running guest moves only between hosts of one kind.
    pub accel: String,
    pub labels: BTreeMap<String, String>,
    /// Ready and enabled: not down, disabled or draining.
    pub schedulable: bool,
    /// Measured CPU use, 0–100.
    pub load: f64,
}

/// Whether VMs of a group must (or should) share a host or avoid each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub anti: bool,
    /// A hard rule excludes hosts; a soft one only ranks them.
    pub hard: bool,
}

/// What to place.
#[derive(Clone, Debug, Default)]
pub struct Request {
    pub size: Resources,
    pub cpu_policy: CpuPolicy,
    pub zone: Option<String>,
    pub requirements: Option<Expr>,
    /// Among the hosts that pass, prefer those where this is highest (as
    /// OpenNebula's RANK); the policy breaks ties.
    pub rank: Option<Expr>,
    pub groups: Vec<Group>,
    pub policy: Policy,
    /// The host a running VM moves away from (live migration): it is
    /// excluded, and the target must run the guest's CPU as it is — the same
    /// accelerator, and under KVM the same CPU model.
    pub from_host: Option<String>,
}

/// The answer to "how many more of these fit?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub fits: u64,
    /// Hosts that could hold the shape at all.
    pub hosts: usize,
    /// What stops the most hosts from taking one more.
    pub limited_by: Option<Constraint>,
}

/// Where a VM went: the host, and for dedicated VMs the cores it owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub host: String,
    pub cores: Vec<u32>,
}

/// The constraints, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Constraint {
    NotSchedulable,
    CurrentHost,
    Zone,
    CpuModel,
    Requirements,
    AntiAffinity,
    Affinity,
    DedicatedCores,
    Vcpus,
    Memory,
    Disk,
}

impl Constraint {
    const ALL: [Constraint; 11] = [
        Constraint::NotSchedulable,
        Constraint::CurrentHost,
        Constraint::Zone,
        Constraint::CpuModel,
        Constraint::Requirements,
        Constraint::AntiAffinity,
        Constraint::Affinity,
        Constraint::DedicatedCores,
        Constraint::Vcpus,
        Constraint::Memory,
        Constraint::Disk,
    ];

    /// The constraint's name in the API.
    pub fn key(self) -> &'static str {
        match self {
            Constraint::NotSchedulable => "not_schedulable",
            Constraint::CurrentHost => "current_host",
            Constraint::Zone => "zone",
            Constraint::CpuModel => "cpu_model",
            Constraint::Requirements => "requirements",
            Constraint::AntiAffinity => "anti_affinity",
            Constraint::Affinity => "affinity",
            Constraint::DedicatedCores => "dedicated_cores",
            Constraint::Vcpus => "vcpus",
            Constraint::Memory => "memory",
            Constraint::Disk => "disk",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Constraint::NotSchedulable => "not schedulable (down, disabled or draining)",
            Constraint::CurrentHost => "the VM's current host",
            Constraint::Zone => "in another zone",
            Constraint::CpuModel => {
                "unable to run the guest's CPU (other accelerator or CPU model)"
            }
            Constraint::Requirements => "not matching the requirements",
            Constraint::AntiAffinity => "holding a VM of a hard anti-affinity group",
            Constraint::Affinity => "not holding the VMs of a hard affinity group",
            Constraint::DedicatedCores => "too few free cores to dedicate",
            Constraint::Vcpus => "too few free vCPUs",
            Constraint::Memory => "too little free memory",
            Constraint::Disk => "too little free disk",
        }
    }
}

/// Why nothing could take the VM: how many hosts each constraint excluded,
/// and the host that came closest (failed only the latest constraint).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub hosts: usize,
    pub excluded: Vec<(Constraint, usize)>,
    pub near_miss: Option<(String, Constraint)>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no host can take the VM: {} host(s) in the pool",
            self.hosts
        )?;
        let parts: Vec<String> = self
            .excluded
            .iter()
            .map(|(c, n)| format!("{n} {}", c.describe()))
            .collect();
        if !parts.is_empty() {
            write!(f, "; excluded: {}", parts.join(", "))?;
        }
        if let Some((host, c)) = &self.near_miss {
            write!(f, "; nearest miss: {host} ({})", c.describe())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub(crate) struct VmEntry {
    pub(crate) host: usize,
    pub(crate) size: Resources,
    pub(crate) cores: Vec<u32>,
    pub(crate) groups: Vec<String>,
}

#[derive(Clone, Debug)]
struct HostState {
    info: HostInfo,
    shared_vcpus: u64,
    memory_mib: u64,
    disk_gib: u64,
    /// Its key in `Cluster::by_free_memory`.
    indexed_free_memory: Option<u64>,
    /// `true` for a core dedicated to a VM.
    dedicated: Vec<bool>,
    dedicated_count: u32,
    /// VMs per group on this host.
    groups: HashMap<String, u32>,
    /// VMs placed on this host.
    vm_count: u32,
}

impl HostState {
    fn new(info: HostInfo) -> Self {
        let cores = info.capacity.vcpus as usize;
        HostState {
            info,
            shared_vcpus: 0,
            memory_mib: 0,
            disk_gib: 0,
            indexed_free_memory: None,
            dedicated: vec![false; cores],
            dedicated_count: 0,
            groups: HashMap::new(),
            vm_count: 0,
        }
    }

    /// Shared vCPUs the host can hold with `extra_dedicated` more cores
    /// dedicated.
    fn shared_limit(&self, extra_dedicated: u32) -> u64 {
        let cores = self
            .info
            .capacity
            .vcpus
            .saturating_sub(self.dedicated_count + extra_dedicated);
        (f64::from(cores) * self.info.cpu_overcommit).floor() as u64
    }

    fn shared_room(&self) -> u64 {
        self.shared_limit(0).saturating_sub(self.shared_vcpus)
    }

    fn memory_room(&self) -> u64 {
        let limit =
            (self.info.capacity.memory_mib as f64 * self.info.memory_overcommit).floor() as u64;
        limit.saturating_sub(self.memory_mib)
    }

    fn disk_room(&self) -> u64 {
        self.info.capacity.disk_gib.saturating_sub(self.disk_gib)
    }

    fn free_cores(&self) -> u32 {
        self.info
            .capacity
            .vcpus
            .saturating_sub(self.dedicated_count)
    }

    /// The first constraint the host fails for `req`, if any.
    /// `from` is the host named by `req.from_host`.
    fn check(
        &self,
        req: &Request,
        from: Option<&HostInfo>,
        group_totals: &HashMap<String, u32>,
    ) -> Option<Constraint> {
        if !self.info.schedulable {
            return Some(Constraint::NotSchedulable);
        }
        if req.from_host.as_ref() == Some(&self.info.name) {
            return Some(Constraint::CurrentHost);
        }
        if req.zone.as_ref().is_some_and(|z| *z != self.info.zone) {
            return Some(Constraint::Zone);
        }
        if from.is_some_and(|f| {
            f.accel != self.info.accel || (f.accel == "kvm" && f.cpu_model != self.info.cpu_model)
        }) {
            return Some(Constraint::CpuModel);
        }
        if req
            .requirements
            .as_ref()
            .is_some_and(|e| !e.eval_bool(&HostContext(self)))
        {
            return Some(Constraint::Requirements);
        }
        for g in req.groups.iter().filter(|g| g.hard) {
            let here = self.groups.get(&g.name).copied().unwrap_or(0);
            if g.anti && here > 0 {
                return Some(Constraint::AntiAffinity);
            }
            let anywhere = group_totals.get(&g.name).copied().unwrap_or(0);
            if !g.anti && anywhere > 0 && here == 0 {
                return Some(Constraint::Affinity);
            }
        }
        match req.cpu_policy {
            CpuPolicy::Dedicated => {
                // The cores must be free, and the shared vCPUs already here
                // must still fit on the cores that remain.
                if self.free_cores() < req.size.vcpus
                    || self.shared_limit(req.size.vcpus) < self.shared_vcpus
                {
                    return Some(Constraint::DedicatedCores);
                }
            }
            CpuPolicy::Shared => {
                if self.shared_room() < u64::from(req.size.vcpus) {
                    return Some(Constraint::Vcpus);
                }
            }
        }
        if self.memory_room() < req.size.memory_mib {
            return Some(Constraint::Memory);
        }
        if self.disk_room() < req.size.disk_gib {
            return Some(Constraint::Disk);
        }
        None
    }

    /// The larger of CPU and memory use, as shares of what the host may
    /// hold, with `req` placed on it.
    fn dominant_share_with(&self, req: &Request) -> f64 {
        let (cpu, memory) = self.shares_with(req);
        cpu.max(memory)
    }

    /// CPU and memory use, as shares of what the host may hold, with `req`
    /// placed on it.
    fn shares_with(&self, req: &Request) -> (f64, f64) {
        let vcpus = f64::from(req.size.vcpus);
        let (shared, dedicated) = match req.cpu_policy {
            CpuPolicy::Shared => (
                self.shared_vcpus as f64 + vcpus,
                f64::from(self.dedicated_count),
            ),
            CpuPolicy::Dedicated => (
                self.shared_vcpus as f64,
                f64::from(self.dedicated_count) + vcpus,
            ),
        };
        let cores = f64::from(self.info.capacity.vcpus.max(1));
        let cpu = (shared / self.info.cpu_overcommit + dedicated) / cores;
        let memory_limit =
            (self.info.capacity.memory_mib as f64 * self.info.memory_overcommit).max(1.0);
        let memory = (self.memory_mib + req.size.memory_mib) as f64 / memory_limit;
        (cpu, memory)
    }

    /// Soft group rules the host would break: fewer is better.
    fn soft_violations(&self, req: &Request, group_totals: &HashMap<String, u32>) -> u32 {
        req.groups
            .iter()
            .filter(|g| !g.hard)
            .filter(|g| {
                let here = self.groups.get(&g.name).copied().unwrap_or(0);
                let anywhere = group_totals.get(&g.name).copied().unwrap_or(0);
                if g.anti {
                    here > 0
                } else {
                    anywhere > 0 && here == 0
                }
            })
            .count() as u32
    }
}

/// How many of the fullest hosts that fit `pack` weighs.
const PACK_WINDOW: usize = 16;

/// The cluster's hosts and placed VMs.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    /// Removed hosts leave a hole, so indexes held by VMs stay valid.
    hosts: Vec<Option<HostState>>,
    by_name: HashMap<String, usize>,
    vms: HashMap<String, VmEntry>,
    group_totals: HashMap<String, u32>,
    /// Hosts by free memory (the key each host was last indexed under), so
    /// pack and spread look only at hosts with room instead of at all.
    by_free_memory: BTreeSet<(u64, usize)>,
}

impl Cluster {
    /// Add a host, or update what is known of it (its VMs stay).
    pub fn upsert_host(&mut self, info: HostInfo) {
        let name = info.name.clone();
        match self.by_name.get(&info.name) {
            Some(&i) => {
                let h = self.hosts[i].as_mut().expect("indexed hosts exist");
                // Cores dedicated beyond a shrunk capacity stay accounted.
                let cores = (info.capacity.vcpus as usize)
                    .max(h.dedicated.iter().rposition(|d| *d).map_or(0, |p| p + 1));
                h.dedicated.resize(cores, false);
                h.info = info;
            }
            None => {
                self.by_name.insert(info.name.clone(), self.hosts.len());
                self.hosts.push(Some(HostState::new(info)));
            }
        }
        self.reindex(self.by_name[&name]);
    }

    /// Put host `i` under its current free memory in the index (or take it
    /// out, once removed).
    fn reindex(&mut self, i: usize) {
        let Some(h) = self.hosts[i].as_mut() else {
            return;
        };
        if let Some(old) = h.indexed_free_memory.take() {
            self.by_free_memory.remove(&(old, i));
        }
        let free = h.memory_room();
        h.indexed_free_memory = Some(free);
        self.by_free_memory.insert((free, i));
    }

    /// Remove a host that holds no VMs.
    pub fn remove_host(&mut self, name: &str) -> Result<(), String> {
        let Some(&i) = self.by_name.get(name) else {
            return Ok(());
        };
        if self.vms.values().any(|v| v.host == i) {
            return Err(format!("host {name} still holds VMs"));
        }
        if let Some(free) = self.hosts[i].as_ref().and_then(|h| h.indexed_free_memory) {
            self.by_free_memory.remove(&(free, i));
        }
        self.hosts[i] = None;
        self.by_name.remove(name);
        Ok(())
    }

    /// Record a host's measured CPU load (for load-aware placement), without
    /// the rest of an update: heartbeats bring it every second.
    pub fn set_load(&mut self, name: &str, load: f64) {
        if let Some(h) = self.by_name.get(name).and_then(|&i| self.hosts[i].as_mut()) {
            h.info.load = load;
        }
    }

    /// Choose a host for `vm` and reserve what it needs there.
    ///
    /// Pack weighs the 16 hosts with the least free memory that pass every
    /// constraint and takes the one whose fuller resource (CPU or memory)
    /// would be fullest; spread takes the host with the most free memory.
    /// Both look through the free-memory index, never at hosts too full for
    /// the VM. Load-aware placement, rank expressions and soft group rules
    /// weigh every host.
    pub fn place(&mut self, vm: &str, req: &Request) -> Result<Placement, Refusal> {
        let i = match self.indexed_choice(req, &self.group_totals) {
            Some(i) => i,
            None => self.scan(req, &self.group_totals)?,
        };
        Ok(self.reserve(vm, i, req))
    }

    /// Choose a new host for the placed VM `vm` (moving away from
    /// `req.from_host`) and reserve what it needs there under `key`, as
    /// [`Cluster::place`] does, except that the VM itself does not count as
    /// a member of its groups: a lone member of a hard affinity group may
    /// go anywhere.
    pub fn place_moving(
        &mut self,
        vm: &str,
        key: &str,
        req: &Request,
    ) -> Result<Placement, Refusal> {
        let totals = self.totals_without(vm, req);
        let i = match self.indexed_choice(req, &totals) {
            Some(i) => i,
            None => self.scan(req, &totals)?,
        };
        Ok(self.reserve(key, i, req))
    }

    /// The totals of the request's groups, without the placed VM `vm`.
    fn totals_without(&self, vm: &str, req: &Request) -> HashMap<String, u32> {
        let own: &[String] = self.vms.get(vm).map_or(&[], |e| &e.groups);
        req.groups
            .iter()
            .map(|g| {
                let total = self.group_totals.get(&g.name).copied().unwrap_or(0);
                let mine = own.iter().filter(|n| **n == g.name).count() as u32;
                (g.name.clone(), total.saturating_sub(mine))
            })
            .collect()
    }

    /// The host a request moves a VM away from.
    fn moving_from(&self, req: &Request) -> Option<&HostInfo> {
        let i = *self.by_name.get(req.from_host.as_ref()?)?;
        self.hosts[i].as_ref().map(|h| &h.info)
    }

    fn indexed_choice(&self, req: &Request, totals: &HashMap<String, u32>) -> Option<usize> {
        let from = self.moving_from(req);
        if req.policy == Policy::LoadAware
            || req.rank.is_some()
            || req.groups.iter().any(|g| !g.hard)
        {
            return None;
        }
        let fits = |&&(_, i): &&(u64, usize)| {
            let h = self.hosts[i].as_ref().expect("indexed hosts exist");
            h.check(req, from, totals).is_none()
        };
        let room = self.by_free_memory.range((req.size.memory_mib, 0)..);
        match req.policy {
            Policy::Spread => room.rev().find(fits).map(|(_, i)| *i),
            // Among the fullest hosts (by memory) that fit, the one whose
            // fullest resource would be fullest: on streams where VMs come
            // and go this leaves fewer half-empty hosts than best fit on
            // memory alone (see docs/SPEC.md).
            _ => room
                .filter(fits)
                .take(PACK_WINDOW)
                .map(|(_, i)| *i)
                .reduce(|best, i| {
                    let share = |i: usize| {
                        self.hosts[i]
                            .as_ref()
                            .expect("indexed")
                            .dominant_share_with(req)
                    };
                    if share(i) > share(best) {
                        i
                    } else {
                        best
                    }
                }),
        }
    }

    /// Weigh every host: the best by policy and soft rules, or why none.
    fn scan(&self, req: &Request, totals: &HashMap<String, u32>) -> Result<usize, Refusal> {
        let from = self.moving_from(req);
        let mut excluded = [0usize; Constraint::ALL.len()];
        let mut near: Option<(usize, Constraint)> = None;
        let mut best: Option<(usize, (u32, f64, f64))> = None;
        for (i, h) in self.hosts.iter().enumerate() {
            let Some(h) = h else { continue };
            if let Some(c) = h.check(req, from, totals) {
                excluded[c as usize] += 1;
                if near.is_none_or(|(_, n)| c > n) {
                    near = Some((i, c));
                }
                continue;
            }
            let soft = h.soft_violations(req, totals);
            // Higher rank first; a host whose rank cannot be computed last.
            let rank = req.rank.as_ref().map_or(0.0, |e| {
                -e.eval_number(&HostContext(h)).unwrap_or(f64::NEG_INFINITY)
            });
            let free = h.memory_room() as f64;
            let score = match req.policy {
                Policy::Pack => -h.dominant_share_with(req),
                Policy::Spread => -free,
                Policy::LoadAware => (h.info.load * 1e12).round() - free,
            };
            if best.is_none_or(|(_, (s, r, sc))| (soft, rank, score) < (s, r, sc)) {
                best = Some((i, (soft, rank, score)));
            }
        }
        let Some((i, _)) = best else {
            return Err(Refusal {
                hosts: self.by_name.len(),
                excluded: Constraint::ALL
                    .iter()
                    .zip(excluded)
                    .filter(|(_, n)| *n > 0)
                    .map(|(c, n)| (*c, n))
                    .collect(),
                near_miss: near.map(|(i, c)| {
                    (
                        self.hosts[i].as_ref().expect("scanned").info.name.clone(),
                        c,
                    )
                }),
            });
        };
        Ok(i)
    }

    /// Reserve what `req` needs on host `i` for `vm`.
    fn reserve(&mut self, vm: &str, i: usize, req: &Request) -> Placement {
        let h = self.hosts[i].as_mut().expect("chosen hosts exist");
        let cores: Vec<u32> = match req.cpu_policy {
            CpuPolicy::Shared => Vec::new(),
            CpuPolicy::Dedicated => (0..h.dedicated.len() as u32)
                .filter(|c| !h.dedicated[*c as usize])
                .take(req.size.vcpus as usize)
                .collect(),
        };
        let host = h.info.name.clone();
        let groups = req.groups.iter().map(|g| g.name.clone()).collect();
        self.add_at(vm, i, req.size, cores.clone(), groups);
        Placement { host, cores }
    }

    /// Record a VM placed earlier (on start-up), with its dedicated cores.
    pub fn add(
        &mut self,
        vm: &str,
        host: &str,
        size: Resources,
        cores: Vec<u32>,
        groups: Vec<String>,
    ) -> Result<(), String> {
        let &i = self
            .by_name
            .get(host)
            .ok_or_else(|| format!("unknown host {host}"))?;
        self.release(vm);
        let h = self.hosts[i].as_ref().expect("indexed hosts exist");
        if let Some(c) = cores
            .iter()
            .find(|c| h.dedicated.get(**c as usize).is_none_or(|d| *d))
        {
            return Err(format!("core {c} of host {host} is not free to dedicate"));
        }
        self.add_at(vm, i, size, cores, groups);
        Ok(())
    }

    fn add_at(
        &mut self,
        vm: &str,
        i: usize,
        size: Resources,
        cores: Vec<u32>,
        groups: Vec<String>,
    ) {
        self.release(vm);
        let h = self.hosts[i].as_mut().expect("indexed hosts exist");
        if cores.is_empty() {
            h.shared_vcpus += u64::from(size.vcpus);
        }
        for c in &cores {
            h.dedicated[*c as usize] = true;
        }
        h.dedicated_count += cores.len() as u32;
        h.memory_mib += size.memory_mib;
        h.disk_gib += size.disk_gib;
        h.vm_count += 1;
        for g in &groups {
            *h.groups.entry(g.clone()).or_default() += 1;
            *self.group_totals.entry(g.clone()).or_default() += 1;
        }
        self.vms.insert(
            vm.to_string(),
            VmEntry {
                host: i,
                size,
                cores,
                groups,
            },
        );
        self.reindex(i);
    }

    /// How many more VMs of the request's shape fit now (groups aside), and
    /// which constraint stops the most hosts from taking another.
    pub fn capacity(&self, req: &Request) -> Capacity {
        let mut fits = 0u64;
        let mut hosts = 0;
        let mut limits = [0usize; Constraint::ALL.len()];
        let shape = Request {
            size: Resources::default(),
            cpu_policy: CpuPolicy::Shared,
            groups: Vec::new(),
            ..req.clone()
        };
        for h in self.hosts.iter().flatten() {
            // Constraints other than room decide whether the host counts.
            if h.check(&shape, None, &self.group_totals).is_some() {
                continue;
            }
            let per = |room: u64, need: u64| room.checked_div(need).unwrap_or(u64::MAX);
            let (cpu, cpu_limit) = match req.cpu_policy {
                CpuPolicy::Shared => (
                    per(h.shared_room(), req.size.vcpus.into()),
                    Constraint::Vcpus,
                ),
                CpuPolicy::Dedicated => {
                    let k = req.size.vcpus.max(1);
                    let mut n = h.free_cores() / k;
                    while n > 0 && h.shared_limit(n * k) < h.shared_vcpus {
                        n -= 1;
                    }
                    (u64::from(n), Constraint::DedicatedCores)
                }
            };
            let options = [
                (cpu, cpu_limit),
                (
                    per(h.memory_room(), req.size.memory_mib),
                    Constraint::Memory,
                ),
                (per(h.disk_room(), req.size.disk_gib), Constraint::Disk),
            ];
            let (n, limit) = options
                .into_iter()
                .min_by_key(|(n, _)| *n)
                .expect("three options");
            fits += n;
            hosts += 1;
            limits[limit as usize] += 1;
        }
        // Among the resources, the one that limits the most hosts (the
        // first in order on a tie).
        let mut limited_by: Option<(Constraint, usize)> = None;
        for c in [
            Constraint::DedicatedCores,
            Constraint::Vcpus,
            Constraint::Memory,
            Constraint::Disk,
        ] {
            let n = limits[c as usize];
            if n > 0 && limited_by.is_none_or(|(_, m)| n > m) {
                limited_by = Some((c, n));
            }
        }
        Capacity {
            fits,
            hosts,
            limited_by: limited_by.map(|(c, _)| c),
        }
    }

    /// Give back what a VM held.
    pub fn release(&mut self, vm: &str) {
        let Some(e) = self.vms.remove(vm) else { return };
        let Some(h) = self.hosts[e.host].as_mut() else {
            return;
        };
        if e.cores.is_empty() {
            h.shared_vcpus -= u64::from(e.size.vcpus);
        }
        for c in &e.cores {
            h.dedicated[*c as usize] = false;
        }
        h.dedicated_count -= e.cores.len() as u32;
        h.memory_mib -= e.size.memory_mib;
        h.disk_gib -= e.size.disk_gib;
        h.vm_count -= 1;
        for g in &e.groups {
            decrement(&mut h.groups, g);
            decrement(&mut self.group_totals, g);
        }
        self.reindex(e.host);
    }
}

/// Reading the cluster and moving placed VMs host by host (what the
/// rebalancing and consolidation planners build on).
impl Cluster {
    /// What is known of a host.
    pub fn host(&self, name: &str) -> Option<&HostInfo> {
        let i = *self.by_name.get(name)?;
        self.hosts[i].as_ref().map(|h| &h.info)
    }

    /// Every host, in the order they were added.
    pub fn hosts(&self) -> impl Iterator<Item = &HostInfo> {
        self.hosts.iter().flatten().map(|h| &h.info)
    }

    /// The host a VM is placed on.
    pub fn vm_host(&self, vm: &str) -> Option<&str> {
        let e = self.vms.get(vm)?;
        self.hosts[e.host].as_ref().map(|h| h.info.name.as_str())
    }

    /// What a host holds, the one count of it kumo keeps: the summed size
    /// of the VMs placed on it and of the room reserved on it (for VMs
    /// migrating in; their dedicated cores count as vCPUs), and how many
    /// entries that is. `None` for an unknown host.
    pub fn allocated(&self, host: &str) -> Option<(Resources, u32)> {
        let h = self.hosts[*self.by_name.get(host)?].as_ref()?;
        let vcpus = h.shared_vcpus + u64::from(h.dedicated_count);
        let size = Resources {
            vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
            memory_mib: h.memory_mib,
            disk_gib: h.disk_gib,
        };
        Some((size, h.vm_count))
    }

    /// How many VMs are placed on a host (0 for an unknown one).
    pub fn vm_count(&self, host: &str) -> usize {
        self.by_name.get(host).map_or(0, |&i| self.vm_count_at(i))
    }

    /// The first constraint of `req` that `host` fails for `vm`, judged as
    /// [`Cluster::place`] judges it, except that a VM placed already is not
    /// counted as a member of its own groups (a lone member of a hard
    /// affinity group may move anywhere). An unknown host is
    /// [`Constraint::NotSchedulable`].
    pub fn check_host(&self, vm: &str, host: &str, req: &Request) -> Result<(), Constraint> {
        let i = self.host_index(host).ok_or(Constraint::NotSchedulable)?;
        match self.mover(vm, req).check(i) {
            Some(c) => Err(c),
            None => Ok(()),
        }
    }

    /// Reserve on `host`, under `key`, what `req` needs for `vm` if the host
    /// passes [`Cluster::check_host`]. With `key` the VM's own name, a VM
    /// placed elsewhere moves (what it held there is given back); with
    /// another key it holds room in both places (a migration under way).
    pub fn place_on(
        &mut self,
        vm: &str,
        key: &str,
        host: &str,
        req: &Request,
    ) -> Result<Placement, Constraint> {
        self.check_host(vm, host, req)?;
        let i = self.host_index(host).expect("checked");
        Ok(self.reserve(key, i, req))
    }

    pub(crate) fn host_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// Slots of host indexes (removed hosts leave holes).
    pub(crate) fn host_slots(&self) -> usize {
        self.hosts.len()
    }

    pub(crate) fn host_at(&self, i: usize) -> Option<&HostInfo> {
        self.hosts.get(i)?.as_ref().map(|h| &h.info)
    }

    pub(crate) fn vm_count_at(&self, i: usize) -> usize {
        self.hosts[i].as_ref().map_or(0, |h| h.vm_count as usize)
    }

    pub(crate) fn vm_entry(&self, vm: &str) -> Option<&VmEntry> {
        self.vms.get(vm)
    }

    /// Put a VM back exactly as an earlier [`Cluster::vm_entry`] recorded
    /// it (undoing a tentative move).
    pub(crate) fn restore_vm(&mut self, vm: &str, e: VmEntry) {
        self.add_at(vm, e.host, e.size, e.cores, e.groups);
    }

    pub(crate) fn set_load_at(&mut self, i: usize, load: f64) {
        if let Some(h) = self.hosts[i].as_mut() {
            h.info.load = load;
        }
    }

    pub(crate) fn set_schedulable_at(&mut self, i: usize, schedulable: bool) {
        if let Some(h) = self.hosts[i].as_mut() {
            h.info.schedulable = schedulable;
        }
    }

    /// CPU and memory use of host `i` as shares of what it may hold, with
    /// `req` placed on it.
    pub(crate) fn shares_with_at(&self, i: usize, req: &Request) -> (f64, f64) {
        self.hosts[i].as_ref().expect("known host").shares_with(req)
    }

    pub(crate) fn reserve_at(&mut self, vm: &str, i: usize, req: &Request) -> Placement {
        self.reserve(vm, i, req)
    }

    /// Checks `req` for `vm` against many hosts, with what does not depend
    /// on the host worked out once.
    pub(crate) fn mover<'a>(&'a self, vm: &str, req: &'a Request) -> Mover<'a> {
        let group_totals = self.totals_without(vm, req);
        Mover {
            cluster: self,
            req,
            from: self.moving_from(req),
            group_totals,
        }
    }
}

/// [`HostState::check`] for one placed VM, host after host.
pub(crate) struct Mover<'a> {
    cluster: &'a Cluster,
    req: &'a Request,
    from: Option<&'a HostInfo>,
    /// The group totals without the VM itself.
    group_totals: HashMap<String, u32>,
}

impl Mover<'_> {
    /// The first constraint host `i` fails, if any.
    pub(crate) fn check(&self, i: usize) -> Option<Constraint> {
        match self.cluster.hosts.get(i).and_then(Option::as_ref) {
            Some(h) => h.check(self.req, self.from, &self.group_totals),
            None => Some(Constraint::NotSchedulable),
        }
    }
}

fn decrement(map: &mut HashMap<String, u32>, key: &str) {
    if let Some(n) = map.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            map.remove(key);
        }
    }
}

/// The host attributes requirement and rank expressions may read, besides
/// `labels.KEY`.
pub const HOST_ATTRIBUTES: [&str; 11] = [
    "name",
    "zone",
    "cpu_model",
    "load",
    "vcpus",
    "memory_mib",
    "disk_gib",
    "free.vcpus",
    "free.cores",
    "free.memory_mib",
    "free.disk_gib",
];

/// Parse a requirement or rank expression over hosts; an attribute hosts do
/// not have is refused like a syntax error, pointing at it.
pub fn parse_host_expr(src: &str) -> Result<Expr, ParseError> {
    let expr = Expr::parse(src)?;
    for path in expr.paths() {
        let name = path.to_string();
        let label = path.segments().len() == 2 && path.segments().next() == Some("labels");
        if !label && !HOST_ATTRIBUTES.contains(&name.as_str()) {
            return Err(ParseError::new(
                path.position(),
                format!(
                    "unknown host attribute '{name}'; use labels.KEY or one of {}",
                    HOST_ATTRIBUTES.join(", ")
                ),
            ));
        }
    }
    Ok(expr)
}

/// What an expression may read of a host (see [`HOST_ATTRIBUTES`]).
struct HostContext<'a>(&'a HostState);

impl Context for HostContext<'_> {
    fn lookup(&self, path: &[&str]) -> Option<Value<'_>> {
        let h = self.0;
        let n = |v: u64| Some(Value::Number(v as f64));
        match path {
            ["name"] => Some(Value::from(h.info.name.as_str())),
            ["zone"] => Some(Value::from(h.info.zone.as_str())),
            ["cpu_model"] => Some(Value::from(h.info.cpu_model.as_str())),
            ["load"] => Some(Value::Number(h.info.load)),
            ["vcpus"] => n(h.info.capacity.vcpus.into()),
            ["memory_mib"] => n(h.info.capacity.memory_mib),
            ["disk_gib"] => n(h.info.capacity.disk_gib),
            ["free", "vcpus"] => n(h.shared_room()),
            ["free", "cores"] => n(h.free_cores().into()),
            ["free", "memory_mib"] => n(h.memory_room()),
            ["free", "disk_gib"] => n(h.disk_room()),
            ["labels", key] => h.info.labels.get(*key).map(|v| Value::from(v.as_str())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn res(vcpus: u32, memory_mib: u64, disk_gib: u64) -> Resources {
        Resources {
            vcpus,
            memory_mib,
            disk_gib,
        }
    }

    fn host(name: &str, zone: &str, cores: u32, memory_mib: u64) -> HostInfo {
        HostInfo {
            name: name.into(),
            zone: zone.into(),
            capacity: res(cores, memory_mib, 100),
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            cpu_model: "EPYC".into(),
            accel: "tcg".into(),
            labels: BTreeMap::new(),
            schedulable: true,
            load: 0.0,
        }
    }

    /// What a host holds counts shared and dedicated VMs and reservations
    /// alike, and gives back what a released one held.
    #[test]
    fn allocated_sums_what_a_host_holds() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 8, 8192));
        assert_eq!(c.allocated("a"), Some((Resources::default(), 0)));
        assert_eq!(c.allocated("nope"), None);
        c.add("shared", "a", res(2, 1024, 10), Vec::new(), Vec::new())
            .expect("fits");
        c.add("dedicated", "a", res(2, 512, 5), vec![0, 1], Vec::new())
            .expect("fits");
        c.add(
            "moving (reserved)",
            "a",
            res(1, 256, 1),
            Vec::new(),
            Vec::new(),
        )
        .expect("fits");
        assert_eq!(c.allocated("a"), Some((res(5, 1792, 16), 3)));
        c.release("dedicated");
        assert_eq!(c.allocated("a"), Some((res(3, 1280, 11), 2)));
    }

    fn req(vcpus: u32, memory_mib: u64) -> Request {
        Request {
            size: res(vcpus, memory_mib, 1),
            ..Request::default()
        }
    }

    #[test]
    fn pack_fills_the_fullest_host_and_spread_the_emptiest() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 8, 8192));
        c.upsert_host(host("b", "z", 8, 8192));
        assert_eq!(c.place("v1", &req(2, 1024)).unwrap().host, "a");
        assert_eq!(
            c.place("v2", &req(2, 1024)).unwrap().host,
            "a",
            "pack stays on the fuller host"
        );
        let spread = Request {
            policy: Policy::Spread,
            ..req(2, 1024)
        };
        assert_eq!(
            c.place("v3", &spread).unwrap().host,
            "b",
            "spread goes to the emptier host"
        );
        c.set_load("a", 90.0);
        let load = Request {
            policy: Policy::LoadAware,
            ..req(1, 512)
        };
        assert_eq!(c.place("v4", &load).unwrap().host, "b");
    }

    #[test]
    fn a_moving_vm_does_not_hold_its_own_affinity_group() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 8, 8192));
        c.upsert_host(host("b", "z", 8, 8192));
        let group = Group {
            name: "g".into(),
            anti: false,
            hard: true,
        };
        let member = Request {
            groups: vec![group],
            ..req(1, 512)
        };
        assert_eq!(c.place("v1", &member).unwrap().host, "a");
        let moving = Request {
            from_host: Some("a".into()),
            ..member.clone()
        };
        // Counted as a member, the lone VM would tie itself to its host.
        let refusal = c.place("v1 (moving)", &moving).unwrap_err();
        assert_eq!(
            refusal.near_miss.map(|(_, k)| k),
            Some(Constraint::Affinity)
        );
        let p = c.place_moving("v1", "v1 (moving)", &moving).unwrap();
        assert_eq!(p.host, "b");
        c.release("v1 (moving)");
        // With a second member on its host, the group keeps it there.
        c.place("v2", &member).unwrap();
        let refusal = c.place_moving("v1", "v1 (moving)", &moving).unwrap_err();
        assert!(
            refusal.excluded.contains(&(Constraint::Affinity, 1)),
            "{refusal}"
        );
    }

    #[test]
    fn expressions_may_read_only_host_attributes() {
        assert!(
            parse_host_expr(r#"cpu_model == "EPYC" && labels.ssd && free.memory_mib > 1"#).is_ok()
        );
        let err = parse_host_expr(r#"labels.ssd && cpu_modle == "x""#).unwrap_err();
        assert_eq!(err.position, 14);
        assert!(
            err.message.contains("unknown host attribute 'cpu_modle'"),
            "{err}"
        );
        assert!(parse_host_expr("labels.a.b").is_err());
    }

    #[test]
    fn rank_prefers_the_highest_value() {
        let mut c = Cluster::default();
        let mut a = host("a", "z", 8, 8192);
        a.labels.insert("speed".into(), "1".into());
        let mut b = host("b", "z", 8, 8192);
        b.labels.insert("speed".into(), "3".into());
        c.upsert_host(a);
        c.upsert_host(b);
        c.upsert_host(host("c", "z", 8, 8192));
        let ranked = Request {
            rank: Some(Expr::parse("labels.speed * 2").unwrap()),
            ..req(1, 512)
        };
        assert_eq!(c.place("v1", &ranked).unwrap().host, "b");
        let by_free = Request {
            rank: Some(Expr::parse("free.memory_mib").unwrap()),
            ..req(1, 512)
        };
        assert_ne!(
            c.place("v2", &by_free).unwrap().host,
            "b",
            "b has less free memory now"
        );
    }

    #[test]
    fn dedicated_cores_are_exclusive_and_shared_vcpus_avoid_them() {
        let mut c = Cluster::default();
        let mut h = host("a", "z", 4, 65536);
        h.cpu_overcommit = 2.0;
        c.upsert_host(h);
        let dedicated = Request {
            cpu_policy: CpuPolicy::Dedicated,
            ..req(2, 1024)
        };
        let p = c.place("d1", &dedicated).unwrap();
        assert_eq!(p.cores, vec![0, 1]);
        // 2 cores left, overcommitted 2x: 4 shared vCPUs.
        assert!(c.place("s1", &req(4, 1024)).is_ok());
        let refused = c.place("s2", &req(1, 1024)).unwrap_err();
        assert_eq!(refused.excluded, vec![(Constraint::Vcpus, 1)]);
        // Dedicating another core would squeeze the shared vCPUs already there.
        let refused = c
            .place(
                "d2",
                &Request {
                    cpu_policy: CpuPolicy::Dedicated,
                    ..req(1, 1024)
                },
            )
            .unwrap_err();
        assert_eq!(refused.excluded, vec![(Constraint::DedicatedCores, 1)]);
        c.release("s1");
        assert_eq!(c.place("d2", &dedicated).unwrap().cores, vec![2, 3]);
        c.release("d1");
        assert_eq!(
            c.place(
                "d3",
                &Request {
                    cpu_policy: CpuPolicy::Dedicated,
                    ..req(1, 1024)
                }
            )
            .unwrap()
            .cores,
            vec![0]
        );
    }

    #[test]
    fn refusals_count_hosts_per_constraint_and_name_the_nearest_miss() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z1", 4, 4096));
        c.upsert_host(host("b", "z2", 4, 4096));
        c.upsert_host(host("c", "z1", 1, 4096));
        c.upsert_host(host("d", "z1", 8, 1024));
        c.upsert_host(HostInfo {
            schedulable: false,
            ..host("a", "z1", 4, 4096)
        });
        let r = c
            .place(
                "v",
                &Request {
                    zone: Some("z1".into()),
                    ..req(2, 2048)
                },
            )
            .unwrap_err();
        assert_eq!(
            r.excluded,
            vec![
                (Constraint::NotSchedulable, 1),
                (Constraint::Zone, 1),
                (Constraint::Vcpus, 1),
                (Constraint::Memory, 1)
            ]
        );
        assert_eq!(r.near_miss, Some(("d".into(), Constraint::Memory)));
        let text = r.to_string();
        assert!(
            text.contains("4 host(s)")
                && text.contains("1 too little free memory")
                && text.contains("nearest miss: d"),
            "{text}"
        );
    }

    #[test]
    fn groups_keep_vms_together_or_apart() {
        let mut c = Cluster::default();
        for name in ["a", "b", "c"] {
            c.upsert_host(host(name, "z", 8, 8192));
        }
        let anti = |hard| Request {
            groups: vec![Group {
                name: "db".into(),
                anti: true,
                hard,
            }],
            ..req(1, 512)
        };
        let hosts: Vec<String> = (0..3)
            .map(|i| c.place(&format!("db{i}"), &anti(true)).unwrap().host)
            .collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        let r = c.place("db3", &anti(true)).unwrap_err();
        assert_eq!(r.excluded, vec![(Constraint::AntiAffinity, 3)]);
        assert!(
            c.place("db3", &anti(false)).is_ok(),
            "a soft rule only ranks"
        );
        let together = Request {
            groups: vec![Group {
                name: "web".into(),
                anti: false,
                hard: true,
            }],
            policy: Policy::Spread,
            ..req(1, 512)
        };
        let first = c.place("w0", &together).unwrap().host;
        assert_eq!(c.place("w1", &together).unwrap().host, first);
    }

    #[test]
    fn capacity_counts_what_fits_and_what_runs_out_first() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 8, 4096));
        c.upsert_host(host("b", "z", 2, 65536));
        c.upsert_host(host("c", "z", 2, 65536));
        // a: 8 vCPUs but 4 GiB -> 4 (memory); b, c: 2 vCPUs -> 2 each (vCPUs).
        assert_eq!(
            c.capacity(&req(1, 1024)),
            Capacity {
                fits: 8,
                hosts: 3,
                limited_by: Some(Constraint::Vcpus)
            }
        );
        let dedicated = Request {
            cpu_policy: CpuPolicy::Dedicated,
            ..req(2, 1024)
        };
        assert_eq!(c.capacity(&dedicated).fits, 4 + 1 + 1);
        for name in ["b", "c"] {
            c.upsert_host(HostInfo {
                schedulable: false,
                ..host(name, "z", 2, 65536)
            });
        }
        assert_eq!(
            c.capacity(&req(1, 1024)),
            Capacity {
                fits: 4,
                hosts: 1,
                limited_by: Some(Constraint::Memory)
            }
        );
        // The answer matches placing them one by one.
        let mut placed = 0;
        while c.place(&format!("v{placed}"), &req(1, 1024)).is_ok() {
            placed += 1;
        }
        assert_eq!(placed, 4);
    }

    /// An independent model of one placed VM, to check the cluster's
    /// incremental state against.
    #[derive(Clone, Debug)]
    struct Placed {
        vm: String,
        host: String,
        size: Resources,
        cores: Vec<u32>,
        groups: Vec<Group>,
    }

    /// Whether `r` fits on `info`, recomputed from scratch from `placed`.
    fn fits_in_model(info: &HostInfo, hosts: &[HostInfo], placed: &[Placed], r: &Request) -> bool {
        let from = hosts.iter().find(|h| Some(&h.name) == r.from_host.as_ref());
        let cpu_runs = from.is_none_or(|f| {
            f.accel == info.accel && (f.accel == "tcg" || f.cpu_model == info.cpu_model)
        });
        let here: Vec<&Placed> = placed.iter().filter(|p| p.host == info.name).collect();
        let dedicated: u32 = here.iter().map(|p| p.cores.len() as u32).sum();
        let shared: u64 = here
            .iter()
            .filter(|p| p.cores.is_empty())
            .map(|p| u64::from(p.size.vcpus))
            .sum();
        let memory: u64 = here.iter().map(|p| p.size.memory_mib).sum();
        let disk: u64 = here.iter().map(|p| p.size.disk_gib).sum();
        let limit = |cores: u32| (f64::from(cores) * info.cpu_overcommit).floor() as u64;
        let cores_left = info.capacity.vcpus.saturating_sub(dedicated);
        let cpu_ok = match r.cpu_policy {
            CpuPolicy::Shared => shared + u64::from(r.size.vcpus) <= limit(cores_left),
            CpuPolicy::Dedicated => {
                r.size.vcpus <= cores_left && shared <= limit(cores_left - r.size.vcpus)
            }
        };
        let group_ok = r.groups.iter().filter(|g| g.hard).all(|g| {
            let mut members = placed
                .iter()
                .filter(|p| p.groups.iter().any(|pg| pg.name == g.name))
                .peekable();
            let any = members.peek().is_some();
            let on_host = members.any(|p| p.host == info.name);
            if g.anti {
                !on_host
            } else {
                !any || on_host
            }
        });
        info.schedulable
            && r.from_host.as_ref() != Some(&info.name)
            && cpu_runs
            && r.zone.as_ref().is_none_or(|z| *z == info.zone)
            && group_ok
            && cpu_ok
            && memory + r.size.memory_mib
                <= (info.capacity.memory_mib as f64 * info.memory_overcommit).floor() as u64
            && disk + r.size.disk_gib <= info.capacity.disk_gib
    }

    #[derive(Clone, Debug)]
    enum Op {
        Place(Request),
        Release(usize),
    }

    fn hosts() -> impl Strategy<Value = Vec<HostInfo>> {
        proptest::collection::vec(
            (
                1u32..9,
                1u64..9,
                1u64..20,
                0u8..2,
                any::<bool>(),
                0u8..3,
                0u8..2,
                0u8..4,
            ),
            1..7,
        )
        .prop_map(|hs| {
            hs.into_iter()
                .enumerate()
                .map(
                    |(i, (cores, gib, disk, zone, schedulable, cpu_x, mem_x, cpu))| HostInfo {
                        capacity: res(cores, gib * 1024, disk),
                        accel: ["tcg", "kvm"][usize::from(cpu % 2)].into(),
                        cpu_model: ["EPYC", "Xeon"][usize::from(cpu / 2)].into(),
                        cpu_overcommit: [1.0, 2.0, 4.0][cpu_x as usize],
                        memory_overcommit: [1.0, 1.5][mem_x as usize],
                        schedulable: schedulable || i == 0,
                        ..host(&format!("h{i}"), &format!("z{zone}"), cores, gib * 1024)
                    },
                )
                .collect()
        })
    }

    fn request() -> impl Strategy<Value = Request> {
        let group = (0u8..2, any::<bool>(), any::<bool>()).prop_map(|(g, anti, hard)| Group {
            name: format!("g{g}"),
            anti,
            hard,
        });
        (
            1u32..5,
            1u64..5,
            1u64..5,
            any::<bool>(),
            proptest::option::of(0u8..2),
            proptest::option::of(group),
            0u8..3,
            any::<bool>(),
            proptest::option::of(0u8..7),
        )
            .prop_map(
                |(vcpus, gib, disk, dedicated, zone, group, policy, ranked, from)| Request {
                    size: res(vcpus, gib * 512, disk),
                    cpu_policy: if dedicated {
                        CpuPolicy::Dedicated
                    } else {
                        CpuPolicy::Shared
                    },
                    zone: zone.map(|z| format!("z{z}")),
                    requirements: None,
                    rank: ranked.then(|| Expr::parse("free.vcpus - load").unwrap()),
                    groups: group.into_iter().collect(),
                    policy: [Policy::Pack, Policy::Spread, Policy::LoadAware][policy as usize],
                    from_host: from.map(|h| format!("h{h}")),
                },
            )
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            prop_oneof![3 => request().prop_map(Op::Place), 1 => any::<usize>().prop_map(Op::Release)],
            1..40,
        )
    }

    proptest! {
        /// Against the model: a placement always fits (with overcommit), a
        /// dedicated core is never given twice, hard group rules hold, and a
        /// refusal happens only when no host could take the VM.
        #[test]
        fn placements_match_a_brute_force_model(hosts in hosts(), ops in ops()) {
            let mut c = Cluster::default();
            for h in &hosts {
                c.upsert_host(h.clone());
            }
            let mut placed: Vec<Placed> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Place(r) => {
                        let vm = format!("vm{n}");
                        // For spread, the index finds the host a full scan
                        // would (ties aside); pack weighs a window of it.
                        if let Some(i) = c.indexed_choice(&r, &c.group_totals) {
                            let best = c.scan(&r, &c.group_totals).expect("the index found a host");
                            if r.policy == Policy::Spread {
                                let free = |i: usize| c.hosts[i].as_ref().unwrap().memory_room();
                                prop_assert_eq!(free(i), free(best));
                            }
                        }
                        match c.place(&vm, &r) {
                            Ok(p) => {
                                let info = hosts.iter().find(|h| h.name == p.host).unwrap();
                                prop_assert!(fits_in_model(info, &hosts, &placed, &r), "{} does not fit {:?}", p.host, r);
                                let taken: Vec<u32> = placed.iter().filter(|q| q.host == p.host).flat_map(|q| q.cores.clone()).collect();
                                prop_assert!(p.cores.iter().all(|c| !taken.contains(c) && *c < info.capacity.vcpus), "core given twice");
                                prop_assert_eq!(p.cores.len() as u32, if r.cpu_policy == CpuPolicy::Dedicated { r.size.vcpus } else { 0 });
                                placed.push(Placed { vm, host: p.host, size: r.size, cores: p.cores, groups: r.groups.clone() });
                            }
                            Err(refusal) => {
                                prop_assert!(!hosts.iter().any(|h| fits_in_model(h, &hosts, &placed, &r)), "refused but a host fits: {}", refusal);
                                let counted: usize = refusal.excluded.iter().map(|(_, n)| n).sum();
                                prop_assert_eq!(counted, hosts.len());
                            }
                        }
                    }
                    Op::Release(i) if !placed.is_empty() => {
                        let p = placed.remove(i % placed.len());
                        c.release(&p.vm);
                    }
                    Op::Release(_) => {}
                }
            }
        }
    }
}
