//! The real controller with simulated hosts: VM lifecycle, host monitoring,
//! bad input, authentication.

use kumo_api::{CreateVm, CreateZone, ErrorCode, EventQuery, HostState, PowerState, VmState};
use kumo_client::Client;
use kumo_testkit::{blank_image, event_kinds, vm_request, wait_until, wait_vm, SimCloud};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

async fn cloud_with_image() -> SimCloud {
    let mut cloud = SimCloud::start(Duration::from_millis(600)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.zone("z2").await.unwrap();
    cloud.host("h1", "z1").await.unwrap();
    let img = blank_image(cloud.dir.path());
    cloud.client.image_import("tiny", &img).await.unwrap();
    cloud
}

#[tokio::test]
async fn vm_lifecycle_on_a_simulated_host() {
    let cloud = cloud_with_image().await;
    let c = &cloud.client;
    let vm = c.vm_create(&vm_request("web", "tiny")).await.unwrap();
    assert_eq!(vm.host, "h1");
    assert_eq!(
        vm.size.disk_gib, 1,
        "disk defaults to the image's virtual size"
    );
    wait_vm(c, "web", VmState::Running, T).await.unwrap();
    let host = c.host("h1").await.unwrap();
    assert_eq!(host.allocated.vcpus, 1);
    assert_eq!(host.vm_count, 1);

    c.vm_action("web", "stop").await.unwrap();
    wait_vm(c, "web", VmState::Stopped, T).await.unwrap();
    let err = c.vm_action("web", "reboot").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    c.vm_action("web", "start").await.unwrap();
    wait_vm(c, "web", VmState::Running, T).await.unwrap();
    let vm = c.vm_action("web", "reboot").await.unwrap();
    assert_eq!(vm.state, VmState::Rebooting);
    wait_vm(c, "web", VmState::Running, T).await.unwrap();

    let vm = c.vm_delete("web").await.unwrap();
    assert_eq!(vm.state, VmState::Deleting);
    wait_until(T, "web gone", || async {
        c.vm("web")
            .await
            .err()
            .filter(|e| e.code() == Some(ErrorCode::NotFound))
    })
    .await
    .unwrap();
    assert_eq!(c.host("h1").await.unwrap().allocated.vcpus, 0);

    let kinds = event_kinds(c, Some("vm/web")).await.unwrap();
    for k in [
        "vm.created",
        "vm.running",
        "vm.stop",
        "vm.stopped",
        "vm.reboot",
        "vm.delete",
        "vm.deleted",
    ] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event in {kinds:?}");
    }
}

#[tokio::test]
async fn created_stopped_vm_starts_later() {
    let cloud = cloud_with_image().await;
    let c = &cloud.client;
    let vm = c
        .vm_create(&CreateVm {
            start: Some(false),
            ..vm_request("cold", "tiny")
        })
        .await
        .unwrap();
    assert_eq!(vm.power, PowerState::Stopped);
    wait_vm(c, "cold", VmState::Stopped, T).await.unwrap();
    c.vm_action("cold", "start").await.unwrap();
    wait_vm(c, "cold", VmState::Running, T).await.unwrap();
}

#[tokio::test]
async fn host_without_heartbeats_goes_down_and_comes_back() {
    let mut cloud = cloud_with_image().await;
    cloud
        .client
        .vm_create(&vm_request("db", "tiny"))
        .await
        .unwrap();
    wait_vm(&cloud.client, "db", VmState::Running, T)
        .await
        .unwrap();
    let mut config = cloud.agent_config("h1", "z1");
    cloud.stop_host(0);
    let c = cloud.client.clone();
    wait_until(T, "h1 down", || async {
        c.host("h1")
            .await
            .ok()
            .filter(|h| h.state == HostState::Down)
    })
    .await
    .unwrap();
    let vm = wait_vm(&c, "db", VmState::Unknown, T).await.unwrap();
    assert!(vm.message.unwrap().contains("h1 is down"));
    let err = c.vm_create(&vm_request("other", "tiny")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoValidHost));
    assert!(err.to_string().contains("1 not schedulable"), "{err}");

    // The host comes back under the same name (with more CPUs now, and no
    // join token needed): same host, same VM, no copies.
    config.capacity.vcpus = Some(16);
    config.join_token = None;
    cloud.host_with(config).await.unwrap();
    wait_vm(&c, "db", VmState::Running, T).await.unwrap();
    assert_eq!(c.host("h1").await.unwrap().capacity.vcpus, 16);
    assert_eq!(c.hosts().await.unwrap().len(), 1);
    assert_eq!(c.vms().await.unwrap().len(), 1);
    let kinds = event_kinds(&c, None).await.unwrap();
    assert!(
        kinds.contains(&"host.down".to_string()) && kinds.contains(&"host.up".to_string()),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn placement_explains_refusals_and_honours_zones() {
    let mut cloud = cloud_with_image().await;
    cloud.host("h2", "z2").await.unwrap();
    let c = &cloud.client;
    let vm = c
        .vm_create(&CreateVm {
            zone: Some("z2".into()),
            ..vm_request("a", "tiny")
        })
        .await
        .unwrap();
    assert_eq!(vm.host, "h2");
    c.host_enable("h2", false).await.unwrap();
    assert_eq!(c.host("h2").await.unwrap().state, HostState::Disabled);
    let err = c
        .vm_create(&CreateVm {
            zone: Some("z2".into()),
            ..vm_request("b", "tiny")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoValidHost));
    let msg = err.to_string();
    assert!(
        msg.contains("1 not schedulable") && msg.contains("1 in another zone"),
        "{msg}"
    );
    let err = c
        .vm_create(&CreateVm {
            vcpus: 33,
            ..vm_request("b", "tiny")
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1 too few free vCPUs"), "{err}");
    // A disabled host keeps its VMs.
    wait_vm(c, "a", VmState::Running, T).await.unwrap();
}

/// Every bad request gets a 4xx naming the field, and changes nothing.
#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let cloud = cloud_with_image().await;
    let c = &cloud.client;
    c.vm_create(&vm_request("taken", "tiny")).await.unwrap();
    wait_vm(c, "taken", VmState::Running, T).await.unwrap();
    let before_vms = c.vms().await.unwrap();
    let before_events = c.events(&EventQuery::default()).await.unwrap().len();

    let cases: Vec<(CreateVm, ErrorCode, &str)> = vec![
        (vm_request("x", "nope"), ErrorCode::InvalidInput, "image"),
        (
            CreateVm {
                vcpus: 0,
                ..vm_request("x", "tiny")
            },
            ErrorCode::InvalidInput,
            "vcpus",
        ),
        (
            CreateVm {
                vcpus: 100_000,
                ..vm_request("x", "tiny")
            },
            ErrorCode::InvalidInput,
            "vcpus",
        ),
        (
            CreateVm {
                memory_mib: 0,
                ..vm_request("x", "tiny")
            },
            ErrorCode::InvalidInput,
            "memory_mib",
        ),
        (
            CreateVm {
                memory_mib: u64::MAX,
                ..vm_request("x", "tiny")
            },
            ErrorCode::InvalidInput,
            "memory_mib",
        ),
        (
            CreateVm {
                disk_gib: Some(0),
                ..vm_request("x", "tiny")
            },
            ErrorCode::InvalidInput,
            "disk_gib",
        ),
        (
            CreateVm {
                zone: Some("mars".into()),
                ..vm_request("x", "tiny")
            },
            ErrorCode::InvalidInput,
            "zone",
        ),
        (
            vm_request("Bad_Name", "tiny"),
            ErrorCode::InvalidInput,
            "name",
        ),
        (
            vm_request("taken", "tiny"),
            ErrorCode::AlreadyExists,
            "name",
        ),
        (
            CreateVm {
                memory_mib: 1 << 20,
                ..vm_request("x", "tiny")
            },
            ErrorCode::NoValidHost,
            "memory",
        ),
    ];
    for (req, code, field) in cases {
        let err = c.vm_create(&req).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
        assert!(err.to_string().contains(field), "{err} should name {field}");
    }
    let err = c
        .zone_create(&CreateZone {
            name: "z1".into(),
            description: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyExists));

    // Malformed image files.
    let dir = cloud.dir.path();
    std::fs::write(dir.join("odd.raw"), b"not a disk image").unwrap();
    let err = c
        .image_import("odd", &dir.join("odd.raw"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput), "{err}");
    assert!(err.to_string().contains("file"), "{err}");
    let good = std::fs::read(blank_image(dir)).unwrap();
    std::fs::write(dir.join("cut.qcow2"), &good[..good.len() / 3]).unwrap();
    let err = c
        .image_import("cut", &dir.join("cut.qcow2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput), "{err}");
    let err = c
        .image_import("tiny", &dir.join("blank.qcow2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyExists));
    assert_eq!(c.images().await.unwrap().len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("controller/images"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(leftovers.len(), 1, "rejected uploads leave no files");

    assert_eq!(c.vms().await.unwrap(), before_vms);
    assert_eq!(
        c.events(&EventQuery::default()).await.unwrap().len(),
        before_events
    );
}

#[tokio::test]
async fn tokens_are_checked_on_every_endpoint() {
    let cloud = cloud_with_image().await;
    let url = cloud.server.url();
    for token in ["", "wrong"] {
        let err = Client::new(&url, token).vms().await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{err}");
    }
    // Host tokens may not use the admin API.
    let host_token = {
        let path = cloud.dir.path().join("host-h1/identity.json");
        let id: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        id["host_token"].as_str().unwrap().to_string()
    };
    let err = Client::new(&url, &host_token).vms().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(cloud.dir.path().join("controller/admin-token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

/// A second machine cannot join under a name in use; a removed host that
/// joins again starts afresh and runs what it is given.
#[tokio::test]
async fn host_names_cannot_be_taken_over_and_removed_hosts_rejoin_afresh() {
    let mut cloud = cloud_with_image().await;
    let c = cloud.client.clone();
    let mut impostor = cloud.agent_config("h1", "z1");
    impostor.data_dir = cloud.dir.path().join("impostor");
    let err = kumo_agent::start(impostor).await.err().expect("refused");
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert_eq!(c.hosts().await.unwrap().len(), 1);

    // Give h1 some history (generation > 1), then remove it while its agent
    // runs, and restart the agent with a join token.
    c.vm_create(&vm_request("a", "tiny")).await.unwrap();
    wait_vm(&c, "a", VmState::Running, T).await.unwrap();
    c.vm_delete("a").await.unwrap();
    wait_until(T, "a gone", || async { c.vm("a").await.err() })
        .await
        .unwrap();
    let old = c.host("h1").await.unwrap();
    assert!(old.generation > 1);
    c.host_delete("h1").await.unwrap();
    cloud.stop_host(0);
    cloud.host("h1", "z1").await.unwrap();
    let new = c.host("h1").await.unwrap();
    assert_ne!(new.id, old.id);
    c.vm_create(&vm_request("b", "tiny")).await.unwrap();
    wait_vm(&c, "b", VmState::Running, T).await.unwrap();
}

/// An agent restarted with another zone is refused by the controller when
/// it registers again: it exits non-zero, printing the controller's reason,
/// instead of running on with what the controller knew of it before.
#[tokio::test]
async fn an_agent_whose_registration_is_refused_exits_with_the_reason() {
    let cloud = SimCloud::start(Duration::from_millis(600)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.zone("z2").await.unwrap();
    let config = cloud.agent_config("h9", "z1");
    let agent = |zone: &str| {
        let mut cmd = std::process::Command::new(kumo_testkit::bin("kumo-agent"));
        cmd.args(["--driver", "sim", "--name", "h9", "--zone", zone])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--controller",
                &config.controller,
            ])
            .arg("--data-dir")
            .arg(&config.data_dir)
            .env("KUMO_JOIN_TOKEN", config.join_token.as_deref().unwrap())
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    let mut first = agent("z1");
    kumo_testkit::wait_host_ready(&cloud.client, "h9")
        .await
        .unwrap();
    // The controller counts the host in as it answers; the agent keeps
    // its identity right after.
    let identity = config.data_dir.join("identity.json");
    wait_until(T, "the agent's identity saved", || async {
        identity.exists().then_some(())
    })
    .await
    .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();

    let moved = agent("z2");
    let out = tokio::time::timeout(
        T,
        tokio::task::spawn_blocking(move || moved.wait_with_output()),
    )
    .await
    .expect("the refused agent exits")
    .unwrap()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("409 Conflict") && stderr.contains("is registered in zone \"z1\""),
        "{stderr}"
    );
    // Nothing changed: the host is still in its zone.
    assert_eq!(cloud.client.host("h9").await.unwrap().zone, "z1");
}

/// The scheduler through the API: requirements over host labels, dedicated
/// cores, overcommit, policies, capacity planning, and malformed input.
#[tokio::test]
async fn scheduler_constraints_through_the_api() {
    let mut cloud = cloud_with_image().await;
    let mut fast = cloud.agent_config("h2", "z1");
    fast.labels.insert("ssd".into(), "true".into());
    cloud.host_with(fast).await.unwrap();
    let c = cloud.client.clone();

    // Requirements pick the labelled host; a bad expression points at the error.
    let vm = c
        .vm_create(&CreateVm {
            requirements: Some("labels.ssd && zone == \"z1\"".into()),
            ..vm_request("db", "tiny")
        })
        .await
        .unwrap();
    assert_eq!(vm.host, "h2");
    let err = c
        .vm_create(&CreateVm {
            requirements: Some("labels.ssd = true".into()),
            ..vm_request("x", "tiny")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput));
    let msg = err.to_string();
    assert!(
        msg.contains("requirements") && msg.contains("position 11") && msg.contains("=="),
        "{msg}"
    );
    let err = c
        .vm_create(&CreateVm {
            requirements: Some("cpu_modle == \"x\"".into()),
            ..vm_request("x", "tiny")
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("unknown host attribute 'cpu_modle'"),
        "{err}"
    );
    let err = c
        .vm_create(&CreateVm {
            requirements: Some("labels.gpu".into()),
            ..vm_request("x", "tiny")
        })
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("2 not matching the requirements"),
        "{err}"
    );

    // Dedicated cores: 8 per host; whole cores, refused with the reason.
    let dedicated = |name: &str, vcpus| CreateVm {
        vcpus,
        cpu_policy: Some(kumo_api::CpuPolicy::Dedicated),
        zone: Some("z1".into()),
        ..vm_request(name, "tiny")
    };
    let d = c.vm_create(&dedicated("d1", 6)).await.unwrap();
    assert_eq!(d.cores.len(), 6);
    let err = c.vm_create(&dedicated("d2", 9)).await.unwrap_err();
    assert!(
        err.to_string().contains("too few free cores to dedicate"),
        "{err}"
    );

    // Overcommit: h1 has 8 cores at the default 4x.
    let cap = c
        .capacity(&kumo_api::CapacityQuery {
            vcpus: 1,
            memory_mib: 256,
            requirements: Some("name == \"h1\"".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = cap.fits;
    c.host_update(
        "h1",
        &kumo_api::UpdateHost {
            cpu_overcommit: Some(1.0),
            memory_overcommit: None,
        },
    )
    .await
    .unwrap();
    let cap = c
        .capacity(&kumo_api::CapacityQuery {
            vcpus: 1,
            memory_mib: 256,
            requirements: Some("name == \"h1\"".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(cap.fits < before, "{before} -> {}", cap.fits);
    assert_eq!(cap.hosts, 1);
    let err = c
        .host_update(
            "h1",
            &kumo_api::UpdateHost {
                cpu_overcommit: Some(0.0),
                memory_overcommit: None,
            },
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("cpu_overcommit"), "{err}");

    // Spread puts the next VM on the emptier host.
    let spread = c
        .vm_create(&CreateVm {
            policy: Some(kumo_api::PlacementPolicy::Spread),
            ..vm_request("s1", "tiny")
        })
        .await
        .unwrap();
    assert_eq!(spread.host, "h1", "h2 holds more");

    // A rank expression decides among the hosts that qualify.
    let ranked = c
        .vm_create(&CreateVm {
            rank: Some("labels.ssd == \"true\"".into()),
            ..vm_request("r1", "tiny")
        })
        .await
        .unwrap();
    assert_eq!(ranked.host, "h2");
    let err = c
        .vm_create(&CreateVm {
            rank: Some("free.vcpus *".into()),
            ..vm_request("r2", "tiny")
        })
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("rank: at position"), "{err}");

    // An unknown policy is refused with the allowed ones.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/vms", cloud.server.url()))
        .bearer_auth(&cloud.server.admin_token)
        .json(&serde_json::json!({"name": "p", "image": "tiny", "vcpus": 1, "memory_mib": 256, "policy": "fastest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body = resp.text().await.unwrap();
    assert!(
        body.contains("policy") && body.contains("pack") && body.contains("load_aware"),
        "{body}"
    );
    assert!(c.vm("p").await.is_err());
}

/// Hard anti-affinity keeps a group's VMs on different hosts and refuses a
/// VM that cannot be kept apart; affinity keeps VMs together.
#[tokio::test]
async fn groups_keep_vms_apart_or_together() {
    use kumo_api::{CreateGroup, GroupPolicy};
    let mut cloud = cloud_with_image().await;
    cloud.host("h2", "z1").await.unwrap();
    let c = cloud.client.clone();
    let group = |name: &str, policy| CreateGroup {
        name: name.into(),
        policy,
        hard: None,
    };
    c.group_create(&group("db", GroupPolicy::AntiAffinity))
        .await
        .unwrap();
    c.group_create(&group("app", GroupPolicy::Affinity))
        .await
        .unwrap();
    let member = |name: &str, g: &str| CreateVm {
        groups: vec![g.into()],
        ..vm_request(name, "tiny")
    };

    let a = c.vm_create(&member("db1", "db")).await.unwrap();
    let b = c.vm_create(&member("db2", "db")).await.unwrap();
    assert_ne!(a.host, b.host);
    let err = c.vm_create(&member("db3", "db")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoValidHost));
    assert!(
        err.to_string()
            .contains("2 holding a VM of a hard anti-affinity group"),
        "{err}"
    );

    let first = c.vm_create(&member("app1", "app")).await.unwrap();
    let spread = CreateVm {
        policy: Some(kumo_api::PlacementPolicy::Spread),
        ..member("app2", "app")
    };
    assert_eq!(c.vm_create(&spread).await.unwrap().host, first.host);

    let err = c.vm_create(&member("x", "nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidInput));
    assert!(err.to_string().contains("groups"), "{err}");
    let err = c.group_delete("db").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict));
    // Deleting a member frees its place for a new one.
    c.vm_delete("db1").await.unwrap();
    wait_until(T, "db1 gone", || async { c.vm("db1").await.err() })
        .await
        .unwrap();
    assert_eq!(
        c.vm_create(&member("db3", "db")).await.unwrap().host,
        a.host
    );
}

/// A thousand simulated hosts join and take ten thousand VMs through the
/// API; every VM runs on exactly one host and no host is over capacity.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_hosts_take_ten_thousand_vms() {
    let mut cloud = SimCloud::start(Duration::from_secs(30)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud
        .sim_hosts("h", "z1", 1000, Duration::from_secs(1), None)
        .await
        .unwrap();
    let img = blank_image(cloud.dir.path());
    cloud.client.image_import("tiny", &img).await.unwrap();
    let mut creators = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let c = cloud.client.clone();
        creators.spawn(async move {
            for i in (worker..10_000).step_by(16) {
                c.vm_create(&vm_request(&format!("vm-{i}"), "tiny"))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = creators.join_next().await {
        done.unwrap();
    }
    let c = cloud.client.clone();
    wait_until(Duration::from_secs(120), "10,000 VMs running", || async {
        let vms = c.vms().await.ok()?;
        (vms.len() == 10_000 && vms.iter().all(|v| v.state == VmState::Running)).then_some(())
    })
    .await
    .unwrap();
    let hosts = c.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1000);
    let placed: u32 = hosts.iter().map(|h| h.vm_count).sum();
    assert_eq!(placed, 10_000);
    for h in &hosts {
        assert!(
            f64::from(h.allocated.vcpus) <= f64::from(h.capacity.vcpus) * h.cpu_overcommit,
            "{}",
            h.name
        );
        assert!(
            h.allocated.memory_mib <= h.capacity.memory_mib,
            "{}",
            h.name
        );
    }
}
