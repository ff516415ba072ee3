//! End to end with real QEMU guests (TCG): boot the tiny guest and use its
//! serial console; stop, start, reboot, delete; kill -9 the agent and the
//! controller and find everything as it was.

use kumo_api::{HostState, VmState};
use kumo_testkit::{tiny_image, vm_request, wait_until, wait_vm, RealCloud, GUEST_READY};
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
