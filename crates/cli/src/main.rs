//! `kumo`, the command-line client.

mod config;
mod console;
mod output;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use kumo_api::{
    CapacityQuery, CreateGroup, CreateJoinToken, CreateVm, CreateZone, EventQuery, MigrateVm,
    MigrationOutcome, UpdateHost, Vm, VmState,
};
use kumo_client::Client;
use output::{age, Format};
use std::path::PathBuf;
use std::time::Duration;

/// kumo: a private IaaS cloud.
#[derive(Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Save the controller URL and token for later commands.
    Login {
        url: String,
        /// File holding the token (the controller's `admin-token`).
        #[arg(long)]
        token_file: PathBuf,
    },
    /// Zones: sites, campuses or racks.
    #[command(subcommand)]
    Zone(ZoneCmd),
    /// Hosts in the pool.
    #[command(subcommand)]
    Host(HostCmd),
    /// Disk images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Virtual machines.
    #[command(subcommand)]
    Vm(VmCmd),
    /// The event log.
    #[command(subcommand)]
    Event(EventCmd),
    /// Affinity and anti-affinity groups.
    #[command(subcommand)]
    Group(GroupCmd),
    /// How many more VMs of a shape fit now, and what runs out first.
    Capacity {
        #[arg(long)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long)]
        memory: u64,
        /// Disk in GiB.
        #[arg(long, default_value_t = 1)]
        disk: u64,
        #[arg(long)]
        zone: Option<String>,
        #[arg(long, value_parser = ["shared", "dedicated"])]
        cpu_policy: Option<String>,
        /// Only hosts where this holds.
        #[arg(long)]
        requires: Option<String>,
    },
}

#[derive(Subcommand)]
enum ZoneCmd {
    List,
    Show {
        name: String,
    },
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Capacity, allocation, load and state of every host.
    List,
    Show {
        name: String,
    },
    /// Take a host out of placement (its VMs keep running).
    Disable {
        name: String,
    },
    Enable {
        name: String,
    },
    /// Change a host's overcommit ratios.
    Set {
        name: String,
        /// Shared vCPUs per core.
        #[arg(long)]
        cpu_overcommit: Option<f64>,
        /// Memory promised per byte of memory.
        #[arg(long)]
        memory_overcommit: Option<f64>,
    },
    /// Remove a host without VMs from the pool.
    Delete {
        name: String,
    },
    /// Join tokens for new hosts.
    #[command(subcommand)]
    Token(TokenCmd),
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token and print it.
    Create {
        /// Lifetime in seconds.
        #[arg(long)]
        ttl: Option<u64>,
    },
    List,
}

#[derive(Subcommand)]
enum ImageCmd {
    List,
    Show {
        name: String,
    },
    /// Import a qcow2 or raw disk image file.
    Import {
        name: String,
        #[arg(long)]
        file: PathBuf,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    List,
    Show {
        name: String,
    },
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long)]
        vcpus: u32,
        /// Memory in MiB.
        #[arg(long)]
        memory: u64,
        /// Root disk in GiB (default: the image's size).
        #[arg(long)]
        disk: Option<u64>,
        #[arg(long)]
        zone: Option<String>,
        /// `dedicated`: whole host cores of its own, pinned.
        #[arg(long, value_parser = ["shared", "dedicated"])]
        cpu_policy: Option<String>,
        /// How to choose the host.
        #[arg(long, value_parser = ["pack", "spread", "load_aware"])]
        policy: Option<String>,
        /// Only hosts where this holds, e.g. 'cpu_model == "EPYC" && labels.ssd'.
        #[arg(long)]
        requires: Option<String>,
        /// Prefer the hosts where this is highest, e.g. 'free.memory_mib'.
        #[arg(long)]
        rank: Option<String>,
        /// Join an affinity or anti-affinity group (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Create without starting.
        #[arg(long)]
        no_start: bool,
        /// Wait until the VM is running.
        #[arg(long)]
        wait: bool,
    },
    Start {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    Stop {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    Reboot {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    Delete {
        name: String,
        #[arg(long)]
        wait: bool,
    },
    /// Move a running VM live to another host.
    Migrate {
        name: String,
        /// Target host (default: the scheduler chooses).
        #[arg(long)]
        to: Option<String>,
        /// Longest acceptable pause at the switch-over, ms (default 300).
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Show progress and wait until the migration ends.
        #[arg(long)]
        wait: bool,
        /// Cancel the VM's migration under way (the VM stays where it was).
        #[arg(long, conflicts_with_all = ["to", "downtime_ms"])]
        cancel: bool,
    },
    /// Attach to the serial console (leave with Ctrl-]), or print its log.
    Console {
        name: String,
        /// Print what the guest has written so far and exit.
        #[arg(long)]
        log: bool,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    List,
    Create {
        name: String,
        #[arg(long, value_parser = ["affinity", "anti_affinity"])]
        policy: String,
        /// Only prefer hosts that keep the rule, never refuse.
        #[arg(long)]
        soft: bool,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum EventCmd {
    List {
        /// Only events about this resource, e.g. vm/web.
        #[arg(long)]
        resource: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let out = cli.output;
    if let Command::Login { url, token_file } = &cli.command {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading {}", token_file.display()))?;
        let client = Client::new(url, token.trim());
        client.zones().await.context("checking the URL and token")?;
        let path = config::save(url, token.trim())?;
        println!(
            "logged in to {url}; credentials saved in {}",
            path.display()
        );
        return Ok(());
    }
    let client = config::client()?;
    match cli.command {
        Command::Login { .. } => unreachable!("handled above"),
        Command::Zone(cmd) => match cmd {
            ZoneCmd::List => out.zones(&client.zones().await?),
            ZoneCmd::Show { name } => out.zones(&[client.zone(&name).await?]),
            ZoneCmd::Create { name, description } => out.zones(&[client
                .zone_create(&CreateZone { name, description })
                .await?]),
            ZoneCmd::Delete { name } => {
                client.zone_delete(&name).await?;
                out.done(&format!("zone {name} deleted"));
            }
        },
        Command::Host(cmd) => match cmd {
            HostCmd::List => out.hosts(&client.hosts().await?),
            HostCmd::Show { name } => out.hosts(&[client.host(&name).await?]),
            HostCmd::Disable { name } => out.hosts(&[client.host_enable(&name, false).await?]),
            HostCmd::Enable { name } => out.hosts(&[client.host_enable(&name, true).await?]),
            HostCmd::Set {
                name,
                cpu_overcommit,
                memory_overcommit,
            } => {
                let req = UpdateHost {
                    cpu_overcommit,
                    memory_overcommit,
                };
                out.hosts(&[client.host_update(&name, &req).await?])
            }
            HostCmd::Delete { name } => {
                client.host_delete(&name).await?;
                out.done(&format!("host {name} removed"));
            }
            HostCmd::Token(TokenCmd::Create { ttl }) => {
                let t = client
                    .join_token_create(&CreateJoinToken { ttl_seconds: ttl })
                    .await?;
                match out {
                    Format::Json => output::json(&t),
                    Format::Table => println!("{}", t.token.unwrap_or_default()),
                }
            }
            HostCmd::Token(TokenCmd::List) => {
                let tokens = client.join_tokens().await?;
                match out {
                    Format::Json => output::json(&tokens),
                    Format::Table => output::table(
                        &["ID", "EXPIRES IN", "AGE"],
                        tokens
                            .iter()
                            .map(|t| {
                                vec![
                                    t.id.to_string(),
                                    output::until(t.expires_at),
                                    age(t.created_at),
                                ]
                            })
                            .collect(),
                    ),
                }
            }
        },
        Command::Image(cmd) => match cmd {
            ImageCmd::List => out.images(&client.images().await?),
            ImageCmd::Show { name } => out.images(&[client.image(&name).await?]),
            ImageCmd::Import { name, file } => {
                let spinner = output::spinner(&format!("uploading {}", file.display()));
                let image = client.image_import(&name, &file).await;
                spinner.finish_and_clear();
                out.images(&[image?]);
            }
            ImageCmd::Delete { name } => {
                client.image_delete(&name).await?;
                out.done(&format!("image {name} deleted"));
            }
        },
        Command::Vm(cmd) => vm(&client, out, cmd).await?,
        Command::Group(cmd) => match cmd {
            GroupCmd::List => out.groups(&client.groups().await?),
            GroupCmd::Create { name, policy, soft } => {
                let req = CreateGroup {
                    name,
                    policy: api_enum(policy)?,
                    hard: Some(!soft),
                };
                out.groups(&[client.group_create(&req).await?])
            }
            GroupCmd::Delete { name } => {
                client.group_delete(&name).await?;
                out.done(&format!("group {name} deleted"));
            }
        },
        Command::Capacity {
            vcpus,
            memory,
            disk,
            zone,
            cpu_policy,
            requires,
        } => {
            let q = CapacityQuery {
                vcpus,
                memory_mib: memory,
                disk_gib: Some(disk),
                zone,
                cpu_policy: cpu_policy.map(api_enum).transpose()?,
                requirements: requires,
            };
            let report = client.capacity(&q).await?;
            match out {
                Format::Json => output::json(&report),
                Format::Table => println!(
                    "{} more VM(s) of {vcpus} vCPUs, {memory} MiB, {disk} GiB fit on {} host(s); runs out first: {}",
                    report.fits,
                    report.hosts,
                    report.limited_by.as_deref().unwrap_or("-")
                ),
            }
        }
        Command::Event(EventCmd::List { resource, limit }) => {
            let q = EventQuery {
                after: None,
                limit: Some(limit),
                resource,
            };
            out.events(&client.events(&q).await?)
        }
    }
    Ok(())
}

async fn vm(client: &Client, out: Format, cmd: VmCmd) -> Result<()> {
    let (vm, wait_for) = match cmd {
        VmCmd::List => {
            out.vms(&client.vms().await?);
            return Ok(());
        }
        VmCmd::Show { name } => (client.vm(&name).await?, None),
        VmCmd::Create {
            name,
            image,
            vcpus,
            memory,
            disk,
            zone,
            cpu_policy,
            policy,
            requires,
            rank,
            groups,
            no_start,
            wait,
        } => {
            let req = CreateVm {
                name,
                image,
                vcpus,
                memory_mib: memory,
                disk_gib: disk,
                zone,
                start: Some(!no_start),
                cpu_policy: cpu_policy.map(api_enum).transpose()?,
                policy: policy.map(api_enum).transpose()?,
                requirements: requires,
                rank,
                groups,
            };
            let target = if no_start {
                VmState::Stopped
            } else {
                VmState::Running
            };
            (client.vm_create(&req).await?, wait.then_some(target))
        }
        VmCmd::Start { name, wait } => (
            client.vm_action(&name, "start").await?,
            wait.then_some(VmState::Running),
        ),
        VmCmd::Stop { name, wait } => (
            client.vm_action(&name, "stop").await?,
            wait.then_some(VmState::Stopped),
        ),
        VmCmd::Reboot { name, wait } => (
            client.vm_action(&name, "reboot").await?,
            wait.then_some(VmState::Running),
        ),
        VmCmd::Migrate { name, cancel, .. } if cancel => {
            (client.vm_migrate_cancel(&name).await?, None)
        }
        VmCmd::Migrate {
            name,
            to,
            downtime_ms,
            wait,
            ..
        } => {
            let req = MigrateVm {
                to,
                downtime_limit_ms: downtime_ms,
            };
            let vm = client.vm_migrate(&name, &req).await?;
            if !wait {
                (vm, None)
            } else {
                let id = vm.migration.as_ref().map(|m| m.id);
                let vm = wait_migration(client, &name, id).await?;
                match out {
                    Format::Json => output::json(&vm),
                    Format::Table => {
                        if let Some(r) = &vm.last_migration {
                            println!("{}", output::migration_result(r));
                        }
                    }
                }
                return match vm.last_migration.as_ref().map(|r| r.outcome) {
                    Some(MigrationOutcome::Completed) => Ok(()),
                    _ => bail!("VM {name} did not move"),
                };
            }
        }
        VmCmd::Delete { name, wait } => {
            let vm = client.vm_delete(&name).await?;
            if wait {
                wait_gone(client, &name).await?;
                out.done(&format!("vm {name} deleted"));
                return Ok(());
            }
            (vm, None)
        }
        VmCmd::Console { name, log } => {
            if log {
                print!("{}", client.console_log(&name).await?.text);
            } else {
                console::attach(client, &name).await?;
            }
            return Ok(());
        }
    };
    let vm = match wait_for {
        Some(target) => wait_state(client, &vm.name, target).await?,
        None => vm,
    };
    out.vms(&[vm]);
    Ok(())
}

/// An API enum from its wire name (clap has already checked the name).
fn api_enum<T: serde::de::DeserializeOwned>(name: String) -> Result<T> {
    Ok(serde_json::from_value(serde_json::Value::String(name))?)
}

const WAIT_LIMIT: Duration = Duration::from_secs(300);

/// Poll until the VM reaches `target`; `failed` ends the wait with its reason.
async fn wait_state(client: &Client, name: &str, target: VmState) -> Result<Vm> {
    let spinner = output::spinner(&format!("waiting for {name} to be {target}"));
    let start = std::time::Instant::now();
    let result = loop {
        let vm = client.vm(name).await?;
        spinner.set_message(format!("{name}: {} (waiting for {target})", vm.state));
        if vm.state == target {
            break Ok(vm);
        }
        if vm.state == VmState::Failed && target != VmState::Failed {
            break Err(anyhow::anyhow!(
                "VM {name} failed: {}",
                vm.message.unwrap_or_default()
            ));
        }
        if start.elapsed() > WAIT_LIMIT {
            break Err(anyhow::anyhow!(
                "VM {name} is still {} after {} s",
                vm.state,
                WAIT_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    spinner.finish_and_clear();
    result
}

/// Follow a migration with a progress bar until it ends; the VM as it
/// ended (`last_migration` says how).
async fn wait_migration(client: &Client, name: &str, id: Option<uuid::Uuid>) -> Result<Vm> {
    let bar = output::progress_bar(&format!("migrating {name}"));
    let start = std::time::Instant::now();
    let result = loop {
        let vm = client.vm(name).await?;
        match &vm.migration {
            Some(m) if Some(m.id) == id => bar.update(m),
            _ if vm.last_migration.as_ref().map(|r| r.id) == id => break Ok(vm),
            _ => {
                break Err(anyhow::anyhow!(
                    "VM {name}: the migration was replaced by another"
                ))
            }
        }
        if start.elapsed() > WAIT_LIMIT {
            break Err(anyhow::anyhow!(
                "VM {name} is still migrating after {} s",
                WAIT_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish();
    result
}

async fn wait_gone(client: &Client, name: &str) -> Result<()> {
    let spinner = output::spinner(&format!("waiting for {name} to be deleted"));
    let start = std::time::Instant::now();
    let result = loop {
        match client.vm(name).await {
            Err(e) if e.code() == Some(kumo_api::ErrorCode::NotFound) => break Ok(()),
            Err(e) => break Err(e.into()),
            Ok(vm) if start.elapsed() > WAIT_LIMIT => bail!(
                "VM {name} is still {} after {} s",
                vm.state,
                WAIT_LIMIT.as_secs()
            ),
            Ok(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    spinner.finish_and_clear();
    result
}
