//! Test helpers: an in-process controller with simulated hosts for fast
//! integration tests, and real processes (kumod, kumo-agent, QEMU) for
//! end-to-end tests, with a registry that kills every process a test
//! started, QEMU guests included, when the test ends.
//!
//! # The network of a [`RealCloud`]
//!
//! Each host agent of a `RealCloud` runs in a network namespace of its own,
//! as on a real host, and the QEMU guests it starts inherit it; the hosts and
//! the controller meet on a bridge, so host-to-host traffic (live migration)
//! crosses a real network. Every cloud takes a number N of its own (1..=254),
//! and everything it creates is named after N:
//!
//! ```text
//! root namespace                        namespace kumo-e2e<N>-<host>, for the i-th host (i = 1, 2, ...)
//!   kumod on 10.215.N.1:<port>            kumo-agent on 10.215.N.(10+i):7371
//!   the test's client, the kumo CLI       the host's QEMU guests
//!   bridge kumo-e2e<N>, 10.215.N.1/24     lo up
//!     veth kumo-e2e<N>-<i> <============> eth0 10.215.N.(10+i)/24, default route via 10.215.N.1
//! ```
//!
//! A cloud owns N while its process holds the abstract Unix socket
//! `@kumo-e2e-net-<N>`, which the kernel releases however the process ends:
//! concurrent test processes never share an N, and a starting cloud removes
//! the networks (and the processes in or pointed at them) that killed test
//! processes left behind. Dropping the cloud (also when a test panics)
//! kills its processes, then deletes its namespaces, veths and bridge.
//! Creating namespaces needs root.

use anyhow::{bail, Context, Result};
use kumo_api::{CreateJoinToken, CreateVm, CreateZone, Vm, VmState};
use kumo_client::Client;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What the tiny guest prints once it is up (after its DHCP attempt).
pub const GUEST_READY: &str = "kumo guest ready";

/// Poll `check` until it returns `Some`, or fail after `timeout` saying `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the VM is in `state`.
pub async fn wait_vm(client: &Client, name: &str, state: VmState, timeout: Duration) -> Result<Vm> {
    wait_until(timeout, &format!("vm {name} {state}"), || async {
        client.vm(name).await.ok().filter(|v| v.state == state)
    })
    .await
}

/// Wait until the VM's migration ended; the VM as it ended
/// (`last_migration` says how).
pub async fn wait_migration_ended(client: &Client, name: &str, timeout: Duration) -> Result<Vm> {
    wait_until(timeout, &format!("migration of {name} ended"), || async {
        client
            .vm(name)
            .await
            .ok()
            .filter(|v| v.migration.is_none() && v.last_migration.is_some())
    })
    .await
}

/// The kinds of the events about `resource` (all events if `None`).
pub async fn event_kinds(client: &Client, resource: Option<&str>) -> Result<Vec<String>> {
    let q = kumo_api::EventQuery {
        resource: resource.map(str::to_string),
        ..Default::default()
    };
    Ok(client
        .events(&q)
        .await?
        .items
        .into_iter()
        .map(|e| e.kind)
        .collect())
}

pub async fn create_zone(client: &Client, name: &str) -> Result<()> {
    client
        .zone_create(&CreateZone {
            name: name.into(),
            description: String::new(),
        })
        .await?;
    Ok(())
}

/// Wait until the host is `ready`.
pub async fn wait_host_ready(client: &Client, name: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(20),
        &format!("host {name} ready"),
        || async {
            client
                .host(name)
                .await
                .ok()
                .filter(|h| h.state == kumo_api::HostState::Ready)
        },
    )
    .await?;
    Ok(())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn vm_request(name: &str, image: &str) -> CreateVm {
    CreateVm {
        name: name.into(),
        image: image.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: None,
        zone: None,
        start: None,
        cpu_policy: None,
        policy: None,
        requirements: None,
        rank: None,
        groups: Vec::new(),
        metadata: Default::default(),
    }
}

/// A small valid qcow2 image file for tests that do not boot it.
pub fn blank_image(dir: &Path) -> PathBuf {
    let path = dir.join("blank.qcow2");
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg("1G")
        .status()
        .expect("qemu-img runs");
    assert!(ok.success());
    path
}

/// A controller in this process, plus simulated hosts.
pub struct SimCloud {
    pub dir: tempfile::TempDir,
    pub server: kumod::Server,
    pub client: Client,
    agents: Vec<kumo_agent::Agent>,
    join_token: String,
}

impl SimCloud {
    pub async fn start(down_after: Duration) -> Result<SimCloud> {
        Self::start_with(down_after, |_| {}).await
    }

    /// Start with the controller's settings changed by `tweak` (e.g. short
    /// rebalancing or power-saving periods).
    pub async fn start_with(
        down_after: Duration,
        tweak: impl FnOnce(&mut kumod::Config),
    ) -> Result<SimCloud> {
        let dir = tempfile::tempdir()?;
        let mut config = kumod::Config {
            down_after,
            ..kumod::Config::new(dir.path().join("controller"), "127.0.0.1:0".parse()?)
        };
        tweak(&mut config);
        let server = kumod::start(config).await?;
        let client = Client::new(&server.url(), &server.admin_token);
        let join_token = client
            .join_token_create(&CreateJoinToken::default())
            .await?
            .token
            .context("join token secret")?;
        Ok(SimCloud {
            dir,
            server,
            client,
            agents: Vec::new(),
            join_token,
        })
    }

    /// A cloud of one zone `z1`, one simulated host `h1` in it, the image
    /// `tiny` (a blank qcow2) and the VM `web` made from it (created, not
    /// waited for).
    pub async fn with_vm() -> Result<SimCloud> {
        let mut cloud = SimCloud::start(Duration::from_secs(5)).await?;
        cloud.zone("z1").await?;
        cloud.host("h1", "z1").await?;
        let img = blank_image(cloud.dir.path());
        cloud.client.image_import("tiny", &img).await?;
        cloud.client.vm_create(&vm_request("web", "tiny")).await?;
        Ok(cloud)
    }

    pub async fn zone(&self, name: &str) -> Result<()> {
        create_zone(&self.client, name).await
    }

    pub fn agent_config(&self, name: &str, zone: &str) -> kumo_agent::Config {
        kumo_agent::Config {
            controller: self.server.url(),
            join_token: Some(self.join_token.clone()),
            name: name.into(),
            zone: zone.into(),
            data_dir: self.dir.path().join(format!("host-{name}")),
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            advertise: None,
            driver: kumo_agent::DriverKind::Sim,
            accel: kumo_agent::Accel::Tcg,
            capacity: kumo_agent::CapacityOverride {
                vcpus: Some(8),
                memory_mib: Some(16384),
                disk_gib: Some(100),
            },
            labels: Default::default(),
            heartbeat: Duration::from_millis(100),
            stop_timeout: Duration::from_secs(5),
            long_poll: true,
            datastore: None,
        }
    }

    /// Join a simulated host and wait until it is ready.
    pub async fn host(&mut self, name: &str, zone: &str) -> Result<()> {
        self.host_with(self.agent_config(name, zone)).await
    }

    pub async fn host_with(&mut self, config: kumo_agent::Config) -> Result<()> {
        let name = config.name.clone();
        self.agents.push(kumo_agent::start(config).await?);
        wait_host_ready(&self.client, &name).await
    }

    /// Join `n` simulated hosts named `PREFIX-1` ... as `kumo-agent
    /// --sim-hosts` runs them (no console endpoint, new states learnt from
    /// heartbeat answers), and wait until all are ready.
    pub async fn sim_hosts(
        &mut self,
        prefix: &str,
        zone: &str,
        n: usize,
        heartbeat: Duration,
        capacity: Option<kumo_agent::CapacityOverride>,
    ) -> Result<()> {
        for i in 1..=n {
            let base = self.agent_config(&format!("{prefix}-{i}"), zone);
            let config = kumo_agent::Config {
                listen: None,
                long_poll: false,
                heartbeat,
                capacity: capacity.unwrap_or(base.capacity),
                ..base
            };
            self.agents.push(kumo_agent::start(config).await?);
        }
        let client = self.client.clone();
        wait_until(
            Duration::from_secs(120),
            &format!("{n} hosts ready"),
            || async {
                let hosts = client.hosts().await.ok()?;
                let ready = hosts
                    .iter()
                    .filter(|h| h.state == kumo_api::HostState::Ready)
                    .count();
                (ready >= n).then_some(())
            },
        )
        .await
    }

    /// Run the `kumo` CLI against this cloud (see [`cli`]).
    pub async fn cli(&self, args: &[&str]) -> Result<String> {
        cli(&self.server.url(), &self.server.admin_token, args, "").await
    }

    /// Stop a host's agent (its heartbeats stop).
    pub fn stop_host(&mut self, index: usize) {
        drop(self.agents.remove(index));
    }
}

/// Run the `kumo` CLI against the controller at `url` with `token` and
/// `stdin`; fails unless it exits 0 within 120 s, and returns its stdout.
pub async fn cli(url: &str, token: &str, args: &[&str], stdin: &str) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin("kumo"))
        .args(args)
        .env("KUMO_URL", url)
        .env("KUMO_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    input.write_all(stdin.as_bytes()).await?;
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await??;
    if !out.status.success() {
        bail!(
            "kumo {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Where `cargo build` put the workspace binaries.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` first",
        path.display()
    );
    path
}

/// The tiny guest image, built by `scripts/build-guest-image` (cached).
pub fn tiny_image() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-guest-image");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the tiny guest image failed");
    }
    let path = String::from_utf8(out.stdout)?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(PathBuf::from(path))
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            child: Some(child),
            name: name.into(),
        })
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A real cloud of processes: kumod and qemu-driver agents, each agent in a
/// network namespace of its own on a bridge (see the module docs).
/// Dropping it kills every process, including the QEMU guests found through
/// the pidfiles under its directory, then removes its network.
pub struct RealCloud {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub client: Client,
    port: u16,
    controller: Option<Proc>,
    agents: Vec<RealHost>,
    join_token: String,
    token: String,
    /// Always `Some` until dropped: removed last, after every process.
    net: Option<Network>,
}

/// A host of a [`RealCloud`]: its namespace, address and agent.
struct RealHost {
    name: String,
    netns: String,
    ip: String,
    /// The agent's arguments, for restarts.
    args: Vec<String>,
    agent: Proc,
}

impl RealCloud {
    pub async fn start() -> Result<RealCloud> {
        let net = Network::create()?;
        let gateway = net.gateway();
        let dir = tempfile::Builder::new()
            .prefix("kumo-e2e")
            .tempdir_in("/tmp")?;
        let port = TcpListener::bind((gateway.as_str(), 0))
            .and_then(|l| l.local_addr())
            .with_context(|| format!("finding a free port on {gateway}"))?
            .port();
        let url = format!("http://{gateway}:{port}");
        let mut cloud = RealCloud {
            dir,
            url: url.clone(),
            client: Client::new(&url, ""),
            port,
            controller: None,
            agents: Vec::new(),
            join_token: String::new(),
            token: String::new(),
            net: Some(net),
        };
        cloud.start_controller().await?;
        cloud.join_token = cloud
            .client
            .join_token_create(&CreateJoinToken::default())
            .await?
            .token
            .context("join token secret")?;
        Ok(cloud)
    }

    fn net(&self) -> &Network {
        self.net
            .as_ref()
            .expect("the network lives as long as the cloud")
    }

    /// Start (or restart) kumod on the same data dir and address.
    pub async fn start_controller(&mut self) -> Result<()> {
        let data = self.dir.path().join("controller");
        let mut cmd = Command::new(bin("kumod"));
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(format!("{}:{}", self.net().gateway(), self.port))
            .args(["--down-after", "3"])
            // Every host here reports the one machine's load; tests move
            // VMs themselves.
            .arg("--no-rebalance");
        self.controller = Some(Proc::spawn(
            "kumod",
            &mut cmd,
            &self.dir.path().join("kumod.log"),
        )?);
        let token_path = data.join("admin-token");
        let token = wait_until(Duration::from_secs(10), "kumod admin token", || async {
            std::fs::read_to_string(&token_path)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        })
        .await?;
        self.client = Client::new(&self.url, &token);
        self.token = token;
        let client = self.client.clone();
        wait_until(Duration::from_secs(10), "kumod serving", || async {
            client.zones().await.ok()
        })
        .await?;
        Ok(())
    }

    pub fn kill_controller(&mut self) {
        self.controller.take();
    }

    pub async fn zone(&self, name: &str) -> Result<()> {
        create_zone(&self.client, name).await
    }

    /// Start a qemu-driver agent (TCG) in a new network namespace and wait
    /// for its host to be ready.
    pub async fn host(&mut self, name: &str, zone: &str) -> Result<()> {
        self.host_with_args(name, zone, &[]).await
    }

    /// [`RealCloud::host`] with `extra` arguments appended to the agent's
    /// command line (kept for restarts).
    pub async fn host_with_args(&mut self, name: &str, zone: &str, extra: &[String]) -> Result<()> {
        let index = self.agents.len() + 1;
        let netns = self.net().netns(name);
        let ip = self.net().add_host(index, &netns)?;
        let mut args = vec![
            "--controller".to_string(),
            self.url.clone(),
            "--join-token".into(),
            self.join_token.clone(),
            "--name".into(),
            name.into(),
            "--zone".into(),
            zone.into(),
            "--data-dir".into(),
            self.dir
                .path()
                .join(format!("host-{name}"))
                .display()
                .to_string(),
            "--listen".into(),
            format!("{ip}:{AGENT_PORT}"),
            "--accel".into(),
            "tcg".into(),
            "--heartbeat".into(),
            "0.5".into(),
            "--stop-timeout".into(),
            "20".into(),
        ];
        args.extend_from_slice(extra);
        let agent = self.spawn_agent(name, &netns, &args)?;
        self.agents.push(RealHost {
            name: name.into(),
            netns,
            ip,
            args,
            agent,
        });
        self.wait_host_ready(name).await
    }

    /// The address of a host (in its namespace), e.g. `10.215.7.11`.
    pub fn host_ip(&self, name: &str) -> Option<String> {
        self.real_host(name).map(|h| h.ip.clone())
    }

    /// The network namespace a host runs in (for `ip netns exec`).
    pub fn host_netns(&self, name: &str) -> Option<String> {
        self.real_host(name).map(|h| h.netns.clone())
    }

    fn real_host(&self, name: &str) -> Option<&RealHost> {
        self.agents.iter().find(|h| h.name == name)
    }

    /// `ip netns exec` execs the agent, so the process is the agent itself
    /// and killing it kills the agent.
    fn spawn_agent(&self, name: &str, netns: &str, args: &[String]) -> Result<Proc> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(bin("kumo-agent"))
            .args(args);
        Proc::spawn(
            &format!("agent {name}"),
            &mut cmd,
            &self.dir.path().join(format!("agent-{name}.log")),
        )
    }

    pub async fn wait_host_ready(&self, name: &str) -> Result<()> {
        wait_host_ready(&self.client, name).await
    }

    /// `kill -9` a host's agent; its guests keep running.
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(h) = self.agents.iter_mut().find(|h| h.name == name) {
            h.agent.kill();
        }
    }

    /// Start a host's agent again, in the same namespace with the same
    /// arguments.
    pub fn restart_agent(&mut self, name: &str) -> Result<()> {
        let i = self
            .agents
            .iter()
            .position(|h| h.name == name)
            .context("no such agent")?;
        let agent = self.spawn_agent(name, &self.agents[i].netns, &self.agents[i].args)?;
        self.agents[i].agent = agent;
        Ok(())
    }

    /// Pids of the live QEMU guests of this cloud.
    pub fn qemu_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for entry in walk(self.dir.path()) {
            if entry.file_name().is_some_and(|n| n == "qemu.pid") {
                pids.extend(entry.parent().and_then(kumo_agent::qemu_pid));
            }
        }
        pids
    }

    /// The live QEMU process of a VM.
    pub async fn vm_qemu_pid(&self, vm: &str) -> Result<i32> {
        let vm = self.client.vm(vm).await?;
        let dir = self
            .dir
            .path()
            .join(format!("host-{}", vm.host))
            .join("vms")
            .join(vm.id.to_string());
        kumo_agent::qemu_pid(&dir).with_context(|| format!("no live QEMU for {}", vm.name))
    }

    /// Run a shell command on the guest's serial console and return what it
    /// printed up to `expect`.
    pub async fn console_run(&self, vm: &str, command: &str, expect: &str) -> Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = self.client.console(vm).await?;
        stream.write_all(format!("{command}\n").as_bytes()).await?;
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = tokio::time::timeout(left, stream.read(&mut buf))
                .await
                .with_context(|| {
                    format!(
                        "no {expect:?} on the console of {vm}; saw {:?}",
                        String::from_utf8_lossy(&seen)
                    )
                })??;
            if n == 0 {
                bail!(
                    "console of {vm} closed; saw {:?}",
                    String::from_utf8_lossy(&seen)
                );
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(expect) {
                return Ok(String::from_utf8_lossy(&seen).into_owned());
            }
        }
    }

    /// Run the `kumo` CLI against this cloud with `stdin`; fails unless it
    /// exits 0, and returns its stdout.
    pub async fn cli(&self, args: &[&str], stdin: &str) -> Result<String> {
        cli(&self.url, &self.token, args, stdin).await
    }

    /// How many times the tiny guest has come up so far (its console log
    /// keeps every boot).
    pub async fn boots(&self, vm: &str) -> Result<usize> {
        Ok(self
            .client
            .console_log(vm)
            .await?
            .text
            .matches(GUEST_READY)
            .count())
    }

    /// Wait until the tiny guest has come up more than `before` times.
    pub async fn wait_boot(&self, vm: &str, before: usize, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("boot {} of {vm}", before + 1), || async {
            self.boots(vm).await.ok().filter(|n| *n > before)
        })
        .await?;
        Ok(())
    }

    /// Wait until the console log holds `text`.
    pub async fn wait_console(&self, vm: &str, text: &str, timeout: Duration) -> Result<String> {
        wait_until(
            timeout,
            &format!("{text:?} on the console of {vm}"),
            || async {
                self.client
                    .console_log(vm)
                    .await
                    .ok()
                    .map(|l| l.text)
                    .filter(|t| t.contains(text))
            },
        )
        .await
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

impl Drop for RealCloud {
    fn drop(&mut self) {
        self.agents.clear();
        self.controller.take();
        kill_and_wait(&self.qemu_pids());
        drop(self.net.take());
        if std::env::var_os("KUMO_KEEP_TEST_DIR").is_some() {
            let path =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("kept test dir {}", path.display());
        }
    }
}

/// The first two octets of every cloud network: cloud N has 10.215.N.0/24.
const NET_PREFIX: &str = "10.215";
/// The port every agent listens on, each at the address of its namespace.
const AGENT_PORT: u16 = 7371;

/// Run `ip ARGS` (iproute2) and return its stdout; fails with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The bridge network 10.215.N.0/24 of one [`RealCloud`]; dropping it
/// removes the bridge and every namespace and veth named after N, killing
/// what still runs in those namespaces.
struct Network {
    n: u8,
    /// Whoever holds this socket owns N (see the module docs).
    _claim: std::os::unix::net::UnixListener,
}

impl Network {
    fn create() -> Result<Network> {
        use std::os::unix::fs::MetadataExt;
        if std::fs::metadata("/proc/self")?.uid() != 0 {
            bail!(
                "the end-to-end tests need root: RealCloud puts each host agent in a \
                 network namespace of its own on a bridge (and the guest image needs root too)"
            );
        }
        remove_stale_networks();
        // Leave alone subnets something else on this machine uses.
        let addresses = ip(&["-o", "-4", "addr", "show"])?;
        let first: u8 = rand::random();
        for k in 0..=u8::MAX {
            let n = first.wrapping_add(k);
            if n == 0 || n == u8::MAX || subnet_used_elsewhere(&addresses, n) {
                continue;
            }
            let Some(claim) = claim(n) else { continue };
            let bridge = bridge_name(n);
            match ip(&["link", "add", &bridge, "type", "bridge"]) {
                Ok(_) => {}
                Err(e) if e.to_string().contains("File exists") => continue,
                Err(e) => return Err(e.context("creating the cloud's bridge")),
            }
            let net = Network { n, _claim: claim };
            ip(&[
                "addr",
                "add",
                &format!("{}/24", net.gateway()),
                "dev",
                &bridge,
            ])?;
            ip(&["link", "set", &bridge, "up"])?;
            return Ok(net);
        }
        bail!("no free network {NET_PREFIX}.N.0/24 for a test cloud: too many clouds at once?")
    }

    /// The bridge's address, where kumod listens.
    fn gateway(&self) -> String {
        format!("{NET_PREFIX}.{}.1", self.n)
    }

    fn netns(&self, host: &str) -> String {
        format!("{}-{host}", bridge_name(self.n))
    }

    /// Create the namespace of the `index`-th host (from 1) with a veth into
    /// the bridge, and return the host's address.
    fn add_host(&self, index: usize, netns: &str) -> Result<String> {
        if !(1..=244).contains(&index) {
            bail!("a test cloud has room for 244 hosts");
        }
        let bridge = bridge_name(self.n);
        // At most "kumo-e2e254-244": 15 characters, the longest name Linux allows.
        let veth = format!("{bridge}-{index}");
        let addr = format!("{NET_PREFIX}.{}.{}", self.n, 10 + index);
        let gateway = self.gateway();
        ip(&["netns", "add", netns])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        ip(&["link", "set", &veth, "master", &bridge, "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        ip(&["-n", netns, "route", "add", "default", "via", &gateway])?;
        Ok(addr)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        teardown(self.n);
    }
}

/// Whether an interface other than N's own bridge (left behind by a killed
/// test process, removed when N is claimed) has an address in 10.215.N.0/24;
/// `addresses` is the output of `ip -o -4 addr show`.
fn subnet_used_elsewhere(addresses: &str, n: u8) -> bool {
    let inet = format!(" inet {NET_PREFIX}.{n}.");
    let bridge = bridge_name(n);
    addresses
        .lines()
        .filter(|l| l.contains(&inet))
        .any(|l| l.split_whitespace().nth(1) != Some(bridge.as_str()))
}

fn bridge_name(n: u8) -> String {
    format!("kumo-e2e{n}")
}

/// Remove what killed test processes left behind: the networks no live
/// process holds.
fn remove_stale_networks() {
    let mut stale: Vec<u8> = names_in(Path::new("/sys/class/net"), "kumo-e2e")
        .into_iter()
        .chain(names_in(Path::new("/run/netns"), "kumo-e2e"))
        .filter_map(|name| network_number(&name))
        .collect();
    stale.sort_unstable();
    stale.dedup();
    for n in stale {
        if let Some(_claim) = claim(n) {
            teardown(n);
        }
    }
}

/// N from `kumo-e2e<N>` or `kumo-e2e<N>-...`.
fn network_number(name: &str) -> Option<u8> {
    let rest = name.strip_prefix("kumo-e2e")?;
    rest.split('-').next()?.parse().ok()
}

/// Take N for this process, or `None` if a live process holds it.
fn claim(n: u8) -> Option<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt;
    let addr =
        std::os::unix::net::SocketAddr::from_abstract_name(format!("kumo-e2e-net-{n}")).ok()?;
    std::os::unix::net::UnixListener::bind_addr(&addr).ok()
}

/// Remove everything named after N: kill the processes in its namespaces and
/// those pointed at its controller address (kumod and agents of a killed
/// test process), then delete the veths, namespaces and bridge. Only for an
/// N this process has claimed.
fn teardown(n: u8) {
    let bridge = bridge_name(n);
    let prefix = format!("{bridge}-");
    let namespaces = names_in(Path::new("/run/netns"), &prefix);
    let mut pids = Vec::new();
    for ns in &namespaces {
        if let Ok(out) = ip(&["netns", "pids", ns]) {
            pids.extend(out.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
    }
    pids.extend(processes_mentioning(&format!("{NET_PREFIX}.{n}.1:")));
    kill_and_wait(&pids);
    let links = Path::new("/sys/class/net");
    let mut deletions = Vec::new();
    for veth in names_in(links, &prefix) {
        deletions.push(ip(&["link", "del", &veth]));
    }
    for ns in &namespaces {
        deletions.push(ip(&["netns", "del", ns]));
    }
    if links.join(&bridge).exists() {
        deletions.push(ip(&["link", "del", &bridge]));
    }
    for e in deletions.into_iter().filter_map(Result::err) {
        eprintln!("cleaning up test network {bridge}: {e:#}");
    }
}

/// Entries of `dir` whose names start with `prefix`.
fn names_in(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

/// Pids of the other processes with `needle` in their command line.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    names_in(Path::new("/proc"), "")
        .into_iter()
        .filter_map(|name| name.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .contains(needle)
            })
        })
        .collect()
}

/// Whether a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next());
        !matches!(state, Some('Z' | 'X') | None)
    })
}

/// `kill -9` the processes and wait (up to 10 s) until they are gone.
fn kill_and_wait(pids: &[i32]) {
    let me = std::process::id() as i32;
    // Never 0 or -1 (a process group, everything) or init.
    let pids: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|p| *p > 1 && *p != me)
        .collect();
    for &pid in &pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_foreign_addresses_rule_out_a_network() {
        let addresses = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever
7: kumo-e2e5    inet 10.215.5.1/24 scope global kumo-e2e5\\       valid_lft forever
8: br-lab    inet 10.215.9.1/24 scope global br-lab\\       valid_lft forever
";
        assert!(
            !subnet_used_elsewhere(addresses, 5),
            "a stale bridge of ours"
        );
        assert!(subnet_used_elsewhere(addresses, 9));
        assert!(!subnet_used_elsewhere(addresses, 1));
        assert!(!subnet_used_elsewhere(addresses, 91));
    }

    #[test]
    fn names_fit_in_an_interface_name() {
        assert!(format!("{}-244", bridge_name(254)).len() <= 15);
        assert_eq!(network_number(&bridge_name(7)), Some(7));
        assert_eq!(network_number("kumo-e2e12-3"), Some(12));
        assert_eq!(network_number("kumo-e2e12-h1"), Some(12));
        assert_eq!(network_number("kumo-e2ex"), None);
    }
}
