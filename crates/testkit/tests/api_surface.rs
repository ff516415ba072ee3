//! The API's surface as an attacker meets it: every route against every
//! kind of credential, malformed input for every request type (refused
//! with the field named, nothing changed), the refusals the HTTP framework
//! produces, and a property-based fuzzer run against the API document.

use kumo_testkit::{vm_request, wait_vm, SimCloud};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::time::Duration;

async fn cloud() -> SimCloud {
    let cloud = SimCloud::with_vm().await.unwrap();
    // A second VM, so that the VM list has a second page.
    cloud
        .client
        .vm_create(&vm_request("web2", "tiny"))
        .await
        .unwrap();
    for name in ["web", "web2"] {
        wait_vm(
            &cloud.client,
            name,
            kumo_api::VmState::Running,
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    }
    cloud
}

fn host_token(cloud: &SimCloud) -> String {
    let path = cloud.dir.path().join("host-h1/identity.json");
    let id: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    id["host_token"].as_str().unwrap().to_string()
}

/// A raw request: status, headers and the body as JSON (Null if none).
async fn call(
    url: &str,
    method: Method,
    path: &str,
    auth: Option<&str>,
    body: Option<String>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let http = reqwest::Client::new();
    let mut req = http.request(method, format!("{url}{path}"));
    if let Some(auth) = auth {
        req = req.header("authorization", auth);
    }
    if let Some(body) = body {
        req = req.header("content-type", "application/json").body(body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, headers, body)
}

/// Who the API is meant for, stated independently of the server's table:
/// health and the document are public; registration takes a join token
/// (or the host's own token); the other agent endpoints are for hosts;
/// image downloads for hosts and the admin; everything else for the admin.
#[derive(Debug, PartialEq)]
enum Meant {
    Public,
    Join,
    Host,
    AdminOrHost,
    Admin,
}

fn meant(method: &str, path: &str) -> Meant {
    match (method, path) {
        (_, "/v1/health" | "/v1/openapi.json") => Meant::Public,
        (_, "/v1/agent/register") => Meant::Join,
        (_, p) if p.starts_with("/v1/agent/") => Meant::Host,
        ("get", "/v1/images/{name}/data") => Meant::AdminOrHost,
        _ => Meant::Admin,
    }
}

#[tokio::test]
async fn every_route_admits_only_its_principals() {
    let cloud = cloud().await;
    let url = cloud.server.url();
    let host = host_token(&cloud);
    let admin = cloud.server.admin_token.clone();
    let (_, _, doc) = call(&url, Method::GET, "/v1/openapi.json", None, None).await;
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let meant = meant(method, path);
            // The document says the same.
            let security = op["security"].as_array().unwrap();
            let schemes: Vec<String> = security
                .iter()
                .flat_map(|s| s.as_object().unwrap().keys().cloned())
                .collect();
            let open = security.is_empty() || security.iter().any(|s| s == &json!({}));
            match meant {
                Meant::Public => assert!(security.is_empty(), "{method} {path}"),
                Meant::Join => assert!(open && schemes == ["host_token"], "{method} {path}"),
                Meant::Host => assert_eq!(schemes, ["host_token"], "{method} {path}"),
                Meant::AdminOrHost => {
                    assert_eq!(schemes, ["admin_token", "host_token"], "{method} {path}")
                }
                Meant::Admin => assert_eq!(schemes, ["admin_token"], "{method} {path}"),
            }
            // A path that names nothing, no side effects (`after` absent:
            // the desired-state poll answers at once).
            let concrete = path.replace("{name}", "no-such-thing");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let body = op.get("requestBody").map(|_| "{}".to_string());
            let bearer = |t: &str| format!("Bearer {t}");
            for (who, auth) in [
                ("none", None),
                ("wrong", Some(bearer("wrong-token"))),
                ("host", Some(bearer(&host))),
                ("admin", Some(bearer(&admin))),
            ] {
                let (status, _, err) =
                    call(&url, m.clone(), &concrete, auth.as_deref(), body.clone()).await;
                let allowed = matches!(
                    (&meant, who),
                    (Meant::Public, _)
                        | (Meant::Join, "none" | "host" | "admin")
                        | (Meant::Host, "host")
                        | (Meant::AdminOrHost, "host" | "admin")
                        | (Meant::Admin, "admin")
                );
                let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
                assert_eq!(
                    !refused, allowed,
                    "{method} {path} with {who} token: {status} {err}"
                );
                if refused {
                    let want = if who == "none" || who == "wrong" {
                        StatusCode::UNAUTHORIZED
                    } else {
                        StatusCode::FORBIDDEN
                    };
                    assert_eq!(status, want, "{method} {path} with {who} token: {err}");
                    assert_eq!(err["field"], "authorization", "{err}");
                }
                assert!(
                    status.as_u16() < 500,
                    "{method} {path} with {who}: {status} {err}"
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 4 * 45,
        "only {checked} calls: are routes missing from the document?"
    );

    // A host token reads image data but cannot delete the image (the old
    // check matched any path ending in `/data`).
    let h = format!("Bearer {host}");
    let (s, _, _) = call(&url, Method::GET, "/v1/images/tiny/data", Some(&h), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = call(&url, Method::DELETE, "/v1/images/data", Some(&h), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let lower = format!("bearer {admin}");
    let (s, _, _) = call(&url, Method::GET, "/v1/vms", Some(&lower), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, e) = call(
        &url,
        Method::GET,
        "/v1/vms",
        Some(&format!("Basic {admin}")),
        None,
    )
    .await;
    assert_eq!(
        (s, e["field"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("authorization"))
    );
}

/// Everything a caller can see, less what moves on its own (heartbeats).
async fn snapshot(url: &str, admin: &str) -> Value {
    let auth = format!("Bearer {admin}");
    let mut state = serde_json::Map::new();
    for path in [
        "/v1/zones",
        "/v1/hosts",
        "/v1/vms",
        "/v1/groups",
        "/v1/images",
        "/v1/join-tokens",
        "/v1/events?limit=10000",
        "/v1/zones/z1/power-saving",
    ] {
        let (_, _, mut v) = call(url, Method::GET, path, Some(&auth), None).await;
        // Paged lists hold theirs under `items`.
        let items = match v.get_mut("items") {
            Some(items) => items.as_array_mut(),
            None => v.as_array_mut(),
        };
        for item in items.into_iter().flatten() {
            for moving in [
                "load",
                "last_heartbeat",
                "cpu_percent",
                "applied_generation",
            ] {
                item.as_object_mut().unwrap().remove(moving);
            }
        }
        state.insert(path.into(), v);
    }
    Value::Object(state)
}

#[tokio::test]
async fn malformed_input_names_its_field_and_changes_nothing() {
    let cloud = cloud().await;
    let url = cloud.server.url();
    let admin = format!("Bearer {}", cloud.server.admin_token);
    let host = format!("Bearer {}", host_token(&cloud));
    let long = "x".repeat(1_500_000);
    let before = snapshot(&url, &cloud.server.admin_token).await;

    // (method, path, token, body, expected field)
    let vm = json!({"name": "db", "image": "tiny", "vcpus": 1, "memory_mib": 64});
    let with = |base: &Value, k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let zone = json!({"name": "z9"});
    let power = json!({"power_off_command": "true", "power_on_command": "true"});
    let register = json!({
        "join_token": "", "name": "h1", "zone": "z1", "address": "http://127.0.0.1:1",
        "agent_secret": "s", "capacity": {"vcpus": 1, "memory_mib": 1024, "disk_gib": 10},
        "hypervisor": {"driver": "sim", "accel": "none"}
    });
    let heartbeat = json!({
        "load": {"cpu_percent": 1.0, "memory_used_mib": 1, "load1": 0.1},
        "applied_generation": 1, "vms": []
    });
    let cases: Vec<(Method, &str, &str, Value, &str)> = vec![
        // Misspelt fields: refused, with the field they meant.
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "requirement", json!("true")),
            "requirement",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "zones", json!("z1")),
            "zones",
        ),
        (
            Method::PATCH,
            "/v1/hosts/h1",
            &admin,
            json!({"cpu_overcomit": 2.0}),
            "cpu_overcomit",
        ),
        (
            Method::POST,
            "/v1/vms/web/migrate",
            &admin,
            json!({"too": "h1"}),
            "too",
        ),
        (
            Method::POST,
            "/v1/zones",
            &admin,
            with(&zone, "descripton", json!("a")),
            "descripton",
        ),
        (
            Method::POST,
            "/v1/groups",
            &admin,
            json!({"name": "g", "policy": "affinity", "hrd": true}),
            "hrd",
        ),
        (
            Method::POST,
            "/v1/join-tokens",
            &admin,
            json!({"ttl": 60}),
            "ttl",
        ),
        (
            Method::PUT,
            "/v1/zones/z1/power-saving",
            &admin,
            with(&power, "headrom", json!(0.1)),
            "headrom",
        ),
        (
            Method::POST,
            "/v1/agent/heartbeat",
            &host,
            with(&heartbeat, "vm", json!([])),
            "vm",
        ),
        (
            Method::POST,
            "/v1/agent/register",
            &host,
            with(&register, "label", json!({})),
            "label",
        ),
        // Nested unknown fields name their path.
        (
            Method::POST,
            "/v1/agent/register",
            &host,
            with(
                &register,
                "capacity",
                json!({"vcpus": 1, "memory_mib": 1, "disk_gib": 1, "gpus": 1}),
            ),
            "capacity.gpus",
        ),
        // Arrays where an object belongs.
        (
            Method::POST,
            "/v1/vms/web/migrate",
            &admin,
            json!([null, null]),
            "body",
        ),
        (
            Method::PATCH,
            "/v1/hosts/h1",
            &admin,
            json!([16, 3]),
            "body",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            json!(["db", "tiny", 1, 64]),
            "body",
        ),
        (
            Method::POST,
            "/v1/agent/register",
            &host,
            with(&register, "capacity", json!([1, 1024, 10])),
            "capacity",
        ),
        // Wrong types.
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "vcpus", json!("2")),
            "vcpus",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "cpu_policy", json!("exclusive")),
            "cpu_policy",
        ),
        (
            Method::PATCH,
            "/v1/hosts/h1",
            &admin,
            json!({"cpu_overcommit": "lots"}),
            "cpu_overcommit",
        ),
        (
            Method::POST,
            "/v1/vms/web/migrate",
            &admin,
            json!({"downtime_limit_ms": -1}),
            "downtime_limit_ms",
        ),
        // Out of range.
        (
            Method::PATCH,
            "/v1/hosts/h1",
            &admin,
            json!({"memory_overcommit": 1000}),
            "memory_overcommit",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "vcpus", json!(0)),
            "vcpus",
        ),
        // Over-long strings, over-full lists and maps.
        (
            Method::POST,
            "/v1/zones",
            &admin,
            with(&zone, "description", json!(long)),
            "description",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "name", json!("a".repeat(64))),
            "name",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "requirements", json!("x".repeat(5000))),
            "requirements",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "groups", json!(vec!["g"; 17])),
            "groups",
        ),
        (
            Method::POST,
            "/v1/vms",
            &admin,
            with(&vm, "metadata", json!({"k": "v".repeat(1025)})),
            "metadata.k",
        ),
        (
            Method::PUT,
            "/v1/zones/z1/power-saving",
            &admin,
            with(&power, "power_on_command", json!("x".repeat(4097))),
            "power_on_command",
        ),
        (
            Method::POST,
            "/v1/agent/heartbeat",
            &host,
            with(
                &heartbeat,
                "vms",
                json!([{"id": "00000000-0000-0000-0000-000000000000", "state": "running", "reboots": 0, "message": "m".repeat(5000)}]),
            ),
            "vms[0].message",
        ),
        // What a schema cannot say still names its field.
        (
            Method::POST,
            "/v1/agent/heartbeat",
            &host,
            with(
                &heartbeat,
                "vms",
                json!([{"id": "not-a-uuid", "state": "running", "reboots": 0}]),
            ),
            "vms[0].id",
        ),
        // Missing fields.
        (
            Method::POST,
            "/v1/vms",
            &admin,
            json!({"name": "db"}),
            "image",
        ),
        // A body where the endpoint takes none: a "dry run" must not drain.
        (
            Method::POST,
            "/v1/hosts/h1/drain",
            &admin,
            json!({"dry_run": true}),
            "body",
        ),
        (Method::POST, "/v1/vms/web/stop", &admin, json!({}), "body"),
        // Numbers the document bounds, and addresses that are no URL.
        (
            Method::POST,
            "/v1/agent/heartbeat",
            &host,
            with(
                &heartbeat,
                "load",
                json!({"cpu_percent": 1e300, "memory_used_mib": 1, "load1": 0.1}),
            ),
            "load.cpu_percent",
        ),
        (
            Method::POST,
            "/v1/agent/register",
            &host,
            with(&register, "address", json!("not a url")),
            "address",
        ),
    ];
    for (method, path, auth, body, field) in cases {
        let (status, _, err) = call(
            &url,
            method.clone(),
            path,
            Some(auth),
            Some(body.to_string()),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{method} {path} {field}: {err}"
        );
        assert_eq!(err["code"], "invalid_input", "{err}");
        assert_eq!(err["field"], field, "{method} {path}: {err}");
        assert!(
            err["message"].as_str().unwrap().len() < 1000,
            "short message: {err}"
        );
    }
    // A misspelling is met with the field meant.
    let (_, _, err) = call(
        &url,
        Method::POST,
        "/v1/vms",
        Some(&admin),
        Some(with(&vm, "requirement", json!("true")).to_string()),
    )
    .await;
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `requirements`"),
        "{err}"
    );

    // Queries: unknown, misspelt, mistyped, repeated, over-long.
    for (method, path, field) in [
        (Method::POST, "/v1/hosts/h1/drain?dry-run=true", "dry-run"),
        (Method::POST, "/v1/zones/z1/drain?dry_run=yes", "dry_run"),
        (
            Method::POST,
            "/v1/zones/z1/drain?dry_run=true&dry_run=false",
            "dry_run",
        ),
        (Method::POST, "/v1/zones/z1/undrain?returns=true", "returns"),
        (Method::GET, "/v1/hosts?zones=z1", "zones"),
        (Method::GET, "/v1/vms?owner=me", "owner"),
        (Method::GET, "/v1/vms?state=sleeping", "state"),
        (Method::GET, "/v1/hosts?state=running", "state"),
        (Method::GET, "/v1/vms?limit=0", "limit"),
        (Method::GET, "/v1/vms?limit=-1", "limit"),
        (Method::GET, "/v1/vms?limit=5001", "limit"),
        (Method::GET, "/v1/hosts?limit=5001", "limit"),
        (Method::GET, "/v1/vms?page_token=", "page_token"),
        (
            Method::GET,
            "/v1/vms?page_token=bm90IGEgdG9rZW4",
            "page_token",
        ),
        (Method::GET, "/v1/vms?name=", "name"),
        (Method::GET, "/v1/capacity?vcpus=1", "memory_mib"),
        (
            Method::GET,
            "/v1/capacity?vcpus=1&memory_mib=64&cpu_policy=exclusive",
            "cpu_policy",
        ),
        (Method::GET, "/v1/events?limit=0", "limit"),
        (Method::GET, "/v1/events?limit=10001", "limit"),
        (Method::GET, "/v1/events?after=-1", "after"),
        (Method::GET, "/v1/events?after=999999999", "after"),
        (
            Method::GET,
            "/v1/events?after=0&wait_seconds=11",
            "wait_seconds",
        ),
        (Method::GET, "/v1/events?wait_seconds=1", "wait_seconds"),
        (Method::POST, "/v1/images?name=", "name"),
    ] {
        let (status, _, err) = call(&url, method.clone(), path, Some(&admin), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {err}");
        assert_eq!(err["field"], field, "{method} {path}: {err}");
    }
    let long_name = format!("/v1/vms/{}", "a".repeat(5000));
    let (status, _, err) = call(&url, Method::GET, &long_name, Some(&admin), None).await;
    assert_eq!(
        (status, err["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("name"))
    );
    assert!(err["message"].as_str().unwrap().len() < 200, "{err}");
    // A page token used on another list, or with other filters.
    let (status, _, page) = call(&url, Method::GET, "/v1/vms?limit=1", Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let token = page["next"].as_str().unwrap().to_string();
    for path in [
        format!("/v1/hosts?page_token={token}"),
        format!("/v1/vms?page_token={token}&state=running"),
        format!("/v1/vms?page_token={token}&name=w"),
    ] {
        let (status, _, err) = call(&url, Method::GET, &path, Some(&admin), None).await;
        assert_eq!(
            (status, err["field"].as_str()),
            (StatusCode::BAD_REQUEST, Some("page_token")),
            "{path}: {err}"
        );
    }
    let resource = format!("/v1/events?resource={}", "r".repeat(200));
    let (status, _, err) = call(&url, Method::GET, &resource, Some(&admin), None).await;
    assert_eq!(
        (status, err["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("resource"))
    );

    // A migration to a host that does not exist names `to`.
    let (status, _, err) = call(
        &url,
        Method::POST,
        "/v1/vms/web/migrate",
        Some(&admin),
        Some(json!({"to": "nowhere"}).to_string()),
    )
    .await;
    assert_eq!(
        (status, err["field"].as_str()),
        (StatusCode::NOT_FOUND, Some("to")),
        "{err}"
    );
    // Simulated hosts have no console: a conflict that says so, not a 502.
    let (status, _, err) = call(
        &url,
        Method::GET,
        "/v1/vms/web/console/log",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("simulated"),
        "{err}"
    );

    assert_eq!(
        snapshot(&url, &cloud.server.admin_token).await,
        before,
        "nothing changed"
    );
}

#[tokio::test]
async fn framework_refusals_are_kumo_errors() {
    let cloud = cloud().await;
    let url = cloud.server.url();
    let admin = format!("Bearer {}", cloud.server.admin_token);
    let check = |status: StatusCode, err: &Value, want: StatusCode, code: &str, field: &str| {
        assert_eq!(status, want, "{err}");
        assert_eq!(err["code"], code, "{err}");
        assert_eq!(err["field"], field, "{err}");
    };
    let (s, headers, err) = call(&url, Method::PUT, "/v1/vms", Some(&admin), None).await;
    check(
        s,
        &err,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method",
    );
    let allow = headers
        .get("allow")
        .expect("an Allow header")
        .to_str()
        .unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let big = json!({"name": "z9", "description": "x".repeat(3 << 20)}).to_string();
    let (s, _, err) = call(&url, Method::POST, "/v1/zones", Some(&admin), Some(big)).await;
    check(
        s,
        &err,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        "body",
    );
    let long = format!("/v1/vms?{}", "a".repeat(62_000));
    let (s, _, err) = call(&url, Method::GET, &long, Some(&admin), None).await;
    check(s, &err, StatusCode::URI_TOO_LONG, "uri_too_long", "uri");
    let (s, _, err) = call(
        &url,
        Method::POST,
        "/v1/zones",
        Some(&admin),
        Some("{\"name\":".into()),
    )
    .await;
    check(s, &err, StatusCode::BAD_REQUEST, "invalid_input", "body");
    let (s, _, err) = call(&url, Method::GET, "/v1/nothing", Some(&admin), None).await;
    check(s, &err, StatusCode::NOT_FOUND, "not_found", "uri");
    let (s, _, err) = call(&url, Method::GET, "/v1/zones/%FF", Some(&admin), None).await;
    assert!(
        s == StatusCode::BAD_REQUEST || s == StatusCode::NOT_FOUND,
        "{s} {err}"
    );
    assert_eq!(err["field"], "name", "{err}");
    let (s, _, body) = call(&url, Method::GET, "/v1/health", None, None).await;
    assert_eq!((s, body["status"].as_str()), (StatusCode::OK, Some("ok")));
    // A body must come as sent: one with a Content-Encoding is refused.
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/zones"))
        .header("authorization", &admin)
        .header("content-encoding", "br")
        .body(r#"{"name":"z9"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["field"], "content-encoding", "{err}");
    // HEAD is GET without the body, under GET's access rule.
    let (s, _, _) = call(&url, Method::HEAD, "/v1/health", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = call(&url, Method::HEAD, "/v1/vms", Some(&admin), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, headers, _) = call(&url, Method::HEAD, "/v1/vms", None, None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // RFC 6750 §3: a 401 names the scheme.
    assert_eq!(headers.get("www-authenticate").unwrap(), "Bearer");
    // Two Authorization headers are one too many, in either order.
    for (first, second) in [
        (admin.as_str(), "Bearer bad"),
        ("Bearer bad", admin.as_str()),
    ] {
        let resp = reqwest::Client::new()
            .get(format!("{url}/v1/vms"))
            .header("authorization", first)
            .header("authorization", second)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    }
}

/// The pinned fuzzer; `scripts/lib/install-deps` installs it.
const SCHEMATHESIS: &str = "st";

/// A property-based API fuzzer (schemathesis) against the live server,
/// driven by the served document: it fails on any 5xx, any status or
/// content type the document does not list, any response that breaks its
/// schema, any schema-violating request accepted, any undocumented method
/// not refused with 405 and `Allow`, and any operation that works without
/// its token. Bounded: few examples per operation, a time budget, a fixed
/// seed. Power saving's settings are left out: they hold shell commands
/// the controller runs, and fuzzed text is no command to run. So is the
/// image upload: generating its binary bodies trips a CPython recursion
/// check in the fuzzer now and then, and crafted images are tested in
/// `images.rs`.
#[tokio::test]
async fn fuzzer_finds_no_disagreement_with_the_document() {
    let cloud = cloud().await;
    let url = cloud.server.url();
    let out = tokio::process::Command::new(SCHEMATHESIS)
        .arg("run")
        .arg(format!("{url}/v1/openapi.json"))
        .args([
            "-H",
            &format!("Authorization: Bearer {}", cloud.server.admin_token),
        ])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,negative_data_rejection,\
             unsupported_method,allow_header_conformance,ignored_auth",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "5",
            "--max-time",
            "60",
            "--seed",
            "1",
            "--workers",
            "2",
            // Above the longest long poll (`GET /v1/events?wait_seconds=10`).
            "--request-timeout",
            "15",
            "--exclude-path",
            "/v1/zones/{name}/power-saving",
            "--exclude-operation-id",
            "import",
            "--no-color",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        // It keeps a cache of its findings in its working directory.
        .current_dir(cloud.dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .expect("schemathesis runs (installed by scripts/lib/install-deps)");
    let report = String::from_utf8_lossy(&out.stdout);
    // Its report can be long (failing requests are shown whole): keep it
    // in a file, show the summary.
    let saved = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzzer-report.txt");
    std::fs::write(&saved, report.as_bytes()).unwrap();
    let mut tail: Vec<String> = report
        .lines()
        .rev()
        .take(60)
        .map(|l| l.chars().take(300).collect())
        .collect();
    tail.reverse();
    assert!(
        out.status.success(),
        "the fuzzer found disagreements; whole report in {}:\n{}\n{}",
        saved.display(),
        tail.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains("Tested:"),
        "the fuzzer tested nothing:\n{report}"
    );
}
