//! Live migration of real guests: an idle 256 MiB tiny guest moved back and
//! forth between hosts in their own network namespaces, over a shared
//! datastore (h1 <-> h2) and with its disk copied live (h1 <-> h3). For each
//! transfer: the pause the guest saw (QMP `STOP` on the source to `RESUME`
//! on the target), QEMU's own downtime figure and transfer time (the
//! baseline: QEMU alone), and kumo's total from the API call to the VM
//! record naming the target. Then a host running several guests is drained.

use super::{fmt, pct};
use anyhow::{bail, Context, Result};
use kumo_api::{HostState, MigrateVm, MigrationOutcome, VmState};
use kumo_client::Client;
use kumo_testkit::{tiny_image, vm_request, wait_until, RealCloud, GUEST_READY};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(180);

pub async fn run(runs: usize, drain_vms: usize) -> Result<()> {
    let image = tiny_image()?;
    let mut cloud = RealCloud::start().await?;
    cloud.zone("z1").await?;
    let ds = cloud.dir.path().join("datastore");
    let shared = vec![
        "--shared-datastore".to_string(),
        format!("ds1={}", ds.display()),
    ];
    cloud.host_with_args("h1", "z1", &shared).await?;
    cloud.host_with_args("h2", "z1", &shared).await?;
    cloud.host("h3", "z1").await?;
    let c = cloud.client.clone();
    c.image_import("tiny", &image).await?;

    place_on(&c, "h1", &["bench".to_string()]).await?;
    cloud.wait_console("bench", GUEST_READY, BOOT).await?;

    println!("idle 256 MiB guest, {runs} migrations per storage kind:");
    println!("storage | guest paused | QEMU downtime | QEMU transfer | kumo total");
    for (label, other) in [("shared", "h2"), ("local", "h3")] {
        let mut paused = Vec::new();
        let mut qemu = Vec::new();
        let mut transfer = Vec::new();
        let mut total = Vec::new();
        for i in 0..runs {
            let to = if i % 2 == 0 { other } else { "h1" };
            let t0 = Instant::now();
            c.vm_migrate(
                "bench",
                &MigrateVm {
                    to: Some(to.into()),
                    downtime_limit_ms: None,
                },
            )
            .await?;
            // Ended how it may: a failure stops the benchmark, saying why,
            // and so does a migration that does not end, with what every
            // side sees of it.
            let vm = cloud
                .migration_ended("bench", Duration::from_secs(120))
                .await?;
            let last = vm.last_migration.as_ref().context("last migration")?;
            if last.outcome != MigrationOutcome::Completed {
                bail!(
                    "migration {i} to {to} ended {:?}: {}\n{}",
                    last.outcome,
                    last.message.as_deref().unwrap_or("no reason given"),
                    cloud.migration_diagnosis("bench").await
                );
            }
            total.push(t0.elapsed());
            let vm = wait_until(Duration::from_secs(20), "the downtime measured", || async {
                c.vm("bench").await.ok().filter(|v| {
                    v.last_migration
                        .as_ref()
                        .is_some_and(|l| l.downtime_ms.is_some())
                })
            })
            .await?;
            let last = vm.last_migration.context("last migration")?;
            let d = Duration::from_secs_f64(last.downtime_ms.unwrap_or_default() / 1000.0);
            let q = Duration::from_millis(last.qemu_downtime_ms.unwrap_or_default());
            let x = Duration::from_millis(last.transfer_ms.unwrap_or_default());
            println!(
                "{label:<7} | {:>12} | {:>13} | {:>13} | {:>10}",
                fmt(d),
                fmt(q),
                fmt(x),
                fmt(*total.last().expect("pushed"))
            );
            paused.push(d);
            qemu.push(q);
            transfer.push(x);
            wait_vm_running(&c).await?;
        }
        let range = |v: &[Duration]| {
            format!(
                "median {} (min {}, max {})",
                fmt(pct(v, 0.5)),
                fmt(pct(v, 0.0)),
                fmt(pct(v, 1.0))
            )
        };
        println!("{label} storage:");
        println!("  guest paused     {} (target <= 50 ms)", range(&paused));
        println!("  QEMU downtime    {}", range(&qemu));
        println!("  QEMU transfer    {}", range(&transfer));
        println!("  kumo total       {}", range(&total));
        let (t, x) = (pct(&total, 0.5), pct(&transfer, 0.5));
        println!(
            "  kumo total / QEMU transfer: {:.2}x ({} of control plane)",
            t.as_secs_f64() / x.as_secs_f64().max(1e-9),
            fmt(t.saturating_sub(x))
        );
    }
    c.vm_delete("bench").await?;
    wait_until(Duration::from_secs(60), "the VM deleted", || async {
        c.vm("bench").await.is_err().then_some(())
    })
    .await?;

    // Drain: guests on h3 (local disks), moved to h1 and h2.
    let names: Vec<String> = (0..drain_vms).map(|i| format!("d{i}")).collect();
    place_on(&c, "h3", &names).await?;
    for i in 0..drain_vms {
        cloud
            .wait_console(&format!("d{i}"), GUEST_READY, BOOT)
            .await?;
    }
    let t0 = Instant::now();
    c.host_drain("h3", false).await?;
    wait_until(Duration::from_secs(600), "h3 in maintenance", || async {
        c.host("h3")
            .await
            .ok()
            .filter(|h| h.state == HostState::Maintenance)
    })
    .await?;
    let took = t0.elapsed();
    let vms = c.vms().await?;
    let moved = vms.iter().filter(|v| v.host != "h3").count();
    println!(
        "drain of a host running {drain_vms} idle 256 MiB guests (local disks, 4 at a time): {} for {moved} VMs moved",
        fmt(took)
    );
    Ok(())
}

/// Create VMs on `host` (the others disabled meanwhile), free to move later.
async fn place_on(c: &Client, host: &str, names: &[String]) -> Result<()> {
    let others: Vec<String> = c
        .hosts()
        .await?
        .into_iter()
        .map(|h| h.name)
        .filter(|h| h != host)
        .collect();
    for h in &others {
        c.host_enable(h, false).await?;
    }
    for name in names {
        c.vm_create(&vm_request(name, "tiny")).await?;
    }
    for h in &others {
        c.host_enable(h, true).await?;
    }
    Ok(())
}

async fn wait_vm_running(c: &Client) -> Result<()> {
    wait_until(Duration::from_secs(30), "the VM running", || async {
        c.vm("bench")
            .await
            .ok()
            .filter(|v| v.state == VmState::Running)
    })
    .await?;
    Ok(())
}
