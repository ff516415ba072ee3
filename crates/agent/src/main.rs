use clap::Parser;
use kumo_agent::{Accel, CapacityOverride, Config, Datastore, DriverKind};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// kumo-agent: runs the guests of one host.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Controller URL.
    #[arg(long, env = "KUMO_URL", default_value = "http://127.0.0.1:7370")]
    controller: String,
    /// Join token for the first start (`kumo host token create`).
    #[arg(long, env = "KUMO_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Host name in the pool.
    #[arg(long)]
    name: String,
    /// Zone the host is in.
    #[arg(long)]
    zone: String,
    #[arg(long, default_value = "/var/lib/kumo-agent")]
    data_dir: PathBuf,
    /// Address of the agent's endpoint (serial consoles, its status).
    #[arg(long, default_value = "127.0.0.1:7371")]
    listen: SocketAddr,
    /// URL the controller uses to reach the agent (default: from --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// The hypervisor driver: real QEMU guests, or simulated hosts.
    #[arg(long, value_enum, default_value = "qemu")]
    driver: DriverKind,
    /// With `--driver sim`: run this many simulated hosts in this process,
    /// named NAME-1 ... NAME-N, each with its own identity and heartbeats
    /// (no console endpoint; new states arrive with heartbeat answers).
    #[arg(long)]
    sim_hosts: Option<u32>,
    /// The accelerator QEMU guests run under.
    #[arg(long, value_enum, default_value = "auto")]
    accel: Accel,
    /// Report this many CPUs instead of the measured count.
    #[arg(long)]
    cpus: Option<u32>,
    /// Report this much memory (MiB) instead of the measured amount.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Report this much disk (GiB) instead of the free space of --data-dir.
    #[arg(long)]
    disk_gib: Option<u64>,
    /// A label for requirement expressions, KEY=VALUE (repeatable), e.g.
    /// `--label ssd=true` matches `labels.ssd`.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 1.0)]
    heartbeat: f64,
    /// Seconds an ACPI shutdown may take before the guest is stopped hard.
    #[arg(long, default_value_t = 30.0)]
    stop_timeout: f64,
    /// A datastore shared with other hosts, NAME=PATH (e.g.
    /// `nfs1=/mnt/kumo`, mounted at the same path everywhere): disks live
    /// there, and migrations between hosts that share it copy no disk.
    #[arg(long, value_parser = parse_datastore)]
    shared_datastore: Option<Datastore>,
}

fn parse_datastore(s: &str) -> Result<Datastore, String> {
    let (name, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=PATH"))?;
    if name.is_empty() || !path.starts_with('/') {
        return Err(format!(
            "{s:?}: give a name and an absolute path, e.g. nfs1=/mnt/kumo"
        ));
    }
    Ok(Datastore {
        name: name.into(),
        path: path.into(),
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let key_ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !key_ok {
        return Err(format!("label key {k:?}: use letters, digits, '_' and '-'"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if !(v > 0.0 && v <= 3600.0) {
        anyhow::bail!("--{flag}: {v} is out of range: use more than 0 and at most 3600 seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let base = Config {
        controller: a.controller,
        join_token: a.join_token,
        name: a.name,
        zone: a.zone,
        data_dir: a.data_dir,
        listen: Some(a.listen),
        advertise: a.advertise,
        driver: a.driver,
        accel: a.accel,
        capacity: CapacityOverride {
            vcpus: a.cpus,
            memory_mib: a.memory_mib,
            disk_gib: a.disk_gib,
        },
        labels: a.labels.into_iter().collect(),
        heartbeat: seconds("heartbeat", a.heartbeat)?,
        stop_timeout: seconds("stop-timeout", a.stop_timeout)?,
        long_poll: true,
        datastore: a.shared_datastore,
    };
    let mut agents = Vec::new();
    match a.sim_hosts {
        None => agents.push(kumo_agent::start(base).await?),
        Some(n) => {
            if base.driver != DriverKind::Sim || n == 0 || n > 100_000 {
                anyhow::bail!("--sim-hosts: {n} needs --driver sim and 1 to 100000 hosts");
            }
            for i in 1..=n {
                let name = format!("{}-{i}", base.name);
                let config = Config {
                    data_dir: base.data_dir.join(&name),
                    name,
                    listen: None,
                    advertise: None,
                    long_poll: false,
                    ..base.clone()
                };
                agents.push(kumo_agent::start(config).await?);
            }
            println!("{n} simulated hosts running");
        }
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}
