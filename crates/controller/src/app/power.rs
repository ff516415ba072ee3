//! Power saving: zones that opt in (`PUT /v1/zones/{name}/power-saving`)
//! have their lightly loaded hosts emptied and switched off, and switched on
//! again when demand rises. A background pass, every `power_period`:
//!
//! ```text
//!   active --consolidation plan--> draining (after_drain = standby)
//!     ^       (one host per zone     |  this pass starts the plan's moves
//!     |        at a time)            |  (targets keep the headroom); the
//!     |                              v  mover sees the host empty
//!     |                           standby --power-off command--> standby,
//!     |                                                          standby_since set
//!     +-- power-on command <-- a refused VM fits this host, or the
//!         (host `down` until     zone's free schedulable memory < headroom
//!          its agent reports)
//! ```
//!
//! - **Consolidation** ([`kumo_sched::Cluster::plan_consolidation`], one
//!   host per pass): only hosts below `max_load`, emptied only if every
//!   receiving host keeps `headroom` free and the zone's schedulable memory
//!   without the host keeps `headroom` free too (so a switched-off host is
//!   not needed at once). Not while a host of the zone is being emptied or
//!   switched on, nor for ten periods after one was switched on. A move
//!   that fails gives the host back to placement (`power.abandoned`).
//! - **Standby**: once a host is empty it runs the zone's
//!   `power_off_command` and records `standby_since` (`power.standby`); a
//!   failed command is retried a minute later. A standby host's silence is
//!   expected: it is never marked down.
//! - **Power on** for a refused VM: the refusal asks the scheduler which
//!   standby host would take the VM (the same constraints as placement:
//!   zone, requirements, groups, dedicated cores, room), names it in the
//!   refusal ("standby host h3, which does, is switched on: retry in about
//!   N s", N from the last measured boot), and the next pass switches on
//!   exactly that host. When no standby host would take the VM, none is
//!   switched on for it; when one already switching on would, it is named
//!   and no other is woken.
//! - **Power on** for headroom: when the zone's free schedulable memory is
//!   below `headroom`, the standby host with the most memory.
//!   Either way it gets `power_on_command` and becomes active, `down` until
//!   its agent heartbeats (`power.on`, with the reason); until then it
//!   counts as free capacity, so one shortage switches on one host.
//! - **Energy**: a host's `idle_watts` times its time in standby, kept in
//!   its record (`energy_saved_wh`) and summed per zone.
//!
//! Turning power saving off (`DELETE`) switches the zone's standby hosts on
//! and gives hosts being emptied back to placement.
//!
//! Commands run with `sh -c`; `{host}` and `{address}` are replaced by the
//! host's name and agent address, shell-quoted (also in `$KUMO_HOST` and
//! `$KUMO_ADDRESS`). Their output is logged.

use super::passes::{Demand, PowerMemory, Wake};
use super::records::{zone_key, HostMode, HostRecord};
use super::{lookup, now_ms, App, Batch, HostEntry, Inventory};
use crate::error::Result;
use kumo_api::{
    ApiError, HostState, MigrateVm, MigrationReason, PowerSaving, PowerSavingStatus, PowerState,
    VmState, Zone,
};
use kumo_sched::{Candidate, ConsolidationConfig};
use std::time::{Duration, Instant};

/// A host switched on counts as coming capacity this long at most.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// A command that failed is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// A power command taking longer is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// No consolidation in a zone for this many periods after a power-on.
const QUIET_PERIODS: u32 = 10;
const MAX_COMMAND_BYTES: usize = 4096;
const MS_PER_HOUR: f64 = 3_600_000.0;

/// Check power-saving settings, naming the first field out of range.
fn check_settings(p: &PowerSaving) -> Result<()> {
    let invalid = |field: &str, msg: String| Err(ApiError::invalid(field, msg).into());
    if !(p.headroom.is_finite() && (0.0..=0.9).contains(&p.headroom)) {
        return invalid(
            "headroom",
            format!(
                "{} is out of range: use a share from 0 to 0.9 (0.2 keeps 20% free)",
                p.headroom
            ),
        );
    }
    if !(p.max_load.is_finite() && p.max_load > 0.0 && p.max_load <= 100.0) {
        return invalid(
            "max_load",
            format!(
                "{} is out of range: use more than 0 and at most 100 (percent CPU)",
                p.max_load
            ),
        );
    }
    for (field, cmd) in [
        ("power_off_command", &p.power_off_command),
        ("power_on_command", &p.power_on_command),
    ] {
        if cmd.trim().is_empty() {
            return invalid(
                field,
                "empty: give a shell command, e.g. `ipmitool -H {host}-bmc chassis power on`"
                    .into(),
            );
        }
        if cmd.len() > MAX_COMMAND_BYTES || cmd.contains('\0') {
            return invalid(
                field,
                format!("use at most {MAX_COMMAND_BYTES} bytes and no NUL characters"),
            );
        }
    }
    if !(p.idle_watts.is_finite() && (0.0..=100_000.0).contains(&p.idle_watts)) {
        return invalid(
            "idle_watts",
            format!(
                "{} is out of range: use 0 to 100000 (watts a host draws idle)",
                p.idle_watts
            ),
        );
    }
    Ok(())
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command with `{host}` and `{address}` replaced (in one pass, so a
/// value is never substituted into).
fn expand(template: &str, host: &str, address: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(r) = tail.strip_prefix("{host}") {
            out.push_str(&shell_quote(host));
            rest = r;
        } else if let Some(r) = tail.strip_prefix("{address}") {
            out.push_str(&shell_quote(address));
            rest = r;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// The last few hundred characters of a command's output.
fn tail(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let start = s.len().saturating_sub(500);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// Run a power command; `Err` says why it failed.
async fn run_command(
    what: &str,
    template: &str,
    host: &str,
    address: &str,
) -> std::result::Result<(), String> {
    let cmd = expand(template, host, address);
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(&cmd)
        .env("KUMO_HOST", host)
        .env("KUMO_ADDRESS", address)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Err(_) => {
            return Err(format!(
                "{what} command `{cmd}` timed out after {} s",
                COMMAND_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(e)) => return Err(format!("{what} command `{cmd}` could not run: {e}")),
        Ok(Ok(out)) => out,
    };
    let (stdout, stderr) = (tail(&out.stdout), tail(&out.stderr));
    tracing::info!(%host, command = %cmd, status = %out.status, %stdout, %stderr, "{what} command ran");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} command `{cmd}` failed ({}){}",
            out.status,
            if stderr.is_empty() {
                String::new()
            } else {
                format!(": {stderr}")
            }
        ))
    }
}

impl Inventory {
    /// Energy power saving saved on a host so far, watt-hours.
    pub fn energy_saved_wh(&self, rec: &HostRecord) -> f64 {
        let current = match (rec.standby_since, self.idle_watts(&rec.zone)) {
            (Some(since), Some(watts)) => {
                watts * now_ms().saturating_sub(since) as f64 / MS_PER_HOUR
            }
            _ => 0.0,
        };
        rec.energy_saved_wh + current
    }

    fn idle_watts(&self, zone: &str) -> Option<f64> {
        Some(self.zones.get(zone)?.power_saving.as_ref()?.idle_watts)
    }

    /// Memory (with overcommit) of the zone's schedulable hosts and of the
    /// hosts switched on but not reporting yet, and how much is allocated.
    fn zone_memory(&self, zone: &str) -> (f64, f64) {
        let mut total = 0.0;
        let mut allocated = 0.0;
        for h in self.hosts.values().filter(|h| h.rec.zone == zone) {
            if h.state() == HostState::Ready || h.waking() {
                total += h.rec.capacity.memory_mib as f64 * h.rec.memory_overcommit;
                allocated += self.allocated(&h.rec.name).0.memory_mib as f64;
            }
        }
        (total, allocated)
    }

    fn free_share(&self, zone: &str) -> f64 {
        let (total, allocated) = self.zone_memory(zone);
        if total <= 0.0 {
            0.0
        } else {
            1.0 - allocated / total
        }
    }
}

impl HostEntry {
    /// Switched on by power saving, not reporting yet, and not given up
    /// on ([`BOOT_TIMEOUT`]): coming capacity.
    fn waking(&self) -> bool {
        self.rec.mode == HostMode::Active
            && self.live.down
            && self
                .live
                .waking_since
                .is_some_and(|t| t.elapsed() < BOOT_TIMEOUT)
    }
}

impl Inventory {
    /// The standby host (or one switched on and not reporting yet) of a
    /// power-saving zone that would take a VM the ready hosts refused,
    /// judged by the scheduler as it judges placement: one already waking
    /// first, then the one with the most memory.
    fn host_to_wake(&self, request: &kumo_sched::Request) -> Option<&HostEntry> {
        self.hosts
            .values()
            .filter(|h| self.idle_watts(&h.rec.zone).is_some())
            .filter(|h| h.rec.mode == HostMode::Standby || h.waking())
            .filter(|h| {
                self.cluster
                    .check_if_schedulable(&h.rec.name, request)
                    .is_ok()
            })
            .max_by(|a, b| {
                (a.waking(), a.rec.capacity.memory_mib)
                    .cmp(&(b.waking(), b.rec.capacity.memory_mib))
                    .then(b.rec.name.cmp(&a.rec.name))
            })
    }
}

/// Being emptied for standby.
fn emptying(rec: &HostRecord) -> bool {
    rec.mode == HostMode::Draining && rec.after_drain == HostMode::Standby
}

/// A host to switch on: its name, address and the command.
struct PowerOn {
    host: String,
    address: String,
    command: String,
    reason: String,
}

impl App {
    /// The placement of `vm` (`request`) was refused with `refusal`: if a
    /// standby host would take it, power saving switches that host on at
    /// its next pass, and the refusal says so and when to retry.
    pub(super) fn placement_refused(
        &self,
        inv: &Inventory,
        vm: &str,
        request: &kumo_sched::Request,
        mut refusal: ApiError,
    ) -> ApiError {
        let host = inv.host_to_wake(request);
        let wake = host.map(|h| Wake {
            host: h.rec.name.clone(),
            vm: vm.to_string(),
        });
        {
            let mut demand = self.power.demand.lock().expect("lock");
            let known = demand
                .iter()
                .any(|d| d.zone == request.zone && d.wake == wake);
            if demand.len() < 1000 && !known {
                demand.push(Demand {
                    zone: request.zone.clone(),
                    wake,
                });
            }
        }
        let Some(h) = host else {
            return refusal;
        };
        let boot = *self.power.boot_time.lock().expect("lock");
        let (doing, wait) = match h.live.waking_since {
            Some(since) if h.waking() => (
                "is switching on",
                boot.map(|b| b.saturating_sub(since.elapsed())),
            ),
            _ => ("is switched on", boot.map(|b| b + self.power_period)),
        };
        let retry = match wait {
            Some(w) => format!("retry in about {} s", w.as_secs().max(1)),
            None => format!(
                "retry once it reports (the next power-saving pass, within {} s, switches it on)",
                self.power_period.as_secs().max(1)
            ),
        };
        refusal.message = format!(
            "{}; no ready host fits, but standby host {}, which does, {doing}: {retry}",
            refusal.message, h.rec.name
        );
        refusal
    }

    /// A host switched on by power saving reported, `took` after its
    /// power-on command: what the next refusal tells users to wait.
    pub(super) fn power_booted(&self, took: Duration) {
        *self.power.boot_time.lock().expect("lock") = Some(took);
    }

    pub async fn zone_power_saving_get(&self, zone: &str) -> Result<PowerSavingStatus> {
        let inv = self.inv.read().await;
        let z = lookup(&inv.zones, "zone", zone)?;
        let hosts: Vec<&HostEntry> = inv.hosts.values().filter(|h| h.rec.zone == zone).collect();
        Ok(PowerSavingStatus {
            zone: zone.to_string(),
            settings: z.power_saving.clone(),
            standby: hosts
                .iter()
                .filter(|h| h.rec.mode == HostMode::Standby)
                .map(|h| h.rec.name.clone())
                .collect(),
            draining: hosts
                .iter()
                .filter(|h| emptying(&h.rec))
                .map(|h| h.rec.name.clone())
                .collect(),
            energy_saved_wh: hosts
                .iter()
                .fold(0.0, |wh, h| wh + inv.energy_saved_wh(&h.rec)),
            free_memory_share: inv.free_share(zone),
        })
    }

    /// Turn power saving on for a zone (or change its settings).
    pub async fn zone_power_saving_set(&self, zone: &str, settings: PowerSaving) -> Result<Zone> {
        check_settings(&settings)?;
        let mut inv = self.inv.write().await;
        let z = Zone {
            power_saving: Some(settings.clone()),
            ..lookup(&inv.zones, "zone", zone)?.clone()
        };
        let mut batch = Batch::default();
        batch.put(zone_key(zone), &z);
        batch.event(
            "zone.power_saving",
            format!("zone/{zone}"),
            &z.project,
            format!(
                "power saving on: hosts below {}% CPU are emptied while {:.0}% headroom stays free ({} W idle each)",
                settings.max_load,
                settings.headroom * 100.0,
                settings.idle_watts
            ),
        );
        self.commit(&mut inv, batch).await?;
        inv.zones.insert(zone.to_string(), z.clone());
        Ok(z)
    }

    /// Turn power saving off: standby hosts are switched on, hosts being
    /// emptied take VMs again.
    pub async fn zone_power_saving_off(&self, zone: &str) -> Result<Zone> {
        let mut mem = self.power.memory.lock().await;
        let mut inv = self.inv.write().await;
        let old = lookup(&inv.zones, "zone", zone)?.clone();
        let Some(settings) = old.power_saving.clone() else {
            return Ok(old);
        };
        let z = Zone {
            power_saving: None,
            ..old
        };
        let mut batch = Batch::default();
        batch.put(zone_key(zone), &z);
        batch.event(
            "zone.power_saving",
            format!("zone/{zone}"),
            &z.project,
            "power saving off: standby hosts are switched on".into(),
        );
        // The energy of the current standby periods, before the idle draw
        // (a zone setting) goes.
        let mut standby = Vec::new();
        for h in inv.hosts.values().filter(|h| h.rec.zone == zone) {
            if emptying(&h.rec) {
                let rec = HostRecord {
                    mode: HostMode::Active,
                    after_drain: HostMode::Maintenance,
                    ..h.rec.clone()
                };
                batch.put_host(rec.clone());
                batch.event(
                    "power.abandoned",
                    format!("host/{}", rec.name),
                    &rec.project,
                    "power saving turned off: the host takes VMs again".into(),
                );
                standby.push((rec, false));
            } else if h.rec.mode == HostMode::Standby {
                let rec = HostRecord {
                    energy_saved_wh: inv.energy_saved_wh(&h.rec),
                    ..h.rec.clone()
                };
                batch.put_host(rec.clone());
                standby.push((rec, true));
            }
        }
        self.commit(&mut inv, batch).await?;
        inv.zones.insert(zone.to_string(), z.clone());
        let mut on = Vec::new();
        for (rec, is_standby) in standby {
            let name = rec.name.clone();
            if is_standby {
                on.push(PowerOn {
                    host: name.clone(),
                    address: rec.address.clone(),
                    command: settings.power_on_command.clone(),
                    reason: "power saving turned off".into(),
                });
            }
        }
        drop(inv);
        for p in on {
            self.power_on(&mut mem, zone, p, true).await?;
        }
        Ok(z)
    }

    /// Run the power-on command, then make the host active (`down` until
    /// its agent reports). With `forced` (power saving turned off) the host
    /// becomes active even if the command failed.
    async fn power_on(
        &self,
        mem: &mut PowerMemory,
        zone: &str,
        p: PowerOn,
        forced: bool,
    ) -> Result<()> {
        let outcome = run_command("power-on", &p.command, &p.host, &p.address).await;
        let mut inv = self.inv.write().await;
        let Some(entry) = inv.hosts.get(&p.host) else {
            return Ok(());
        };
        let mut batch = Batch::default();
        if let Err(why) = &outcome {
            mem.failed.insert(p.host.clone(), Instant::now());
            batch.event(
                "power.on_failed",
                format!("host/{}", p.host),
                &entry.rec.project,
                format!("could not switch the host on ({}): {why}", p.reason),
            );
            if !forced {
                self.commit(&mut inv, batch).await?;
                return Ok(());
            }
        }
        if entry.rec.mode != HostMode::Standby && !forced {
            return Ok(());
        }
        let saved = inv.energy_saved_wh(&entry.rec);
        let rec = HostRecord {
            mode: if entry.rec.mode == HostMode::Standby {
                HostMode::Active
            } else {
                entry.rec.mode
            },
            after_drain: HostMode::Maintenance,
            energy_saved_wh: saved,
            standby_since: None,
            ..entry.rec.clone()
        };
        batch.put_host(rec.clone());
        batch.event(
            "power.on",
            format!("host/{}", p.host),
            &rec.project,
            format!(
                "switched on: {}; down until its agent reports; {saved:.1} Wh saved in standby so far",
                p.reason
            ),
        );
        self.commit(&mut inv, batch).await?;
        let e = inv.hosts.get_mut(&p.host).expect("present");
        // Whatever it said before standby is stale: it is down until it
        // reports (which makes it schedulable again).
        e.live.down = true;
        e.live.load = None;
        e.live.waking_since = Some(Instant::now());
        inv.sync_host(&p.host);
        mem.failed.remove(&p.host);
        mem.powered_on.insert(zone.to_string(), Instant::now());
        Ok(())
    }

    /// One power-saving pass (see the module docs).
    pub async fn power_pass(&self) -> Result<()> {
        let mut mem = self.power.memory.lock().await;
        let demand = std::mem::take(&mut *self.power.demand.lock().expect("lock"));
        let retry = |mem: &PowerMemory, host: &str| {
            mem.failed
                .get(host)
                .is_none_or(|t| t.elapsed() >= RETRY_AFTER)
        };
        let mut offs = Vec::new();
        let mut ons = Vec::new();
        let mut consolidate = Vec::new();
        {
            let inv = self.inv.read().await;
            for (zone, z) in &inv.zones {
                let Some(ps) = &z.power_saving else {
                    continue;
                };
                let in_zone = || inv.hosts.values().filter(|h| h.rec.zone == *zone);
                for h in in_zone() {
                    if h.rec.mode == HostMode::Standby
                        && h.rec.standby_since.is_none()
                        && retry(&mem, &h.rec.name)
                    {
                        offs.push((
                            h.rec.name.clone(),
                            h.rec.address.clone(),
                            ps.power_off_command.clone(),
                        ));
                    }
                }
                let share = inv.free_share(zone);
                let booting = in_zone().any(HostEntry::waking);
                let last_on = mem.powered_on.get(zone);
                // The standby hosts refused VMs need (the refusal chose
                // them with the scheduler), each once.
                let mut wakes: Vec<&Wake> = Vec::new();
                for w in demand.iter().filter_map(|d| d.wake.as_ref()) {
                    let standby = inv
                        .hosts
                        .get(&w.host)
                        .is_some_and(|h| h.rec.zone == *zone && h.rec.mode == HostMode::Standby);
                    if standby && retry(&mem, &w.host) && !wakes.iter().any(|o| o.host == w.host) {
                        wakes.push(w);
                    }
                }
                for w in &wakes {
                    let h = &inv.hosts[&w.host];
                    ons.push((
                        zone.clone(),
                        PowerOn {
                            host: w.host.clone(),
                            address: h.rec.address.clone(),
                            command: ps.power_on_command.clone(),
                            reason: format!(
                                "the placement of VM {} was refused and this standby host takes it",
                                w.vm
                            ),
                        },
                    ));
                }
                // Short of memory: the host with the most of it.
                let reason = (wakes.is_empty() && share < ps.headroom).then(|| {
                    format!(
                        "the zone's free schedulable memory is {:.0}%, below the {:.0}% headroom",
                        share * 100.0,
                        ps.headroom * 100.0
                    )
                });
                if !wakes.is_empty() {
                    continue;
                }
                if let Some(reason) = reason {
                    // The host with the most memory; one still on first.
                    let pick = in_zone()
                        .filter(|h| h.rec.mode == HostMode::Standby && retry(&mem, &h.rec.name))
                        .max_by(|a, b| {
                            (a.rec.standby_since.is_none(), a.rec.capacity.memory_mib)
                                .cmp(&(b.rec.standby_since.is_none(), b.rec.capacity.memory_mib))
                                .then(b.rec.name.cmp(&a.rec.name))
                        });
                    if let Some(h) = pick {
                        ons.push((
                            zone.clone(),
                            PowerOn {
                                host: h.rec.name.clone(),
                                address: h.rec.address.clone(),
                                command: ps.power_on_command.clone(),
                                reason,
                            },
                        ));
                    }
                    continue;
                }
                let quiet = self.power_period * QUIET_PERIODS;
                let busy = booting
                    || in_zone().any(|h| emptying(&h.rec))
                    || last_on.is_some_and(|t| t.elapsed() < quiet)
                    || demand
                        .iter()
                        .any(|d| d.zone.as_ref().is_none_or(|d| d == zone));
                if !busy {
                    consolidate.push(zone.clone());
                }
            }
        }
        // A host about to be switched on need not be switched off first.
        offs.retain(|(host, ..)| !ons.iter().any(|(_, p)| p.host == *host));
        for (host, address, command) in offs {
            self.power_off(&mut mem, &host, &address, &command).await?;
        }
        for (zone, p) in ons {
            self.power_on(&mut mem, &zone, p, false).await?;
        }
        self.check_emptying().await?;
        for zone in consolidate {
            self.consolidate(&zone).await?;
        }
        Ok(())
    }

    async fn power_off(
        &self,
        mem: &mut PowerMemory,
        host: &str,
        address: &str,
        command: &str,
    ) -> Result<()> {
        let outcome = run_command("power-off", command, host, address).await;
        let mut inv = self.inv.write().await;
        let Some(entry) = inv.hosts.get(host) else {
            return Ok(());
        };
        if entry.rec.mode != HostMode::Standby || entry.rec.standby_since.is_some() {
            return Ok(());
        }
        let mut batch = Batch::default();
        match outcome {
            Ok(()) => {
                mem.failed.remove(host);
                batch.put_host(HostRecord {
                    standby_since: Some(now_ms()),
                    ..entry.rec.clone()
                });
                batch.event(
                    "power.standby",
                    format!("host/{host}"),
                    &entry.rec.project,
                    "switched off by power saving: the host was emptied; it is switched on when the zone needs it".into(),
                );
            }
            Err(why) => {
                mem.failed.insert(host.to_string(), Instant::now());
                batch.event(
                    "power.off_failed",
                    format!("host/{host}"),
                    &entry.rec.project,
                    format!("{why}; tried again in {} s", RETRY_AFTER.as_secs()),
                );
            }
        }
        self.commit(&mut inv, batch).await?;
        Ok(())
    }

    /// Hosts being emptied whose VMs stopped moving (a migration failed, a
    /// VM was stopped) take VMs again; hosts an operator took out of
    /// standby get the energy of that standby counted.
    async fn check_emptying(&self) -> Result<()> {
        let mut inv = self.inv.write().await;
        let mut batch = Batch::default();
        for h in inv.hosts.values() {
            if emptying(&h.rec) {
                let stuck = inv.vms_on(h.rec.id).find(|v| v.migration.is_none());
                if let Some(vm) = stuck {
                    let rec = HostRecord {
                        mode: HostMode::Active,
                        after_drain: HostMode::Maintenance,
                        ..h.rec.clone()
                    };
                    let why = vm
                        .last_migration
                        .as_ref()
                        .and_then(|r| r.message.clone())
                        .unwrap_or_else(|| format!("it is {}", vm.state));
                    batch.event(
                        "power.abandoned",
                        format!("host/{}", h.rec.name),
                        &h.rec.project,
                        format!(
                            "power saving stopped emptying the host, which takes VMs again: VM {} did not move ({why})",
                            vm.name
                        ),
                    );
                    batch.put_host(rec.clone());
                }
            } else if h.rec.mode != HostMode::Standby && h.rec.standby_since.is_some() {
                let rec = HostRecord {
                    energy_saved_wh: inv.energy_saved_wh(&h.rec),
                    standby_since: None,
                    ..h.rec.clone()
                };
                batch.put_host(rec.clone());
            }
        }
        self.commit(&mut inv, batch).await?;
        Ok(())
    }

    /// Plan one host of the zone to empty; mark it draining towards
    /// standby and start its VMs' moves.
    async fn consolidate(&self, zone: &str) -> Result<()> {
        let mut inv = self.inv.write().await;
        let Some(ps) = inv.zones.get(zone).and_then(|z| z.power_saving.clone()) else {
            return Ok(());
        };
        let mut candidates = Vec::new();
        for h in inv.hosts.values() {
            if h.rec.zone != zone || h.state() != HostState::Ready {
                continue;
            }
            for vm in inv.vms_on(h.rec.id) {
                if vm.state != VmState::Running
                    || vm.power != PowerState::Running
                    || vm.migration.is_some()
                {
                    continue;
                }
                match super::migrations::move_request(&inv, vm) {
                    Ok(request) => candidates.push(Candidate {
                        vm: vm.name.clone(),
                        host: h.rec.name.clone(),
                        request,
                        cpu_percent: vm.cpu_percent.map_or(0.0, f64::from),
                    }),
                    Err(e) => {
                        tracing::warn!(vm = %vm.name, error = %crate::error::Chain(&e), "power saving: VM left out")
                    }
                }
            }
        }
        let cfg = ConsolidationConfig {
            headroom: ps.headroom,
            max_load: ps.max_load,
            max_hosts: 1,
        };
        let plan = inv.cluster.plan_consolidation(zone, &candidates, &cfg);
        let Some((host, moves)) = plan.into_iter().next() else {
            return Ok(());
        };
        // The zone without the host must keep the headroom, or it would be
        // switched on again at once.
        let (total, allocated) = inv.zone_memory(zone);
        let h = &inv.hosts[&host];
        let without = total - h.rec.capacity.memory_mib as f64 * h.rec.memory_overcommit;
        if without <= 0.0 || 1.0 - allocated / without < ps.headroom {
            return Ok(());
        }
        let load = h.live.load.map_or(0.0, |l| l.cpu_percent);
        let rec = HostRecord {
            mode: HostMode::Draining,
            after_drain: HostMode::Standby,
            welcome_back: false,
            ..h.rec.clone()
        };
        let mut batch = Batch::default();
        batch.put_host(rec.clone());
        batch.event(
            "host.draining",
            format!("host/{host}"),
            &rec.project,
            format!(
                "power saving empties the host (CPU {load:.0}% < {}%): {} VM(s) to move, then standby",
                ps.max_load,
                moves.len()
            ),
        );
        self.commit(&mut inv, batch).await?;
        for m in moves {
            let req = MigrateVm {
                to: Some(m.to.clone()),
                downtime_limit_ms: None,
            };
            let reason = MigrationReason::PowerSaving {
                detail: m.reason.clone(),
            };
            if let Err(e) = self.start_migration(&mut inv, &m.vm, req, reason).await {
                // check_emptying gives the host back at the next pass.
                tracing::info!(vm = %m.vm, error = %crate::error::Chain(&e), "power saving: move not started");
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PowerSaving {
        PowerSaving {
            headroom: 0.2,
            max_load: 30.0,
            power_off_command: "off {host}".into(),
            power_on_command: "on {host}".into(),
            idle_watts: 150.0,
        }
    }

    #[test]
    fn placeholders_are_replaced_shell_quoted_once() {
        assert_eq!(
            expand("wake {host} at {address} {x}", "h1", "http://10.0.0.1:7371"),
            "wake 'h1' at 'http://10.0.0.1:7371' {x}"
        );
        // An address cannot break out of its quotes nor be substituted into.
        assert_eq!(
            expand("ping {address}", "h1", "x'; rm -rf / #{host}"),
            r"ping 'x'\''; rm -rf / #{host}'"
        );
    }

    #[test]
    fn every_setting_is_checked_by_name() {
        assert!(check_settings(&settings()).is_ok());
        let bad = [
            (
                "headroom",
                PowerSaving {
                    headroom: 0.95,
                    ..settings()
                },
            ),
            (
                "headroom",
                PowerSaving {
                    headroom: f64::NAN,
                    ..settings()
                },
            ),
            (
                "max_load",
                PowerSaving {
                    max_load: 101.0,
                    ..settings()
                },
            ),
            (
                "power_off_command",
                PowerSaving {
                    power_off_command: "".into(),
                    ..settings()
                },
            ),
            (
                "power_on_command",
                PowerSaving {
                    power_on_command: "a\0b".into(),
                    ..settings()
                },
            ),
            (
                "idle_watts",
                PowerSaving {
                    idle_watts: -5.0,
                    ..settings()
                },
            ),
        ];
        for (field, p) in bad {
            match check_settings(&p) {
                Err(crate::Error::Api(e)) => assert_eq!(e.field.as_deref(), Some(field)),
                other => panic!("{field}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod wake_tests {
    use super::*;
    use crate::app::testing::{HostSpec, TestApp};
    use kumo_api::{CreateVm, ErrorCode};

    /// Put a registered host into standby, switched off.
    async fn standby(t: &TestApp, spec: HostSpec<'_>) {
        let name = spec.name.to_string();
        t.ready_host(spec).await;
        let mut inv = t.app.inv.write().await;
        let rec = HostRecord {
            mode: HostMode::Standby,
            standby_since: Some(now_ms()),
            ..inv.hosts[&name].rec.clone()
        };
        inv.install_host(rec);
    }

    #[tokio::test]
    async fn the_standby_host_that_fits_is_woken_first_time() {
        check().await;
    }

    /// Three standby hosts, only the smallest of which has the label a
    /// VM requires: the refusal names it, and the next pass switches on
    /// that host and no other; a second refusal waits for it.
    pub(crate) async fn check() {
        let t = TestApp::new(Duration::from_secs(600)).await;
        t.ready_host(HostSpec::new("h1")).await;
        let settings = PowerSaving {
            headroom: 0.2,
            max_load: 30.0,
            power_off_command: "true".into(),
            power_on_command: "true".into(),
            idle_watts: 100.0,
        };
        t.app.zone_power_saving_set("z1", settings).await.unwrap();
        standby(
            &t,
            HostSpec {
                memory_mib: 65_536,
                ..HostSpec::new("s1")
            },
        )
        .await;
        standby(
            &t,
            HostSpec {
                memory_mib: 32_768,
                ..HostSpec::new("s2")
            },
        )
        .await;
        standby(
            &t,
            HostSpec {
                memory_mib: 8_192,
                labels: &[("gpu", "yes")],
                ..HostSpec::new("s3")
            },
        )
        .await;
        let gpu = CreateVm {
            requirements: Some(r#"labels.gpu == "yes""#.into()),
            ..TestApp::vm("web", 1024)
        };
        for pass in 0..2 {
            let e = match t.app.vm_create(gpu.clone()).await {
                Err(crate::Error::Api(e)) => e,
                other => panic!("pass {pass}: {other:?}"),
            };
            assert_eq!(e.code, ErrorCode::NoValidHost);
            let doing = if pass == 0 {
                "is switched on"
            } else {
                "is switching on"
            };
            assert!(
                e.message
                    .contains(&format!("standby host s3, which does, {doing}: retry")),
                "{}",
                e.message
            );
            t.app.power_pass().await.unwrap();
            let hosts = t.app.host_list(&Default::default()).await.unwrap().items;
            let state = |n: &str| hosts.iter().find(|h| h.name == n).unwrap().state;
            assert_eq!(state("s1"), HostState::Standby, "pass {pass}");
            assert_eq!(state("s2"), HostState::Standby, "pass {pass}");
            assert_eq!(state("s3"), HostState::Down, "pass {pass}: switched on");
        }
        let ons = t
            .app
            .inv
            .read()
            .await
            .recent_events
            .iter()
            .filter(|e| e.kind == "power.on")
            .map(|e| e.resource.clone())
            .collect::<Vec<_>>();
        assert_eq!(ons, ["host/s3"]);
        // Once it reports, the VM fits, and the next refusal knows how
        // long a boot takes.
        t.heartbeat("s3").await;
        t.app.vm_create(gpu.clone()).await.unwrap();
        assert!(t.app.power.boot_time.lock().unwrap().is_some());
    }
}
