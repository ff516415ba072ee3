//! `kumo`, the command-line client.

mod config;
mod console;
mod output;
mod size;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use kumo_api::{
    CapacityQuery, CreateGroup, CreateJoinToken, CreateVm, CreateZone, DrainPlan, EventQuery, Host,
    HostListQuery, HostState, MigrateVm, MigrationOutcome, UpdateHost, Vm, VmListQuery, VmState,
};
use kumo_client::Client;
use output::{age, outln, Format};
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
        /// The controller's URL, e.g. http://127.0.0.1:7370.
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
    /// Automatic rebalancing: its settings and what its last pass did.
    Rebalance,
    /// Print a shell completion script, e.g. `kumo completions bash >
    /// /etc/bash_completion.d/kumo`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// How many more VMs of a shape fit now, and what runs out first.
    Capacity {
        /// Virtual CPUs of one VM.
        #[arg(long)]
        vcpus: u32,
        /// Memory of one VM, e.g. 512M or 2G; a plain number is in MiB.
        #[arg(long, value_name = "SIZE", value_parser = size::mib)]
        memory: u64,
        /// Disk of one VM, e.g. 20G; a plain number is in GiB.
        #[arg(long, value_name = "SIZE", value_parser = size::gib, default_value = "1")]
        disk: u64,
        /// Only hosts in this zone (default: all).
        #[arg(long)]
        zone: Option<String>,
        /// `dedicated`: whole host cores of its own, pinned.
        #[arg(long, value_parser = ["shared", "dedicated"])]
        cpu_policy: Option<String>,
        /// Only hosts where this holds.
        #[arg(long)]
        requires: Option<String>,
    },
}

#[derive(Subcommand)]
enum ZoneCmd {
    /// List every zone.
    List,
    /// Show one zone.
    Show {
        /// The zone's name.
        name: String,
    },
    /// Create a zone.
    Create {
        /// The zone's name.
        name: String,
        /// What the zone is, e.g. "campus B, rack 3".
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete a zone without hosts.
    Delete {
        /// The zone's name.
        name: String,
    },
    /// Move the VMs of every host in the zone away live (a planned
    /// outage); the hosts go to maintenance once empty.
    Drain {
        /// The zone's name.
        name: String,
        #[command(flatten)]
        args: DrainArgs,
    },
    /// Take the zone's drained hosts back into placement.
    Undrain {
        /// The zone's name.
        name: String,
        #[command(flatten)]
        args: UndrainArgs,
    },
    /// Power saving: empty lightly loaded hosts and switch them off, switch
    /// them on when demand rises. Without --on or --off: show its status.
    PowerSaving {
        /// The zone's name.
        name: String,
        #[command(flatten)]
        args: PowerSavingArgs,
    },
}

#[derive(clap::Args)]
struct PowerSavingArgs {
    /// Turn power saving on (or change its settings).
    #[arg(long, conflicts_with = "off", requires_all = ["off_command", "on_command"])]
    on: bool,
    /// Turn power saving off: standby hosts are switched on.
    #[arg(long)]
    off: bool,
    /// Shell command switching a host off; `{host}` and `{address}` are
    /// replaced, e.g. 'ipmitool -H {host}-bmc chassis power soft'.
    #[arg(long, requires = "on")]
    off_command: Option<String>,
    /// Shell command switching a host on.
    #[arg(long, requires = "on")]
    on_command: Option<String>,
    /// Share of memory and CPU kept free (0 to 0.9).
    #[arg(long, default_value_t = 0.2, requires = "on")]
    headroom: f64,
    /// Only hosts below this CPU load (percent) are emptied.
    #[arg(long, default_value_t = 30.0, requires = "on")]
    max_load: f64,
    /// Idle draw of a host in watts, for the energy estimate.
    #[arg(long, default_value_t = 150.0, requires = "on")]
    idle_watts: f64,
}

#[derive(clap::Args)]
struct DrainArgs {
    /// Only show where the VMs would go; move nothing.
    #[arg(long)]
    dry_run: bool,
    /// Show progress and wait until the hosts are empty and in maintenance.
    #[arg(long, conflicts_with = "dry_run")]
    wait: bool,
}

#[derive(clap::Args)]
struct UndrainArgs {
    /// Move the VMs the drain took away back to the hosts they came from.
    #[arg(long = "return")]
    return_vms: bool,
    /// With --return: show progress and wait until every VM is back.
    #[arg(long, requires = "return_vms")]
    wait: bool,
}

#[derive(Subcommand)]
enum HostCmd {
    /// Capacity, allocation, load and state of every host (or those the
    /// filters pick).
    List {
        /// Only hosts in this state (ready, down, disabled, draining, maintenance, standby).
        #[arg(long, value_parser = parse_api::<HostState>)]
        state: Option<HostState>,
        /// Only hosts in this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only hosts whose name starts with this.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show one host.
    Show {
        /// The host's name.
        name: String,
    },
    /// Take a host out of placement (its VMs keep running).
    Disable {
        /// The host's name.
        name: String,
    },
    /// Take a disabled host back into placement.
    Enable {
        /// The host's name.
        name: String,
    },
    /// Change a host's overcommit ratios.
    Set {
        /// The host's name.
        name: String,
        /// Shared vCPUs per core.
        #[arg(long, value_parser = finite)]
        cpu_overcommit: Option<f64>,
        /// Memory promised per byte of memory.
        #[arg(long, value_parser = finite)]
        memory_overcommit: Option<f64>,
    },
    /// Remove a host without VMs from the pool.
    Delete {
        /// The host's name.
        name: String,
    },
    /// Move the host's VMs away live for maintenance; the host goes to
    /// maintenance once empty.
    Drain {
        /// The host's name.
        name: String,
        #[command(flatten)]
        args: DrainArgs,
    },
    /// Take a drained host back into placement.
    Undrain {
        /// The host's name.
        name: String,
        #[command(flatten)]
        args: UndrainArgs,
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
    /// Join tokens not used or expired yet.
    List,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List every image.
    List,
    /// Show one image.
    Show {
        /// The image's name.
        name: String,
    },
    /// Import a qcow2 or raw disk image file.
    Import {
        /// The name VMs will use for the image.
        name: String,
        /// The image file to upload.
        #[arg(long)]
        file: PathBuf,
    },
    /// Delete an image no VM uses.
    Delete {
        /// The image's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Every VM (or those the filters pick), by name.
    List {
        /// Only VMs in this state (starting, running, stopping, stopped, rebooting, failed,
        /// unknown, deleting, migrating).
        #[arg(long, value_parser = parse_api::<VmState>)]
        state: Option<VmState>,
        /// Only VMs on this host.
        #[arg(long)]
        host: Option<String>,
        /// Only VMs in this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only VMs whose name starts with this.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show one VM.
    Show {
        /// The VM's name.
        name: String,
    },
    /// Create a VM on the host the scheduler chooses, and start it.
    Create {
        /// The VM's name.
        name: String,
        /// The image its root disk is made from.
        #[arg(long)]
        image: String,
        /// Virtual CPUs.
        #[arg(long)]
        vcpus: u32,
        /// Memory, e.g. 512M or 2G; a plain number is in MiB.
        #[arg(long, value_name = "SIZE", value_parser = size::mib)]
        memory: u64,
        /// Root disk, e.g. 20G; a plain number is in GiB (default: the
        /// image's size).
        #[arg(long, value_name = "SIZE", value_parser = size::gib)]
        disk: Option<u64>,
        /// Only hosts in this zone (default: any).
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
        /// Metadata KEY=VALUE (repeatable); simulated hosts read
        /// `sim.cpu_percent` as the guest's CPU use.
        #[arg(long = "meta", value_parser = parse_meta)]
        metadata: Vec<(String, String)>,
        /// Create without starting.
        #[arg(long)]
        no_start: bool,
        /// Wait until the VM is running.
        #[arg(long)]
        wait: bool,
    },
    /// Start a stopped VM.
    Start {
        /// The VM's name.
        name: String,
        /// Wait until the VM is running.
        #[arg(long)]
        wait: bool,
    },
    /// Stop a VM: ACPI power button, then a hard stop if the guest does
    /// not power off in time.
    Stop {
        /// The VM's name.
        name: String,
        /// Wait until the VM is stopped.
        #[arg(long)]
        wait: bool,
    },
    /// Reset a running VM.
    Reboot {
        /// The VM's name.
        name: String,
        /// Wait until the VM is running again.
        #[arg(long)]
        wait: bool,
    },
    /// Delete a VM and its disk.
    Delete {
        /// The VM's name.
        name: String,
        /// Wait until the VM is gone.
        #[arg(long)]
        wait: bool,
    },
    /// Move a VM to another host: live if it runs, cold if it is stopped.
    Migrate {
        /// The VM's name.
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
        /// The VM's name.
        name: String,
        /// Print what the guest has written so far and exit.
        #[arg(long)]
        log: bool,
    },
}

#[derive(Subcommand)]
enum GroupCmd {
    /// List every group.
    List,
    /// Show one group.
    Show {
        /// The group's name.
        name: String,
    },
    /// Create a group; VMs join it with `vm create --group`.
    Create {
        /// The group's name.
        name: String,
        /// `affinity`: its VMs on one host; `anti_affinity`: each on another.
        #[arg(long, value_parser = ["affinity", "anti_affinity"])]
        policy: String,
        /// Only prefer hosts that keep the rule, never refuse.
        #[arg(long)]
        soft: bool,
    },
    /// Delete a group without VMs.
    Delete {
        /// The group's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum EventCmd {
    /// The newest events, oldest first.
    List {
        /// Only events about this resource, e.g. vm/web.
        #[arg(long)]
        resource: Option<String>,
        /// How many of the newest events to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Then keep printing events as they happen, one per line (with
        /// `-o json`, one JSON object per line), until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
        let hint = if e.chain().any(|c| {
            matches!(
                c.downcast_ref::<kumo_client::Error>(),
                Some(kumo_client::Error::NotKumo { .. })
            )
        }) {
            " (is kumod running there? `kumo login URL --token-file FILE` or KUMO_URL changes the URL)"
        } else {
            ""
        };
        // Lines stay lines (a requirement's error points at its column on
        // the next one); every other control character is shown escaped.
        let message: Vec<String> = chain.join(": ").lines().map(output::printable).collect();
        eprintln!("error: {}{hint}", message.join("\n"));
        std::process::exit(1);
    }
}

/// `KEY=VALUE`.
/// A flag's number that must be finite: `NaN` and `inf` parse as `f64`
/// but JSON cannot carry them (serde_json writes them as `null`, which the
/// API reads as "unchanged").
fn finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err("not a finite number".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?}: use KEY=VALUE"))
}

async fn power_saving(client: &Client, out: Format, zone: &str, a: PowerSavingArgs) -> Result<()> {
    if a.on {
        let req = kumo_api::PowerSaving {
            headroom: a.headroom,
            max_load: a.max_load,
            power_off_command: a.off_command.unwrap_or_default(),
            power_on_command: a.on_command.unwrap_or_default(),
            idle_watts: a.idle_watts,
        };
        client.zone_power_saving_set(zone, &req).await?;
    } else if a.off {
        client.zone_power_saving_off(zone).await?;
    }
    out.power_saving(&client.zone_power_saving(zone).await?);
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let out = cli.output;
    if let Command::Login { url, token_file } = &cli.command {
        let token = std::fs::read_to_string(token_file)
            .with_context(|| format!("reading {}", token_file.display()))?;
        let client = Client::new(url, token.trim());
        client.zones().await.context("checking the URL and token")?;
        let path = config::save(url, token.trim())?;
        outln!(
            "logged in to {url}; credentials saved in {}",
            path.display()
        );
        return Ok(());
    }
    if let Command::Completions { shell } = cli.command {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "kumo", &mut script);
        output::write_stdout(&script);
        return Ok(());
    }
    let client = config::client()?;
    match cli.command {
        Command::Login { .. } | Command::Completions { .. } => unreachable!("handled above"),
        Command::Zone(cmd) => match cmd {
            ZoneCmd::List => out.zones(&client.zones().await?),
            ZoneCmd::Show { name } => out.one(&client.zone(&name).await?, Format::zones),
            ZoneCmd::Create { name, description } => out.one(
                &client
                    .zone_create(&CreateZone { name, description })
                    .await?,
                Format::zones,
            ),
            ZoneCmd::Delete { name } => {
                client.zone_delete(&name).await?;
                out.done(&format!("zone {name} deleted"));
            }
            ZoneCmd::Drain { name, args } => drain(&client, out, Scope::Zone(name), args).await?,
            ZoneCmd::Undrain { name, args } => {
                undrain(&client, out, Scope::Zone(name), args).await?
            }
            ZoneCmd::PowerSaving { name, args } => power_saving(&client, out, &name, args).await?,
        },
        Command::Rebalance => out.rebalance(&client.rebalance_status().await?),
        Command::Host(cmd) => match cmd {
            HostCmd::List { state, zone, name } => {
                let q = HostListQuery {
                    state,
                    zone,
                    name,
                    ..Default::default()
                };
                out.hosts(&client.hosts_where(&q).await?)
            }
            HostCmd::Show { name } => out.one(&client.host(&name).await?, Format::hosts),
            HostCmd::Disable { name } => {
                out.one(&client.host_enable(&name, false).await?, Format::hosts)
            }
            HostCmd::Enable { name } => {
                out.one(&client.host_enable(&name, true).await?, Format::hosts)
            }
            HostCmd::Set {
                name,
                cpu_overcommit,
                memory_overcommit,
            } => {
                let req = UpdateHost {
                    cpu_overcommit,
                    memory_overcommit,
                };
                out.one(&client.host_update(&name, &req).await?, Format::hosts)
            }
            HostCmd::Delete { name } => {
                client.host_delete(&name).await?;
                out.done(&format!("host {name} removed"));
            }
            HostCmd::Drain { name, args } => drain(&client, out, Scope::Host(name), args).await?,
            HostCmd::Undrain { name, args } => {
                undrain(&client, out, Scope::Host(name), args).await?
            }
            HostCmd::Token(TokenCmd::Create { ttl }) => {
                let t = client
                    .join_token_create(&CreateJoinToken { ttl_seconds: ttl })
                    .await?;
                match out {
                    Format::Json => output::json(&t),
                    Format::Table => outln!("{}", t.token.unwrap_or_default()),
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
            ImageCmd::Show { name } => out.one(&client.image(&name).await?, Format::images),
            ImageCmd::Import { name, file } => {
                let spinner = output::spinner(&format!("uploading {}", file.display()));
                let image = client.image_import(&name, &file).await;
                spinner.finish_and_clear();
                out.one(&image?, Format::images);
            }
            ImageCmd::Delete { name } => {
                client.image_delete(&name).await?;
                out.done(&format!("image {name} deleted"));
            }
        },
        Command::Vm(cmd) => vm(&client, out, cmd).await?,
        Command::Group(cmd) => match cmd {
            GroupCmd::List => out.groups(&client.groups().await?),
            GroupCmd::Show { name } => out.one(&client.group(&name).await?, Format::groups),
            GroupCmd::Create { name, policy, soft } => {
                let req = CreateGroup {
                    name,
                    policy: api_enum(policy)?,
                    hard: Some(!soft),
                };
                out.one(&client.group_create(&req).await?, Format::groups)
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
                Format::Table => outln!(
                    "{} more VM(s) of {vcpus} vCPUs, {memory} MiB, {disk} GiB fit on {} host(s); runs out first: {}",
                    report.fits,
                    report.hosts,
                    report.limited_by.as_deref().unwrap_or("-")
                ),
            }
        }
        Command::Event(EventCmd::List {
            resource,
            limit,
            follow,
        }) => {
            let mut q = EventQuery {
                limit: Some(limit),
                resource,
                ..Default::default()
            };
            let page = client.events(&q).await?;
            if !follow {
                out.events(&page.items);
                return Ok(());
            }
            out.event_lines(&page.items);
            // Each answer's `next` is the cursor of the following request,
            // so no event is shown twice or skipped.
            q.after = Some(page.next);
            q.limit = Some(FOLLOW_PAGE);
            q.wait_seconds = Some(FOLLOW_WAIT_SECONDS);
            loop {
                let page = client.events(&q).await?;
                out.event_lines(&page.items);
                q.after = Some(page.next);
            }
        }
    }
    Ok(())
}

async fn vm(client: &Client, out: Format, cmd: VmCmd) -> Result<()> {
    let (vm, wait_for) = match cmd {
        VmCmd::List {
            state,
            host,
            zone,
            name,
        } => {
            let q = VmListQuery {
                state,
                host,
                zone,
                name,
                ..Default::default()
            };
            out.vms(&client.vms_where(&q).await?);
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
            metadata,
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
                metadata: metadata.into_iter().collect(),
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
                            outln!("{}", output::printable(&output::migration_result(r)));
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
                output::write_stdout(client.console_log(&name).await?.text.as_bytes());
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
    out.one(&vm, Format::vms);
    Ok(())
}

/// An API enum from its wire name (clap has already checked the name).
fn api_enum<T: serde::de::DeserializeOwned>(name: String) -> Result<T> {
    Ok(serde_json::from_value(serde_json::Value::String(name))?)
}

/// A command-line value as the API enum of that name (`running`).
fn parse_api<T: serde::de::DeserializeOwned>(name: &str) -> Result<T> {
    api_enum(name.to_string())
}

/// `event list --follow`: events per request, and how long each request
/// waits for new ones (the most the API allows).
const FOLLOW_PAGE: usize = 1000;
const FOLLOW_WAIT_SECONDS: u64 = 10;

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

/// What a drain or undrain applies to: one host, or every host of a zone.
enum Scope {
    Host(String),
    Zone(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Host(h) => write!(f, "host {h}"),
            Scope::Zone(z) => write!(f, "zone {z}"),
        }
    }
}

impl Scope {
    async fn drain(&self, client: &Client, dry_run: bool) -> Result<DrainPlan> {
        Ok(match self {
            Scope::Host(h) => client.host_drain(h, dry_run).await?,
            Scope::Zone(z) => client.zone_drain(z, dry_run).await?,
        })
    }

    /// What is left to move (for a host: a dry run of its drain, which
    /// plans from where things stand).
    async fn drain_status(&self, client: &Client) -> Result<DrainPlan> {
        Ok(match self {
            Scope::Host(h) => client.host_drain(h, true).await?,
            Scope::Zone(z) => client.zone_drain_status(z).await?,
        })
    }

    async fn undrain(&self, client: &Client, return_vms: bool) -> Result<Vec<Host>> {
        Ok(match self {
            Scope::Host(h) => vec![client.host_undrain(h, return_vms).await?],
            Scope::Zone(z) => client.zone_undrain(z, return_vms).await?,
        })
    }

    async fn hosts(&self, client: &Client) -> Result<Vec<String>> {
        Ok(match self {
            Scope::Host(h) => vec![h.clone()],
            Scope::Zone(z) => client
                .hosts()
                .await?
                .into_iter()
                .filter(|h| h.zone == *z)
                .map(|h| h.name)
                .collect(),
        })
    }
}

/// `host drain` and `zone drain`: print the plan, then optionally follow it.
async fn drain(client: &Client, out: Format, scope: Scope, args: DrainArgs) -> Result<()> {
    let plan = scope.drain(client, args.dry_run).await?;
    out.drain_plan(&plan);
    if !args.wait {
        return Ok(());
    }
    let hosts = scope.hosts(client).await?;
    let done = wait_moves(client, &scope, &hosts, Goal::Drained).await?;
    if let Format::Table = out {
        let states: Vec<String> = done
            .iter()
            .map(|h| format!("{} {}", h.name, h.state))
            .collect();
        outln!("{scope} drained: {}", states.join(", "));
    }
    Ok(())
}

/// `host undrain` and `zone undrain`: print the hosts, then optionally wait
/// for the VMs to come back.
async fn undrain(client: &Client, out: Format, scope: Scope, args: UndrainArgs) -> Result<()> {
    let hosts = scope.undrain(client, args.return_vms).await?;
    out.hosts(&hosts);
    if !args.wait {
        return Ok(());
    }
    let names: Vec<String> = hosts.into_iter().map(|h| h.name).collect();
    wait_moves(client, &scope, &names, Goal::Returned).await?;
    if let Format::Table = out {
        outln!("{scope}: every VM its drain moved away is back");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Goal {
    /// The hosts are empty and in maintenance (or standby).
    Drained,
    /// No VM a drain took from the hosts is still away.
    Returned,
}

/// Follow the mover with a progress bar until `goal` holds for `hosts`;
/// fails when nothing moved for [`WAIT_LIMIT`]. The hosts as they ended.
async fn wait_moves(
    client: &Client,
    scope: &Scope,
    hosts: &[String],
    goal: Goal,
) -> Result<Vec<Host>> {
    let ours = |h: &str| hosts.iter().any(|n| n == h);
    let bar = output::count_bar(0);
    bar.set_message(format!("following the moves of {scope}"));
    let mut total = 0;
    let mut seen = None;
    let mut since = std::time::Instant::now();
    let result = loop {
        let vms = client.vms().await?;
        let left: Vec<&Vm> = vms
            .iter()
            .filter(|v| match goal {
                Goal::Drained => ours(&v.host),
                Goal::Returned => v.evacuated_from.as_deref().is_some_and(ours),
            })
            .collect();
        let moving: Vec<&str> = left
            .iter()
            .filter(|v| v.migration.is_some())
            .map(|v| v.name.as_str())
            .collect();
        let ended: Vec<Host> = client
            .hosts()
            .await?
            .into_iter()
            .filter(|h| ours(&h.name))
            .collect();
        total = total.max(left.len());
        bar.set_length(total.max(1) as u64);
        bar.set_position((total - left.len()) as u64);
        let place = match goal {
            Goal::Drained => format!("left on {}", hosts.join(", ")),
            Goal::Returned => "still away".into(),
        };
        bar.set_message(format!(
            "VM(s) moved; {} {place}, {} migration(s) under way",
            left.len(),
            moving.len()
        ));
        let finished = match goal {
            Goal::Drained => ended
                .iter()
                .all(|h| matches!(h.state, HostState::Maintenance | HostState::Standby)),
            Goal::Returned => left.is_empty(),
        };
        if finished {
            break Ok(ended);
        }
        if goal == Goal::Drained {
            let gave_up = ended.iter().find(|h| {
                matches!(
                    h.state,
                    HostState::Ready | HostState::Disabled | HostState::Down
                )
            });
            if let Some(h) = gave_up {
                break Err(anyhow::anyhow!(
                    "{scope}: host {} is {} while draining; {} VM(s) still on the drained hosts",
                    h.name,
                    h.state,
                    left.len()
                ));
            }
        }
        let now_seen = (left.len(), moving.join(","));
        if seen.as_ref() != Some(&now_seen) {
            seen = Some(now_seen);
            since = std::time::Instant::now();
        } else if since.elapsed() > WAIT_LIMIT {
            break Err(stalled(client, scope, goal, &left).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    bar.finish_and_clear();
    result
}

/// Why a drain or return stopped moving, as far as the API tells.
async fn stalled(client: &Client, scope: &Scope, goal: Goal, left: &[&Vm]) -> anyhow::Error {
    let why = |v: &Vm| match &v.last_migration {
        Some(r) if r.outcome != MigrationOutcome::Completed => {
            format!("{} on {} ({})", v.name, v.host, output::migration_result(r))
        }
        _ => format!("{} on {}", v.name, v.host),
    };
    let mut details: Vec<String> = left.iter().map(|v| why(v)).collect();
    if goal == Goal::Drained {
        if let Ok(plan) = scope.drain_status(client).await {
            details = plan
                .moves
                .iter()
                .map(|m| match &m.refusal {
                    Some(r) => format!("{} on {}: {r}", m.vm, m.from),
                    None => format!("{} on {}", m.vm, m.from),
                })
                .collect();
        }
    }
    anyhow::anyhow!(
        "{scope}: no VM moved for {} s; {} VM(s) {}: {}",
        WAIT_LIMIT.as_secs(),
        left.len(),
        match goal {
            Goal::Drained => "left on the drained hosts",
            Goal::Returned => "still away",
        },
        details.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("kumo").chain(args.iter().copied()))
    }

    /// Every subcommand and every argument (flags and positionals) of
    /// `kumo`, at any depth, has a help line.
    #[test]
    fn every_command_and_argument_has_help() {
        fn missing(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() {
                out.push(path.clone());
            }
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if arg.get_help().is_none() && !builtin {
                    out.push(format!("{path} <{}>", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                missing(sub, &path, out);
            }
        }
        let mut out = Vec::new();
        missing(&Cli::command(), "", &mut out);
        assert!(out.is_empty(), "no help line for:\n{}", out.join("\n"));
    }

    #[test]
    fn size_flags_take_units_and_name_the_flag_when_refused() {
        let cli = parse(&[
            "vm", "create", "web", "--image", "i", "--vcpus", "1", "--memory", "2G", "--disk",
            "20G",
        ])
        .unwrap();
        let Command::Vm(VmCmd::Create { memory, disk, .. }) = cli.command else {
            panic!("vm create");
        };
        assert_eq!((memory, disk), (2048, Some(20)));
        let cli = parse(&["capacity", "--vcpus", "1", "--memory", "512"]).unwrap();
        let Command::Capacity { memory, disk, .. } = cli.command else {
            panic!("capacity");
        };
        assert_eq!((memory, disk), (512, 1));
        let err = parse(&[
            "vm", "create", "web", "--image", "i", "--vcpus", "1", "--memory", "2X",
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("'2X' for '--memory <SIZE>'"), "{err}");
        assert!(err.contains("K, M, G or T"), "{err}");
        let err = parse(&[
            "capacity", "--vcpus", "1", "--memory", "1G", "--disk", "1.5G",
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("'--disk <SIZE>'") && err.contains("not a whole number of GiB"),
            "{err}"
        );
    }

    #[test]
    fn overcommit_ratios_must_be_finite() {
        let cli = parse(&["host", "set", "h1", "--cpu-overcommit", "2.5"]).unwrap();
        let Command::Host(HostCmd::Set { cpu_overcommit, .. }) = cli.command else {
            panic!("host set");
        };
        assert_eq!(cpu_overcommit, Some(2.5));
        for bad in ["NaN", "inf", "infinity"] {
            for flag in ["--cpu-overcommit", "--memory-overcommit"] {
                let err = parse(&["host", "set", "h1", flag, bad])
                    .err()
                    .unwrap()
                    .to_string();
                assert!(err.contains("not a finite number"), "{flag} {bad}: {err}");
            }
        }
    }

    #[test]
    fn drain_flags_parse_the_same_for_hosts_and_zones() {
        let cli = parse(&["host", "drain", "h1", "--dry-run"]).unwrap();
        let Command::Host(HostCmd::Drain { name, args }) = cli.command else {
            panic!("host drain");
        };
        assert_eq!(name, "h1");
        assert!(args.dry_run && !args.wait);
        let cli = parse(&["zone", "undrain", "z1", "--return", "--wait"]).unwrap();
        let Command::Zone(ZoneCmd::Undrain { name, args }) = cli.command else {
            panic!("zone undrain");
        };
        assert_eq!(name, "z1");
        assert!(args.return_vms && args.wait);
        // A dry run moves nothing to wait for; an undrain without --return
        // neither.
        assert!(parse(&["zone", "drain", "z1", "--dry-run", "--wait"]).is_err());
        assert!(parse(&["host", "undrain", "h1", "--wait"]).is_err());
    }

    #[test]
    fn a_drain_summary_says_whether_everything_fits() {
        let mv = |vm: &str, to: Option<&str>| kumo_api::PlannedMove {
            vm: vm.into(),
            from: "h1".into(),
            to: to.map(Into::into),
            to_zone: to.map(|_| "z1".into()),
            refusal: to.is_none().then(|| "no host can take the VM".into()),
            cancels_arrival: false,
        };
        let mut plan = DrainPlan {
            scope: "host/h1".into(),
            moves: vec![mv("a", Some("h2")), mv("b", Some("h3"))],
            feasible: true,
            memory_mib: 3072,
        };
        assert_eq!(
            output::drain_summary(&plan),
            "2 VM(s), 3.0 GiB of memory to move; the other hosts have room for all of it"
        );
        plan.moves.push(mv("c", None));
        plan.feasible = false;
        assert_eq!(
            output::drain_summary(&plan),
            "3 VM(s), 3.0 GiB of memory to move: 1 VM(s) have nowhere to go"
        );
        plan.moves.clear();
        assert_eq!(output::drain_summary(&plan), "host/h1: no VMs to move");
    }
}
