//! Test helpers: an in-process controller with simulated hosts for fast
//! integration tests, and real processes (kumod, kumo-agent, QEMU) for
//! end-to-end tests, with a registry that kills every process a test
//! started, QEMU guests included, when the test ends.

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
        let dir = tempfile::tempdir()?;
        let server = kumod::start(kumod::Config {
            data_dir: dir.path().join("controller"),
            listen: "127.0.0.1:0".parse()?,
            down_after,
        })
        .await?;
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

    /// Stop a host's agent (its heartbeats stop).
    pub fn stop_host(&mut self, index: usize) {
        drop(self.agents.remove(index));
    }
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

/// A real cloud of processes on 127.0.0.1: kumod and qemu-driver agents.
/// Dropping it kills every process, including the QEMU guests found through
/// the pidfiles under its directory.
pub struct RealCloud {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub client: Client,
    port: u16,
    controller: Option<Proc>,
    agents: Vec<(String, Proc, Vec<String>)>,
    join_token: String,
    token: String,
}

impl RealCloud {
    pub async fn start() -> Result<RealCloud> {
        let dir = tempfile::Builder::new()
            .prefix("kumo-e2e")
            .tempdir_in("/tmp")?;
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut cloud = RealCloud {
            dir,
            url: url.clone(),
            client: Client::new(&url, ""),
            port,
            controller: None,
            agents: Vec::new(),
            join_token: String::new(),
            token: String::new(),
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

    /// Start (or restart) kumod on the same data dir and port.
    pub async fn start_controller(&mut self) -> Result<()> {
        let data = self.dir.path().join("controller");
        let mut cmd = Command::new(bin("kumod"));
        cmd.arg("--data-dir")
            .arg(&data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--down-after", "3"]);
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

    /// Start a qemu-driver agent (TCG) and wait for its host to be ready.
    pub async fn host(&mut self, name: &str, zone: &str) -> Result<()> {
        let port = free_port();
        let args = vec![
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
            format!("127.0.0.1:{port}"),
            "--accel".into(),
            "tcg".into(),
            "--heartbeat".into(),
            "0.5".into(),
            "--stop-timeout".into(),
            "20".into(),
        ];
        let proc = self.spawn_agent(name, &args)?;
        self.agents.push((name.to_string(), proc, args));
        self.wait_host_ready(name).await
    }

    fn spawn_agent(&self, name: &str, args: &[String]) -> Result<Proc> {
        let mut cmd = Command::new(bin("kumo-agent"));
        cmd.args(args);
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
        if let Some((_, p, _)) = self.agents.iter_mut().find(|(n, _, _)| n == name) {
            p.kill();
        }
    }

    pub fn restart_agent(&mut self, name: &str) -> Result<()> {
        let i = self
            .agents
            .iter()
            .position(|(n, _, _)| n == name)
            .context("no such agent")?;
        let args = self.agents[i].2.clone();
        self.agents[i].1 = self.spawn_agent(name, &args)?;
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
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(bin("kumo"))
            .args(args)
            .env("KUMO_URL", &self.url)
            .env("KUMO_TOKEN", &self.token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let mut input = child.stdin.take().context("stdin")?;
        input.write_all(stdin.as_bytes()).await?;
        drop(input);
        let out =
            tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await??;
        if !out.status.success() {
            bail!(
                "kumo {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
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
        for pid in self.qemu_pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if std::env::var_os("KUMO_KEEP_TEST_DIR").is_some() {
            let path =
                std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("kept test dir {}", path.display());
        }
    }
}
