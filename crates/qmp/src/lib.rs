//! A small async client for QMP, the QEMU Machine Protocol.
//!
//! kumo writes its own client because the `qapi` crate fails on QEMU 7.2
//! replies, and because the agent only needs a handful of commands.
//!
//! # The protocol
//!
//! QMP is line-delimited JSON over a stream socket (here: a unix socket,
//! `-qmp unix:PATH,server=on,wait=off`). A session goes like this:
//!
//! 1. On connect QEMU sends a greeting,
//!    `{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ".."}, "capabilities": [..]}}`.
//!    QEMU serves one client per monitor at a time, so a second client gets
//!    no greeting until the first one leaves: [`Qmp::connect`] therefore gives
//!    up after a timeout.
//! 2. The client leaves capabilities-negotiation mode by sending
//!    `{"execute": "qmp_capabilities"}`; only then are other commands accepted.
//! 3. In command mode the client sends `{"execute": NAME, "arguments": {..}, "id": ID}`
//!    and QEMU answers each command with `{"return": VALUE, "id": ID}` or
//!    `{"error": {"class": CLASS, "desc": TEXT}, "id": ID}`, echoing the `id`.
//!    Asynchronous events, `{"event": NAME, "data": {..}, "timestamp": {"seconds": S, "microseconds": US}}`,
//!    may arrive at any time between replies.
//! 4. The session ends when either side closes the socket, e.g. after `quit`
//!    or when QEMU exits.
//!
//! # This client
//!
//! [`Qmp`] is a cheap-to-clone handle that may be used from many tasks at
//! once. Each command gets a fresh numeric `id`; a background reader task
//! routes every reply to the caller waiting for that `id` and every event to
//! the broadcast channel returned by [`Qmp::events`]. A background writer
//! task sends whole commands, so dropping an [`Qmp::execute`] future (e.g. on
//! a timeout) never leaves a half-written command on the socket. When the
//! socket closes, waiting and later calls fail with [`Error::Disconnected`]
//! and event receivers see [`broadcast::error::RecvError::Closed`]. The tasks
//! stop when the last handle is dropped, which closes the connection.
//!
//! Only compact monitors (the default) are supported: a monitor configured
//! with `pretty=on` spreads messages over several lines.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kumo_qmp::Error> {
//! let qmp = kumo_qmp::Qmp::connect("/run/kumo/vm-1/qmp.sock").await?;
//! println!("QEMU {}", qmp.version());
//! let mut events = qmp.events();
//! qmp.system_powerdown().await?;
//! while let Ok(event) = events.recv().await {
//!     if event.event == "SHUTDOWN" {
//!         break;
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod error;
mod types;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;

pub use error::Error;
pub use types::{CpuInfo, QemuVersion, QmpEvent, StatusInfo, Timestamp, VersionInfo};

/// How long [`Qmp::connect`] waits for the whole handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many events a slow [`Qmp::events`] receiver may fall behind before it
/// starts missing some (it then gets `RecvError::Lagged`).
const EVENT_CAPACITY: usize = 256;

/// A connection to one QEMU's QMP monitor.
///
/// Clones share the connection. Must be created inside a tokio runtime.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Encoded commands for the writer task.
    commands: mpsc::UnboundedSender<Vec<u8>>,
    next_id: AtomicU64,
    version: QemuVersion,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer task ends by itself once `commands` is dropped.
        self.reader.abort();
    }
}

/// State shared between the handles and the reader and writer tasks.
struct Shared {
    state: Mutex<State>,
}

struct State {
    /// Set once the connection is gone; then `pending` stays empty.
    closed: bool,
    /// Callers waiting for the reply with this `id`.
    pending: HashMap<u64, oneshot::Sender<Result<Value, Error>>>,
    /// Dropped on close, so that receivers see `Closed`.
    events: Option<broadcast::Sender<QmpEvent>>,
}

impl Qmp {
    /// Connect to the QMP unix socket at `path`, read QEMU's greeting and
    /// enter command mode, giving up after [`CONNECT_TIMEOUT`].
    pub async fn connect(path: impl AsRef<Path>) -> Result<Qmp, Error> {
        Qmp::connect_timeout(path, CONNECT_TIMEOUT).await
    }

    /// Like [`Qmp::connect`], with a different limit for the handshake.
    pub async fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Qmp, Error> {
        tokio::time::timeout(timeout, Qmp::handshake(path.as_ref()))
            .await
            .map_err(|_| Error::Timeout)?
    }

    async fn handshake(path: &Path) -> Result<Qmp, Error> {
        let (read, write) = UnixStream::connect(path).await?.into_split();
        let mut read = BufReader::new(read);
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Err(Error::Disconnected);
        }
        let greeting: Greeting = serde_json::from_str(&line)
            .map_err(|e| Error::bad_json("unexpected QMP greeting", e))?;

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                closed: false,
                pending: HashMap::new(),
                events: Some(events),
            }),
        });
        let (commands, commands_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(write, commands_rx, shared.clone()));
        let reader = tokio::spawn(read_loop(read, shared.clone()));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                shared,
                commands,
                next_id: AtomicU64::new(0),
                version: greeting.qmp.version.qemu,
                reader,
            }),
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// The QEMU version announced in the greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Whether the connection is still open, as far as this client knows.
    pub fn is_connected(&self) -> bool {
        !self.inner.shared.state().closed
    }

    /// Subscribe to QEMU's asynchronous events from now on.
    ///
    /// Once the connection closes the receiver yields the events still
    /// buffered, then `RecvError::Closed`.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.inner.shared.state().events {
            Some(events) => events.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Run a QMP command and return its `return` value.
    ///
    /// `arguments`, if given, must be a JSON object. An `error` reply becomes
    /// [`Error::Command`]. Safe to call concurrently; there is no timeout
    /// here, but the future may be dropped (e.g. by `tokio::time::timeout`)
    /// at any point without upsetting the connection.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, Error> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut request = Map::new();
        request.insert("execute".into(), command.into());
        if let Some(arguments) = arguments {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), id.into());
        let mut line = Value::Object(request).to_string().into_bytes();
        line.push(b'\n');

        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut state = self.inner.shared.state();
            if state.closed {
                return Err(Error::Disconnected);
            }
            state.pending.insert(id, reply_tx);
        }
        // Forget the waiter if this future is dropped before the reply.
        let _forget = ForgetOnDrop {
            shared: &self.inner.shared,
            id,
        };
        tracing::trace!(command, id, "QMP execute");
        if self.inner.commands.send(line).is_err() {
            return Err(Error::Disconnected);
        }
        reply_rx.await.unwrap_or(Err(Error::Disconnected))
    }

    /// Run a command and decode its return value.
    async fn call<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, Error> {
        let value = self.execute(command, arguments).await?;
        serde_json::from_value(value)
            .map_err(|e| Error::bad_json(format!("unexpected reply to {command}"), e))
    }

    /// `query-status`: whether the guest runs, and QEMU's run state.
    pub async fn query_status(&self) -> Result<StatusInfo, Error> {
        self.call("query-status", None).await
    }

    /// `query-version`: the version of the QEMU at the other end.
    pub async fn query_version(&self) -> Result<VersionInfo, Error> {
        self.call("query-version", None).await
    }

    /// `query-cpus-fast`: the guest's vCPUs and their host threads.
    pub async fn query_cpus_fast(&self) -> Result<Vec<CpuInfo>, Error> {
        self.call("query-cpus-fast", None).await
    }

    /// `system_powerdown`: press the ACPI power button. The guest decides
    /// whether and when to shut down (watch for the `SHUTDOWN` event).
    pub async fn system_powerdown(&self) -> Result<(), Error> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: hard-reset the guest.
    pub async fn system_reset(&self) -> Result<(), Error> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `stop`: pause the guest's vCPUs.
    pub async fn stop(&self) -> Result<(), Error> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: start or resume the guest's vCPUs (also leaves `-S`'s
    /// `prelaunch` state).
    pub async fn cont(&self) -> Result<(), Error> {
        self.execute("cont", None).await.map(drop)
    }

    /// `quit`: make QEMU exit at once, without a guest shutdown.
    ///
    /// QEMU may close the socket before answering; that counts as success,
    /// as does a connection that was already closed. Later calls fail with
    /// [`Error::Disconnected`].
    pub async fn quit(&self) -> Result<(), Error> {
        match self.execute("quit", None).await {
            Ok(_) | Err(Error::Disconnected) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("version", &self.inner.version)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Greeting {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: VersionInfo,
}

#[derive(Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// Removes a waiter from `pending` when an `execute` future ends, whether it
/// got its reply (then this is a no-op) or was dropped.
struct ForgetOnDrop<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for ForgetOnDrop<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(&self.id);
    }
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Route one message from QEMU.
    fn dispatch(&self, message: Value) {
        let Value::Object(mut message) = message else {
            tracing::warn!(%message, "ignoring QMP message that is not an object");
            return;
        };
        if message.contains_key("event") {
            match serde_json::from_value::<QmpEvent>(Value::Object(message)) {
                Ok(event) => {
                    tracing::debug!(event = %event.event, "QMP event");
                    if let Some(events) = &self.state().events {
                        // No receivers is fine.
                        let _ = events.send(event);
                    }
                }
                Err(error) => tracing::warn!(%error, "ignoring malformed QMP event"),
            }
            return;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            let message = Value::Object(message);
            tracing::warn!(%message, "ignoring QMP message without an id");
            return;
        };
        let result = if let Some(value) = message.remove("return") {
            Ok(value)
        } else if let Some(error) = message.remove("error") {
            match serde_json::from_value::<ErrorBody>(error) {
                Ok(ErrorBody { class, desc }) => Err(Error::Command { class, desc }),
                Err(e) => Err(Error::bad_json("malformed QMP error reply", e)),
            }
        } else {
            Err(Error::protocol(
                "QMP reply has neither \"return\" nor \"error\"",
            ))
        };
        match self.state().pending.remove(&id) {
            // The caller may have gone away meanwhile.
            Some(waiter) => drop(waiter.send(result)),
            None => tracing::debug!(id, "dropping QMP reply nobody waits for"),
        }
    }

    /// Mark the connection closed: fail every waiting call with `error()`,
    /// and end the event stream.
    fn close(&self, error: impl Fn() -> Error) {
        let mut state = self.state();
        state.closed = true;
        state.events = None;
        for (_, waiter) in state.pending.drain() {
            let _ = waiter.send(Err(error()));
        }
    }
}

/// Read messages from QEMU until the socket closes or sends garbage.
async fn read_loop(mut read: BufReader<OwnedReadHalf>, shared: Arc<Shared>) {
    let mut line = String::new();
    loop {
        line.clear();
        match read.read_line(&mut line).await {
            Ok(0) => {
                tracing::debug!("QMP socket closed");
                shared.close(|| Error::Disconnected);
                return;
            }
            Ok(_) => {}
            Err(error) => {
                // A reset is how QEMU's exit often looks.
                tracing::debug!(%error, "QMP read failed");
                shared.close(|| Error::Disconnected);
                return;
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line) {
            Ok(message) => shared.dispatch(message),
            Err(error) => {
                // We cannot tell which reply this was meant to be; give up
                // rather than leave a caller waiting forever.
                let reason = format!("malformed JSON from QEMU: {error}");
                tracing::error!(line = line.trim_end(), "{reason}");
                shared.close(|| Error::protocol(reason.clone()));
                return;
            }
        }
    }
}

/// Write whole commands to QEMU, in order, until every handle is gone.
async fn write_loop(
    mut write: OwnedWriteHalf,
    mut commands: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Shared>,
) {
    while let Some(line) = commands.recv().await {
        if let Err(error) = write.write_all(&line).await {
            tracing::debug!(%error, "QMP write failed");
            shared.close(|| Error::Disconnected);
            return;
        }
    }
}

#[cfg(test)]
mod tests;
