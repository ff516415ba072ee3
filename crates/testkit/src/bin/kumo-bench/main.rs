//! kumo-bench: measure kumo's promises and print the figures (never asserts
//! on timings); the numbers go into `docs/SPEC.md`.
//!
//! * `api-list`: `GET /v1/vms` latency with many (simulated) VMs, against
//!   `GET /v1/zones` as the bare HTTP round trip.
//! * `boot`: real QEMU guests (TCG) created through the API: how long from
//!   `POST /v1/vms` to a running QEMU and to its first serial output, against
//!   launching the same QEMU command line directly.
//! * `sched`: the scheduler alone: placements per second and decision
//!   latency, and packing quality on a churn stream against first-fit and
//!   best-fit.
//! * `migrate`: live migration of an idle real guest, over a shared
//!   datastore and with its disk copied: the pause the guest saw and the
//!   total time, against QEMU's own figures for the same transfers; and the
//!   drain of a host running several guests.
//! * `rebalance`: the rebalancing planner on a large cluster with skewed
//!   load against the naive baseline (planning time, imbalance, overloaded
//!   hosts, moves), and power-saving consolidation on a quiet one.

mod migrate;
mod rebalance;
mod sched;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kumo_api::{VmList, VmListQuery, VmState, Zone};
use kumo_testkit::{blank_image, tiny_image, vm_request, wait_until, RealCloud, SimCloud};
use serde::de::DeserializeOwned;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Measure kumo's promises (figures for docs/SPEC.md)")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// GET /v1/vms latency with many simulated VMs.
    ApiList {
        /// Simulated hosts, all in this process.
        #[arg(long, default_value_t = 10)]
        hosts: usize,
        #[arg(long, default_value_t = 10_000)]
        vms: usize,
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Heartbeat interval of each simulated host.
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
    },
    /// Time from POST /v1/vms to a running QEMU and its first serial output.
    /// Needs `kumod` and `kumo-agent` built in the same profile as this binary.
    Boot {
        #[arg(long, default_value_t = 10)]
        vms: usize,
    },
    /// Placement throughput and latency, and packing quality.
    Sched {
        /// Cluster sizes to time placement on.
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        hosts: Vec<usize>,
        /// Fill the cluster's memory to this share while timing.
        #[arg(long, default_value_t = 0.9)]
        fill: f64,
        /// Arrivals and departures in the churn stream.
        #[arg(long, default_value_t = 100_000)]
        events: usize,
        /// Seed of the churn stream.
        #[arg(long, default_value_t = 11)]
        seed: u64,
    },
    /// Live migration downtime and total time (shared and local disk), and
    /// a host drain. Needs root, `kumod` and `kumo-agent` built alongside.
    Migrate {
        /// Migrations per storage kind.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Guests on the host that is drained.
        #[arg(long, default_value_t = 8)]
        drain_vms: usize,
    },
    /// Rebalancing against the naive baseline, and consolidation.
    Rebalance {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, default_value_t = 20_000)]
        vms: usize,
        /// Seed of the VM shapes and the load.
        #[arg(long, default_value_t = 11)]
        seed: u64,
        /// Moves per plan for the comparison (generous: the whole job at once).
        #[arg(long, default_value_t = 500)]
        max_moves: usize,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().bench {
        Bench::ApiList {
            hosts,
            vms,
            requests,
            heartbeat_ms,
        } => api_list(hosts, vms, requests, Duration::from_millis(heartbeat_ms)).await,
        Bench::Boot { vms } => boot(vms).await,
        Bench::Sched {
            hosts,
            fill,
            events,
            seed,
        } => {
            println!(
                "placement, one core, filling {:.0}% of the memory:",
                fill * 100.0
            );
            for n in hosts {
                sched::throughput(n, fill);
            }
            println!("packing on a churn stream of {events} events:");
            sched::packing(events, seed);
            Ok(())
        }
        Bench::Migrate { runs, drain_vms } => migrate::run(runs, drain_vms).await,
        Bench::Rebalance {
            hosts,
            vms,
            seed,
            max_moves,
        } => {
            rebalance::rebalance(hosts, vms, seed, max_moves);
            rebalance::consolidation(hosts, vms, seed);
            Ok(())
        }
    }
}

/// Parallel `POST /v1/vms` calls while filling the cloud.
const CREATORS: usize = 16;

async fn api_list(hosts: usize, vms: usize, requests: usize, heartbeat: Duration) -> Result<()> {
    let mut cloud = SimCloud::start(heartbeat * 30).await?;
    cloud.zone("z1").await?;
    // Room for every 1 vCPU / 256 MiB / 1 GiB VM, with 10% to spare.
    let per_host = (vms.div_ceil(hosts) as u64 * 11 / 10).max(1);
    let capacity = kumo_agent::CapacityOverride {
        vcpus: Some(u32::try_from(per_host)?),
        memory_mib: Some(per_host * 256),
        disk_gib: Some(per_host),
    };
    let start = Instant::now();
    cloud
        .sim_hosts("h", "z1", hosts, heartbeat, Some(capacity))
        .await?;
    println!(
        "{hosts} hosts joined in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let c = cloud.client.clone();
    c.image_import("blank", &blank_image(cloud.dir.path()))
        .await?;

    let start = Instant::now();
    let mut creators = tokio::task::JoinSet::new();
    for k in 0..CREATORS {
        let c = c.clone();
        creators.spawn(async move {
            for i in (k..vms).step_by(CREATORS) {
                c.vm_create(&vm_request(&format!("vm{i}"), "blank")).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = creators.join_next().await {
        done??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "created {vms} VMs in {secs:.1} s ({:.0} creates/s, {CREATORS} in parallel)",
        vms as f64 / secs
    );
    wait_until(Duration::from_secs(600), "every VM running", || async {
        let list = c.vms().await.ok()?;
        (list.iter().filter(|v| v.state == VmState::Running).count() == vms).then_some(())
    })
    .await?;
    println!("all running after {:.1} s", start.elapsed().as_secs_f64());

    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("{}{path}", cloud.server.url()))
            .bearer_auth(&cloud.server.admin_token)
    };
    let zones = time_gets::<Vec<Zone>>(get("/v1/zones"), requests).await?;
    let list = time_gets::<VmList>(get("/v1/vms"), requests).await?;
    let page = time_gets::<VmList>(get("/v1/vms?limit=500"), requests).await?;
    // A whole walk in pages of 500, as a client that pages would do it.
    let mut walks = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t0 = Instant::now();
        let mut q = VmListQuery {
            limit: Some(500),
            ..Default::default()
        };
        let mut seen = 0;
        loop {
            let page = c.vm_page(&q).await?;
            seen += page.items.len();
            match page.next {
                Some(next) => q.page_token = Some(next),
                None => break,
            }
        }
        walks.push(t0.elapsed());
        if seen != vms {
            bail!("a paged walk saw {seen} VMs of {vms}");
        }
    }
    println!("GET /v1/zones x{requests}: {}", summary(&zones.total));
    println!(
        "GET /v1/vms   x{requests}: {} ({vms} VMs, {} KiB body)",
        summary(&list.total),
        list.body_bytes / 1024
    );
    println!("  of which until the headers: {}", summary(&list.headers));
    println!(
        "GET /v1/vms?limit=500 x{requests}: {} (target: p99 < 20 ms)",
        summary(&page.total)
    );
    println!(
        "paged walk of every VM, pages of 500, x{requests}: {} (target: p50 within 2x the unpaged list's)",
        summary(&walks)
    );
    println!(
        "ratio walk/unpaged: p50 {:.2}x, p99 {:.2}x",
        ms(pct(&walks, 0.5)) / ms(pct(&list.total, 0.5)),
        ms(pct(&walks, 0.99)) / ms(pct(&list.total, 0.99)),
    );
    println!(
        "ratio vms/zones: p50 {:.0}x, p99 {:.0}x (target: p99 < 50 ms at 10,000 VMs)",
        ms(pct(&list.total, 0.5)) / ms(pct(&zones.total, 0.5)),
        ms(pct(&list.total, 0.99)) / ms(pct(&zones.total, 0.99)),
    );
    Ok(())
}

/// `n` sequential sends of a request, each reading and parsing the whole body.
struct Gets {
    /// Until the response headers: the server's work (axum sends JSON
    /// headers once the body is serialized) and the round trip.
    headers: Vec<Duration>,
    /// Until the body is downloaded and parsed.
    total: Vec<Duration>,
    body_bytes: usize,
}

async fn time_gets<T: DeserializeOwned>(req: reqwest::RequestBuilder, n: usize) -> Result<Gets> {
    let mut gets = Gets {
        headers: Vec::with_capacity(n),
        total: Vec::with_capacity(n),
        body_bytes: 0,
    };
    for _ in 0..n {
        let t0 = Instant::now();
        let resp = req
            .try_clone()
            .context("request")?
            .send()
            .await?
            .error_for_status()?;
        gets.headers.push(t0.elapsed());
        let body = resp.bytes().await?;
        serde_json::from_slice::<T>(&body)?;
        gets.total.push(t0.elapsed());
        gets.body_bytes = body.len();
    }
    Ok(gets)
}

/// Times from launching a guest (`POST /v1/vms`, or spawning QEMU directly).
struct Launch {
    /// Until its pidfile names a live QEMU.
    running: Duration,
    /// Until its serial console log is not empty.
    first_output: Duration,
}

/// One VM through kumo and one QEMU started directly, back to back.
struct Run {
    accepted: Duration,
    kumo: Launch,
    /// Making the overlay and seed, before the direct QEMU's clock starts.
    prepared: Duration,
    direct: Launch,
}

/// One figure of a run, for the medians.
type Figure = fn(&Run) -> Duration;

async fn boot(vms: usize) -> Result<()> {
    let image = tiny_image()?;
    let mut cloud = RealCloud::start().await?;
    cloud.zone("z1").await?;
    cloud.host("h1", "z1").await?;
    let c = cloud.client.clone();
    c.image_import("tiny", &image).await?;

    println!("vm  | accepted -> QEMU -> serial | direct: overlay+seed, QEMU, serial | overhead");
    let mut runs = Vec::new();
    // One guest at a time (a real host offers as many vCPUs as the machine
    // has, 2 here), so both launches see the same idle machine.
    for i in 0..vms {
        let (prepared, direct) =
            launch_direct(&image, &cloud.dir.path().join(format!("direct/{i}"))).await?;
        let name = format!("bench{i}");
        let t0 = Instant::now();
        let vm = c.vm_create(&vm_request(&name, "tiny")).await?;
        let accepted = t0.elapsed();
        let vm_dir = cloud.dir.path().join(format!("host-h1/vms/{}", vm.id));
        let kumo = watch(&vm_dir, t0).await?;
        let run = Run {
            accepted,
            kumo,
            prepared,
            direct,
        };
        println!(
            "{i:<3} | {} {} {} | {} {} {} | {}",
            fmt(run.accepted),
            fmt(run.kumo.running - run.accepted),
            fmt(run.kumo.first_output - run.accepted),
            fmt(run.prepared),
            fmt(run.direct.running),
            fmt(run.direct.first_output),
            fmt_signed(run.kumo.running, run.direct.running),
        );
        wait_booted(&vm_dir.join("console.log")).await?;
        c.vm_delete(&name).await?;
        wait_until(Duration::from_secs(60), "the VM deleted", || async {
            c.vm(&name).await.is_err().then_some(())
        })
        .await?;
        runs.push(run);
    }

    let median =
        |figure: fn(&Run) -> Duration| pct(&runs.iter().map(figure).collect::<Vec<_>>(), 0.5);
    println!("median over {vms} VMs:");
    let figures: [(&str, Figure); 7] = [
        ("POST /v1/vms accepted", |r| r.accepted),
        ("accepted -> QEMU running", |r| r.kumo.running - r.accepted),
        ("accepted -> first serial output", |r| {
            r.kumo.first_output - r.accepted
        }),
        ("POST -> QEMU running", |r| r.kumo.running),
        ("direct: overlay + seed (untimed)", |r| r.prepared),
        ("direct: spawn -> QEMU running", |r| r.direct.running),
        ("direct: spawn -> first serial output", |r| {
            r.direct.first_output
        }),
    ];
    for (label, figure) in figures {
        println!("  {label:<38} {}", fmt(median(figure)));
    }
    let overhead = fmt_signed(median(|r| r.kumo.running), median(|r| r.direct.running));
    println!(
        "  {:<38} {overhead} (target < 100 ms)",
        "control-plane overhead"
    );
    Ok(())
}

/// Start QEMU the way the agent does (the agent's own command line,
/// [`kumo_agent::MachineSpec`]) on a fresh overlay and seed, time it, and
/// kill it. Also returns how long making the overlay and seed took.
async fn launch_direct(image: &Path, dir: &Path) -> Result<(Duration, Launch)> {
    std::fs::create_dir_all(dir)?;
    let path = |name: &str| dir.join(name).display().to_string();
    let t_prepare = Instant::now();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(image)
        .arg(path("disk.qcow2")))?;
    std::fs::write(
        dir.join("meta-data"),
        "instance-id: direct\nlocal-hostname: direct\n",
    )?;
    std::fs::write(dir.join("user-data"), "#cloud-config\n")?;
    run(Command::new("genisoimage")
        .args([
            "-quiet",
            "-output",
            &path("seed.iso"),
            "-volid",
            "cidata",
            "-joliet",
            "-rock",
        ])
        .args([path("meta-data"), path("user-data")]))?;
    let prepared = t_prepare.elapsed();
    let format = kumo_api::ImageFormat::Qcow2;
    let size = kumo_api::Resources {
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
    };
    let image_ref = kumo_api::ImageRef {
        id: uuid::Uuid::nil(),
        sha256: String::new(),
        format,
        size_bytes: 0,
    };
    let machine = kumo_api::Machine::single_disk(uuid::Uuid::nil(), size, image_ref, vec![]);
    let disks = [kumo_agent::DiskFiles {
        file: dir.join("disk.qcow2"),
        base: Some((image.to_path_buf(), format)),
    }];
    let argv = kumo_agent::MachineSpec {
        name: "direct",
        id: uuid::Uuid::nil(),
        machine: &machine,
        accel: "tcg",
        dir,
        disks: &disks,
        launch: kumo_agent::Launch::Run,
    }
    .argv();
    let t0 = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64").args(argv).spawn()?;
    let launch = watch(dir, t0).await;
    let _ = qemu.wait();
    if let Some(pid) = kumo_agent::qemu_pid(dir) {
        use nix::sys::signal::{kill, Signal};
        kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL)?;
    }
    Ok((prepared, launch?))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Poll every 5 ms: time since `t0` until the QEMU of `dir` runs (its
/// pidfile names a live process) and until its console log is not empty.
async fn watch(dir: &Path, t0: Instant) -> Result<Launch> {
    let (mut running, mut first_output) = (None, None);
    loop {
        if running.is_none() && kumo_agent::qemu_pid(dir).is_some() {
            running = Some(t0.elapsed());
        }
        if first_output.is_none()
            && std::fs::metadata(dir.join("console.log")).is_ok_and(|m| m.len() > 0)
        {
            first_output = Some(t0.elapsed());
        }
        if let (Some(running), Some(first_output)) = (running, first_output) {
            return Ok(Launch {
                running,
                first_output,
            });
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!(
                "no running QEMU with console output in {} after 60 s",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait until the guest behind `console_log` has finished booting.
async fn wait_booted(console_log: &Path) -> Result<()> {
    wait_until(Duration::from_secs(90), "the guest to boot", || async {
        std::fs::read_to_string(console_log)
            .ok()
            .filter(|t| t.contains(kumo_testkit::GUEST_READY))
    })
    .await?;
    Ok(())
}

fn pct(times: &[Duration], q: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn fmt(d: Duration) -> String {
    format!("{:.1} ms", ms(d))
}

fn fmt_signed(a: Duration, b: Duration) -> String {
    format!("{:+.1} ms", ms(a) - ms(b))
}

fn summary(times: &[Duration]) -> String {
    let max = times.iter().max().copied().unwrap_or_default();
    format!(
        "p50 {}  p99 {}  max {}",
        fmt(pct(times, 0.5)),
        fmt(pct(times, 0.99)),
        fmt(max)
    )
}
