//! What the background passes (rebalancing, power saving) are set up with
//! and remember between runs. [`super::App`] holds them, so they sit below
//! it; the passes themselves are in `rebalance.rs` and `power.rs`.

use kumo_api::RebalanceStatus;
use kumo_sched::RebalanceConfig;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How automatic rebalancing behaves (`kumod --rebalance-*`).
#[derive(Clone, Debug, PartialEq)]
pub struct RebalanceSettings {
    pub enabled: bool,
    /// Host CPU load (percent, 0–100) above which a host is overloaded.
    pub threshold: f64,
    /// How often a pass runs.
    pub period: Duration,
    /// How long a host must stay above the threshold to count.
    pub sustain: Duration,
    /// Migrations started per pass, at most.
    pub max_moves: usize,
    /// Rebalancing migrations under way at once, at most.
    pub max_in_flight: usize,
    /// A VM that moved stays put this long.
    pub cooldown: Duration,
    /// Cost–benefit: the least drop of the imbalance score per GiB of
    /// memory copied (see [`RebalanceConfig::min_gain_per_gib`]).
    pub min_gain_per_gib: f64,
}

impl Default for RebalanceSettings {
    fn default() -> Self {
        RebalanceSettings {
            enabled: true,
            threshold: 85.0,
            period: Duration::from_secs(30),
            sustain: Duration::from_secs(60),
            max_moves: 1,
            max_in_flight: 2,
            cooldown: Duration::from_secs(600),
            min_gain_per_gib: RebalanceConfig::default().min_gain_per_gib,
        }
    }
}

impl RebalanceSettings {
    /// Check the settings, naming the first one out of range.
    pub fn check(&self) -> std::result::Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold <= 100.0) {
            return Err(format!(
                "threshold: {} is out of range: use more than 0 and at most 100 (percent)",
                self.threshold
            ));
        }
        if self.period < Duration::from_millis(100) || self.period > Duration::from_secs(86_400) {
            return Err(format!(
                "period: {:?} is out of range: use 0.1 s to one day",
                self.period
            ));
        }
        if self.sustain > Duration::from_secs(86_400) {
            return Err(format!(
                "sustain: {:?} is out of range: use at most one day",
                self.sustain
            ));
        }
        if !(1..=1000).contains(&self.max_moves) {
            return Err(format!(
                "max_moves: {} is out of range: use 1 to 1000",
                self.max_moves
            ));
        }
        if !(1..=1000).contains(&self.max_in_flight) {
            return Err(format!(
                "max_in_flight: {} is out of range: use 1 to 1000",
                self.max_in_flight
            ));
        }
        if !(self.min_gain_per_gib.is_finite() && self.min_gain_per_gib >= 0.0) {
            return Err(format!(
                "min_gain_per_gib: {} is out of range: use 0 or more",
                self.min_gain_per_gib
            ));
        }
        Ok(())
    }

    fn status(&self) -> RebalanceStatus {
        RebalanceStatus {
            enabled: self.enabled,
            threshold: self.threshold,
            sustain_seconds: self.sustain.as_secs_f64(),
            period_seconds: self.period.as_secs_f64(),
            max_moves: self.max_moves,
            max_in_flight: self.max_in_flight,
            cooldown_seconds: self.cooldown.as_secs_f64(),
            min_gain_per_gib: self.min_gain_per_gib,
            started_total: 0,
            last_pass: None,
        }
    }
}

/// The rebalancer's report, kept between passes.
pub(crate) struct RebalanceReport(pub(super) std::sync::Mutex<RebalanceStatus>);

impl RebalanceReport {
    pub(crate) fn new(settings: &RebalanceSettings) -> Self {
        RebalanceReport(std::sync::Mutex::new(settings.status()))
    }
}

/// Power saving's memory between passes (lost on restart, which only
/// costs a retry or an early consolidation).
#[derive(Default)]
pub(crate) struct PowerSaver {
    /// Placements refused since the last pass.
    pub(super) demand: std::sync::Mutex<Vec<Demand>>,
    /// How long the last host switched on took to report, measured from
    /// its power-on command to its first heartbeat.
    pub(super) boot_time: std::sync::Mutex<Option<Duration>>,
    /// Held across a pass (and a `DELETE`), commands included.
    pub(super) memory: tokio::sync::Mutex<PowerMemory>,
}

/// A placement refused: in which zone (`None`: any), and the standby
/// host that would take the VM (if one would).
pub(super) struct Demand {
    pub(super) zone: Option<String>,
    pub(super) wake: Option<Wake>,
}

/// A standby host to switch on for a refused VM.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Wake {
    pub(super) host: String,
    pub(super) vm: String,
}

#[derive(Default)]
pub(super) struct PowerMemory {
    /// Per zone, when a host was last switched on.
    pub(super) powered_on: HashMap<String, Instant>,
    /// Hosts whose command failed, and when.
    pub(super) failed: HashMap<String, Instant>,
}
