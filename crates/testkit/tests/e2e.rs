//! End to end with real QEMU guests (TCG): boot the tiny guest and use its
//! serial console; stop, start, reboot, delete; kill -9 the agent and the
//! controller and find everything as it was.

use kumo_api::{HostState, VmState};
use kumo_testkit::{tiny_image, vm_request, wait_until, wait_vm, RealCloud, GUEST_READY};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(90);
const BANNER: &str = "kumo tiny guest: hostname=";

#[tokio::test(flavor = "multi_thread")]
async fn real_guest_lifecycle_survives_agent_and_controller_crashes() {
    let image = tiny_image().unwrap();
    let mut cloud = RealCloud::start().await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.host("h1", "z1").await.unwrap();
    let c = cloud.client.clone();
    let host = c.host("h1").await.unwrap();
    assert_eq!(host.hypervisor.driver, "qemu");
    assert_eq!(host.hypervisor.accel, "tcg");
    c.image_import("tiny", &image).await.unwrap();

    // Boot: the guest gets its name from the cloud and gives a shell.
    c.vm_create(&vm_request("web", "tiny")).await.unwrap();
    wait_vm(&c, "web", VmState::Running, BOOT).await.unwrap();
    cloud
        .wait_console("web", &format!("{BANNER}web"), BOOT)
        .await
        .unwrap();
    cloud.wait_console("web", GUEST_READY, BOOT).await.unwrap();
    let out = cloud
        .console_run("web", "echo hi-$((40+2))", "hi-42")
        .await
        .unwrap();
    assert!(out.contains("hi-42"));
    let pids = cloud.qemu_pids();
    assert_eq!(pids.len(), 1, "one QEMU for one VM");
    // The guest's directory (QMP and console sockets, console log) is the
    // agent's alone.
    let web = c.vm("web").await.unwrap();
    let dir = cloud
        .dir
        .path()
        .join("host-h1/vms")
        .join(web.id.to_string());
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{}", dir.display());

    // The same through the CLI: the interactive console fed from a pipe.
    let out = cloud
        .cli(&["vm", "console", "web"], "echo cli-$((2*3))\n")
        .await
        .unwrap();
    assert!(out.contains("cli-6"), "{out}");
    let log = cloud
        .cli(&["vm", "console", "web", "--log"], "")
        .await
        .unwrap();
    assert!(
        log.contains("cli-6") && log.contains(&format!("{BANNER}web")),
        "{log}"
    );
    let list: Vec<kumo_api::Vm> =
        serde_json::from_str(&cloud.cli(&["vm", "list", "-o", "json"], "").await.unwrap()).unwrap();
    assert_eq!(list.len(), 1);

    // kill -9 the agent: the guest keeps running; a new agent re-attaches.
    cloud.kill_agent("h1");
    wait_until(Duration::from_secs(15), "h1 down", || async {
        c.host("h1")
            .await
            .ok()
            .filter(|h| h.state == HostState::Down)
    })
    .await
    .unwrap();
    assert_eq!(cloud.qemu_pids(), pids, "the guest outlives its agent");
    cloud.restart_agent("h1").unwrap();
    cloud.wait_host_ready("h1").await.unwrap();
    wait_vm(&c, "web", VmState::Running, BOOT).await.unwrap();
    assert_eq!(cloud.qemu_pids(), pids, "re-attached, not restarted");
    cloud
        .console_run("web", "echo still-$((1+1))", "still-2")
        .await
        .unwrap();

    // kill -9 the controller: hosts and VMs are all there after a restart.
    let hosts_before = c.hosts().await.unwrap();
    let vms_before = c.vms().await.unwrap();
    cloud.kill_controller();
    cloud.start_controller().await.unwrap();
    let c = cloud.client.clone();
    let hosts_after = c.hosts().await.unwrap();
    assert_eq!(hosts_after.len(), hosts_before.len());
    assert_eq!(hosts_after[0].id, hosts_before[0].id);
    let vms_after = c.vms().await.unwrap();
    assert_eq!(vms_after.len(), 1);
    assert_eq!(
        (vms_after[0].id, vms_after[0].host_id),
        (vms_before[0].id, vms_before[0].host_id)
    );
    wait_vm(&c, "web", VmState::Running, BOOT).await.unwrap();
    assert_eq!(cloud.qemu_pids(), pids);

    // Reboot: same QEMU process, the guest boots again.
    let before = cloud.boots("web").await.unwrap();
    c.vm_action("web", "reboot").await.unwrap();
    cloud.wait_boot("web", before, BOOT).await.unwrap();
    wait_vm(&c, "web", VmState::Running, BOOT).await.unwrap();
    assert_eq!(cloud.qemu_pids(), pids);

    // Stop (ACPI shutdown), start, delete.
    c.vm_action("web", "stop").await.unwrap();
    wait_vm(&c, "web", VmState::Stopped, BOOT).await.unwrap();
    assert!(cloud.qemu_pids().is_empty(), "stopped means no QEMU");
    let before = cloud.boots("web").await.unwrap();
    c.vm_action("web", "start").await.unwrap();
    wait_vm(&c, "web", VmState::Running, BOOT).await.unwrap();
    cloud.wait_boot("web", before, BOOT).await.unwrap();
    assert_eq!(cloud.qemu_pids().len(), 1);

    // The guest powers itself off: the VM is stopped, and starts again.
    cloud
        .console_run("web", "poweroff", "poweroff")
        .await
        .unwrap();
    let vm = wait_vm(&c, "web", VmState::Stopped, BOOT).await.unwrap();
    assert_eq!(vm.power, kumo_api::PowerState::Stopped);
    assert!(cloud.qemu_pids().is_empty());
    c.vm_action("web", "start").await.unwrap();
    wait_vm(&c, "web", VmState::Running, BOOT).await.unwrap();

    c.vm_delete("web").await.unwrap();
    wait_until(BOOT, "web deleted", || async { c.vm("web").await.err() })
        .await
        .unwrap();
    assert!(cloud.qemu_pids().is_empty(), "deleted means no QEMU");
}

/// The cores of a thread, from /proc (`Cpus_allowed_list`, e.g. "0" or "0-1").
fn allowed_cpus(pid: i32, tid: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_string()
}

/// Threads of a QEMU process by name (`CPU 0/TCG` are the vCPUs).
fn threads(pid: i32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|e| {
            let tid = e.file_name().to_string_lossy().into_owned();
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            (tid, comm.trim().to_string())
        })
        .collect()
}

/// A dedicated VM's vCPU threads run on its own cores; a shared VM's
/// threads keep off them.
#[tokio::test(flavor = "multi_thread")]
async fn dedicated_vcpus_are_pinned_and_shared_guests_avoid_them() {
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(cores >= 2, "needs two cores");
    let image = tiny_image().unwrap();
    let mut cloud = RealCloud::start().await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.host("h1", "z1").await.unwrap();
    let c = cloud.client.clone();
    c.image_import("tiny", &image).await.unwrap();

    let ded = c
        .vm_create(&kumo_api::CreateVm {
            cpu_policy: Some(kumo_api::CpuPolicy::Dedicated),
            ..vm_request("ded", "tiny")
        })
        .await
        .unwrap();
    assert_eq!(ded.cores.len(), 1);
    let core = ded.cores[0];
    c.vm_create(&vm_request("shared", "tiny")).await.unwrap();
    wait_vm(&c, "ded", VmState::Running, BOOT).await.unwrap();
    wait_vm(&c, "shared", VmState::Running, BOOT).await.unwrap();

    let ded_pid = cloud.vm_qemu_pid("ded").await.unwrap();
    let shared_pid = cloud.vm_qemu_pid("shared").await.unwrap();
    let others: Vec<String> = (0..cores as u32)
        .filter(|c| *c != core)
        .map(|c| c.to_string())
        .collect();
    let expect_shared = if others.len() == 1 {
        others[0].clone()
    } else {
        format!("{}-{}", others[0], others[others.len() - 1])
    };
    wait_until(Duration::from_secs(20), "pinned threads", || async {
        let ded_ok = threads(ded_pid)
            .iter()
            .filter(|(_, name)| name.starts_with("CPU "))
            .all(|(tid, _)| allowed_cpus(ded_pid, tid) == core.to_string());
        let shared_ok = threads(shared_pid)
            .iter()
            .all(|(tid, _)| allowed_cpus(shared_pid, tid) == expect_shared);
        (ded_ok && shared_ok).then_some(())
    })
    .await
    .unwrap();
    // Both guests still work.
    cloud.wait_console("ded", GUEST_READY, BOOT).await.unwrap();
    cloud
        .wait_console("shared", GUEST_READY, BOOT)
        .await
        .unwrap();
}
