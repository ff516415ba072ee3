//! An [`App`] of its own for tests of the application layer: a temporary
//! data directory, hosts registered and heartbeating through the same
//! calls agents make, and an image record to create VMs from.

use super::App;
use crate::Config;
use kumo_api::{
    CreateJoinToken, CreateVm, CreateZone, Heartbeat, HostLoad, HypervisorInfo, Image, ImageFormat,
    RegisterHost, Resources, Vm, DEFAULT_PROJECT,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub const IMAGE: &str = "img";

/// An App over a temporary directory, removed on drop.
pub struct TestApp {
    pub app: Arc<App>,
    dir: PathBuf,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A host to register: 8 CPUs, `memory_mib`, 100 GiB, with `labels`.
pub struct HostSpec<'a> {
    pub name: &'a str,
    pub zone: &'a str,
    pub memory_mib: u64,
    pub labels: &'a [(&'a str, &'a str)],
}

impl HostSpec<'_> {
    pub fn new(name: &str) -> HostSpec<'_> {
        HostSpec {
            name,
            zone: "z1",
            memory_mib: 16_384,
            labels: &[],
        }
    }
}

impl TestApp {
    /// With zone `z1` and image [`IMAGE`]; hosts are declared down after
    /// `down_after`.
    pub async fn new(down_after: Duration) -> TestApp {
        let dir = std::env::temp_dir().join(format!("kumod-test-{}", Uuid::new_v4()));
        let config = Config {
            down_after,
            ..Config::new(dir.clone(), "127.0.0.1:0".parse().expect("address"))
        };
        let app = App::open(&config).await.expect("app opens");
        app.zone_create(CreateZone {
            name: "z1".into(),
            description: String::new(),
        })
        .await
        .expect("zone");
        let image = Image {
            id: Uuid::new_v4(),
            name: IMAGE.into(),
            project: DEFAULT_PROJECT.into(),
            format: ImageFormat::Raw,
            size_bytes: 1,
            virtual_size_bytes: 1,
            sha256: String::new(),
            created_at: 0,
        };
        app.inv.write().await.images.insert(IMAGE.into(), image);
        TestApp { app, dir }
    }

    /// Register a host as its agent would (a QEMU host whose agent
    /// address refuses connections); it stays `joining` until
    /// [`TestApp::heartbeat`].
    pub async fn register(&self, spec: HostSpec<'_>) {
        let token = self
            .app
            .join_token_create(CreateJoinToken { ttl_seconds: None })
            .await
            .expect("join token");
        self.app
            .host_register(
                RegisterHost {
                    join_token: token.token.expect("secret shown once"),
                    name: spec.name.into(),
                    zone: spec.zone.into(),
                    address: "http://127.0.0.1:1".into(),
                    agent_secret: "secret".into(),
                    capacity: Resources {
                        vcpus: 8,
                        memory_mib: spec.memory_mib,
                        disk_gib: 100,
                    },
                    hypervisor: HypervisorInfo {
                        driver: "qemu".into(),
                        version: None,
                        accel: "tcg".into(),
                    },
                    cpu_model: String::new(),
                    labels: spec
                        .labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                    datastore: None,
                },
                None,
            )
            .await
            .expect("host registers");
    }

    /// A heartbeat from the host, applying its latest generation and
    /// reporting no guests.
    pub async fn heartbeat(&self, host: &str) {
        let generation = self.app.host_get(host).await.expect("host").generation;
        self.app
            .host_heartbeat(
                host,
                Heartbeat {
                    load: HostLoad {
                        cpu_percent: 0.0,
                        memory_used_mib: 0,
                        load1: 0.0,
                    },
                    applied_generation: generation,
                    vms: Vec::new(),
                },
            )
            .await
            .expect("heartbeat");
    }

    /// Register a host and heartbeat once: it is `ready`.
    pub async fn ready_host(&self, spec: HostSpec<'_>) {
        let name = spec.name.to_string();
        self.register(spec).await;
        self.heartbeat(&name).await;
    }

    /// A 1-CPU VM of `memory_mib` from [`IMAGE`].
    pub fn vm(name: &str, memory_mib: u64) -> CreateVm {
        CreateVm {
            memory_mib,
            ..CreateVm::new(name, IMAGE)
        }
    }

    /// Change a VM in the inventory only, as reports would have.
    pub async fn force_vm(&self, name: &str, change: impl FnOnce(&mut Vm)) {
        let mut inv = self.app.inv.write().await;
        let mut vm = inv.vms()[name].clone();
        change(&mut vm);
        inv.put_vm(vm).expect("the VM fits where it is");
    }
}
