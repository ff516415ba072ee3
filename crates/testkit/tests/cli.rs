//! The `kumo` CLI against the real controller with simulated hosts.

use kumo_testkit::{bin, cli, SimCloud};
use serde_json::Value;
use std::process::Stdio;
use std::time::Duration;

/// What `kumo ARGS` printed, as JSON.
async fn json(cloud: &SimCloud, args: &[&str]) -> Value {
    let text = cloud.cli(args).await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("kumo {args:?}: {e}: {text}"))
}

#[tokio::test]
async fn show_prints_one_json_object_and_list_an_array() {
    let cloud = SimCloud::with_vm().await.unwrap();
    cloud
        .cli(&["group", "create", "g1", "--policy", "anti_affinity"])
        .await
        .unwrap();
    for (kind, name) in [
        ("zone", "z1"),
        ("host", "h1"),
        ("image", "tiny"),
        ("vm", "web"),
        ("group", "g1"),
    ] {
        let one = json(&cloud, &[kind, "show", name, "-o", "json"]).await;
        assert!(one.is_object(), "{kind} show: {one}");
        assert_eq!(one["name"], name, "{kind} show: {one}");
        let list = json(&cloud, &[kind, "list", "-o", "json"]).await;
        let names: Vec<&Value> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| &v["name"])
            .collect();
        assert_eq!(names, [name], "{kind} list: {list}");
    }
    // Commands about one resource print it as one object too.
    let vm = json(&cloud, &["vm", "stop", "web", "-o", "json"]).await;
    assert_eq!(vm["name"], "web");
    let host = json(&cloud, &["host", "disable", "h1", "-o", "json"]).await;
    assert_eq!(host["state"], "disabled");
}

#[tokio::test]
async fn a_listing_into_a_closed_pipe_ends_quietly() {
    let mut cloud = SimCloud::start(Duration::from_secs(5)).await.unwrap();
    cloud.zone("z1").await.unwrap();
    cloud.host("h1", "z1").await.unwrap();
    // `kumo host list | head -1` after head left: the reading end is
    // closed before kumo writes.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = tokio::process::Command::new(bin("kumo"))
        .args(["host", "list"])
        .env("KUMO_URL", cloud.server.url())
        .env("KUMO_TOKEN", &cloud.server.admin_token)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert!(out.status.success(), "{:?}", out.status);
}

#[tokio::test]
async fn the_controller_serves_on_every_listen_address() {
    // As the quickstart runs it: a private address for the agents (here
    // 127.0.0.2 stands in for the bridge) and 127.0.0.1 for people.
    let cloud = SimCloud::start_with(Duration::from_secs(5), |c| {
        c.listen.push("127.0.0.2:0".parse().unwrap());
    })
    .await
    .unwrap();
    assert_eq!(cloud.server.addrs.len(), 2);
    assert_eq!(cloud.server.addrs[0], cloud.server.addr);
    for addr in &cloud.server.addrs {
        let url = format!("http://{addr}");
        let zones = cli(
            &url,
            &cloud.server.admin_token,
            &["zone", "list", "-o", "json"],
            "",
        )
        .await
        .unwrap();
        assert_eq!(zones.trim(), "[]", "{url}");
    }
}
