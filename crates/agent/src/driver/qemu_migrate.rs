//! Live migration of real guests, QEMU to QEMU.
//!
//! Target: a QEMU with the same devices starts with `-incoming defer` and
//! listens (`migrate-incoming tcp:IP:0`); for local storage it first gets
//! fresh disks (overlays of their images, blank ones) and exports each
//! writable over one NBD server, under the disk's id. Source: for local
//! storage one `drive-mirror` job per disk (sync `top`: only what the guest
//! wrote, an image is on both hosts; `write-blocking`, so the copy stays in
//! step once ready) copies each disk into its export, and memory moves only
//! once every job is ready; a failure or a cancel cancels them all. Then
//! `migrate` sends memory,
//! with auto-converge for busy guests and the downtime limit asked for. The
//! target resumes the guest itself when the last copy lands, so the guest's
//! pause never waits for the control plane.
//!
//! A stopped VM moves the same way: the source starts its QEMU with the
//! vCPUs stopped (`-S`) just to send it, and the target's QEMU stays
//! stopped after it arrived.
//!
//! Both sides keep a note in the VM's directory (`incoming.json`,
//! `outgoing`), so a restarted agent picks up a migration QEMU is still
//! carrying out instead of starting another.

use super::qemu::{DiskSetup, Launch, QemuGuest};
use crate::ledger;
use anyhow::Context;
use kumo_api::{
    Disk, MigrationProgress, MigrationState, MigrationStatus, MigrationStorage, VmSpec,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use uuid::Uuid;

const INCOMING: &str = "incoming.json";
const OUTGOING: &str = "outgoing";
/// The prefix of the mirror job of each disk (`mirror-disk0`).
const MIRROR_JOB: &str = "mirror-";
/// How often the source looks at the transfer.
const POLL: Duration = Duration::from_millis(50);
/// How long a guest whose transfer completed may take to run on its
/// target (QEMU loading the last of it): well above the pause QEMU aims for
/// (300 ms by default), with room for a loaded host.
const ARRIVAL: Duration = Duration::from_secs(10);
/// QEMU's bandwidth cap for the transfer, bytes/s (its default, 128 MiB/s,
/// would make every migration wait on it).
const MAX_BANDWIDTH: u64 = 10 << 30;

/// What the source notes of a migration it sends: which one, and once it
/// ended, how (a restarted agent, or the next look, reports the same).
#[derive(Debug, Serialize, Deserialize)]
struct OutgoingNote {
    id: Uuid,
    result: Option<MigrationStatus>,
}

/// What the target notes of a migration it waits for.
#[derive(Debug, Serialize, Deserialize)]
struct IncomingNote {
    id: Uuid,
    uri: String,
    nbd: Option<String>,
}

fn failed(id: Uuid, e: anyhow::Error) -> MigrationStatus {
    MigrationStatus {
        message: Some(format!("{e:#}")),
        ..MigrationStatus::new(id, MigrationState::Failed)
    }
}

/// Microseconds since the epoch of a QMP event.
fn event_us(e: &kumo_qmp::QmpEvent) -> Option<u64> {
    let t = e.timestamp.to_system_time()?;
    Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_micros() as u64)
}

/// A free TCP port on `ip` (for the NBD server, which cannot report the
/// one it picks).
fn free_port(ip: &str) -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}"))?;
    Ok(l.local_addr()?.port())
}

impl QemuGuest {
    /// The time of the newest `name` event QEMU sent since the last look.
    fn last_event(&mut self, name: &str) -> Option<u64> {
        let events = self.events.as_mut()?;
        let mut found = None;
        loop {
            match events.try_recv() {
                Ok(e) if e.event == name => found = event_us(&e),
                Ok(_) | Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => return found,
            }
        }
    }

    async fn read_note<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Option<T> {
        serde_json::from_slice(&tokio::fs::read(self.path(name)).await.ok()?).ok()
    }

    async fn write_note<T: Serialize>(&self, name: &str, value: &T) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(value)?;
        ledger::write_atomic(self.path(name), bytes).await
    }

    /// Target: start (or find) the QEMU waiting for the guest, and say
    /// where the migration stands.
    pub(super) async fn migrate_in(
        &mut self,
        spec: &VmSpec,
        id: Uuid,
        storage: MigrationStorage,
    ) -> MigrationStatus {
        let note = self
            .read_note::<IncomingNote>(INCOMING)
            .await
            .filter(|n| n.id == id);
        let running = self.attach().await;
        match (note, running) {
            (Some(note), true) => {
                let qmp = match self.qmp() {
                    Ok(q) => q.clone(),
                    Err(e) => return failed(id, e),
                };
                match qmp.query_status().await {
                    Ok(s) if s.running => MigrationStatus {
                        event_us: self.resumed_us().await,
                        ..MigrationStatus::new(id, MigrationState::Completed)
                    },
                    // Still receiving (a failed transfer makes QEMU exit).
                    _ => MigrationStatus {
                        uri: Some(note.uri),
                        nbd: note.nbd,
                        ..MigrationStatus::new(id, MigrationState::Listening)
                    },
                }
            }
            (Some(_), false) => failed(
                id,
                anyhow::anyhow!("the QEMU waiting for the guest exited (the transfer broke off)"),
            ),
            (None, running) => {
                if running {
                    // A QEMU from an earlier attempt.
                    let _ = self.kill().await;
                }
                match self.listen(spec, id, storage).await {
                    Ok(note) => MigrationStatus {
                        uri: Some(note.uri),
                        nbd: note.nbd,
                        ..MigrationStatus::new(id, MigrationState::Listening)
                    },
                    Err(e) => {
                        let _ = self.kill().await;
                        failed(id, e.context("preparing to receive the guest"))
                    }
                }
            }
        }
    }

    /// When the guest resumed here, kept once seen.
    async fn resumed_us(&mut self) -> Option<u64> {
        if let Some(t) = self.last_event("RESUME") {
            let _ = tokio::fs::write(self.path("resumed_us"), t.to_string()).await;
            return Some(t);
        }
        tokio::fs::read_to_string(self.path("resumed_us"))
            .await
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    async fn listen(
        &mut self,
        spec: &VmSpec,
        id: Uuid,
        storage: MigrationStorage,
    ) -> anyhow::Result<IncomingNote> {
        let setup = match storage {
            MigrationStorage::Shared => DiskSetup::Existing,
            MigrationStorage::Local => DiskSetup::Fresh,
        };
        let disks = self.prepare(spec, setup).await?;
        let _ = tokio::fs::remove_file(self.path("resumed_us")).await;
        self.launch(spec, &disks, Launch::Incoming).await?;
        let ip = self.migration_ip.clone();
        let ip = &*ip;
        let qmp = self.qmp()?;
        let nbd = match storage {
            MigrationStorage::Shared => None,
            MigrationStorage::Local => {
                let port = free_port(ip)?;
                qmp.execute(
                    "nbd-server-start",
                    Some(json!({"addr": {"type": "inet", "data": {"host": ip, "port": port.to_string()}}})),
                )
                .await
                .context("starting the NBD server")?;
                for disk in &spec.machine.disks {
                    let d = &disk.id;
                    qmp.execute(
                        "block-export-add",
                        Some(json!({"type": "nbd", "id": d, "node-name": d, "name": d, "writable": true})),
                    )
                    .await
                    .with_context(|| format!("exporting disk {d}"))?;
                }
                Some(format!("nbd:{ip}:{port}"))
            }
        };
        qmp.execute(
            "migrate-incoming",
            Some(json!({"uri": format!("tcp:{ip}:0")})),
        )
        .await
        .context("migrate-incoming")?;
        let q = qmp.execute("query-migrate", None).await?;
        let port = q["socket-address"][0]["port"]
            .as_str()
            .context("QEMU did not say where it listens")?;
        let note = IncomingNote {
            id,
            uri: format!("tcp:{ip}:{port}"),
            nbd,
        };
        self.write_note(INCOMING, &note).await?;
        tracing::info!(dir = %self.dir.display(), uri = %note.uri, "waiting for a guest migrating in");
        Ok(note)
    }

    /// Target, once the guest is its own: stop exporting the disk, and say
    /// when the guest resumed here (once, for the migration just ended). A
    /// stopped guest (`running` false) moved cold: there is no resume.
    ///
    /// The source may finish sending before this QEMU has loaded the last
    /// of it: this waits for the guest to run here, up to [`ARRIVAL`]
    /// (`None` then, and the note stays for the next look). Until it is
    /// done the disk stays exported to the source, and a transfer from
    /// here would fail at its switch-over (QEMU cannot hand over a disk
    /// that another user still holds writable).
    pub(super) async fn finish_migrate_in(&mut self, running: bool) -> Option<MigrationStatus> {
        let note = self.read_note::<IncomingNote>(INCOMING).await?;
        if !running {
            // It arrived stopped and stays so: its QEMU has done its job.
            if let Err(e) = self.kill().await {
                tracing::warn!(dir = %self.dir.display(), error = %format_args!("{e:#}"), "stopping the QEMU that received a stopped guest");
                return None;
            }
            let _ = tokio::fs::remove_file(self.path(INCOMING)).await;
            return None;
        }
        let qmp = self.qmp().ok()?.clone();
        let deadline = Instant::now() + ARRIVAL;
        loop {
            match qmp.query_status().await {
                Ok(s) if s.running => break,
                // QEMU went away: nothing arrived.
                Err(_) => return None,
                Ok(_) if Instant::now() >= deadline => {
                    tracing::warn!(dir = %self.dir.display(), "the guest that migrated in does not run yet");
                    return None;
                }
                Ok(_) => tokio::time::sleep(POLL).await,
            }
        }
        let _ = qmp.execute("nbd-server-stop", None).await;
        let done = MigrationStatus {
            event_us: self.resumed_us().await,
            ..MigrationStatus::new(note.id, MigrationState::Completed)
        };
        let _ = tokio::fs::remove_file(self.path(INCOMING)).await;
        Some(done)
    }

    /// Source: send the guest (or follow a transfer QEMU is already
    /// carrying out), reporting progress, until it completed, failed or was
    /// cancelled. The guest keeps running here unless it completed.
    pub(super) async fn migrate_out(
        &mut self,
        spec: &VmSpec,
        out: &Outgoing<'_>,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> MigrationStatus {
        let note = self
            .read_note::<OutgoingNote>(OUTGOING)
            .await
            .filter(|n| n.id == out.id);
        if let Some(result) = note.as_ref().and_then(|n| n.result.clone()) {
            return result;
        }
        let disks = &spec.machine.disks;
        let result = match self
            .send(disks, out, note.is_some(), report, cancelled)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                if let Ok(qmp) = self.qmp() {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    cancel_mirrors(qmp, disks, true).await;
                }
                failed(out.id, e)
            }
        };
        let note = OutgoingNote {
            id: out.id,
            result: Some(result.clone()),
        };
        if let Err(e) = self.write_note(OUTGOING, &note).await {
            tracing::warn!(error = %format_args!("{e:#}"), "noting how the migration ended");
        }
        result
    }

    /// `ours`: this migration was started here before (by an agent that
    /// may have died since).
    async fn send(
        &mut self,
        disks: &[Disk],
        out: &Outgoing<'_>,
        ours: bool,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<MigrationStatus> {
        let started = Instant::now();
        let qmp = self.qmp()?.clone();
        // QEMU reports the last migration it took part in, which may be an
        // older one, or the one that brought the guest here: a transfer is
        // this one only if it was started here (`ours`: the agent may have
        // died before sending the command), and a completed one only if
        // QEMU then paused the guest for good.
        let state = qmp.execute("query-migrate", None).await?;
        let sending = ours
            && match state["status"].as_str() {
                None => false,
                Some("completed") => qmp.query_status().await?.status == "postmigrate",
                Some(_) => true,
            };
        if !sending {
            if cancelled() {
                return Ok(MigrationStatus::new(out.id, MigrationState::Cancelled));
            }
            if self.read_note::<IncomingNote>(INCOMING).await.is_some() {
                anyhow::bail!("the guest has not finished arriving here from its last migration");
            }
            self.write_note(
                OUTGOING,
                &OutgoingNote {
                    id: out.id,
                    result: None,
                },
            )
            .await?;
            qmp.execute(
                "migrate-set-capabilities",
                Some(json!({"capabilities": [{"capability": "auto-converge", "state": true}]})),
            )
            .await?;
            qmp.execute(
                "migrate-set-parameters",
                Some(json!({"downtime-limit": out.downtime_limit_ms, "max-bandwidth": MAX_BANDWIDTH})),
            )
            .await?;
        }
        let settings = Settings::read(&qmp).await?;
        if !sending {
            if let Some(nbd) = out.nbd {
                let mirrored = self
                    .mirror_disks(&qmp, disks, out, nbd, &settings, report, cancelled)
                    .await?;
                if let Some(s) = mirrored {
                    return Ok(s);
                }
            }
            // Drop old events: the STOP that counts comes with this transfer.
            let _ = self.last_event("STOP");
            qmp.execute("migrate", Some(json!({"uri": out.uri})))
                .await
                .context("migrate")?;
            tracing::info!(dir = %self.dir.display(), uri = out.uri, "sending the guest");
        }
        let mut asked_cancel = false;
        loop {
            let q = qmp.execute("query-migrate", None).await?;
            let progress = progress(&q, None, &settings, started);
            match q["status"].as_str().unwrap_or("none") {
                "completed" => {
                    if out.nbd.is_some() {
                        // In step and idle (the guest is paused): finishing
                        // the jobs leaves the target's copies whole.
                        cancel_mirrors(&qmp, disks, false).await;
                    }
                    return Ok(MigrationStatus {
                        progress: Some(progress),
                        event_us: self.last_event("STOP"),
                        qemu_downtime_ms: q["downtime"].as_u64(),
                        ..MigrationStatus::new(out.id, MigrationState::Completed)
                    });
                }
                "failed" => {
                    anyhow::bail!(
                        "QEMU: {}",
                        q["error-desc"].as_str().unwrap_or("the transfer failed")
                    )
                }
                "cancelled" => {
                    cancel_mirrors(&qmp, disks, true).await;
                    return Ok(MigrationStatus::new(out.id, MigrationState::Cancelled));
                }
                "none" => anyhow::bail!("QEMU has no transfer under way"),
                _ => {}
            }
            if cancelled() && !asked_cancel {
                tracing::info!(dir = %self.dir.display(), "cancelling the transfer");
                qmp.execute("migrate_cancel", None).await?;
                asked_cancel = true;
            }
            report(MigrationStatus {
                progress: Some(progress),
                ..MigrationStatus::new(out.id, MigrationState::Active)
            });
            tokio::time::sleep(POLL).await;
        }
    }

    /// Copy every disk into its export on the target (one job each) until
    /// every copy keeps in step; `Some` if the migration ended here
    /// (cancelled: every job is cancelled).
    #[allow(clippy::too_many_arguments)]
    async fn mirror_disks(
        &mut self,
        qmp: &kumo_qmp::Qmp,
        disks: &[Disk],
        out: &Outgoing<'_>,
        nbd: &str,
        settings: &Settings,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<Option<MigrationStatus>> {
        let started = Instant::now();
        let jobs = qmp.execute("query-block-jobs", None).await?;
        for disk in disks {
            let job = mirror_job(disk);
            if find_job(&jobs, &job).is_none() {
                qmp.execute(
                    "drive-mirror",
                    Some(json!({
                        "job-id": job, "device": disk.id,
                        "target": format!("{nbd}:exportname={}", disk.id), "format": "raw",
                        "sync": "top", "mode": "existing", "copy-mode": "write-blocking",
                    })),
                )
                .await
                .with_context(|| format!("mirroring disk {}", disk.id))?;
            }
        }
        loop {
            let jobs = qmp.execute("query-block-jobs", None).await?;
            let (mut done, mut ready) = ((0, 0), true);
            for disk in disks {
                let job = find_job(&jobs, &mirror_job(disk)).with_context(|| {
                    format!(
                        "the mirror of disk {} stopped before it was in step",
                        disk.id
                    )
                })?;
                done.0 += job["offset"].as_u64().unwrap_or(0);
                done.1 += job["len"].as_u64().unwrap_or(0);
                ready &= job["ready"].as_bool() == Some(true);
            }
            if ready {
                return Ok(None);
            }
            if cancelled() {
                cancel_mirrors(qmp, disks, true).await;
                return Ok(Some(MigrationStatus::new(
                    out.id,
                    MigrationState::Cancelled,
                )));
            }
            report(MigrationStatus {
                progress: Some(progress(&Value::Null, Some(done), settings, started)),
                ..MigrationStatus::new(out.id, MigrationState::Active)
            });
            tokio::time::sleep(POLL).await;
        }
    }
}

fn mirror_job(disk: &Disk) -> String {
    format!("{MIRROR_JOB}{}", disk.id)
}

/// Cancel the mirror job of every disk: `force`d, the copies are given up;
/// otherwise a job in step ends with its copy whole.
async fn cancel_mirrors(qmp: &kumo_qmp::Qmp, disks: &[Disk], force: bool) {
    for disk in disks {
        let _ = qmp
            .execute(
                "block-job-cancel",
                Some(json!({"device": mirror_job(disk), "force": force})),
            )
            .await;
    }
}

/// What the source needs to send the guest.
pub struct Outgoing<'a> {
    pub id: Uuid,
    pub uri: &'a str,
    pub nbd: Option<&'a str>,
    pub downtime_limit_ms: u64,
}

fn find_job<'a>(jobs: &'a Value, job: &str) -> Option<&'a Value> {
    jobs.as_array()?.iter().find(|j| j["device"] == job)
}

/// The transfer settings QEMU holds (read back, not assumed).
struct Settings {
    auto_converge: bool,
    downtime_limit_ms: u64,
}

impl Settings {
    async fn read(qmp: &kumo_qmp::Qmp) -> anyhow::Result<Settings> {
        let caps = qmp.execute("query-migrate-capabilities", None).await?;
        let params = qmp.execute("query-migrate-parameters", None).await?;
        let auto_converge = caps.as_array().is_some_and(|caps| {
            caps.iter()
                .any(|c| c["capability"] == "auto-converge" && c["state"] == true)
        });
        Ok(Settings {
            auto_converge,
            downtime_limit_ms: params["downtime-limit"].as_u64().unwrap_or_default(),
        })
    }
}

/// Transfer figures from `query-migrate` (or, while the disks are copied,
/// the mirror jobs' summed offsets and lengths).
fn progress(
    q: &Value,
    disk: Option<(u64, u64)>,
    settings: &Settings,
    started: Instant,
) -> MigrationProgress {
    let ram = &q["ram"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let (disk_done_bytes, disk_total_bytes) = disk.unwrap_or_default();
    MigrationProgress {
        stage: if disk.is_some() { "disk" } else { "memory" }.into(),
        disk_total_bytes,
        disk_done_bytes,
        memory_total_bytes: n(&ram["total"]),
        memory_transferred_bytes: n(&ram["transferred"]),
        memory_remaining_bytes: n(&ram["remaining"]),
        dirty_rate_bytes: n(&ram["dirty-pages-rate"]) * n(&ram["page-size"]).max(1),
        passes: n(&ram["dirty-sync-count"]),
        cpu_throttle_percent: n(&q["cpu-throttle-percentage"]),
        auto_converge: settings.auto_converge,
        downtime_limit_ms: settings.downtime_limit_ms,
        elapsed_ms: q["total-time"]
            .as_u64()
            .unwrap_or(started.elapsed().as_millis() as u64),
    }
}
