use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A QEMU version, as found in the QMP greeting and in `query-version`.
///
/// Versions order naturally, so `v >= QemuVersion::new(8, 0, 0)` works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
}

impl QemuVersion {
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        QemuVersion {
            major,
            minor,
            micro,
        }
    }
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The reply to `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The upstream version.
    pub qemu: QemuVersion,
    /// The distribution's package string, e.g. `Debian 1:7.2+dfsg-7`; may be empty.
    #[serde(default)]
    pub package: String,
}

/// The reply to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// Whether the guest's vCPUs are running.
    pub running: bool,
    /// QEMU's run state, e.g. `prelaunch`, `running`, `paused`, `shutdown`,
    /// `inmigrate`, `postmigrate`, `internal-error`.
    pub status: String,
}

/// One entry of the reply to `query-cpus-fast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfo {
    /// The vCPU's index.
    pub cpu_index: u32,
    /// The host thread id running the vCPU (for pinning and accounting).
    pub thread_id: u32,
}

/// When QEMU emitted an event: seconds and microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

impl Timestamp {
    /// The timestamp as a [`SystemTime`], or `None` if QEMU could not read
    /// its clock (it then sends `-1`).
    pub fn to_system_time(self) -> Option<SystemTime> {
        let secs = u64::try_from(self.seconds).ok()?;
        let micros = u64::try_from(self.microseconds).ok()?;
        UNIX_EPOCH.checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
    }
}

/// An asynchronous QMP event, such as `STOP`, `RESUME`, `SHUTDOWN` or
/// `RESET`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// The event's name.
    pub event: String,
    /// The event's payload; `Value::Null` for events without one.
    #[serde(default)]
    pub data: Value,
    /// When QEMU emitted it.
    #[serde(default)]
    pub timestamp: Timestamp,
}
