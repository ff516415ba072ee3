//! Real guests: one detached QEMU process per VM (own session, pidfile, QMP
//! and serial sockets in the VM's directory), so guests outlive the agent
//! and a restarted agent re-attaches over QMP.
//!
//! The guest is built from its VM's [`Machine`]: [`MachineSpec::argv`] is
//! a pure function from it (and the files [`QemuGuest::prepare`] made) to
//! QEMU's command line.
//!
//! A VM's directory `<data-dir>/vms/<id>/` holds its disks (`disk.qcow2`
//! for `disk0`, a copy-on-write overlay of the cached image that survives
//! stop and start; `<disk id>.<format>` for the others), `seed.iso` (a
//! NoCloud seed carrying the VM's name as its hostname), `qemu.pid`,
//! `qmp.sock`, `console.sock` and `console.log`. On a host with a shared
//! datastore the disks are `<datastore>/disks/<id>.qcow2` and
//! `<datastore>/disks/<id>-<disk id>.<format>` instead (and the image cache
//! `<datastore>/images/`), so every host mounting the datastore opens the
//! same disks through the same paths; `disk-ids.json` in the VM's
//! directory then notes which files those are, as this host set them up.

use super::images::ImageStore;
use super::{Accel, Guest, Hypervisor, Outgoing};
use crate::{ledger, metrics};
use anyhow::{bail, Context};
use async_trait::async_trait;
use kumo_api::{
    CpuModel, Discard, Disk, DiskBus, DiskCache, DiskFormat, DiskSource, HostLoad, HypervisorInfo,
    ImageFormat, Machine, MigrationStatus, MigrationStorage, NicBackend, NicModel, SerialConsole,
    VmSpec, VmStatus,
};
use kumo_qmp::Qmp;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

const BINARY: &str = "qemu-system-x86_64";
/// In a VM's directory, which files its disks on a shared datastore are
/// (file name to [`file_id`]), as this host set them up.
const DISK_IDS: &str = "disk-ids.json";
/// Longest path a unix socket may have (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

pub struct Qemu {
    version: String,
    accel: &'static str,
    vms_dir: PathBuf,
    datastore: Option<PathBuf>,
}

impl Qemu {
    /// The QEMU of this host (see [`super::Probed::probe`]).
    pub async fn probe(
        accel: Accel,
        data_dir: &Path,
        datastore: Option<&Path>,
    ) -> anyhow::Result<Qemu> {
        let out = tokio::process::Command::new(BINARY)
            .arg("--version")
            .output()
            .await
            .with_context(|| format!("running {BINARY}; is qemu-system-x86 installed?"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = text
            .split_whitespace()
            .skip_while(|w| *w != "version")
            .nth(1)
            .unwrap_or("unknown")
            .to_string();
        let accel = match accel {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
            Accel::Auto if kvm_works(data_dir).await => "kvm",
            Accel::Auto => "tcg",
        };
        if let Some(ds) = datastore {
            kumo_private_fs::create_dir(&ds.join("disks"))
                .with_context(|| format!("datastore {}", ds.display()))?;
        }
        Ok(Qemu {
            version,
            accel,
            vms_dir: data_dir.join("vms"),
            datastore: datastore.map(Path::to_path_buf),
        })
    }

    pub fn info(&self) -> HypervisorInfo {
        HypervisorInfo {
            driver: "qemu".into(),
            version: Some(self.version.clone()),
            accel: self.accel.into(),
        }
    }

    /// The driver, with the image cache its guests' disks come from and
    /// the address guests migrating in are received on.
    pub fn ready(self, images: Arc<dyn ImageStore>, migration_ip: String) -> QemuDriver {
        QemuDriver {
            qemu: self,
            images,
            migration_ip: migration_ip.into(),
        }
    }
}

/// The QEMU driver of a host.
pub struct QemuDriver {
    qemu: Qemu,
    images: Arc<dyn ImageStore>,
    migration_ip: Arc<str>,
}

impl Hypervisor for QemuDriver {
    fn info(&self) -> HypervisorInfo {
        self.qemu.info()
    }

    fn guest(&self, id: Uuid) -> Box<dyn Guest> {
        let dir = self.qemu.vms_dir.join(id.to_string());
        // A guest created before the host had its datastore keeps its
        // disks (a stat, once per VM actor).
        let shared_disks = self
            .qemu
            .datastore
            .as_ref()
            .filter(|_| !dir.join(FIRST_DISK_FILE).exists())
            .map(|ds| ds.join("disks"));
        Box::new(QemuGuest {
            id,
            shared_disks,
            dir,
            accel: self.qemu.accel,
            images: self.images.clone(),
            migration_ip: self.migration_ip.clone(),
            qmp: None,
            events: None,
            pid: None,
            cpu_sample: None,
            pinned: None,
        })
    }

    /// Read at agent start only.
    fn guests_on_disk(&self) -> Vec<Uuid> {
        std::fs::read_dir(&self.qemu.vms_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn console_paths(&self, id: Uuid) -> Option<(PathBuf, PathBuf)> {
        let dir = self.qemu.vms_dir.join(id.to_string());
        Some((dir.join("console.log"), dir.join("console.sock")))
    }

    fn simulated_load(&self, _statuses: &[VmStatus], _vcpus: u32) -> Option<HostLoad> {
        None
    }
}

/// The file of `disk0` in the VM's directory, as the first release named it.
const FIRST_DISK_FILE: &str = "disk.qcow2";

/// The live QEMU process of the guest whose directory is `dir`, from its
/// pidfile. Its command line must name `dir`, so a reused pid is not taken
/// for the guest; a zombie is not alive.
pub fn live_pid(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat[stat.rfind(')')? + 2..].chars().next()?;
    if state == 'Z' || state == 'X' {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains(dir.to_string_lossy().as_ref())
        .then_some(pid)
}

/// Whether guests really run under KVM here: `/dev/kvm` existing is not
/// enough, and neither is QEMU calling a machine `running`. On some hosts
/// a KVM guest stalls in its firmware ("KVM internal error") while QEMU
/// still reports it running, and not every time: of three boots one may
/// get through. So boot an empty machine [`KVM_PROBE_BOOTS`] times and
/// count KVM as working only if every boot gets through its firmware.
async fn kvm_works(data_dir: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let log = data_dir.join("kvm-probe.log");
    let mut works = true;
    for _ in 0..KVM_PROBE_BOOTS {
        if !firmware_boots_under_kvm(&log).await {
            works = false;
            break;
        }
    }
    tracing::info!(works, "KVM probe");
    works
}

/// Boots of an empty machine the KVM probe needs, all good, to use KVM.
const KVM_PROBE_BOOTS: usize = 5;

/// How long one probe boot may take to reach the boot loader.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an empty machine under KVM gets as far as trying to boot within
/// [`KVM_PROBE_TIMEOUT`]. SeaBIOS logs its progress on the debug console
/// at I/O port 0x402 (SeaBIOS docs, "Debugging"), and writes "Booting
/// from" only once the whole platform setup has run; under working KVM
/// that takes well under a second. `log` receives that debug console.
async fn firmware_boots_under_kvm(log: &Path) -> bool {
    let _ = tokio::fs::remove_file(log).await;
    let child = tokio::process::Command::new(BINARY)
        .args([
            "-accel",
            "kvm",
            "-M",
            "pc",
            "-cpu",
            "host",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-global",
            "isa-debugcon.iobase=0x402",
        ])
        .arg("-debugcon")
        .arg(format!("file:{}", log.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = tokio::time::Instant::now() + KVM_PROBE_TIMEOUT;
    let mut booted = false;
    while !booted && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        booted = tokio::fs::read(log)
            .await
            .is_ok_and(|bytes| String::from_utf8_lossy(&bytes).contains("Booting from"));
    }
    let _ = child.kill().await;
    let _ = tokio::fs::remove_file(log).await;
    booted
}

pub struct QemuGuest {
    id: Uuid,
    pub(super) dir: PathBuf,
    /// The datastore directory holding the guest's disks, if they are
    /// shared (else they are in `dir`).
    shared_disks: Option<PathBuf>,
    accel: &'static str,
    images: Arc<dyn ImageStore>,
    /// The address guests migrating in are received on.
    pub(super) migration_ip: Arc<str>,
    pub(super) qmp: Option<Qmp>,
    /// QMP events since the connection was made (switch-over times).
    pub(super) events: Option<tokio::sync::broadcast::Receiver<kumo_qmp::QmpEvent>>,
    pid: Option<i32>,
    cpu_sample: Option<(u64, Instant)>,
    /// The pinning last applied: own cores, cores reserved by others.
    pinned: Option<(Vec<u32>, BTreeSet<u32>)>,
}

impl QemuGuest {
    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn live_pid(&self) -> Option<i32> {
        live_pid(&self.dir)
    }

    /// Where `disk` lives on this host (see the module docs).
    pub(super) fn disk_path(&self, disk: &Disk) -> PathBuf {
        let first = disk.id == "disk0" && disk.format == DiskFormat::Qcow2;
        match (&self.shared_disks, first) {
            (Some(ds), true) => ds.join(format!("{}.qcow2", self.id)),
            (Some(ds), false) => {
                ds.join(format!("{}-{}.{}", self.id, disk.id, disk.format.as_str()))
            }
            (None, true) => self.dir.join(FIRST_DISK_FILE),
            (None, false) => self
                .dir
                .join(format!("{}.{}", disk.id, disk.format.as_str())),
        }
    }

    /// Whether QEMU runs; (re)connects QMP if it does.
    pub(super) async fn attach(&mut self) -> bool {
        match self.live_pid() {
            Some(pid) => {
                self.pid = Some(pid);
                if !self.qmp.as_ref().is_some_and(|q| q.is_connected()) {
                    self.qmp = Qmp::connect(self.path("qmp.sock")).await.ok();
                    self.events = self.qmp.as_ref().map(Qmp::events);
                    if self.qmp.is_some() {
                        tracing::info!(dir = %self.dir.display(), pid, "attached to running guest");
                    }
                }
                true
            }
            None => {
                self.pid = None;
                self.qmp = None;
                self.events = None;
                self.pinned = None;
                false
            }
        }
    }

    pub(super) fn qmp(&self) -> anyhow::Result<&Qmp> {
        self.qmp.as_ref().context("no QMP connection to the guest")
    }

    /// Everything QEMU needs before it starts: the directory, the images
    /// in the cache, the disks (as `setup` says) and the seed; returns
    /// where each of `spec.machine.disks` is.
    pub(super) async fn prepare(
        &self,
        spec: &VmSpec,
        setup: DiskSetup,
    ) -> anyhow::Result<Vec<DiskFiles>> {
        check(&spec.machine)?;
        kumo_private_fs::create_dir(&self.dir)?;
        if self.path("console.sock").as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "data dir path too long for unix sockets: {}",
                self.dir.display()
            );
        }
        let mut files = Vec::with_capacity(spec.machine.disks.len());
        for disk in &spec.machine.disks {
            let base = match &disk.source {
                DiskSource::Image(image) => Some((self.images.ensure(image).await?, image.format)),
                DiskSource::Blank => None,
            };
            let file = self.disk_path(disk);
            self.make_disk(
                disk,
                &file,
                base.as_ref().map(|(p, f)| (p.as_path(), *f)),
                setup,
            )
            .await
            .with_context(|| format!("disk {}", disk.id))?;
            files.push(DiskFiles { file, base });
        }
        if self.shared_disks.is_some() {
            self.note_shared_disks(&files)?;
        }
        self.write_seed(spec).await?;
        Ok(files)
    }

    /// Note which files the shared disks are (see
    /// [`remove_shared_disks`]).
    fn note_shared_disks(&self, files: &[DiskFiles]) -> anyhow::Result<()> {
        let ids = serde_json::to_vec(&disk_ids(files)?)?;
        Ok(kumo_private_fs::write_file(&self.path(DISK_IDS), &ids)?)
    }

    /// Make `disk` at `file` (over `base`, an image of that format) as
    /// `setup` says.
    async fn make_disk(
        &self,
        disk: &Disk,
        file: &Path,
        base: Option<(&Path, ImageFormat)>,
        setup: DiskSetup,
    ) -> anyhow::Result<()> {
        let exists = tokio::fs::try_exists(file).await?;
        match setup {
            DiskSetup::Existing if !exists => {
                bail!("the shared disk {} is missing", file.display())
            }
            DiskSetup::Existing => return Ok(()),
            DiskSetup::Keep if exists => return Ok(()),
            DiskSetup::Fresh => remove_if_present(tokio::fs::remove_file(file).await)?,
            DiskSetup::Keep => {}
        }
        let tmp = file.with_extension("tmp");
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", disk.format.as_str()]);
        if let Some((image, format)) = base {
            // `-F`: the base's format as imported, never probed.
            cmd.args(["-F", format.as_str(), "-b"]).arg(image);
        }
        cmd.arg(&tmp).arg(format!("{}G", disk.size_gib));
        run(&mut cmd).await.context("creating the disk")?;
        tokio::fs::rename(&tmp, file).await?;
        Ok(())
    }

    /// Start QEMU, detached, on the disks `prepare` made.
    pub(super) async fn launch(
        &mut self,
        spec: &VmSpec,
        disks: &[DiskFiles],
        how: Launch,
    ) -> anyhow::Result<()> {
        for stale in ["qmp.sock", "console.sock", "qemu.pid"] {
            let _ = tokio::fs::remove_file(self.path(stale)).await;
        }
        let machine = MachineSpec {
            name: &spec.name,
            id: spec.id,
            machine: &spec.machine,
            accel: self.accel,
            dir: &self.dir,
            disks,
            launch: how,
        };
        run(tokio::process::Command::new(BINARY).args(machine.argv()))
            .await
            .context("starting QEMU")?;
        if !self.attach().await {
            bail!("QEMU exited right after starting");
        }
        if self.qmp.is_none() {
            bail!("QEMU runs but its QMP socket does not answer");
        }
        Ok(())
    }

    /// The NoCloud seed: the VM's name becomes the guest's hostname.
    async fn write_seed(&self, spec: &VmSpec) -> anyhow::Result<()> {
        let seed = self.path("seed");
        kumo_private_fs::create_dir(&seed)?;
        let meta = format!("instance-id: {}\nlocal-hostname: {}\n", spec.id, spec.name);
        tokio::fs::write(seed.join("meta-data"), meta).await?;
        tokio::fs::write(seed.join("user-data"), "#cloud-config\n").await?;
        run(tokio::process::Command::new("genisoimage")
            .args(["-quiet", "-output"])
            .arg(self.path("seed.iso"))
            .args(["-volid", "cidata", "-joliet", "-rock"])
            .arg(seed.join("meta-data"))
            .arg(seed.join("user-data")))
        .await
        .context("making the seed image (is genisoimage installed?)")
    }

    /// Stop hard: QMP `quit`, then SIGKILL if QEMU is still there.
    pub(super) async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(qmp) = self.qmp.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), qmp.quit()).await;
        }
        for _ in 0..20 {
            let Some(pid) = self.live_pid() else {
                return Ok(());
            };
            if self.pid.is_none() {
                self.pid = Some(pid);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(pid) = self.live_pid() {
            kill(Pid::from_raw(pid), Signal::SIGKILL)?;
            for _ in 0..50 {
                if self.live_pid().is_none() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            bail!("QEMU (pid {pid}) survived SIGKILL");
        }
        Ok(())
    }

    /// Remove the guest's disks on the shared datastore that are still
    /// the files this host set up (see [`remove_shared_disks`]).
    async fn remove_shared_disks(&self, ds: &Path) -> anyhow::Result<()> {
        let noted: Option<BTreeMap<String, String>> = tokio::fs::read(self.path(DISK_IDS))
            .await
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        remove_shared_disks(ds, self.id, noted.as_ref()).await
    }
}

/// Which file each of `files` is, by file name (see [`file_id`]).
fn disk_ids(files: &[DiskFiles]) -> anyhow::Result<BTreeMap<String, String>> {
    files
        .iter()
        .map(|f| {
            let name = f.file.file_name().unwrap_or_default();
            let id = file_id(&f.file)
                .with_context(|| format!("the disk {} is gone", f.file.display()))?;
            Ok((name.to_string_lossy().into_owned(), id))
        })
        .collect()
}

/// Remove guest `id`'s disks in the datastore directory `ds` (`<id>.qcow2`,
/// `<id>-<disk>.<format>`) that are still the files `noted` (from
/// [`disk_ids`]) says; all of them without a note (a guest set up before
/// hosts noted that). A host taking the guest onto the datastore by
/// copying its disks (a local-storage migration) makes new files at the
/// same paths, maybe before the host the guest left there earlier has
/// cleaned up.
async fn remove_shared_disks(
    ds: &Path,
    id: Uuid,
    noted: Option<&BTreeMap<String, String>>,
) -> anyhow::Result<()> {
    let (whole, prefix) = (format!("{id}.qcow2"), format!("{id}-"));
    let mut entries = match tokio::fs::read_dir(ds).await {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    while let Some(entry) = entries.next_entry().await? {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let ours = noted.is_none_or(|noted| {
            noted
                .get(&*name)
                .is_some_and(|noted| file_id(&entry.path()).is_some_and(|now| now == *noted))
        });
        if (*name == whole || name.starts_with(&prefix)) && ours {
            remove_if_present(tokio::fs::remove_file(entry.path()).await)?;
        }
    }
    Ok(())
}

#[async_trait]
impl Guest for QemuGuest {
    async fn is_running(&mut self) -> bool {
        self.attach().await
    }

    async fn start(&mut self, spec: &VmSpec) -> anyhow::Result<()> {
        let disks = self.prepare(spec, DiskSetup::Keep).await?;
        self.launch(spec, &disks, Launch::Run).await
    }

    /// Start QEMU with the guest's vCPUs stopped before they ever ran: a
    /// stopped VM's QEMU, only to send the guest to another host.
    async fn start_paused(&mut self, spec: &VmSpec) -> anyhow::Result<()> {
        let disks = self.prepare(spec, DiskSetup::Keep).await?;
        self.launch(spec, &disks, Launch::Paused).await
    }

    /// Each vCPU of a dedicated VM on its own core, every thread of a
    /// shared VM off the cores dedicated to other VMs.
    async fn pin(&mut self, cores: &[u32], reserved: &BTreeSet<u32>) -> anyhow::Result<()> {
        let Some(pid) = self.pid else { return Ok(()) };
        let host_cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let wanted = (cores.to_vec(), reserved.clone());
        if self.pinned.as_ref() == Some(&wanted) {
            return Ok(());
        }
        if cores.is_empty() {
            let allowed: Vec<u32> = (0..host_cpus).filter(|c| !reserved.contains(c)).collect();
            for tid in threads(pid) {
                set_affinity(tid, &allowed)?;
            }
        } else {
            let vcpus = self.qmp()?.query_cpus_fast().await?;
            for cpu in vcpus {
                let core = cores
                    .get(cpu.cpu_index as usize)
                    .with_context(|| format!("vCPU {} has no dedicated core", cpu.cpu_index))?;
                set_affinity(cpu.thread_id as i32, &[*core])?;
            }
        }
        tracing::info!(dir = %self.dir.display(), ?cores, ?reserved, "pinned guest threads");
        self.pinned = Some(wanted);
        Ok(())
    }

    async fn reset(&mut self) -> anyhow::Result<()> {
        Ok(self.qmp()?.system_reset().await?)
    }

    async fn shutdown(&mut self, timeout: Duration) -> anyhow::Result<()> {
        // A paused guest (one that migrated away) cannot hear the button.
        if let Ok(qmp) = self.qmp() {
            if qmp.query_status().await.is_ok_and(|s| !s.running) {
                return self.kill().await;
            }
        }
        if let Ok(qmp) = self.qmp() {
            if let Err(e) = qmp.system_powerdown().await {
                tracing::warn!(error = %crate::Chain(&e), "ACPI power button");
            }
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.live_pid().is_none() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::info!(dir = %self.dir.display(), "guest ignored the power button; stopping it hard");
        self.kill().await
    }

    /// Its disks on a shared datastore go too unless `keep_shared_disk`
    /// (another host runs the guest from them now, or may).
    async fn remove(&mut self, keep_shared_disk: bool) -> anyhow::Result<()> {
        self.kill().await?;
        if let Some(ds) = self.shared_disks.as_ref().filter(|_| !keep_shared_disk) {
            self.remove_shared_disks(ds).await?;
        }
        remove_if_present(tokio::fs::remove_dir_all(&self.dir).await)
    }

    async fn incoming(
        &mut self,
        spec: &VmSpec,
        id: Uuid,
        storage: MigrationStorage,
    ) -> MigrationStatus {
        self.migrate_in(spec, id, storage).await
    }

    async fn finish_incoming(&mut self, running: bool) -> Option<MigrationStatus> {
        self.finish_migrate_in(running).await
    }

    async fn outgoing(
        &mut self,
        spec: &VmSpec,
        out: &Outgoing<'_>,
        report: &(dyn Fn(MigrationStatus) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> MigrationStatus {
        self.migrate_out(spec, out, report, cancelled).await
    }

    async fn saved_reboots(&self) -> Option<u64> {
        tokio::fs::read_to_string(self.path("reboots"))
            .await
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    async fn save_reboots(&mut self, n: u64) {
        let saved = match kumo_private_fs::create_dir(&self.dir) {
            Ok(()) => ledger::write_atomic(self.path("reboots"), n.to_string().into_bytes()).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = saved {
            tracing::warn!(dir = %self.dir.display(), error = %format_args!("{e:#}"), "saving the reboot count");
        }
    }

    /// CPU use of the guest since the last call, percent of one CPU.
    fn cpu_percent(&mut self, _spec: &VmSpec) -> Option<f32> {
        let ticks = metrics::process_ticks(self.pid?)?;
        let now = Instant::now();
        let last = self.cpu_sample.replace((ticks, now));
        let (t0, i0) = last?;
        let secs = now.duration_since(i0).as_secs_f32();
        (secs > 0.0)
            .then(|| 100.0 * ticks.saturating_sub(t0) as f32 / metrics::TICKS_PER_SECOND / secs)
    }
}

/// The longest device id: block node names are at most 31 bytes, and
/// `<id>-file` names the disk's file node.
const MAX_DEVICE_ID: usize = 16;

/// Refuse a machine QEMU could not be given safely: device ids are used in
/// node names and file names, so they are short lowercase words, unique;
/// an image overlay is qcow2; at most one disk boots; MACs are unique.
pub fn check(machine: &Machine) -> anyhow::Result<()> {
    let valid = |id: &str| {
        id.len() <= MAX_DEVICE_ID
            && id.starts_with(|c: char| c.is_ascii_lowercase())
            && id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    let mut ids = BTreeSet::new();
    let disk_ids = machine.disks.iter().map(|d| &d.id);
    for id in disk_ids.chain(machine.nics.iter().map(|n| &n.id)) {
        if !valid(id) {
            bail!("device id {id:?}: use 1-{MAX_DEVICE_ID} lowercase letters and digits, starting with a letter");
        }
        // `seed0` and `imageN` are the agent's own nodes.
        if id == "seed0" || id.starts_with("image") || !ids.insert(id.as_str()) {
            bail!("device id {id:?} is taken");
        }
    }
    for d in &machine.disks {
        if matches!(d.source, DiskSource::Image(_)) && d.format != DiskFormat::Qcow2 {
            bail!("disk {}: an image overlay is qcow2", d.id);
        }
    }
    if machine.disks.iter().filter(|d| d.boot).count() > 1 {
        bail!("more than one boot disk");
    }
    let macs: BTreeSet<_> = machine.nics.iter().map(|n| n.mac).collect();
    if macs.len() != machine.nics.len() {
        bail!("two NICs have the same MAC");
    }
    Ok(())
}

/// Where one of the machine's disks is on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFiles {
    /// The disk's own file.
    pub file: PathBuf,
    /// For an image overlay: the image in the cache, and the format it was
    /// imported (and inspected) as.
    pub base: Option<(PathBuf, ImageFormat)>,
}

/// Everything QEMU's command line is built from ([`MachineSpec::argv`]
/// is a pure function of it, so tests can see what QEMU is told).
#[derive(Clone, Debug)]
pub struct MachineSpec<'a> {
    /// The VM's name (names are checked: no commas).
    pub name: &'a str,
    pub id: Uuid,
    /// The guest's devices, as the controller sent them.
    pub machine: &'a Machine,
    /// `kvm` or `tcg`.
    pub accel: &'a str,
    /// The VM's directory: QMP and console sockets, console log, pidfile
    /// and `seed.iso`.
    pub dir: &'a Path,
    /// Where each of `machine.disks` is on the host, in the same order.
    pub disks: &'a [DiskFiles],
    pub launch: Launch,
}

impl MachineSpec<'_> {
    /// QEMU's arguments.
    ///
    /// Each disk is a block graph spelled out node by node, so nothing in
    /// an image file decides what QEMU opens (an image is untrusted input,
    /// see docs/images.md): every node names its driver (no format
    /// probing) and its `file` node; an image overlay's base is a
    /// read-only node `image<N>` (N: the disk's place in the machine) of
    /// the format the image was imported as, with `backing: null` where
    /// the format has a backing at all; the overlay takes that node as its
    /// backing instead of the file named in its header, and a blank qcow2
    /// disk has none. A disk's node is named by its id (`disk0`), its file
    /// node `<id>-file`: migration mirrors and exports the disks by those
    /// names. The agent's NoCloud seed (`seed0`) follows the machine's
    /// disks; each NIC is a `-netdev` and a `-device` named by its id.
    /// (`-blockdev` in JSON: `null` has no `key=value` spelling, and JSON
    /// strings need no escaping of commas in paths.)
    pub fn argv(&self) -> Vec<String> {
        let dir = self.dir;
        let m = self.machine;
        let cpu = match (m.cpu.model, self.accel) {
            (CpuModel::Host, "kvm") => "host",
            (CpuModel::Host, _) => "max",
        };
        let mut argv: Vec<String> = [
            "-name".to_string(),
            format!("guest={},debug-threads=on", self.name),
            "-uuid".into(),
            self.id.to_string(),
            "-machine".into(),
            format!("pc,accel={}", self.accel),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            m.cpu.vcpus.to_string(),
            "-m".into(),
            m.memory_mib.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
        ]
        .into();
        match m.serial {
            SerialConsole::None => {}
            SerialConsole::Logged => argv.extend([
                "-chardev".into(),
                format!(
                    "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
                    option_path(&dir.join("console.sock")),
                    option_path(&dir.join("console.log")),
                ),
                "-serial".into(),
                "chardev:serial0".into(),
            ]),
        }
        argv.extend([
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                option_path(&dir.join("qmp.sock"))
            ),
        ]);
        for (n, (disk, files)) in m.disks.iter().zip(self.disks).enumerate() {
            argv.extend(disk_args(n, disk, files));
        }
        argv.extend(blockdev(json!({
            "driver": "file", "filename": dir.join("seed.iso").to_string_lossy(), "node-name": "seed0-file", "read-only": true,
        })));
        argv.extend(blockdev(json!({
            "driver": "raw", "file": "seed0-file", "node-name": "seed0", "read-only": true,
        })));
        argv.extend(["-device".into(), "virtio-blk-pci,drive=seed0".into()]);
        for nic in &m.nics {
            let netdev = match nic.backend {
                NicBackend::User => format!("user,id={}", nic.id),
            };
            let model = match nic.model {
                NicModel::VirtioNet => "virtio-net-pci",
            };
            argv.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                format!("{model},netdev={},mac={}", nic.id, nic.mac),
            ]);
        }
        argv.extend(["-daemonize".into(), "-pidfile".into()]);
        argv.push(dir.join("qemu.pid").display().to_string());
        match self.launch {
            Launch::Run => {}
            Launch::Paused => argv.push("-S".into()),
            Launch::Incoming => argv.extend(["-incoming".into(), "defer".into()]),
        }
        argv
    }
}

fn blockdev(node: Value) -> [String; 2] {
    ["-blockdev".to_string(), node.to_string()]
}

/// The `-blockdev`s and `-device` of disk `disk`, the `n`th of the machine.
fn disk_args(n: usize, disk: &Disk, files: &DiskFiles) -> Vec<String> {
    let id = &disk.id;
    let file_node = format!("{id}-file");
    // Options every node of the disk's own file takes.
    let with_options = |mut node: Value| {
        if disk.discard == Discard::Unmap {
            node["discard"] = "unmap".into();
        }
        if disk.cache == DiskCache::None {
            node["cache"] = json!({"direct": true});
        }
        node
    };
    let mut args = Vec::new();
    let mut node = json!({"driver": disk.format.as_str(), "file": file_node, "node-name": id});
    if let Some((image, format)) = &files.base {
        let base = format!("image{n}");
        let mut image_node = json!({
            "driver": format.as_str(), "file": format!("{base}-file"),
            "node-name": base, "read-only": true,
        });
        if *format == ImageFormat::Qcow2 {
            image_node["backing"] = Value::Null;
        }
        args.extend(blockdev(json!({
            "driver": "file", "filename": image.to_string_lossy(), "node-name": format!("{base}-file"), "read-only": true,
        })));
        args.extend(blockdev(image_node));
        node["backing"] = base.into();
    } else if disk.format == DiskFormat::Qcow2 {
        node["backing"] = Value::Null;
    }
    args.extend(blockdev(with_options(json!({
        "driver": "file", "filename": files.file.to_string_lossy(), "node-name": file_node,
    }))));
    args.extend(blockdev(with_options(node)));
    let bus = match disk.bus {
        DiskBus::VirtioBlk => "virtio-blk-pci",
    };
    let boot = if disk.boot { ",bootindex=0" } else { "" };
    args.extend(["-device".into(), format!("{bus},drive={id}{boot}")]);
    args
}

/// A path as the value in a QEMU `key=value,...` option: a comma is
/// doubled, so a path cannot end the value and add options.
fn option_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// How QEMU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    Run,
    /// vCPUs stopped before they ran (`-S`).
    Paused,
    /// Waiting for a guest migrating in (`-incoming defer`).
    Incoming,
}

/// How [`QemuGuest::prepare`] treats the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DiskSetup {
    /// Use the disk there is, or create it from the image.
    Keep,
    /// A new overlay of the image, replacing any (a disk about to be
    /// mirrored in from another host).
    Fresh,
    /// The disk must be there already (on a shared datastore).
    Existing,
}

/// Which file `path` names: `device:inode:birth`, the birth time in
/// nanoseconds since the epoch (a file system frees an inode number for
/// reuse as soon as the file is gone, so a new file at the same path may
/// well have the old number); `-` where the file system keeps no birth
/// time (NFS), leaving the inode alone to tell.
fn file_id(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let birth = m
        .created()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(|| "-".to_string(), |d| d.as_nanos().to_string());
    Some(format!("{}:{}:{birth}", m.dev(), m.ino()))
}

fn remove_if_present(r: std::io::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Thread ids of a process.
fn threads(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn set_affinity(tid: i32, cpus: &[u32]) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    for c in cpus {
        set.set(*c as usize)?;
    }
    sched_setaffinity(Pid::from_raw(tid), &set)
        .with_context(|| format!("pinning thread {tid} to {cpus:?}"))
}

/// Run a command to completion; its stderr becomes the error.
pub(super) async fn run(cmd: &mut tokio::process::Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kumo_api::{ImageRef, Nic, Resources};

    const DIR: &str = "/var/lib/kumo/vms/x";
    const IMAGE: &str = "/var/lib/kumo/images/abc";

    fn image(format: ImageFormat) -> ImageRef {
        ImageRef {
            id: Uuid::nil(),
            sha256: "abc".into(),
            format,
            size_bytes: 1 << 20,
        }
    }

    /// Today's machine: one disk over an image of `format`.
    fn single(format: ImageFormat) -> (Machine, Vec<DiskFiles>) {
        let size = Resources {
            vcpus: 2,
            memory_mib: 256,
            disk_gib: 3,
        };
        let machine = Machine::single_disk(Uuid::nil(), size, image(format), vec![]);
        let files = vec![DiskFiles {
            file: format!("{DIR}/disk.qcow2").into(),
            base: Some((IMAGE.into(), format)),
        }];
        (machine, files)
    }

    /// Two disks (the image overlay, and a blank raw one that does not
    /// boot, read around the page cache, discards ignored) and two NICs.
    fn two_by_two() -> (Machine, Vec<DiskFiles>) {
        let (mut machine, mut files) = single(ImageFormat::Qcow2);
        machine.cpu.cores = vec![2, 3];
        machine.disks.push(Disk {
            id: "data".into(),
            source: DiskSource::Blank,
            format: DiskFormat::Raw,
            size_gib: 1,
            bus: DiskBus::VirtioBlk,
            cache: DiskCache::None,
            discard: Discard::Ignore,
            boot: false,
        });
        files.push(DiskFiles {
            file: format!("{DIR}/data.raw").into(),
            base: None,
        });
        machine.nics.push(Nic {
            id: "net1".into(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            model: NicModel::VirtioNet,
            backend: NicBackend::User,
        });
        (machine, files)
    }

    fn argv(machine: &Machine, disks: &[DiskFiles], launch: Launch) -> Vec<String> {
        argv_in(DIR, "tcg", machine, disks, launch)
    }

    fn argv_in(
        dir: &str,
        accel: &str,
        machine: &Machine,
        disks: &[DiskFiles],
        launch: Launch,
    ) -> Vec<String> {
        MachineSpec {
            name: "web",
            id: Uuid::nil(),
            machine,
            accel,
            dir: Path::new(dir),
            disks,
            launch,
        }
        .argv()
    }

    /// The arguments every guest of `DIR` starts with.
    fn head() -> Vec<&'static str> {
        vec![
            "-name", "guest=web,debug-threads=on",
            "-uuid", "00000000-0000-0000-0000-000000000000",
            "-machine", "pc,accel=tcg", "-cpu", "max", "-smp", "2", "-m", "256",
            "-nodefaults", "-display", "none",
            "-chardev", "socket,id=serial0,path=/var/lib/kumo/vms/x/console.sock,server=on,wait=off,logfile=/var/lib/kumo/vms/x/console.log,logappend=on",
            "-serial", "chardev:serial0",
            "-qmp", "unix:/var/lib/kumo/vms/x/qmp.sock,server=on,wait=off",
            "-blockdev", r#"{"driver":"file","filename":"/var/lib/kumo/images/abc","node-name":"image0-file","read-only":true}"#,
            "-blockdev", r#"{"backing":null,"driver":"qcow2","file":"image0-file","node-name":"image0","read-only":true}"#,
            "-blockdev", r#"{"discard":"unmap","driver":"file","filename":"/var/lib/kumo/vms/x/disk.qcow2","node-name":"disk0-file"}"#,
            "-blockdev", r#"{"backing":"image0","discard":"unmap","driver":"qcow2","file":"disk0-file","node-name":"disk0"}"#,
            "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
        ]
    }

    /// The seed and everything after the NICs.
    const SEED: [&str; 6] = [
        "-blockdev",
        r#"{"driver":"file","filename":"/var/lib/kumo/vms/x/seed.iso","node-name":"seed0-file","read-only":true}"#,
        "-blockdev",
        r#"{"driver":"raw","file":"seed0-file","node-name":"seed0","read-only":true}"#,
        "-device",
        "virtio-blk-pci,drive=seed0",
    ];
    const TAIL: [&str; 3] = ["-daemonize", "-pidfile", "/var/lib/kumo/vms/x/qemu.pid"];

    /// Golden command line of today's machine: `disk0` over the image
    /// (the node names running guests and migrations use), one user-mode
    /// NIC with the VM's MAC.
    #[test]
    fn golden_single_disk_machine() {
        let (machine, files) = single(ImageFormat::Qcow2);
        let mut want = head();
        want.extend(SEED);
        want.extend([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:00",
        ]);
        want.extend(TAIL);
        assert_eq!(argv(&machine, &files, Launch::Run), want);
    }

    /// Golden command line of a machine with two disks and two NICs.
    #[test]
    fn golden_two_disks_two_nics() {
        let (machine, files) = two_by_two();
        let mut want = head();
        want.extend([
            // The cache mode sits on both of the disk's nodes.
            "-blockdev", r#"{"cache":{"direct":true},"driver":"file","filename":"/var/lib/kumo/vms/x/data.raw","node-name":"data-file"}"#,
            "-blockdev", r#"{"cache":{"direct":true},"driver":"raw","file":"data-file","node-name":"data"}"#,
            "-device", "virtio-blk-pci,drive=data",
        ]);
        want.extend(SEED);
        want.extend([
            "-netdev",
            "user,id=net0",
            "-device",
            "virtio-net-pci,netdev=net0,mac=02:00:00:00:00:00",
            "-netdev",
            "user,id=net1",
            "-device",
            "virtio-net-pci,netdev=net1,mac=02:00:00:00:00:01",
        ]);
        want.extend(TAIL);
        assert_eq!(argv(&machine, &files, Launch::Run), want);
        check(&machine).unwrap();
    }

    #[test]
    fn a_raw_base_is_opened_as_raw() {
        let (machine, files) = single(ImageFormat::Raw);
        let argv = argv(&machine, &files, Launch::Run);
        // raw has no backing to turn off (QEMU refuses the option there).
        assert!(argv.contains(
            &r#"{"driver":"raw","file":"image0-file","node-name":"image0","read-only":true}"#
                .to_string()
        ));
    }

    #[test]
    fn how_qemu_starts() {
        let (machine, files) = single(ImageFormat::Qcow2);
        let argv = |launch| argv(&machine, &files, launch);
        assert!(argv(Launch::Run).ends_with(&TAIL.map(String::from)));
        assert!(argv(Launch::Paused).ends_with(&["-S".to_string()]));
        assert!(argv(Launch::Incoming).ends_with(&["-incoming".to_string(), "defer".into()]));
        let kvm = argv_in(DIR, "kvm", &machine, &files, Launch::Run);
        assert!(kvm.windows(2).any(|w| w == ["-cpu", "host"]));
    }

    /// A host giving a guest up removes its disks on the datastore only
    /// while their paths still name the files it set up: not the new disk
    /// another host has meanwhile made there for the same guest.
    #[tokio::test]
    async fn a_host_leaving_removes_only_its_own_shared_disks() {
        let ds = tempfile::tempdir().unwrap();
        let id = Uuid::from_u128(7);
        let disk = |name: &str, content: &str| {
            let file = ds.path().join(name);
            std::fs::write(&file, content).unwrap();
            DiskFiles { file, base: None }
        };
        let read = |name: &str| std::fs::read_to_string(ds.path().join(name)).ok();
        let (first, data) = (format!("{id}.qcow2"), format!("{id}-data.raw"));
        let files = [disk(&first, "old"), disk(&data, "data")];
        let noted = disk_ids(&files).unwrap();
        // Another host took the guest onto the datastore anew (the same
        // path, a new file: ext4 gives it the old inode number at once).
        std::fs::remove_file(ds.path().join(&first)).unwrap();
        disk(&first, "new");
        let other = disk("other.qcow2", "another guest's");
        remove_shared_disks(ds.path(), id, Some(&noted))
            .await
            .unwrap();
        assert_eq!(read(&first).as_deref(), Some("new"));
        assert_eq!(read(&data), None);
        // Its own disk it removes; a guest without a note loses all of its
        // disks, and no other guest's.
        let noted = disk_ids(&files[..1]).unwrap();
        remove_shared_disks(ds.path(), id, Some(&noted))
            .await
            .unwrap();
        assert_eq!(read(&first), None);
        disk(&first, "unnoted");
        remove_shared_disks(ds.path(), id, None).await.unwrap();
        assert_eq!(read(&first), None);
        assert!(other.file.exists());
    }

    #[test]
    fn a_comma_in_a_path_cannot_add_options() {
        let (machine, _) = single(ImageFormat::Qcow2);
        let files = [DiskFiles {
            file: "/srv/a,b/disk.qcow2".into(),
            base: Some((IMAGE.into(), ImageFormat::Qcow2)),
        }];
        let argv = argv_in("/srv/a,b", "tcg", &machine, &files, Launch::Run);
        assert!(argv.contains(&"unix:/srv/a,,b/qmp.sock,server=on,wait=off".to_string()));
        assert!(argv
            .iter()
            .any(|a| a.contains(r#""filename":"/srv/a,b/disk.qcow2""#)));
    }

    #[test]
    fn machines_qemu_cannot_be_given_safely_are_refused() {
        let (good, _) = two_by_two();
        let refused = |change: &dyn Fn(&mut Machine), why: &str| {
            let mut m = good.clone();
            change(&mut m);
            let e = check(&m).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        };
        refused(&|m| m.disks[1].id = "../x".into(), "device id");
        refused(&|m| m.disks[1].id = "a".repeat(17), "device id");
        refused(&|m| m.nics[1].id = "disk0".into(), "taken");
        refused(&|m| m.disks[1].id = "seed0".into(), "taken");
        refused(&|m| m.disks[1].id = "image1".into(), "taken");
        refused(&|m| m.disks[0].format = DiskFormat::Raw, "qcow2");
        refused(&|m| m.disks[1].boot = true, "boot disk");
        refused(&|m| m.nics[1].mac = m.nics[0].mac, "MAC");
    }
}
