//! Protocol tests against a fake QMP server on a unix socket (no QEMU).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::sync::broadcast::error::RecvError;

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7"}, "capabilities": ["oob"]}}"#;

/// The server end of one fake QMP connection.
struct Peer {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Peer {
    async fn accept(listener: &UnixListener) -> Peer {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, write) = stream.into_split();
        Peer {
            read: BufReader::new(read),
            write,
        }
    }

    async fn send_raw(&mut self, line: &str) {
        // QEMU terminates lines with CRLF.
        self.write
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    async fn send(&mut self, message: Value) {
        self.send_raw(&message.to_string()).await;
    }

    /// Read one command; returns its name, id and arguments.
    async fn recv(&mut self) -> (String, Value, Option<Value>) {
        let mut line = String::new();
        assert_ne!(self.read.read_line(&mut line).await.unwrap(), 0, "EOF");
        let mut message: Value = serde_json::from_str(&line).unwrap();
        let name = message["execute"].as_str().unwrap().to_owned();
        let arguments = message.as_object_mut().unwrap().remove("arguments");
        (name, message["id"].clone(), arguments)
    }

    /// Greet, and accept `qmp_capabilities`.
    async fn handshake(&mut self) {
        self.send_raw(GREETING).await;
        let (name, id, arguments) = self.recv().await;
        assert_eq!(name, "qmp_capabilities");
        assert_eq!(arguments, None);
        self.send(json!({"return": {}, "id": id})).await;
    }
}

fn socket() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// Connect a client to a fake server that has greeted it.
async fn pair() -> (tempfile::TempDir, Qmp, Peer) {
    let (dir, path, listener) = socket();
    let server = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        peer.handshake().await;
        peer
    });
    let qmp = Qmp::connect(&path).await.unwrap();
    (dir, qmp, server.await.unwrap())
}

#[test]
fn qmp_is_send_and_sync() {
    fn check<T: Send + Sync + 'static>() {}
    check::<Qmp>();
    check::<Error>();
}

#[tokio::test]
async fn handshake_reads_version() {
    let (_dir, qmp, _peer) = pair().await;
    assert_eq!(*qmp.version(), QemuVersion::new(7, 2, 22));
    assert_eq!(qmp.version().to_string(), "7.2.22");
    assert!(qmp.is_connected());
}

#[tokio::test]
async fn replies_out_of_order_and_events_are_routed() {
    let (_dir, qmp, mut peer) = pair().await;
    let mut events = qmp.events();

    let a = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("cmd-a", Some(json!({"x": 1}))).await }
    });
    let b = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.query_status().await }
    });

    let mut ids = HashMap::new();
    for _ in 0..2 {
        let (name, id, arguments) = peer.recv().await;
        if name == "cmd-a" {
            assert_eq!(arguments, Some(json!({"x": 1})));
        } else {
            assert_eq!(arguments, None);
        }
        ids.insert(name, id);
    }
    // Answer the second command first, with an event in between.
    peer.send(json!({
        "return": {"status": "paused", "singlestep": false, "running": false},
        "id": ids["query-status"],
    }))
    .await;
    peer.send(json!({
        "timestamp": {"seconds": 1700000000, "microseconds": 250},
        "event": "STOP",
    }))
    .await;
    peer.send(json!({"id": ids["cmd-a"], "return": {"answer": 42}}))
        .await;

    let status = b.await.unwrap().unwrap();
    assert_eq!(
        status,
        StatusInfo {
            running: false,
            status: "paused".into()
        }
    );
    assert_eq!(a.await.unwrap().unwrap(), json!({"answer": 42}));

    let event = events.recv().await.unwrap();
    assert_eq!(event.event, "STOP");
    assert_eq!(event.data, Value::Null);
    assert_eq!(
        event.timestamp.to_system_time(),
        Some(epoch_plus(1_700_000_000, 250))
    );

    // An event with data.
    peer.send(json!({
        "timestamp": {"seconds": 1, "microseconds": 2},
        "event": "RESET",
        "data": {"guest": false, "reason": "host-qmp-system-reset"},
    }))
    .await;
    let event = events.recv().await.unwrap();
    assert_eq!(event.event, "RESET");
    assert_eq!(event.data["reason"], "host-qmp-system-reset");
}

fn epoch_plus(secs: u64, micros: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros)
}

#[tokio::test]
async fn error_reply_becomes_command_error() {
    let (_dir, qmp, mut peer) = pair().await;
    let call = tokio::spawn(async move { qmp.execute("nope", None).await });
    let (_, id, _) = peer.recv().await;
    peer.send(json!({
        "id": id,
        "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
    }))
    .await;
    match call.await.unwrap() {
        Err(Error::Command { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert_eq!(desc, "The command nope has not been found");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
}

#[tokio::test]
async fn typed_helpers_decode_replies() {
    let (_dir, qmp, mut peer) = pair().await;
    let server = tokio::spawn(async move {
        for _ in 0..2 {
            let (name, id, _) = peer.recv().await;
            let reply = match name.as_str() {
                "query-cpus-fast" => json!([
                    {"cpu-index": 0, "thread-id": 1234, "qom-path": "/machine/unattached/device[0]", "target": "x86_64"},
                    {"cpu-index": 1, "thread-id": 1235, "qom-path": "/machine/unattached/device[1]", "target": "x86_64"},
                ]),
                "query-version" => {
                    json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""})
                }
                other => panic!("unexpected command {other}"),
            };
            peer.send(json!({"return": reply, "id": id})).await;
        }
        peer
    });
    let cpus = qmp.query_cpus_fast().await.unwrap();
    assert_eq!(
        cpus,
        vec![
            CpuInfo {
                cpu_index: 0,
                thread_id: 1234
            },
            CpuInfo {
                cpu_index: 1,
                thread_id: 1235
            },
        ]
    );
    let version = qmp.query_version().await.unwrap();
    assert_eq!(version.qemu, QemuVersion::new(7, 2, 0));
    server.await.unwrap();
}

#[tokio::test]
async fn unexpected_reply_shape_is_a_protocol_error() {
    let (_dir, qmp, mut peer) = pair().await;
    let call = tokio::spawn(async move { qmp.query_status().await });
    let (_, id, _) = peer.recv().await;
    peer.send(json!({"return": {"status": 3}, "id": id})).await;
    let error = call.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
}

#[tokio::test]
async fn close_fails_pending_and_later_calls() {
    let (_dir, qmp, mut peer) = pair().await;
    let mut events = qmp.events();
    let pending = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    let _ = peer.recv().await;
    drop(peer);

    assert!(matches!(pending.await.unwrap(), Err(Error::Disconnected)));
    assert!(!qmp.is_connected());
    assert!(matches!(
        qmp.execute("query-status", None).await,
        Err(Error::Disconnected)
    ));
    assert!(matches!(events.recv().await, Err(RecvError::Closed)));
    assert!(matches!(qmp.events().recv().await, Err(RecvError::Closed)));
}

#[tokio::test]
async fn quit_treats_disconnect_as_success() {
    let (_dir, qmp, mut peer) = pair().await;
    let server = tokio::spawn(async move {
        let (name, _, _) = peer.recv().await;
        assert_eq!(name, "quit");
        // Exit without answering.
    });
    qmp.quit().await.unwrap();
    server.await.unwrap();
    assert!(matches!(qmp.stop().await, Err(Error::Disconnected)));
}

#[tokio::test]
async fn malformed_json_fails_pending_calls() {
    let (_dir, qmp, mut peer) = pair().await;
    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("query-status", None).await }
    });
    let _ = peer.recv().await;
    peer.send_raw("{\"return\": oops").await;
    let error = call.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
    assert!(matches!(
        qmp.execute("query-status", None).await,
        Err(Error::Disconnected)
    ));
}

#[tokio::test]
async fn dropped_call_does_not_confuse_later_ones() {
    let (_dir, qmp, mut peer) = pair().await;
    // Give up on the first call before its reply arrives.
    let gave_up = tokio::time::timeout(Duration::from_millis(50), qmp.execute("slow", None)).await;
    assert!(gave_up.is_err());
    let (_, slow_id, _) = peer.recv().await;

    let call = tokio::spawn({
        let qmp = qmp.clone();
        async move { qmp.execute("fast", None).await }
    });
    let (name, fast_id, _) = peer.recv().await;
    assert_eq!(name, "fast");
    peer.send(json!({"return": "late", "id": slow_id})).await;
    peer.send(json!({"return": "fast", "id": fast_id})).await;
    assert_eq!(call.await.unwrap().unwrap(), json!("fast"));
    assert!(qmp.inner.shared.state().pending.is_empty());
}

#[tokio::test]
async fn missing_greeting_times_out() {
    let (_dir, path, listener) = socket();
    // Accept, but never greet (like a QEMU whose monitor is busy).
    let _server = tokio::spawn(async move {
        let (_stream, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let error = Qmp::connect_timeout(&path, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Timeout), "{error:?}");
}

#[tokio::test]
async fn bad_greeting_is_a_protocol_error() {
    let (_dir, path, listener) = socket();
    let _server = tokio::spawn(async move {
        let mut peer = Peer::accept(&listener).await;
        peer.send_raw(r#"{"hello": "world"}"#).await;
        std::future::pending::<()>().await;
    });
    let error = Qmp::connect(&path).await.unwrap_err();
    assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
}

#[tokio::test]
async fn missing_socket_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let error = Qmp::connect(dir.path().join("nope.sock"))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Io(_)), "{error:?}");
}

#[test]
fn versions_order_and_timestamps_convert() {
    assert!(QemuVersion::new(7, 2, 22) < QemuVersion::new(8, 0, 0));
    assert!(QemuVersion::new(7, 10, 0) > QemuVersion::new(7, 2, 22));
    let unknown = Timestamp {
        seconds: -1,
        microseconds: -1,
    };
    assert_eq!(unknown.to_system_time(), None);
}

#[test]
fn error_messages_do_not_repeat_their_cause() {
    use std::error::Error as _;
    let io = Error::from(std::io::Error::other("boom"));
    assert_eq!(io.to_string(), "QMP socket I/O failed");
    assert_eq!(io.source().unwrap().to_string(), "boom");
    let command = Error::Command {
        class: "GenericError".into(),
        desc: "no".into(),
    };
    assert_eq!(command.to_string(), "QMP command failed: GenericError: no");
}
