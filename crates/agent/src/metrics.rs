//! Host capacity and load, read from /proc.

use crate::CapacityOverride;
use kumo_api::{HostLoad, Resources};
use std::path::Path;

pub fn capacity(data_dir: &Path, over: CapacityOverride) -> anyhow::Result<Resources> {
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let memory_mib = meminfo("MemTotal:").unwrap_or(0) / 1024;
    let st = nix::sys::statvfs::statvfs(data_dir)?;
    let disk_gib = st.blocks_available() as u64 * st.fragment_size() as u64 / (1 << 30);
    Ok(Resources {
        vcpus: over.vcpus.unwrap_or(vcpus),
        memory_mib: over.memory_mib.unwrap_or(memory_mib),
        disk_gib: over.disk_gib.unwrap_or(disk_gib),
    })
}

/// The CPU's model name, from /proc/cpuinfo.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("model name"))?;
            Some(line.split_once(':')?.1.trim().to_string())
        })
        .unwrap_or_default()
}

/// A value in kB from /proc/meminfo.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Jiffies spent busy and in total, from the first line of /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// CPU time of a process in clock ticks (utime + stime).
pub fn process_ticks(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second for /proc times (USER_HZ, 100 on Linux).
pub const TICKS_PER_SECOND: f32 = 100.0;

/// Measures host load between calls.
#[derive(Default)]
pub struct LoadMeter {
    last: Option<(u64, u64)>,
}

impl LoadMeter {
    pub fn sample(&mut self) -> HostLoad {
        let now = cpu_times();
        let cpu_percent = match (self.last, now) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                100.0 * (b1 - b0) as f32 / (t1 - t0) as f32
            }
            _ => 0.0,
        };
        self.last = now;
        let total = meminfo("MemTotal:").unwrap_or(0);
        let available = meminfo("MemAvailable:").unwrap_or(total);
        let load1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        HostLoad {
            cpu_percent,
            memory_used_mib: total.saturating_sub(available) / 1024,
            load1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc() {
        let mut m = LoadMeter::default();
        m.sample();
        let load = m.sample();
        assert!(load.memory_used_mib > 0);
        assert!((0.0..=100.0).contains(&load.cpu_percent));
        assert!(process_ticks(std::process::id() as i32).is_some());
        let cap = capacity(Path::new("/"), CapacityOverride::default()).unwrap();
        assert!(cap.vcpus >= 1 && cap.memory_mib > 0);
    }
}
