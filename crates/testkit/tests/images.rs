//! Images are untrusted input: crafted images of every bad kind are refused
//! on import with a 400 naming `file`, and change nothing; an image that
//! got into the controller's store anyway (say, imported before the checks
//! existed) is refused by the agent that downloads it, and its VM fails
//! saying why.

use kumo_api::{ApiError, ErrorCode, EventQuery, Image, ImageFormat, VmState};
use kumo_store::StoreExt;
use kumo_testkit::{blank_image, vm_request, wait_vm, RealCloud, SimCloud};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// `qemu-img create -q ARGS`.
fn qemu_img_create(args: &[&str]) {
    let out = Command::new("qemu-img")
        .arg("create")
        .arg("-q")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(out.status.success(), "qemu-img create {args:?}: {out:?}");
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// A host file a crafted image points at (the agent's identity, say).
fn host_secret(dir: &Path) -> PathBuf {
    let secret = dir.join("identity.json");
    let mut bytes = br#"{"agent_secret": "do not leak"}"#.to_vec();
    bytes.resize(1 << 20, b' ');
    std::fs::write(&secret, bytes).unwrap();
    secret
}

/// A qcow2 whose data lives in `data_file` (OSSA-2024-001).
fn data_file_image(path: &Path, data_file: &Path) {
    let option = format!("data_file={},data_file_raw=on", path_str(data_file));
    qemu_img_create(&["-f", "qcow2", "-o", &option, path_str(path), "1M"]);
}

/// POST the file as an image; the HTTP status and the body.
async fn import(cloud: &SimCloud, name: &str, file: &Path) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/images", cloud.server.url()))
        .query(&[("name", name)])
        .bearer_auth(&cloud.server.admin_token)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(std::fs::read(file).unwrap())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test]
async fn crafted_images_are_refused_on_import_and_change_nothing() {
    let cloud = SimCloud::start(Duration::from_secs(5)).await.unwrap();
    let c = &cloud.client;
    c.image_import("good", &blank_image(cloud.dir.path()))
        .await
        .unwrap();
    let images_before = c.images().await.unwrap();
    let events_before = c.events(&EventQuery::default()).await.unwrap();
    let store = cloud.dir.path().join("controller/images");
    let files_before = std::fs::read_dir(&store).unwrap().count();

    let crafted = tempfile::tempdir().unwrap();
    let file = |name: &str| crafted.path().join(name);
    let secret = host_secret(crafted.path());
    data_file_image(&file("data-file.qcow2"), &secret);
    qemu_img_create(&["-f", "qcow2", path_str(&file("base.qcow2")), "1M"]);
    let base = path_str(&file("base.qcow2")).to_string();
    qemu_img_create(&[
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        &base,
        path_str(&file("backing.qcow2")),
    ]);
    let graph =
        format!(r#"json:{{"driver":"qcow2","file":{{"driver":"file","filename":"{base}"}}}}"#);
    qemu_img_create(&[
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        &graph,
        path_str(&file("json-backing.qcow2")),
        "1M",
    ]);
    qemu_img_create(&["-f", "vmdk", path_str(&file("disk.vmdk")), "1M"]);
    qemu_img_create(&["-f", "vdi", path_str(&file("disk.vdi")), "1M"]);
    // Encrypted, with a short key derivation (made only to be refused).
    let key = "secret,id=k,data=kumo";
    let luks = path_str(&file("disk.luks")).to_string();
    let options = "key-secret=k,iter-time=10";
    qemu_img_create(&["--object", key, "-f", "luks", "-o", options, &luks, "1M"]);
    let encrypted = path_str(&file("encrypted.qcow2")).to_string();
    let options = "encrypt.format=luks,encrypt.key-secret=k,encrypt.iter-time=10";
    qemu_img_create(&[
        "--object", key, "-f", "qcow2", "-o", options, &encrypted, "1M",
    ]);
    qemu_img_create(&["-f", "qcow2", path_str(&file("huge.qcow2")), "3T"]);
    std::fs::write(file("notes.txt"), "not a disk image\n").unwrap();
    std::fs::write(file("empty"), "").unwrap();

    let secret_name = format!("({})", secret.display());
    let cases: &[(&str, &[&str])] = &[
        (
            "data-file.qcow2",
            &["names an external data file", &secret_name, "host files"],
        ),
        ("backing.qcow2", &["has a backing file", &base]),
        ("json-backing.qcow2", &["has a backing file", "json:"]),
        ("disk.vmdk", &["format vmdk is not supported", "qcow2, raw"]),
        ("disk.vdi", &["format vdi is not supported"]),
        ("disk.luks", &["format luks is not supported"]),
        ("encrypted.qcow2", &["encrypted"]),
        ("huge.qcow2", &["virtual size 3298534883328 bytes", "2 TiB"]),
        (
            "notes.txt",
            &["17 bytes is not a raw disk image", "512-byte sectors"],
        ),
        ("empty", &["the file is empty"]),
    ];
    for (name, wanted) in cases {
        let (status, body) = import(&cloud, "crafted", &file(name)).await;
        assert_eq!(status, 400, "{name}: {body}");
        let err: ApiError = serde_json::from_str(&body).unwrap();
        assert_eq!(err.code, ErrorCode::InvalidInput, "{name}: {err:?}");
        assert_eq!(err.field.as_deref(), Some("file"), "{name}: {err:?}");
        assert!(err.message.starts_with("file: "), "{name}: {err:?}");
        for w in *wanted {
            assert!(
                err.message.contains(w),
                "{name}: {:?} lacks {w:?}",
                err.message
            );
        }
    }

    assert_eq!(c.images().await.unwrap(), images_before);
    assert_eq!(
        c.events(&EventQuery::default()).await.unwrap(),
        events_before
    );
    assert_eq!(
        std::fs::read_dir(&store).unwrap().count(),
        files_before,
        "a refused upload leaves no file behind"
    );
}

/// SHA-256 of a file, hex.
fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_image_that_got_past_import_is_refused_by_the_agent() {
    let mut cloud = RealCloud::start().await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.host("h1", "z1").await.unwrap();
    let c = cloud.client.clone();
    let raw = cloud.dir.path().join("disk.raw");
    qemu_img_create(&["-f", "raw", path_str(&raw), "1M"]);
    let image = c.image_import("slipped", &raw).await.unwrap();

    // As if it had been imported before the checks existed: swap in an
    // image whose data file is a host file, behind the controller's back.
    let secret = host_secret(cloud.dir.path());
    let evil = cloud.dir.path().join("evil.qcow2");
    data_file_image(&evil, &secret);
    cloud.kill_controller();
    let data = cloud.dir.path().join("controller");
    std::fs::copy(&evil, data.join("images").join(image.id.to_string())).unwrap();
    {
        let store = kumo_store::SqliteStore::open(&data.join("state.db")).unwrap();
        let forged = Image {
            format: ImageFormat::Qcow2,
            size_bytes: std::fs::metadata(&evil).unwrap().len(),
            sha256: sha256(&evil),
            ..image.clone()
        };
        store.put_json("images/slipped", &forged).await.unwrap();
    }
    cloud.start_controller().await.unwrap();
    cloud.wait_host_ready("h1").await.unwrap();

    c.vm_create(&vm_request("victim", "slipped")).await.unwrap();
    let vm = wait_vm(&c, "victim", VmState::Failed, Duration::from_secs(60))
        .await
        .unwrap();
    let message = vm.message.unwrap_or_default();
    assert!(
        message.contains(&format!("image {} refused", image.id))
            && message.contains(&format!(
                "names an external data file ({})",
                secret.display()
            )),
        "{message}"
    );
    assert!(cloud.qemu_pids().is_empty(), "no QEMU opened the image");
    let cache = cloud.dir.path().join("host-h1/images");
    let cached: Vec<_> = std::fs::read_dir(&cache)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        cached.is_empty(),
        "a refused image is not cached: {cached:?}"
    );
}
