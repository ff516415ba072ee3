//! Human tables by default, `-o json` everywhere.

use indicatif::{ProgressBar, ProgressStyle};
use kumo_api::{DrainPlan, Event, Group, Host, Image, Millis, Vm, Zone};
use serde::Serialize;
use std::io::{IsTerminal, Write};

/// How results are printed (`-o`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// JSON: one object for one resource, an array for a list.
    Json,
}

/// `println!` for what kumo prints as its result (tables, JSON, messages),
/// through [`write_stdout`]: a closed pipe ends kumo quietly instead of
/// panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::write_stdout(format!("{}\n", format_args!($($arg)*)).as_bytes())
    };
}
pub(crate) use outln;

/// Write `bytes` to standard output and flush them.
///
/// A reader that went away (`kumo host list | head -1`) ends kumo at once,
/// quietly, with status 0: there is no one left to tell, and what kumo was
/// asked to do is done. This is what dying by SIGPIPE gives C tools, without
/// the signal: Rust ignores SIGPIPE, and kumo keeps it that way so a
/// connection to the controller closing under it stays an error kumo can
/// report rather than a silent death. Any other failure to write (a full
/// disk) ends kumo with a message and status 1.
pub fn write_stdout(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

/// `v` as pretty-printed JSON, one document.
pub fn json<T: Serialize + ?Sized>(v: &T) {
    outln!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

/// A cell as it may reach a terminal: control characters (escape
/// sequences a host or a user could plant in a message or a description:
/// cursor moves, screen clears, a new title) are shown escaped, `\u{1b}`.
pub fn printable(cell: &str) -> String {
    cell.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_unicode().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Print rows under headers, columns aligned.
pub fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|c| printable(c)).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        text += parts.join("  ").trim_end();
        text.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    write_stdout(text.as_bytes());
}

fn now() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

pub fn age(t: Millis) -> String {
    span(now().saturating_sub(t))
}

pub fn until(t: Millis) -> String {
    span(t.saturating_sub(now()))
}

fn gib(mib: u64) -> String {
    format!("{:.1}G", mib as f64 / 1024.0)
}

/// A spinner on stderr when it is a terminal; hidden otherwise.
pub fn spinner(msg: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    pb
}

/// A count of things done out of `total` on stderr when it is a terminal
/// (e.g. VMs moved off drained hosts); the message says what goes on.
pub fn count_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total.max(1));
    pb.set_style(
        ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// The last line of a drain plan: how much moves and whether it fits.
pub fn drain_summary(plan: &DrainPlan) -> String {
    if plan.moves.is_empty() {
        return format!("{}: no VMs to move", plan.scope);
    }
    let stuck = plan.moves.iter().filter(|m| m.to.is_none()).count();
    let head = format!(
        "{} VM(s), {:.1} GiB of memory to move",
        plan.moves.len(),
        plan.memory_mib as f64 / 1024.0
    );
    if stuck == 0 {
        format!("{head}; the other hosts have room for all of it")
    } else {
        format!("{head}: {stuck} VM(s) have nowhere to go")
    }
}

/// A migration's progress on stderr when it is a terminal.
pub struct MigrationBar(ProgressBar);

pub fn progress_bar(msg: &str) -> MigrationBar {
    if !std::io::stderr().is_terminal() {
        return MigrationBar(ProgressBar::hidden());
    }
    let pb = ProgressBar::new(1);
    pb.set_style(
        ProgressStyle::with_template("{msg:30} [{bar:30}] {bytes}/{total_bytes} {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(msg.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    MigrationBar(pb)
}

impl MigrationBar {
    pub fn update(&self, m: &kumo_api::Migration) {
        let Some(p) = &m.progress else {
            self.0
                .set_message(format!("{:?} {} -> {}", m.phase, m.source, m.target).to_lowercase());
            return;
        };
        let (done, total) = if p.stage == "disk" {
            (p.disk_done_bytes, p.disk_total_bytes)
        } else {
            let total = p.memory_transferred_bytes + p.memory_remaining_bytes;
            (p.memory_transferred_bytes, total.max(p.memory_total_bytes))
        };
        self.0.set_length(total.max(1));
        self.0.set_position(done.min(total));
        let mut msg = format!("{} {} -> {}", p.stage, m.source, m.target);
        if p.dirty_rate_bytes > 0 {
            msg += &format!(", dirty {}/s", gib_bytes(p.dirty_rate_bytes));
        }
        if p.cpu_throttle_percent > 0 {
            msg += &format!(", throttled {}%", p.cpu_throttle_percent);
        }
        self.0.set_message(msg);
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn gib_bytes(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// One line on how a migration ended.
pub fn migration_result(r: &kumo_api::MigrationResult) -> String {
    let outcome = serde_json::to_value(r.outcome).expect("serializes");
    let mut line = format!(
        "{} -> {}: {} in {:.1} s",
        r.source,
        r.target,
        outcome.as_str().unwrap_or("?"),
        r.total_ms as f64 / 1000.0
    );
    if let Some(d) = r.downtime_ms {
        line += &format!(", downtime {d:.1} ms");
    } else if let Some(d) = r.qemu_downtime_ms {
        line += &format!(", downtime {d} ms (QEMU)");
    }
    if let Some(m) = &r.message {
        line += &format!(": {m}");
    }
    line
}

impl Format {
    /// One resource: a JSON object (not a one-element array, as
    /// `openstack … show -f json` prints one too), or a one-row table
    /// drawn by `table`, e.g. `out.one(&vm, Format::vms)`.
    pub fn one<T: Serialize>(self, item: &T, table: fn(Format, &[T])) {
        match self {
            Format::Json => json(item),
            Format::Table => table(self, std::slice::from_ref(item)),
        }
    }

    pub fn done(self, msg: &str) {
        match self {
            Format::Json => json(&serde_json::json!({ "ok": true, "message": msg })),
            Format::Table => outln!("{msg}"),
        }
    }

    pub fn power_saving(self, p: &kumo_api::PowerSavingStatus) {
        if let Format::Json = self {
            return json(p);
        }
        match &p.settings {
            Some(s) => outln!(
                "zone {}: power saving on (headroom {:.0}%, hosts below {}% CPU emptied, {} W idle)",
                p.zone,
                s.headroom * 100.0,
                s.max_load,
                s.idle_watts
            ),
            None => outln!("zone {}: power saving off", p.zone),
        }
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(", ")
            }
        };
        outln!("standby:      {}", list(&p.standby));
        outln!("emptying:     {}", list(&p.draining));
        outln!("free memory:  {:.0}%", p.free_memory_share * 100.0);
        outln!("energy saved: {:.1} Wh", p.energy_saved_wh);
    }

    pub fn rebalance(self, r: &kumo_api::RebalanceStatus) {
        if let Format::Json = self {
            return json(r);
        }
        outln!(
            "rebalancing {}: hosts above {}% for {:.0} s; at most {} move(s) per {:.0} s, {} under way; VMs stay {:.0} s after a move",
            if r.enabled { "on" } else { "off" },
            r.threshold,
            r.sustain_seconds,
            r.max_moves,
            r.period_seconds,
            r.max_in_flight,
            r.cooldown_seconds
        );
        outln!("migrations started: {}", r.started_total);
        if let Some(p) = &r.last_pass {
            outln!(
                "last pass {} ago: {} overloaded host(s), {} candidate(s), imbalance {:.2} -> {:.2}",
                age(p.at),
                p.overloaded.len(),
                p.candidates,
                p.imbalance_before,
                p.imbalance_after
            );
            for m in &p.moves {
                match &m.error {
                    None => outln!("  {} {} -> {}: {}", m.vm, m.from, m.to, m.reason),
                    Some(e) => outln!("  {} {} -> {}: not started: {e}", m.vm, m.from, m.to),
                }
            }
            if let Some(note) = &p.note {
                outln!("  {note}");
            }
        }
    }

    pub fn zones(self, zones: &[Zone]) {
        if let Format::Json = self {
            return json(zones);
        }
        table(
            &["NAME", "DESCRIPTION", "AGE"],
            zones
                .iter()
                .map(|z| vec![z.name.clone(), z.description.clone(), age(z.created_at)])
                .collect(),
        );
    }

    pub fn hosts(self, hosts: &[Host]) {
        if let Format::Json = self {
            return json(hosts);
        }
        table(
            &[
                "NAME",
                "ZONE",
                "STATE",
                "VMS",
                "VCPUS",
                "MEMORY",
                "DISK",
                "CPU%",
                "MEM USED",
                "HYPERVISOR",
                "HEARTBEAT",
            ],
            hosts
                .iter()
                .map(|h| {
                    let load = h.load.unwrap_or_default();
                    vec![
                        h.name.clone(),
                        h.zone.clone(),
                        h.state.to_string(),
                        h.vm_count.to_string(),
                        format!("{}/{}", h.allocated.vcpus, h.capacity.vcpus),
                        format!(
                            "{}/{}",
                            gib(h.allocated.memory_mib),
                            gib(h.capacity.memory_mib)
                        ),
                        format!("{}/{}G", h.allocated.disk_gib, h.capacity.disk_gib),
                        h.load
                            .map_or("-".into(), |_| format!("{:.0}", load.cpu_percent)),
                        h.load.map_or("-".into(), |_| gib(load.memory_used_mib)),
                        format!(
                            "{} {} {}",
                            h.hypervisor.driver,
                            h.hypervisor.version.as_deref().unwrap_or(""),
                            h.hypervisor.accel
                        )
                        .replace("  ", " "),
                        h.last_heartbeat
                            .map_or("never".into(), |t| format!("{} ago", age(t))),
                    ]
                })
                .collect(),
        );
    }

    pub fn images(self, images: &[Image]) {
        if let Format::Json = self {
            return json(images);
        }
        table(
            &["NAME", "FORMAT", "SIZE", "VIRTUAL SIZE", "SHA256", "AGE"],
            images
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.format.as_str().to_string(),
                        format!("{:.1}M", i.size_bytes as f64 / 1048576.0),
                        format!("{:.1}M", i.virtual_size_bytes as f64 / 1048576.0),
                        i.sha256.chars().take(12).collect(),
                        age(i.created_at),
                    ]
                })
                .collect(),
        );
    }

    pub fn vms(self, vms: &[Vm]) {
        if let Format::Json = self {
            return json(vms);
        }
        table(
            &[
                "NAME", "STATE", "HOST", "ZONE", "IMAGE", "VCPUS", "MEMORY", "DISK", "CPU%", "AGE",
                "MESSAGE",
            ],
            vms.iter()
                .map(|v| {
                    vec![
                        v.name.clone(),
                        v.state.to_string(),
                        v.host.clone(),
                        v.zone.clone(),
                        v.image.clone(),
                        v.size.vcpus.to_string(),
                        format!("{}M", v.size.memory_mib),
                        format!("{}G", v.size.disk_gib),
                        v.cpu_percent.map_or("-".into(), |c| format!("{c:.0}")),
                        age(v.created_at),
                        v.message.clone().unwrap_or_default(),
                    ]
                })
                .collect(),
        );
    }

    /// Where each VM of a drain goes (or why it cannot), then a summary.
    pub fn drain_plan(self, plan: &DrainPlan) {
        if let Format::Json = self {
            return json(plan);
        }
        if !plan.moves.is_empty() {
            table(
                &["VM", "FROM", "TO", "TO ZONE", "NOTE"],
                plan.moves
                    .iter()
                    .map(|m| {
                        vec![
                            m.vm.clone(),
                            m.from.clone(),
                            m.to.clone().unwrap_or_else(|| "-".into()),
                            m.to_zone.clone().unwrap_or_else(|| "-".into()),
                            m.refusal.clone().unwrap_or_default(),
                        ]
                    })
                    .collect(),
            );
        }
        outln!("{}", drain_summary(plan));
    }

    pub fn groups(self, groups: &[Group]) {
        if let Format::Json = self {
            return json(groups);
        }
        table(
            &["NAME", "POLICY", "RULE", "AGE"],
            groups
                .iter()
                .map(|g| {
                    let policy = serde_json::to_value(g.policy).expect("serializes");
                    vec![
                        g.name.clone(),
                        policy.as_str().unwrap_or("?").to_string(),
                        if g.hard { "hard" } else { "soft" }.to_string(),
                        age(g.created_at),
                    ]
                })
                .collect(),
        );
    }

    /// Events as they arrive: one line each, without a table's header
    /// (a follower prints many batches), or one JSON object per line.
    pub fn event_lines(self, events: &[Event]) {
        for e in events {
            match self {
                Format::Json => outln!("{}", serde_json::to_string(e).expect("events serialize")),
                Format::Table => outln!(
                    "{:<8} {:<24} {:<20} {}",
                    e.seq,
                    printable(&e.kind),
                    printable(&e.resource),
                    printable(&e.message)
                ),
            }
        }
    }

    pub fn events(self, events: &[Event]) {
        if let Format::Json = self {
            return json(events);
        }
        table(
            &["SEQ", "AGE", "KIND", "RESOURCE", "MESSAGE"],
            events
                .iter()
                .map(|e| {
                    vec![
                        e.seq.to_string(),
                        age(e.time),
                        e.kind.clone(),
                        e.resource.clone(),
                        e.message.clone(),
                    ]
                })
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cells_cannot_drive_the_terminal() {
        assert_eq!(
            super::printable("ok\u{1b}]0;owned\u{7}"),
            "ok\\u{1b}]0;owned\\u{7}"
        );
        assert_eq!(super::printable("plain text é"), "plain text é");
    }
}
