//! Real guests: one detached QEMU process per VM (own session, pidfile, QMP
//! and serial sockets in the VM's directory), so guests outlive the agent
//! and a restarted agent re-attaches over QMP.
//!
//! A VM's directory `<data-dir>/vms/<id>/` holds `disk.qcow2` (a
//! copy-on-write overlay of the cached image; it survives stop and start),
//! `seed.iso` (a NoCloud seed carrying the VM's name as its hostname),
//! `qemu.pid`, `qmp.sock`, `console.sock` and `console.log`. On a host with
//! a shared datastore the disk is `<datastore>/disks/<id>.qcow2` instead
//! (and the image cache `<datastore>/images/`), so every host mounting the
//! datastore opens the same disk through the same path; `disk-id` in the
//! VM's directory then notes which file that is.

use super::{images, Accel};
use crate::{metrics, Shared};
use anyhow::{bail, Context};
use kumo_api::{HypervisorInfo, ImageFormat, VmSpec};
use kumo_qmp::Qmp;
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use uuid::Uuid;

const BINARY: &str = "qemu-system-x86_64";
/// In a VM's directory, which file its disk on a shared datastore is
/// (see [`file_id`]), as this host set it up.
const DISK_ID: &str = "disk-id";
/// Longest path a unix socket may have (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

pub struct Qemu {
    version: String,
    accel: &'static str,
    vms_dir: PathBuf,
    datastore: Option<PathBuf>,
}

impl Qemu {
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

    pub fn guest(&self, id: Uuid) -> QemuGuest {
        let dir = self.vms_dir.join(id.to_string());
        let local = dir.join("disk.qcow2");
        // A guest created before the host had its datastore keeps its disk.
        let shared = self.datastore.as_ref().filter(|_| !local.exists());
        QemuGuest {
            disk: match shared {
                Some(ds) => ds.join("disks").join(format!("{id}.qcow2")),
                None => local,
            },
            shared_disk: shared.is_some(),
            dir,
            accel: self.accel,
            qmp: None,
            events: None,
            pid: None,
            cpu_sample: None,
            pinned: None,
        }
    }

    pub fn guests_on_disk(&self) -> Vec<Uuid> {
        std::fs::read_dir(&self.vms_dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn console_paths(&self, id: Uuid) -> (PathBuf, PathBuf) {
        let dir = self.vms_dir.join(id.to_string());
        (dir.join("console.log"), dir.join("console.sock"))
    }
}

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

/// Whether a guest really runs under KVM here: `/dev/kvm` existing is not
/// enough (some hosts fail at the first instruction with "KVM internal
/// error"), so boot an empty machine under KVM and see whether it keeps
/// running.
async fn kvm_works(data_dir: &Path) -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let sock = data_dir.join("kvm-probe.sock");
    let _ = std::fs::remove_file(&sock);
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
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else { return false };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let works = match Qmp::connect(&sock).await {
        Ok(qmp) => qmp.query_status().await.is_ok_and(|s| s.running),
        Err(_) => false,
    };
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&sock);
    tracing::info!(works, "KVM probe");
    works
}

pub struct QemuGuest {
    pub(super) dir: PathBuf,
    /// The guest's disk: in `dir`, or on the shared datastore.
    pub(super) disk: PathBuf,
    shared_disk: bool,
    accel: &'static str,
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

    pub async fn is_running(&mut self) -> bool {
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

    pub async fn start(&mut self, shared: &Shared, spec: &VmSpec) -> anyhow::Result<()> {
        let image = self.prepare(shared, spec, DiskSetup::Keep).await?;
        self.launch(spec, &image, Launch::Run).await
    }

    /// Start QEMU with the guest's vCPUs stopped before they ever ran: a
    /// stopped VM's QEMU, only to send the guest to another host.
    pub async fn start_paused(&mut self, shared: &Shared, spec: &VmSpec) -> anyhow::Result<()> {
        let image = self.prepare(shared, spec, DiskSetup::Keep).await?;
        self.launch(spec, &image, Launch::Paused).await
    }

    /// Everything QEMU needs before it starts: the directory, the image in
    /// the cache (its path is returned), the disk (as `setup` says) and the
    /// seed.
    pub(super) async fn prepare(
        &self,
        shared: &Shared,
        spec: &VmSpec,
        setup: DiskSetup,
    ) -> anyhow::Result<PathBuf> {
        kumo_private_fs::create_dir(&self.dir)?;
        if self.path("console.sock").as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "data dir path too long for unix sockets: {}",
                self.dir.display()
            );
        }
        let image = images::ensure(shared, &spec.image).await?;
        match setup {
            DiskSetup::Existing if !self.disk.exists() => {
                bail!("the shared disk {} is missing", self.disk.display())
            }
            DiskSetup::Existing => {}
            DiskSetup::Fresh | DiskSetup::Keep => {
                if setup == DiskSetup::Fresh {
                    let _ = tokio::fs::remove_file(&self.disk).await;
                }
                if !self.disk.exists() {
                    let tmp = self.disk.with_extension("qcow2.tmp");
                    // `-F`: the base's format as imported, never probed.
                    run(tokio::process::Command::new("qemu-img")
                        .args([
                            "create",
                            "-q",
                            "-f",
                            "qcow2",
                            "-F",
                            spec.image.format.as_str(),
                            "-b",
                        ])
                        .arg(&image)
                        .arg(&tmp)
                        .arg(format!("{}G", spec.size.disk_gib)))
                    .await
                    .context("creating the disk overlay")?;
                    tokio::fs::rename(&tmp, &self.disk).await?;
                }
            }
        }
        if self.shared_disk {
            self.note_disk()?;
        }
        self.write_seed(spec).await?;
        Ok(image)
    }

    /// Note which file the shared disk is (see [`QemuGuest::remove`]).
    fn note_disk(&self) -> anyhow::Result<()> {
        let id = file_id(&self.disk)
            .with_context(|| format!("the disk {} is gone", self.disk.display()))?;
        Ok(kumo_private_fs::write_file(
            &self.path(DISK_ID),
            id.as_bytes(),
        )?)
    }

    /// Whether the shared disk's path still names the file this host set
    /// up. A guest set up before hosts noted it counts as this host's.
    fn owns_shared_disk(&self) -> bool {
        match std::fs::read_to_string(self.path(DISK_ID)) {
            Ok(noted) => file_id(&self.disk).is_some_and(|id| id == noted.trim()),
            Err(_) => true,
        }
    }

    /// Start QEMU, detached, on the disk over `image`.
    pub(super) async fn launch(
        &mut self,
        spec: &VmSpec,
        image: &Path,
        how: Launch,
    ) -> anyhow::Result<()> {
        for stale in ["qmp.sock", "console.sock", "qemu.pid"] {
            let _ = tokio::fs::remove_file(self.path(stale)).await;
        }
        let machine = MachineSpec {
            name: &spec.name,
            id: spec.id,
            vcpus: spec.size.vcpus,
            memory_mib: spec.size.memory_mib,
            accel: self.accel,
            dir: &self.dir,
            disk: &self.disk,
            image,
            image_format: spec.image.format,
            launch: how,
        };
        run(tokio::process::Command::new(BINARY).args(machine.argv()))
            .await
            .context("starting QEMU")?;
        if !self.is_running().await {
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

    /// Keep the guest's threads on the cores it may use: each vCPU of a
    /// dedicated VM on its own core (`cores`, one per vCPU), every thread of
    /// a shared VM off the cores dedicated to other VMs (`reserved`).
    pub async fn pin(&mut self, cores: &[u32], reserved: &BTreeSet<u32>) -> anyhow::Result<()> {
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

    pub async fn reset(&mut self) -> anyhow::Result<()> {
        Ok(self.qmp()?.system_reset().await?)
    }

    pub async fn shutdown(&mut self, timeout: Duration) -> anyhow::Result<()> {
        // A paused guest (one that migrated away) cannot hear the button.
        if let Ok(qmp) = self.qmp() {
            if qmp.query_status().await.is_ok_and(|s| !s.running) {
                return self.kill().await;
            }
        }
        if let Ok(qmp) = self.qmp() {
            if let Err(e) = qmp.system_powerdown().await {
                tracing::warn!(error = %e, "ACPI power button");
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

    /// Stop hard and remove the guest's state on this host; its disk on a
    /// shared datastore goes too unless `keep_shared_disk` (another host
    /// runs the guest from it now, or may) — and only if the path still
    /// names the file this host set up: a host taking the guest onto the
    /// datastore by copying its disk (a local-storage migration) makes a
    /// new file at the same path, maybe before the host the guest left
    /// there earlier has cleaned up.
    pub async fn remove(&mut self, keep_shared_disk: bool) -> anyhow::Result<()> {
        self.kill().await?;
        if self.shared_disk && !keep_shared_disk && self.owns_shared_disk() {
            remove_if_present(tokio::fs::remove_file(&self.disk).await)?;
        }
        remove_if_present(tokio::fs::remove_dir_all(&self.dir).await)
    }

    pub fn saved_reboots(&self) -> Option<u64> {
        std::fs::read_to_string(self.path("reboots"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn save_reboots(&self, n: u64) {
        let saved = kumo_private_fs::create_dir(&self.dir).and_then(|()| {
            kumo_private_fs::write_file(&self.path("reboots"), n.to_string().as_bytes())
        });
        if let Err(e) = saved {
            tracing::warn!(dir = %self.dir.display(), error = %e, "saving the reboot count");
        }
    }

    /// CPU use of the guest since the last call, percent of one CPU.
    pub fn cpu_percent(&mut self) -> Option<f32> {
        let ticks = metrics::process_ticks(self.pid?)?;
        let now = Instant::now();
        let last = self.cpu_sample.replace((ticks, now));
        let (t0, i0) = last?;
        let secs = now.duration_since(i0).as_secs_f32();
        (secs > 0.0)
            .then(|| 100.0 * ticks.saturating_sub(t0) as f32 / metrics::TICKS_PER_SECOND / secs)
    }
}

/// Everything QEMU's command line is built from ([`MachineSpec::argv`]
/// is a pure function of it, so tests can see what QEMU is told).
#[derive(Clone, Debug)]
pub struct MachineSpec<'a> {
    /// The VM's name (names are checked: no commas).
    pub name: &'a str,
    pub id: Uuid,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// `kvm` or `tcg`.
    pub accel: &'a str,
    /// The VM's directory: QMP and console sockets, console log, pidfile
    /// and `seed.iso`.
    pub dir: &'a Path,
    /// The guest's disk: a qcow2 overlay of `image`.
    pub disk: &'a Path,
    /// The base image in the host's cache, and the format it was imported
    /// (and inspected) as.
    pub image: &'a Path,
    pub image_format: ImageFormat,
    pub launch: Launch,
}

impl MachineSpec<'_> {
    /// QEMU's arguments.
    ///
    /// The disks are block graphs spelled out node by node, so nothing in
    /// an image file decides what QEMU opens (an image is untrusted input,
    /// see docs/images.md): every node names its driver (no format
    /// probing) and its `file` node; the base image is a read-only node of
    /// the format it was imported as, with `backing: null` where the
    /// format has a backing at all; the guest's overlay takes that node as
    /// its backing instead of the file named in its header. The overlay's
    /// node is `disk0`: migration mirrors and exports it by that name.
    /// (`-blockdev` in JSON: `null` has no `key=value` spelling, and JSON
    /// strings need no escaping of commas in paths.)
    pub fn argv(&self) -> Vec<String> {
        let dir = self.dir;
        let blockdev = |node: Value| ["-blockdev".to_string(), node.to_string()];
        let mut image = json!({
            "driver": self.image_format.as_str(), "file": "image0-file",
            "node-name": "image0", "read-only": true,
        });
        if self.image_format == ImageFormat::Qcow2 {
            image["backing"] = Value::Null;
        }
        let mut argv: Vec<String> = [
            "-name".to_string(),
            format!("guest={},debug-threads=on", self.name),
            "-uuid".into(),
            self.id.to_string(),
            "-machine".into(),
            format!("pc,accel={}", self.accel),
            "-cpu".into(),
            if self.accel == "kvm" { "host" } else { "max" }.into(),
            "-smp".into(),
            self.vcpus.to_string(),
            "-m".into(),
            self.memory_mib.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-chardev".into(),
            format!(
                "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
                option_path(&dir.join("console.sock")),
                option_path(&dir.join("console.log")),
            ),
            "-serial".into(),
            "chardev:serial0".into(),
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                option_path(&dir.join("qmp.sock"))
            ),
        ]
        .into();
        argv.extend(blockdev(json!({
            "driver": "file", "filename": self.image.to_string_lossy(), "node-name": "image0-file", "read-only": true,
        })));
        argv.extend(blockdev(image));
        argv.extend(blockdev(json!({
            "driver": "file", "filename": self.disk.to_string_lossy(), "node-name": "disk0-file", "discard": "unmap",
        })));
        argv.extend(blockdev(json!({
            "driver": "qcow2", "file": "disk0-file", "backing": "image0",
            "node-name": "disk0", "discard": "unmap",
        })));
        argv.extend(["-device".into(), "virtio-blk-pci,drive=disk0".into()]);
        argv.extend(blockdev(json!({
            "driver": "file", "filename": dir.join("seed.iso").to_string_lossy(), "node-name": "seed0-file", "read-only": true,
        })));
        argv.extend(blockdev(json!({
            "driver": "raw", "file": "seed0-file", "node-name": "seed0", "read-only": true,
        })));
        argv.extend(["-device".into(), "virtio-blk-pci,drive=seed0".into()]);
        argv.extend(["-nic".into(), "user,model=virtio-net-pci".into()]);
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

    fn spec(image_format: ImageFormat, launch: Launch) -> MachineSpec<'static> {
        MachineSpec {
            name: "web",
            id: Uuid::nil(),
            vcpus: 2,
            memory_mib: 256,
            accel: "tcg",
            dir: Path::new("/var/lib/kumo/vms/x"),
            disk: Path::new("/var/lib/kumo/vms/x/disk.qcow2"),
            image: Path::new("/var/lib/kumo/images/abc"),
            image_format,
            launch,
        }
    }

    /// The `-blockdev` nodes of `argv`, by node name.
    fn blockdevs(argv: &[String]) -> std::collections::BTreeMap<String, Value> {
        argv.windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| {
                let node: Value = serde_json::from_str(&w[1]).unwrap();
                (node["node-name"].as_str().unwrap().to_string(), node)
            })
            .collect()
    }

    #[test]
    fn the_base_image_is_an_explicit_node_without_backing() {
        let nodes = blockdevs(&spec(ImageFormat::Qcow2, Launch::Run).argv());
        assert_eq!(
            nodes["image0-file"],
            json!({"driver": "file", "filename": "/var/lib/kumo/images/abc",
                   "node-name": "image0-file", "read-only": true})
        );
        assert_eq!(
            nodes["image0"],
            json!({"driver": "qcow2", "file": "image0-file", "node-name": "image0",
                   "read-only": true, "backing": null})
        );
        // The guest's disk: the overlay over that node, not over the file
        // its header names; `disk0` is what migration mirrors and exports.
        assert_eq!(
            nodes["disk0"],
            json!({"driver": "qcow2", "file": "disk0-file", "backing": "image0",
                   "node-name": "disk0", "discard": "unmap"})
        );
        assert_eq!(
            nodes["disk0-file"]["filename"],
            "/var/lib/kumo/vms/x/disk.qcow2"
        );
        // Every format node names its driver and its file: nothing probed.
        for node in nodes.values() {
            assert!(node["driver"].is_string(), "{node}");
            if node["driver"] != "file" {
                assert!(node["file"].is_string(), "{node}");
            }
        }
    }

    #[test]
    fn a_raw_base_is_opened_as_raw() {
        let argv = spec(ImageFormat::Raw, Launch::Run).argv();
        let nodes = blockdevs(&argv);
        // raw has no backing to turn off (QEMU refuses the option there).
        assert_eq!(
            nodes["image0"],
            json!({"driver": "raw", "file": "image0-file", "node-name": "image0",
                   "read-only": true})
        );
        assert_eq!(nodes["disk0"]["backing"], "image0");
        assert!(argv
            .windows(2)
            .any(|w| w == ["-device", "virtio-blk-pci,drive=disk0"]));
    }

    #[test]
    fn how_qemu_starts() {
        let argv = |launch| spec(ImageFormat::Qcow2, launch).argv();
        assert!(argv(Launch::Run).ends_with(&[
            "-daemonize".to_string(),
            "-pidfile".into(),
            "/var/lib/kumo/vms/x/qemu.pid".into()
        ]));
        assert!(argv(Launch::Paused).ends_with(&["-S".to_string()]));
        assert!(argv(Launch::Incoming).ends_with(&["-incoming".to_string(), "defer".into()]));
    }

    /// A host giving a guest up removes its disk on the datastore only
    /// while the path still names the file it set up: not the new disk
    /// another host has meanwhile made there for the same guest.
    #[tokio::test]
    async fn a_host_leaving_removes_only_its_own_shared_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let ds = tmp.path().join("ds");
        std::fs::create_dir_all(ds.join("disks")).unwrap();
        let qemu = Qemu {
            version: "test".into(),
            accel: "tcg",
            vms_dir: tmp.path().join("vms"),
            datastore: Some(ds),
        };
        let id = Uuid::from_u128(7);
        let make = |guest: &QemuGuest, content: &str| {
            kumo_private_fs::create_dir(&guest.dir).unwrap();
            std::fs::write(&guest.disk, content).unwrap();
            guest.note_disk().unwrap();
        };
        // Another host took the guest onto the datastore anew (the same
        // path, a new file) before this one cleaned up.
        let mut leaving = qemu.guest(id);
        make(&leaving, "old");
        std::fs::remove_file(&leaving.disk).unwrap();
        std::fs::write(&leaving.disk, "new").unwrap();
        leaving.remove(false).await.unwrap();
        assert_eq!(std::fs::read_to_string(&leaving.disk).unwrap(), "new");
        assert!(!leaving.dir.exists());
        // Its own disk it removes.
        let mut own = qemu.guest(id);
        make(&own, "mine");
        own.remove(false).await.unwrap();
        assert!(!own.disk.exists());
        // Unless told to keep it (another host runs the guest from it).
        let mut shared = qemu.guest(id);
        make(&shared, "shared");
        shared.remove(true).await.unwrap();
        assert!(shared.disk.exists());
    }

    #[test]
    fn a_comma_in_a_path_cannot_add_options() {
        let argv = MachineSpec {
            dir: Path::new("/srv/a,b"),
            disk: Path::new("/srv/a,b/disk.qcow2"),
            ..spec(ImageFormat::Qcow2, Launch::Run)
        }
        .argv();
        assert!(argv.contains(&"unix:/srv/a,,b/qmp.sock,server=on,wait=off".to_string()));
        assert_eq!(
            blockdevs(&argv)["disk0-file"]["filename"],
            "/srv/a,b/disk.qcow2"
        );
    }
}
