//! State and secrets on disk are their owner's alone: data directories
//! 0700, the files holding tokens and state 0600 — on a new install, and
//! after the first start of a data dir an older version made 0755 / 0644.

use kumo_client::Client;
use kumo_testkit::{create_zone, free_port, wait_until, SimCloud};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// Permission bits as `ls -l` shows them in octal, e.g. "700".
fn mode(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    format!("{:o}", meta.permissions().mode() & 0o7777)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn assert_modes(expected: &[(PathBuf, &str)]) {
    for (path, want) in expected {
        assert_eq!(mode(path), *want, "mode of {}", path.display());
    }
}

#[tokio::test]
async fn a_new_controller_and_host_keep_state_and_secrets_owner_only() {
    let mut cloud = SimCloud::start(Duration::from_secs(5)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.host("h1", "z1").await.unwrap();
    let controller = cloud.dir.path().join("controller");
    let host = cloud.dir.path().join("host-h1");
    let ledger = host.join("desired.json");
    wait_until(T, "the host's ledger", || async {
        ledger.exists().then_some(())
    })
    .await
    .unwrap();
    assert_modes(&[
        (controller.clone(), "700"),
        (controller.join("images"), "700"),
        (controller.join("state.db"), "600"),
        (controller.join("admin-token"), "600"),
        (host.clone(), "700"),
        (host.join("vms"), "700"),
        (host.join("identity.json"), "600"),
        (ledger, "600"),
    ]);
    for side in ["state.db-wal", "state.db-shm", "state.db-journal"] {
        let path = controller.join(side);
        if path.exists() {
            assert_modes(&[(path, "600")]);
        }
    }
}

#[tokio::test]
async fn a_controller_tightens_the_data_dir_an_older_version_left_open() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("controller");
    let config = kumod::Config::new(data.clone(), "127.0.0.1:0".parse().unwrap());
    let server = kumod::start(config.clone()).await.unwrap();
    let client = Client::new(&server.url(), &server.admin_token);
    create_zone(&client, "z1").await.unwrap();
    let token = server.admin_token.clone();
    // The database is free to open again once nothing holds the app, and
    // the client's open connections do until the client is dropped.
    let app = Arc::downgrade(&server.app);
    drop((client, server));
    wait_until(T, "the controller stopped", || async {
        (app.strong_count() == 0).then_some(())
    })
    .await
    .unwrap();

    // As an older version made them.
    chmod(&data, 0o755);
    chmod(&data.join("images"), 0o755);
    chmod(&data.join("state.db"), 0o644);
    chmod(&data.join("admin-token"), 0o644);
    let server = kumod::start(config).await.unwrap();
    assert_modes(&[
        (data.clone(), "700"),
        (data.join("images"), "700"),
        (data.join("state.db"), "600"),
        (data.join("admin-token"), "600"),
    ]);
    // Same token, same state.
    assert_eq!(server.admin_token, token);
    let client = Client::new(&server.url(), &server.admin_token);
    let zones = client.zones().await.unwrap();
    assert!(zones.iter().any(|z| z.name == "z1"), "{zones:?}");
}

#[tokio::test]
async fn a_host_tightens_the_data_dir_an_older_version_left_open() {
    let mut cloud = SimCloud::start(Duration::from_secs(5)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    let config = cloud.agent_config("h1", "z1");
    cloud.host_with(config.clone()).await.unwrap();
    let host = config.data_dir.clone();
    let ledger = host.join("desired.json");
    wait_until(T, "the host's ledger", || async {
        ledger.exists().then_some(())
    })
    .await
    .unwrap();
    cloud.stop_host(0);

    // As an older version made them.
    chmod(&host, 0o755);
    chmod(&host.join("vms"), 0o755);
    chmod(&host.join("identity.json"), 0o644);
    chmod(&ledger, 0o644);
    // Restarted while the controller is out of reach, the host goes on with
    // its saved identity and ledger: nothing rewrites them, so what is
    // checked is what the start tightened.
    let agent = kumo_agent::start(kumo_agent::Config {
        controller: format!("http://127.0.0.1:{}", free_port()),
        join_token: None,
        ..config
    })
    .await
    .unwrap();
    assert_modes(&[
        (host.clone(), "700"),
        (host.join("vms"), "700"),
        (host.join("identity.json"), "600"),
        (ledger, "600"),
    ]);
    drop(agent);
}
