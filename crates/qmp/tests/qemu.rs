//! kumo-qmp against a real `qemu-system-x86_64` (QEMU >= 7 must be installed).
//!
//! Each test starts its own stopped (`-S`) QEMU with no devices, which takes a
//! fraction of a second, and kills it when done, even on panic.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kumo_qmp::{Error, Qmp, QmpEvent};
use tokio::sync::broadcast;

const QEMU: &str = "qemu-system-x86_64";

/// A QEMU child process, killed and reaped on drop.
struct Qemu {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qemu {
    /// A machine without CPUs or devices: the fastest QEMU there is.
    fn start() -> Qemu {
        Qemu::start_with(&["-M", "none"])
    }

    fn start_with(machine_args: &[&str]) -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qmp.sock");
        let child = Command::new(QEMU)
            .args(machine_args)
            .args(["-nodefaults", "-nographic", "-display", "none", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {QEMU} (is QEMU installed?): {e}"));
        Qemu {
            child,
            socket,
            _dir: dir,
        }
    }

    /// Connect once QEMU has created its socket.
    async fn connect(&mut self) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Qmp::connect(&self.socket).await {
                Ok(qmp) => return qmp,
                // The socket does not exist yet.
                Err(Error::Io(_)) if Instant::now() < deadline => {
                    if let Some(status) = self.child.try_wait().unwrap() {
                        panic!("QEMU exited early with {status}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot connect to QEMU's QMP socket: {e:?}"),
            }
        }
    }

    /// Wait for QEMU to exit by itself.
    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "QEMU did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Fails harmlessly if QEMU already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The next event named `name`, skipping others.
async fn next_event(events: &mut broadcast::Receiver<QmpEvent>, name: &str) -> QmpEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let event = events.recv().await.unwrap();
            if event.event == name {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event"))
}

#[tokio::test]
async fn handshake_and_queries() {
    let mut qemu = Qemu::start();
    let qmp = qemu.connect().await;

    let version = *qmp.version();
    assert!(version.major >= 7, "QEMU {version} is too old");
    let info = qmp.query_version().await.unwrap();
    assert_eq!(info.qemu, version);

    let status = qmp.query_status().await.unwrap();
    assert!(!status.running);
    assert!(
        ["prelaunch", "paused"].contains(&status.status.as_str()),
        "unexpected run state {}",
        status.status
    );
    // `-M none` has no CPUs.
    assert_eq!(qmp.query_cpus_fast().await.unwrap(), vec![]);
}

#[tokio::test]
async fn unknown_command_is_command_not_found() {
    let mut qemu = Qemu::start();
    let qmp = qemu.connect().await;
    match qmp.execute("no-such-command", None).await {
        Err(Error::Command { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected CommandNotFound, got {other:?}"),
    }
    // Bad arguments are command errors too, and the connection survives.
    let error = qmp
        .execute("query-status", Some(serde_json::json!({"bogus": 1})))
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Command { .. }), "{error:?}");
    assert!(qmp.query_status().await.is_ok());
}

#[tokio::test]
async fn concurrent_executes_get_their_own_replies() {
    let mut qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let expected = *qmp.version();

    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let qmp = qmp.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    match i % 3 {
                        0 => assert_eq!(qmp.query_version().await.unwrap().qemu, expected),
                        1 => assert!(!qmp.query_status().await.unwrap().running),
                        _ => {
                            let error = qmp.execute("nope", None).await.unwrap_err();
                            assert!(matches!(error, Error::Command { .. }), "{error:?}");
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn run_state_changes_and_events() {
    let mut qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let mut events = qmp.events();

    qmp.cont().await.unwrap();
    let resume = next_event(&mut events, "RESUME").await;
    assert!(resume.timestamp.to_system_time().is_some());
    assert!(qmp.query_status().await.unwrap().running);

    qmp.stop().await.unwrap();
    next_event(&mut events, "STOP").await;
    let status = qmp.query_status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.status, "paused");

    qmp.system_reset().await.unwrap();
    let reset = next_event(&mut events, "RESET").await;
    assert_eq!(reset.data["guest"], false);

    qmp.system_powerdown().await.unwrap();
    next_event(&mut events, "POWERDOWN").await;
}

#[tokio::test]
async fn quit_exits_qemu_and_disconnects() {
    let mut qemu = Qemu::start();
    let qmp = qemu.connect().await;
    let mut events = qmp.events();

    qmp.quit().await.unwrap();
    let status = qemu.wait_exit().await;
    assert!(status.success(), "QEMU exited with {status}");

    let shutdown = next_event(&mut events, "SHUTDOWN").await;
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
    // The stream ends once the socket is closed.
    let end = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap();
    assert!(matches!(end, Err(broadcast::error::RecvError::Closed)));

    assert!(!qmp.is_connected());
    assert!(matches!(qmp.query_status().await, Err(Error::Disconnected)));
    assert!(matches!(
        qmp.execute("query-version", None).await,
        Err(Error::Disconnected)
    ));
    // Quitting twice is harmless.
    qmp.quit().await.unwrap();
}

#[tokio::test]
async fn cpus_of_a_real_machine() {
    let mut qemu = Qemu::start_with(&["-M", "q35", "-accel", "tcg", "-smp", "2", "-m", "64"]);
    let qmp = qemu.connect().await;
    let cpus = qmp.query_cpus_fast().await.unwrap();
    assert_eq!(cpus.len(), 2);
    for (i, cpu) in cpus.iter().enumerate() {
        assert_eq!(cpu.cpu_index as usize, i);
        assert!(cpu.thread_id > 0);
    }
}
