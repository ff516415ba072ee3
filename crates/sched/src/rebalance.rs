//! Moving running VMs: automatic load rebalancing and power-saving
//! consolidation, planned on a clone of the [`Cluster`] so that later moves
//! see the capacity, dedicated cores, groups and load earlier ones took.
//!
//! **Imbalance score** ([`imbalance`]): the population standard deviation of
//! the measured load (`HostInfo::load`, 0–100) over schedulable hosts, as
//! Ganeti's hbal scores a cluster; 0 is perfectly even. It is an average, so
//! one move's gain shrinks as the cluster grows: moving `d` points of load
//! across a gap of `g` points lowers the variance by about `2·d·g / hosts`.
//!
//! **Load accounting**: a VM using `c` % of one CPU adds `c / cores` to its
//! host's load (host load is over all its cores), so moving it lowers the
//! source's load by `c / source cores` and raises the target's by
//! `c / target cores`. Negative or unknown (not finite) use and load count
//! as 0.
//!
//! **Rebalancing** ([`Cluster::plan_rebalance`]):
//!
//! ```text
//! until max_moves:
//!   source = the most loaded schedulable host above threshold with a qualifying move
//!   for each of its candidates not moved yet:
//!     target = the lowest score among the hosts where the move qualifies, where
//!       score      = target load (+ location_weight in another zone than the source);
//!                    of equal scores, the one whose move lowers the imbalance most
//!       qualifies  = every constraint of the VM's request holds (from_host = source)
//!                    and the target ends at or below threshold
//!                    and the imbalance drops, by at least min_gain_per_gib x GiB of memory
//!   move, of the candidates whose move alone brings source to the threshold,
//!     the one lowering the imbalance most per GiB (the cheapest fix);
//!     if none would, the one lowering it most (the biggest step)
//! ```
//!
//! A host without a qualifying move is skipped until the others run out,
//! then looked at again if moves were planned since (they free room); the
//! plan ends when no overloaded host has one. Hosts that are not schedulable
//! (down, disabled, draining) are neither scored, sources nor targets:
//! draining evacuates them. Rank expressions and soft group rules do not
//! steer moves; hard rules hold.
//!
//! **Consolidation** ([`Cluster::plan_consolidation`]): the emptiest hosts of
//! a zone first (fewest VMs, then least load), each emptied completely — or
//! left as it is — into the fullest other hosts of the zone that keep the
//! headroom, largest VM first. An emptied host takes nothing afterwards and
//! leaves the score (it is powered off), and a host that took VMs is not
//! emptied (no VM moves twice).

use crate::cluster::{Cluster, Request};
use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet};

/// One VM the planner may move: its placement request (size, CPU policy,
/// requirements, groups — exactly what the VM was placed with; the planner
/// sets `from_host` itself) and its measured CPU use.
///
/// A candidate the cluster does not place on `host` is ignored, as is a
/// second candidate for the same VM.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub vm: String,
    pub host: String,
    pub request: Request,
    /// Percent of one CPU (150: one and a half CPUs busy).
    pub cpu_percent: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceConfig {
    /// A host whose measured load (host CPU %, 0–100, `HostInfo::load`) is
    /// above this is overloaded; a move never takes a target above it.
    pub threshold: f64,
    /// At most this many moves per plan (the rate limit of the caller's
    /// period).
    pub max_moves: usize,
    /// A move must lower the imbalance score by at least this much per GiB
    /// of guest memory copied (cost–benefit). The score's gains shrink as
    /// the cluster grows (see the module docs): scale this with it.
    pub min_gain_per_gib: f64,
    /// Load points a target in another zone than the source must be below
    /// one in the same zone to be chosen instead.
    pub location_weight: f64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            threshold: 80.0,
            max_moves: 4,
            min_gain_per_gib: 0.0001,
            location_weight: 20.0,
        }
    }
}

/// One planned live migration.
#[derive(Clone, Debug, PartialEq)]
pub struct Move {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// The cores dedicated to the VM on `to` (empty for shared vCPUs).
    pub cores: Vec<u32>,
    /// The imbalance score before and after this move.
    pub imbalance_before: f64,
    pub imbalance_after: f64,
    /// Human-readable, e.g. "host h3 at 93% > 80%: vm7 (150% of a CPU) to
    /// h9 at 41% -> 44%; imbalance 12.100 -> 9.800; 256 MiB to copy".
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConsolidationConfig {
    /// Keep at least this share of each receiving host's CPU (allocated
    /// and measured) and memory free.
    pub headroom: f64,
    /// Only hosts whose load is below this are emptied.
    pub max_load: f64,
    /// At most this many hosts emptied per plan.
    pub max_hosts: usize,
}

impl Default for ConsolidationConfig {
    fn default() -> Self {
        ConsolidationConfig {
            headroom: 0.2,
            max_load: 30.0,
            max_hosts: 1,
        }
    }
}

/// The cluster's imbalance score: the population standard deviation of the
/// measured load over schedulable hosts (0 with none).
pub fn imbalance(cluster: &Cluster) -> f64 {
    let loads: Vec<f64> = cluster
        .hosts()
        .filter(|h| h.schedulable)
        .map(|h| h.load)
        .collect();
    if loads.is_empty() {
        return 0.0;
    }
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    (loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt()
}

/// A variance drop smaller than this is rounding, not a gain.
const MIN_VARIANCE_DROP: f64 = 1e-9;

impl Cluster {
    /// Moves that bring overloaded hosts down while lowering the imbalance
    /// score, at most `cfg.max_moves` (see the module docs).
    pub fn plan_rebalance(&self, candidates: &[Candidate], cfg: &RebalanceConfig) -> Vec<Move> {
        let mut p = Planner::new(self, candidates);
        let mut moves = Vec::new();
        // Hosts without a qualifying move, with how many moves had been
        // planned when that was found.
        let mut stuck: HashMap<usize, usize> = HashMap::new();
        while moves.len() < cfg.max_moves {
            let next = p
                .loads
                .overloaded(cfg.threshold)
                .find(|i| !stuck.contains_key(i));
            let Some(source) = next else {
                // Moves planned since a host got stuck may have made room.
                let before = stuck.len();
                stuck.retain(|_, at| *at == moves.len());
                if stuck.len() == before {
                    break;
                }
                continue;
            };
            match p.best_move(source, cfg) {
                Some((k, target)) => {
                    let why = p.overloaded_reason(source, cfg.threshold);
                    moves.push(p.apply(k, target, &why));
                }
                None => {
                    stuck.insert(source, moves.len());
                }
            }
        }
        moves
    }

    /// The naive baseline: the busiest VM (that fits anywhere) of the most
    /// loaded overloaded host to the least loaded host it fits, one at a
    /// time, until no host is overloaded or `cfg.max_moves`; the score,
    /// location and cost are not weighed.
    pub fn plan_rebalance_naive(
        &self,
        candidates: &[Candidate],
        cfg: &RebalanceConfig,
    ) -> Vec<Move> {
        let mut p = Planner::new(self, candidates);
        let mut moves = Vec::new();
        let mut stuck = HashSet::new();
        while moves.len() < cfg.max_moves {
            let Some(source) = p
                .loads
                .overloaded(cfg.threshold)
                .find(|i| !stuck.contains(i))
            else {
                break;
            };
            let mut busiest: Vec<usize> = p.by_host[source]
                .iter()
                .copied()
                .filter(|k| !p.moved[*k])
                .collect();
            busiest.sort_by(|a, b| p.cands[*b].cpu.total_cmp(&p.cands[*a].cpu).then(a.cmp(b)));
            let found = busiest.into_iter().find_map(|k| {
                let c = &p.cands[k];
                let mover = p.cluster.mover(&c.cand.vm, &c.request);
                p.loads
                    .by_load
                    .iter()
                    .map(|(_, j)| *j)
                    .find(|j| mover.check(*j).is_none())
                    .map(|j| (k, j))
            });
            match found {
                Some((k, target)) => {
                    let why = p.overloaded_reason(source, cfg.threshold);
                    moves.push(p.apply(k, target, &why));
                }
                None => {
                    stuck.insert(source);
                }
            }
        }
        moves
    }

    /// Hosts in `zone` that can be emptied entirely into other schedulable
    /// hosts of the zone while those keep `cfg.headroom`, each with the moves
    /// that empty it (none for a host without VMs). A host holding a VM that
    /// is not among `candidates` cannot be emptied.
    pub fn plan_consolidation(
        &self,
        zone: &str,
        candidates: &[Candidate],
        cfg: &ConsolidationConfig,
    ) -> Vec<(String, Vec<Move>)> {
        let mut p = Planner::new(self, candidates);
        let limit = 1.0 - cfg.headroom;
        let in_zone: Vec<usize> = (0..self.host_slots())
            .filter(|i| self.host_at(*i).is_some_and(|h| h.zone == zone))
            .collect();
        let mut order: Vec<usize> = in_zone
            .iter()
            .copied()
            .filter(|i| {
                let h = self.host_at(*i).expect("in the zone");
                h.schedulable && h.load < cfg.max_load
            })
            .collect();
        order.sort_by(|a, b| {
            self.vm_count_at(*a)
                .cmp(&self.vm_count_at(*b))
                .then(p.loads.load[*a].total_cmp(&p.loads.load[*b]))
                .then(a.cmp(b))
        });
        let mut emptied = Vec::new();
        for source in order {
            if emptied.len() >= cfg.max_hosts {
                break;
            }
            // Every VM on it must be a candidate; a host that took VMs in
            // this plan holds more than its candidates, so it is kept.
            if p.by_host[source].len() != p.cluster.vm_count_at(source) {
                continue;
            }
            let mut vms = p.by_host[source].clone();
            // Largest first: the small ones fill the gaps.
            vms.sort_by(|a, b| {
                let (ca, cb) = (&p.cands[*a], &p.cands[*b]);
                cb.request
                    .size
                    .memory_mib
                    .cmp(&ca.request.size.memory_mib)
                    .then(cb.cpu.total_cmp(&ca.cpu))
                    .then(a.cmp(b))
            });
            let name = self.host_at(source).expect("known").name.clone();
            let why = format!(
                "emptying host {name} at {:.0}% < {:.0}% to save power",
                p.loads.load[source], cfg.max_load
            );
            let mut moves = Vec::new();
            let mut undo = Vec::new();
            for k in vms {
                let Some(target) = p.receiver(k, source, &in_zone, limit) else {
                    break;
                };
                undo.push(p.undo_record(k, target));
                moves.push(p.apply(k, target, &why));
            }
            if undo.len() < p.by_host[source].len() {
                for u in undo.into_iter().rev() {
                    p.undo(u);
                }
                continue;
            }
            // Powered off next: it takes nothing more and is not scored.
            p.cluster.set_schedulable_at(source, false);
            p.loads.unscore(source);
            emptied.push((name, moves));
        }
        emptied
    }
}

/// A load as an ordered key (the loads are finite).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Load(f64);

impl Eq for Load {}

impl PartialOrd for Load {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Load {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Measured host loads, kept up to date move by move together with what
/// the score needs: no rescan of every host per move.
struct Loads {
    /// By host index (0 for a removed host).
    load: Vec<f64>,
    cores: Vec<f64>,
    zone: Vec<usize>,
    /// Schedulable hosts: scored, indexed, and possible targets.
    scored: Vec<bool>,
    n: f64,
    sum: f64,
    /// Updated by each change's exact delta: a variance derived from a sum
    /// of squares loses its digits to cancellation when loads are even.
    variance: f64,
    by_load: BTreeSet<(Load, usize)>,
    by_zone_load: Vec<BTreeSet<(Load, usize)>>,
}

impl Loads {
    fn new(cluster: &Cluster) -> Self {
        let slots = cluster.host_slots();
        let mut zones: HashMap<&str, usize> = HashMap::new();
        let mut l = Loads {
            load: vec![0.0; slots],
            cores: vec![1.0; slots],
            zone: vec![usize::MAX; slots],
            scored: vec![false; slots],
            n: 0.0,
            sum: 0.0,
            variance: 0.0,
            by_load: BTreeSet::new(),
            by_zone_load: Vec::new(),
        };
        for i in 0..slots {
            let Some(h) = cluster.host_at(i) else {
                continue;
            };
            let next = zones.len();
            let z = *zones.entry(h.zone.as_str()).or_insert(next);
            if z == l.by_zone_load.len() {
                l.by_zone_load.push(BTreeSet::new());
            }
            l.load[i] = if h.load.is_finite() { h.load } else { 0.0 };
            l.cores[i] = f64::from(h.capacity.vcpus.max(1));
            l.zone[i] = z;
            if h.schedulable {
                l.scored[i] = true;
                l.by_load.insert((Load(l.load[i]), i));
                l.by_zone_load[z].insert((Load(l.load[i]), i));
            }
        }
        l.rescore();
        l
    }

    /// Count, sum and variance from scratch.
    fn rescore(&mut self) {
        let scored: Vec<f64> = (0..self.load.len())
            .filter(|i| self.scored[*i])
            .map(|i| self.load[i])
            .collect();
        self.n = scored.len() as f64;
        self.sum = scored.iter().sum();
        self.variance = 0.0;
        if self.n > 0.0 {
            let mean = self.sum / self.n;
            self.variance = scored.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / self.n;
        }
    }

    /// Stop scoring host `i` (it is about to be powered off).
    fn unscore(&mut self, i: usize) {
        if std::mem::replace(&mut self.scored[i], false) {
            self.by_load.remove(&(Load(self.load[i]), i));
            self.by_zone_load[self.zone[i]].remove(&(Load(self.load[i]), i));
            self.rescore();
        }
    }

    fn score(&self) -> f64 {
        self.variance.max(0.0).sqrt()
    }

    /// How the variance changes when scored hosts' loads go from `old` to
    /// `new` (each pair a different host).
    fn variance_delta(&self, changes: &[(f64, f64)]) -> f64 {
        if self.n == 0.0 {
            return 0.0;
        }
        let d_sum: f64 = changes.iter().map(|(o, n)| n - o).sum();
        let d_squares: f64 = changes.iter().map(|(o, n)| (n - o) * (n + o)).sum();
        d_squares / self.n - d_sum * (2.0 * self.sum + d_sum) / (self.n * self.n)
    }

    /// How much the score drops with the variance changed by `delta`.
    fn score_drop(&self, delta: f64) -> f64 {
        let before = self.score();
        let after = (self.variance + delta).max(0.0).sqrt();
        if before + after > 0.0 {
            // Equal to before - after, without its cancellation.
            -delta / (before + after)
        } else {
            0.0
        }
    }

    fn set(&mut self, i: usize, load: f64) {
        let old = self.load[i];
        if self.scored[i] {
            self.variance += self.variance_delta(&[(old, load)]);
            self.sum += load - old;
            self.by_load.remove(&(Load(old), i));
            self.by_load.insert((Load(load), i));
            let z = &mut self.by_zone_load[self.zone[i]];
            z.remove(&(Load(old), i));
            z.insert((Load(load), i));
        }
        self.load[i] = load;
    }

    /// Scored hosts above `threshold`, the most loaded first.
    fn overloaded(&self, threshold: f64) -> impl Iterator<Item = usize> + '_ {
        self.by_load
            .iter()
            .rev()
            .take_while(move |(l, _)| l.0 > threshold)
            .map(|(_, i)| *i)
    }
}

/// A usable candidate, with its request ready for checks.
struct Prepared<'a> {
    cand: &'a Candidate,
    /// The candidate's request with `from_host` set.
    request: Request,
    host: usize,
    /// Measured use, percent of one CPU.
    cpu: f64,
}

/// What undoes one tentative move.
struct Undo {
    k: usize,
    entry: crate::cluster::VmEntry,
    target: usize,
    source_load: f64,
    target_load: f64,
}

/// The state a plan is made on.
struct Planner<'a> {
    cluster: Cluster,
    loads: Loads,
    cands: Vec<Prepared<'a>>,
    /// Candidate indexes by host index.
    by_host: Vec<Vec<usize>>,
    moved: Vec<bool>,
}

impl<'a> Planner<'a> {
    fn new(cluster: &Cluster, candidates: &'a [Candidate]) -> Self {
        let mut seen = HashSet::new();
        let mut cands = Vec::new();
        let mut by_host = vec![Vec::new(); cluster.host_slots()];
        for cand in candidates {
            let Some(host) = cluster.host_index(&cand.host) else {
                continue;
            };
            if cluster.vm_entry(&cand.vm).is_none_or(|e| e.host != host)
                || !seen.insert(cand.vm.as_str())
            {
                continue;
            }
            by_host[host].push(cands.len());
            cands.push(Prepared {
                cand,
                request: Request {
                    from_host: Some(cand.host.clone()),
                    ..cand.request.clone()
                },
                host,
                cpu: if cand.cpu_percent.is_finite() && cand.cpu_percent > 0.0 {
                    cand.cpu_percent
                } else {
                    0.0
                },
            });
        }
        Planner {
            moved: vec![false; cands.len()],
            loads: Loads::new(cluster),
            cluster: cluster.clone(),
            cands,
            by_host,
        }
    }

    /// The candidate on `source` to move next, and its target: of those
    /// whose move alone brings the host to the threshold, the one that
    /// lowers the imbalance most per GiB copied (the cheapest fix);
    /// failing that, the one that lowers it most (the biggest step).
    fn best_move(&self, source: usize, cfg: &RebalanceConfig) -> Option<(usize, usize)> {
        // (candidate, target, fixes the host, value)
        let mut best: Option<(usize, usize, bool, f64)> = None;
        for &k in &self.by_host[source] {
            if self.moved[k] {
                continue;
            }
            let Some((target, drop)) = self.best_target(k, cfg) else {
                continue;
            };
            let c = &self.cands[k];
            let fixes = self.loads.load[source] - c.cpu / self.loads.cores[source] <= cfg.threshold;
            let value = if fixes {
                drop / (c.request.size.memory_mib.max(1) as f64 / 1024.0)
            } else {
                drop
            };
            if best.is_none_or(|(_, _, f, v)| (fixes, value) > (f, v)) {
                best = Some((k, target, fixes, value));
            }
        }
        best.map(|(k, target, _, _)| (k, target))
    }

    /// The lowest-scoring target where moving candidate `k` qualifies (of
    /// equal scores, the one the imbalance favours: a host with fewer cores
    /// rises closer to the mean), and how much the move lowers the
    /// imbalance.
    fn best_target(&self, k: usize, cfg: &RebalanceConfig) -> Option<(usize, f64)> {
        let c = &self.cands[k];
        let l = &self.loads;
        let source = c.host;
        let a = l.load[source];
        let a_after = a - c.cpu / l.cores[source];
        let need = cfg.min_gain_per_gib * c.request.size.memory_mib as f64 / 1024.0;
        let mover = self.cluster.mover(&c.cand.vm, &c.request);
        // (score, target, drop)
        let mut best: Option<(f64, usize, f64)> = None;
        let consider = |j: usize, b: f64, penalty: f64, best: &mut Option<(f64, usize, f64)>| {
            let b_after = b + c.cpu / l.cores[j];
            let score = b + penalty;
            if j == source || b_after > cfg.threshold || best.is_some_and(|(s, _, _)| score > s) {
                return;
            }
            let delta = l.variance_delta(&[(a, a_after), (b, b_after)]);
            if delta > -MIN_VARIANCE_DROP {
                return;
            }
            let drop = l.score_drop(delta);
            // Of equally loaded hosts, the one the imbalance favours.
            let tied_worse = best.is_some_and(|(s, _, d)| score == s && drop <= d);
            if drop < need || tied_worse || mover.check(j).is_some() {
                return;
            }
            *best = Some((score, j, drop));
        };
        // Loads ascending: each scan stops at the first host that cannot
        // win.
        let zone = l.zone[source];
        for &(Load(b), j) in &l.by_zone_load[zone] {
            if b > cfg.threshold || best.is_some_and(|(s, _, _)| b > s) {
                break;
            }
            consider(j, b, 0.0, &mut best);
        }
        for &(Load(b), j) in &l.by_load {
            if b > cfg.threshold || best.is_some_and(|(s, _, _)| b + cfg.location_weight > s) {
                break;
            }
            if l.zone[j] != zone {
                consider(j, b, cfg.location_weight, &mut best);
            }
        }
        best.map(|(_, j, drop)| (j, drop))
    }

    /// The fullest host of `in_zone` that takes candidate `k` and keeps
    /// `limit` (1 - headroom) of its CPU, load and memory.
    fn receiver(&self, k: usize, source: usize, in_zone: &[usize], limit: f64) -> Option<usize> {
        let c = &self.cands[k];
        let mover = self.cluster.mover(&c.cand.vm, &c.request);
        let mut best: Option<(f64, usize)> = None;
        for &j in in_zone {
            if j == source || self.loads.load[j] + c.cpu / self.loads.cores[j] > limit * 100.0 {
                continue;
            }
            let (cpu, memory) = self.cluster.shares_with_at(j, &c.request);
            let fill = cpu.max(memory);
            if fill > limit || best.is_some_and(|(f, _)| fill <= f) || mover.check(j).is_some() {
                continue;
            }
            best = Some((fill, j));
        }
        best.map(|(_, j)| j)
    }

    fn overloaded_reason(&self, source: usize, threshold: f64) -> String {
        format!(
            "host {} at {:.0}% > {threshold:.0}%",
            self.cluster.host_at(source).expect("known").name,
            self.loads.load[source]
        )
    }

    /// Move candidate `k` to `target` in the plan's state; `why` starts the
    /// move's reason.
    fn apply(&mut self, k: usize, target: usize, why: &str) -> Move {
        let c = &self.cands[k];
        let source = c.host;
        let before = self.loads.score();
        let placement = self.cluster.reserve_at(&c.cand.vm, target, &c.request);
        let a = self.loads.load[source];
        let b = self.loads.load[target];
        let a_after = a - c.cpu / self.loads.cores[source];
        let b_after = b + c.cpu / self.loads.cores[target];
        self.loads.set(source, a_after);
        self.loads.set(target, b_after);
        self.cluster.set_load_at(source, a_after);
        self.cluster.set_load_at(target, b_after);
        self.moved[k] = true;
        let after = self.loads.score();
        let from = self.cluster.host_at(source).expect("known");
        let to = self.cluster.host_at(target).expect("known");
        let zone_note = if to.zone == from.zone {
            String::new()
        } else {
            format!(" in zone {}", to.zone)
        };
        Move {
            reason: format!(
                "{why}: {} ({:.0}% of a CPU) to {}{zone_note} at {b:.0}% -> {b_after:.0}%; \
                 imbalance {before:.3} -> {after:.3}; {} MiB to copy",
                c.cand.vm, c.cpu, to.name, c.request.size.memory_mib
            ),
            vm: c.cand.vm.clone(),
            from: from.name.clone(),
            to: placement.host,
            cores: placement.cores,
            imbalance_before: before,
            imbalance_after: after,
        }
    }

    fn undo_record(&self, k: usize, target: usize) -> Undo {
        Undo {
            k,
            entry: self
                .cluster
                .vm_entry(&self.cands[k].cand.vm)
                .expect("candidates are placed")
                .clone(),
            target,
            source_load: self.loads.load[self.cands[k].host],
            target_load: self.loads.load[target],
        }
    }

    fn undo(&mut self, u: Undo) {
        let c = &self.cands[u.k];
        let source = c.host;
        self.cluster.restore_vm(&c.cand.vm, u.entry);
        self.loads.set(u.target, u.target_load);
        self.loads.set(source, u.source_load);
        self.cluster.set_load_at(u.target, u.target_load);
        self.cluster.set_load_at(source, u.source_load);
        self.moved[u.k] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{parse_host_expr, Constraint, CpuPolicy, Group, HostInfo, Policy};
    use kumo_api::Resources;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn host(name: &str, zone: &str, cores: u32, memory_mib: u64, load: f64) -> HostInfo {
        HostInfo {
            name: name.into(),
            zone: zone.into(),
            capacity: Resources {
                vcpus: cores,
                memory_mib,
                disk_gib: 100,
            },
            cpu_overcommit: 1.0,
            memory_overcommit: 1.0,
            cpu_model: "EPYC".into(),
            accel: "tcg".into(),
            labels: BTreeMap::new(),
            schedulable: true,
            load,
        }
    }

    fn req(vcpus: u32, memory_mib: u64) -> Request {
        Request {
            size: Resources {
                vcpus,
                memory_mib,
                disk_gib: 1,
            },
            ..Request::default()
        }
    }

    /// Record `vm` on `host` (as placed earlier, whatever the host's load
    /// now) and make it a candidate using `cpu_percent`.
    fn put(
        c: &mut Cluster,
        cands: &mut Vec<Candidate>,
        vm: &str,
        host: &str,
        r: Request,
        cpu_percent: f64,
    ) {
        match r.cpu_policy {
            CpuPolicy::Dedicated => {
                c.place_on(vm, vm, host, &r).unwrap();
            }
            CpuPolicy::Shared => {
                let groups = r.groups.iter().map(|g| g.name.clone()).collect();
                c.add(vm, host, r.size, Vec::new(), groups).unwrap();
            }
        }
        cands.push(Candidate {
            vm: vm.into(),
            host: host.into(),
            request: r,
            cpu_percent,
        });
    }

    fn cfg(threshold: f64, max_moves: usize, location_weight: f64) -> RebalanceConfig {
        RebalanceConfig {
            threshold,
            max_moves,
            min_gain_per_gib: 0.0,
            location_weight,
        }
    }

    #[test]
    fn imbalance_is_the_std_dev_of_load_over_schedulable_hosts() {
        let mut c = Cluster::default();
        assert_eq!(imbalance(&c), 0.0);
        c.upsert_host(host("a", "z", 4, 4096, 90.0));
        c.upsert_host(host("b", "z", 4, 4096, 10.0));
        assert!((imbalance(&c) - 40.0).abs() < 1e-9);
        c.upsert_host(HostInfo {
            schedulable: false,
            ..host("c", "z", 4, 4096, 50.0)
        });
        assert!(
            (imbalance(&c) - 40.0).abs() < 1e-9,
            "a host that is not schedulable is not scored"
        );
    }

    #[test]
    fn load_moves_as_cpu_use_over_each_hosts_cores() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 4, 8192, 90.0));
        c.upsert_host(host("b", "z", 8, 8192, 10.0));
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "v", "a", req(2, 1024), 200.0);
        let moves = c.plan_rebalance(&cands, &cfg(80.0, 4, 0.0));
        assert_eq!(moves.len(), 1);
        let m = &moves[0];
        assert_eq!(
            (m.vm.as_str(), m.from.as_str(), m.to.as_str()),
            ("v", "a", "b")
        );
        // a: 90 - 200/4 = 40; b: 10 + 200/8 = 35.
        assert!((m.imbalance_before - 40.0).abs() < 1e-9);
        assert!((m.imbalance_after - 2.5).abs() < 1e-9, "{m:?}");
        assert!(
            m.reason.contains("host a at 90% > 80%")
                && m.reason.contains("to b at 10% -> 35%")
                && m.reason.contains("1024 MiB to copy"),
            "{}",
            m.reason
        );
        assert_eq!(c.host("a").unwrap().load, 90.0, "planning changes nothing");
        assert_eq!(c.vm_host("v"), Some("a"));
    }

    #[test]
    fn targets_in_the_sources_zone_come_first_by_the_location_weight() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z1", 8, 8192, 95.0));
        c.upsert_host(host("b", "z1", 8, 8192, 40.0));
        c.upsert_host(host("c", "z2", 8, 8192, 10.0));
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "v", "a", req(1, 512), 100.0);
        let to = |weight| {
            c.plan_rebalance(&cands, &cfg(80.0, 1, weight))[0]
                .to
                .clone()
        };
        assert_eq!(to(50.0), "b", "30 points less load do not outweigh 50");
        assert_eq!(to(20.0), "c");
        let m = &c.plan_rebalance(&cands, &cfg(80.0, 1, 0.0))[0];
        assert!(m.reason.contains("to c in zone z2"), "{}", m.reason);
    }

    #[test]
    fn only_overloaded_hosts_shed_and_each_move_lowers_the_imbalance() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 4, 65536, 100.0));
        c.upsert_host(host("b", "z", 4, 65536, 70.0));
        c.upsert_host(host("c", "z", 4, 65536, 0.0));
        let mut cands = Vec::new();
        for i in 0..4 {
            put(
                &mut c,
                &mut cands,
                &format!("a{i}"),
                "a",
                req(1, 512),
                100.0,
            );
        }
        for i in 0..3 {
            put(&mut c, &mut cands, &format!("b{i}"), "b", req(1, 512), 93.3);
        }
        let moves = c.plan_rebalance(&cands, &cfg(80.0, 10, 0.0));
        // a: 100 -> 75 with one VM to c (0 -> 25): no host is above 80 any
        // more, so b's VMs stay though moving one would even things out.
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!((moves[0].from.as_str(), moves[0].to.as_str()), ("a", "c"));
        assert!(moves.iter().all(|m| m.imbalance_after < m.imbalance_before));
    }

    #[test]
    fn a_host_stuck_earlier_is_looked_at_again_once_others_made_room() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 4, 65536, 95.0));
        c.upsert_host(host("b", "z", 8, 8192, 90.0));
        c.upsert_host(host("c", "z", 4, 2048, 0.0));
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "va", "a", req(1, 4096), 100.0);
        put(&mut c, &mut cands, "vb", "b", req(1, 2048), 200.0);
        c.add("fixed", "b", req(1, 4096).size, Vec::new(), Vec::new())
            .unwrap();
        // va fits nowhere until vb has left b (for c, the only host with
        // room for it).
        let moves = c.plan_rebalance(&cands, &cfg(80.0, 4, 0.0));
        let summary: Vec<(&str, &str)> = moves
            .iter()
            .map(|m| (m.vm.as_str(), m.to.as_str()))
            .collect();
        assert_eq!(summary, [("vb", "c"), ("va", "b")], "{moves:?}");
    }

    #[test]
    fn later_moves_see_the_room_and_cores_earlier_ones_took() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 8, 65536, 100.0));
        // t has memory for one of the VMs only.
        c.upsert_host(host("t", "z", 4, 2048, 0.0));
        c.upsert_host(host("u", "z", 4, 65536, 30.0));
        let dedicated = Request {
            cpu_policy: CpuPolicy::Dedicated,
            ..req(2, 2048)
        };
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "d1", "a", dedicated.clone(), 100.0);
        put(&mut c, &mut cands, "d2", "a", dedicated, 100.0);
        // Moving s would take any target above the threshold.
        put(&mut c, &mut cands, "s", "a", req(4, 1024), 400.0);
        let moves = c.plan_rebalance(&cands, &cfg(80.0, 4, 0.0));
        let summary: Vec<(&str, &str, &[u32])> = moves
            .iter()
            .map(|m| (m.vm.as_str(), m.to.as_str(), m.cores.as_slice()))
            .collect();
        // a: 100 -> 87.5 -> 75; t (then at 25, below u) has no memory left
        // for d2.
        assert_eq!(
            summary,
            [("d1", "t", &[0, 1][..]), ("d2", "u", &[0, 1][..])],
            "{moves:?}"
        );
    }

    #[test]
    fn hard_groups_and_the_guests_cpu_hold_for_moves() {
        let mut c = Cluster::default();
        let kvm = |name: &str, model: &str, load| HostInfo {
            accel: "kvm".into(),
            cpu_model: model.into(),
            ..host(name, "z", 8, 65536, load)
        };
        c.upsert_host(kvm("a", "EPYC", 95.0));
        c.upsert_host(kvm("x", "Xeon", 0.0));
        c.upsert_host(kvm("b", "EPYC", 50.0));
        let group = |name: &str| Request {
            groups: vec![Group {
                name: name.into(),
                anti: false,
                hard: true,
            }],
            ..req(1, 512)
        };
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "lone", "a", group("solo"), 100.0);
        put(&mut c, &mut cands, "p1", "a", group("pair"), 200.0);
        put(&mut c, &mut cands, "p2", "a", group("pair"), 200.0);
        let moves = c.plan_rebalance(&cands, &cfg(80.0, 4, 0.0));
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(
            (moves[0].vm.as_str(), moves[0].to.as_str()),
            ("lone", "b"),
            "the pair stays together, and x runs another CPU model"
        );
        let moving = Request {
            from_host: Some("a".into()),
            ..group("pair")
        };
        assert_eq!(c.check_host("p1", "b", &moving), Err(Constraint::Affinity));
        assert_eq!(c.check_host("p1", "x", &moving), Err(Constraint::CpuModel));
        assert_eq!(
            c.check_host("p1", "nowhere", &moving),
            Err(Constraint::NotSchedulable)
        );
    }

    #[test]
    fn requirements_see_the_load_earlier_moves_planned() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 8, 65536, 100.0));
        c.upsert_host(host("b", "z", 4, 65536, 0.0));
        c.upsert_host(host("c", "z", 4, 65536, 20.0));
        let cool = Request {
            requirements: Some(parse_host_expr("load < 20").unwrap()),
            ..req(1, 512)
        };
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "v1", "a", cool.clone(), 100.0);
        put(&mut c, &mut cands, "v2", "a", cool, 100.0);
        let moves = c.plan_rebalance(&cands, &cfg(60.0, 4, 0.0));
        assert_eq!(
            moves.len(),
            1,
            "a is still at 87.5 but b is at 25 after the first: {moves:?}"
        );
        assert_eq!(moves[0].to, "b");
    }

    #[test]
    fn moves_cost_memory_and_max_moves_caps_the_plan() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 8, 1 << 20, 100.0));
        c.upsert_host(host("b", "z", 8, 1 << 20, 0.0));
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "big", "a", req(1, 64 * 1024), 100.0);
        put(&mut c, &mut cands, "small", "a", req(1, 1024), 100.0);
        put(&mut c, &mut cands, "small2", "a", req(1, 1024), 100.0);
        // Each move lowers the imbalance (50) by 12.5; 64 GiB would need 64.
        let costly = RebalanceConfig {
            min_gain_per_gib: 1.0,
            ..cfg(80.0, 4, 0.0)
        };
        let moves = c.plan_rebalance(&cands, &costly);
        assert!(!moves.is_empty() && moves.iter().all(|m| m.vm != "big"));
        assert_eq!(c.plan_rebalance(&cands, &cfg(80.0, 1, 0.0)).len(), 1);
        assert!(c.plan_rebalance(&cands, &cfg(80.0, 0, 0.0)).is_empty());
    }

    #[test]
    fn the_cheapest_move_that_fixes_the_host_goes_first_else_the_biggest_step() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 10, 1 << 20, 100.0));
        c.upsert_host(host("b", "z", 10, 1 << 20, 0.0));
        let mut cands = Vec::new();
        // From a (10 cores): big and small would each fix a (-30), the
        // others not (-5, -15). Small is the cheaper fix; busy would lower
        // the imbalance more per GiB, but leave a overloaded.
        put(&mut c, &mut cands, "big", "a", req(4, 16384), 300.0);
        put(&mut c, &mut cands, "small", "a", req(4, 4096), 300.0);
        put(&mut c, &mut cands, "idle", "a", req(1, 512), 50.0);
        put(&mut c, &mut cands, "busy", "a", req(2, 1536), 150.0);
        let moves = c.plan_rebalance(&cands, &cfg(80.0, 4, 0.0));
        let vms: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
        assert_eq!(vms, ["small"], "{moves:?}");
        c.set_load("a", 100.0 + 20.0);
        let moves = c.plan_rebalance(&cands, &cfg(80.0, 4, 0.0));
        let vms: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
        // At 120 nothing fixes a alone: the biggest step (big and small
        // tie; the first wins). At 90 small and busy would: small lowers
        // the imbalance by 30 for 4 GiB, busy by 15 for 1.5 GiB.
        assert_eq!(vms, ["big", "busy"], "{moves:?}");
    }

    #[test]
    fn naive_moves_the_busiest_vm_to_the_least_loaded_host() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z1", 8, 65536, 100.0));
        c.upsert_host(host("b", "z1", 4, 65536, 50.0));
        c.upsert_host(host("c", "z2", 4, 65536, 10.0));
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "idle", "a", req(1, 512), 5.0);
        put(&mut c, &mut cands, "busy", "a", req(4, 512), 300.0);
        let moves = c.plan_rebalance_naive(&cands, &cfg(80.0, 4, 100.0));
        assert_eq!(moves.len(), 1);
        assert_eq!(
            (moves[0].vm.as_str(), moves[0].to.as_str()),
            ("busy", "c"),
            "{moves:?}"
        );
    }

    #[test]
    fn candidates_not_placed_where_they_say_are_ignored() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 4, 65536, 100.0));
        c.upsert_host(host("b", "z", 4, 65536, 0.0));
        c.place_on("v", "v", "a", &req(1, 512)).unwrap();
        let stale = |vm: &str, host: &str| Candidate {
            vm: vm.into(),
            host: host.into(),
            request: req(1, 512),
            cpu_percent: 100.0,
        };
        let cands = [stale("v", "b"), stale("ghost", "a"), stale("v", "gone")];
        assert!(c.plan_rebalance(&cands, &cfg(80.0, 4, 0.0)).is_empty());
        assert!(c
            .plan_rebalance_naive(&cands, &cfg(80.0, 4, 0.0))
            .is_empty());
    }

    fn consolidation(max_hosts: usize) -> ConsolidationConfig {
        ConsolidationConfig {
            headroom: 0.2,
            max_load: 30.0,
            max_hosts,
        }
    }

    #[test]
    fn consolidation_empties_the_emptiest_hosts_into_the_fullest_with_headroom() {
        let mut c = Cluster::default();
        c.upsert_host(host("full", "z", 10, 10240, 50.0));
        c.upsert_host(host("light", "z", 10, 10240, 10.0));
        c.upsert_host(host("empty", "z", 10, 10240, 1.0));
        c.upsert_host(host("hot", "z", 10, 10240, 60.0));
        c.upsert_host(host("elsewhere", "y", 10, 10240, 0.0));
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "f", "full", req(5, 5120), 400.0);
        put(&mut c, &mut cands, "l1", "light", req(2, 2048), 50.0);
        put(&mut c, &mut cands, "l2", "light", req(1, 1024), 50.0);
        put(&mut c, &mut cands, "h", "hot", req(1, 1024), 100.0);
        let plan = c.plan_consolidation("z", &cands, &consolidation(5));
        let hosts: Vec<&str> = plan.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(hosts, ["empty", "light"], "{plan:?}");
        assert!(plan[0].1.is_empty(), "nothing to move off an empty host");
        let light = &plan[1].1;
        assert_eq!(light.len(), 2);
        // full: 5 + 2 vCPUs of 10 -> 70% (1 more would break the 80%
        // headroom); then hot takes the other.
        assert_eq!(light[0].vm, "l1");
        assert_eq!(light[0].to, "full");
        assert_eq!(light[1].to, "full", "7 + 1 of 10 keeps 20% free");
        assert!(light
            .iter()
            .all(|m| m.reason.starts_with("emptying host light")));
        assert_eq!(
            c.plan_consolidation("z", &cands, &consolidation(1)).len(),
            1
        );
        assert!(c
            .plan_consolidation("nowhere", &cands, &consolidation(5))
            .is_empty());
    }

    #[test]
    fn consolidation_empties_a_host_completely_or_not_at_all() {
        let mut c = Cluster::default();
        c.upsert_host(host("a", "z", 10, 10240, 10.0));
        c.upsert_host(host("b", "z", 10, 10240, 50.0));
        let mut cands = Vec::new();
        put(&mut c, &mut cands, "b1", "b", req(6, 1024), 500.0);
        put(&mut c, &mut cands, "a1", "a", req(1, 1024), 10.0);
        put(&mut c, &mut cands, "a2", "a", req(2, 1024), 10.0);
        // b keeps 20% free only with one of a's VMs: a stays as it is.
        let plan = c.plan_consolidation("z", &cands, &consolidation(5));
        assert!(plan.is_empty(), "{plan:?}");
        // A VM the caller may not move keeps its host.
        c.release("a2");
        let movable: Vec<Candidate> = cands.iter().filter(|c| c.vm == "b1").cloned().collect();
        assert!(c
            .plan_consolidation("z", &movable, &consolidation(5))
            .is_empty());
        let plan = c.plan_consolidation("z", &cands, &consolidation(5));
        assert_eq!(plan.len(), 1);
        assert_eq!(plan[0].0, "a");
    }

    // A brute-force model of the rules, recomputed from scratch per check.

    #[derive(Clone, Debug)]
    struct ModelVm {
        vm: String,
        host: String,
        req: Request,
        cores: Vec<u32>,
        cpu: f64,
        candidate: bool,
    }

    #[derive(Clone, Debug)]
    struct Model {
        hosts: Vec<HostInfo>,
        vms: Vec<ModelVm>,
    }

    impl Model {
        fn host(&self, name: &str) -> &HostInfo {
            self.hosts.iter().find(|h| h.name == name).unwrap()
        }

        fn host_mut(&mut self, name: &str) -> &mut HostInfo {
            self.hosts.iter_mut().find(|h| h.name == name).unwrap()
        }

        fn vm(&self, name: &str) -> usize {
            self.vms.iter().position(|v| v.vm == name).unwrap()
        }

        fn score(&self) -> f64 {
            let loads: Vec<f64> = self
                .hosts
                .iter()
                .filter(|h| h.schedulable)
                .map(|h| h.load)
                .collect();
            if loads.is_empty() {
                return 0.0;
            }
            let mean = loads.iter().sum::<f64>() / loads.len() as f64;
            (loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / loads.len() as f64).sqrt()
        }

        /// Shared vCPUs, dedicated cores and memory on `host`, without VM `skip`.
        fn used(&self, host: &str, skip: Option<usize>) -> (u64, u32, u64) {
            let on = self
                .vms
                .iter()
                .enumerate()
                .filter(|(i, v)| v.host == host && Some(*i) != skip);
            let mut used = (0, 0, 0);
            for (_, v) in on {
                if v.cores.is_empty() {
                    used.0 += u64::from(v.req.size.vcpus);
                }
                used.1 += v.cores.len() as u32;
                used.2 += v.req.size.memory_mib;
            }
            used
        }

        /// Whether VM `i` may run on `to`, moving from its host.
        fn fits(&self, i: usize, to: &HostInfo) -> bool {
            let v = &self.vms[i];
            let from = self.host(&v.host);
            let r = &v.req;
            let cpu_runs =
                from.accel == to.accel && (from.accel == "tcg" || from.cpu_model == to.cpu_model);
            let (shared, dedicated, memory) = self.used(&to.name, Some(i));
            let limit = |cores: u32| (f64::from(cores) * to.cpu_overcommit).floor() as u64;
            let cores_left = to.capacity.vcpus.saturating_sub(dedicated);
            let cpu_ok = match r.cpu_policy {
                CpuPolicy::Shared => shared + u64::from(r.size.vcpus) <= limit(cores_left),
                CpuPolicy::Dedicated => {
                    r.size.vcpus <= cores_left && shared <= limit(cores_left - r.size.vcpus)
                }
            };
            let group_ok = r.groups.iter().filter(|g| g.hard).all(|g| {
                let members: Vec<&ModelVm> = self
                    .vms
                    .iter()
                    .enumerate()
                    .filter(|(j, o)| *j != i && o.req.groups.iter().any(|og| og.name == g.name))
                    .map(|(_, o)| o)
                    .collect();
                let on_host = members.iter().any(|o| o.host == to.name);
                if g.anti {
                    !on_host
                } else {
                    members.is_empty() || on_host
                }
            });
            to.schedulable
                && to.name != v.host
                && cpu_runs
                && r.zone.as_ref().is_none_or(|z| *z == to.zone)
                && group_ok
                && cpu_ok
                && memory + r.size.memory_mib
                    <= (to.capacity.memory_mib as f64 * to.memory_overcommit).floor() as u64
        }

        /// The score of moving VM `i` to `to` and the imbalance drop, if it
        /// qualifies with `slack` to spare (negative: tolerate rounding).
        fn qualifies(
            &self,
            i: usize,
            to: &HostInfo,
            cfg: &RebalanceConfig,
            slack: f64,
        ) -> Option<(f64, f64)> {
            let v = &self.vms[i];
            let from = self.host(&v.host);
            let b_after = to.load + v.cpu / f64::from(to.capacity.vcpus);
            if !self.fits(i, to) || b_after > cfg.threshold - slack {
                return None;
            }
            let mut after = self.clone();
            after.shift(i, &to.name);
            let drop = self.score() - after.score();
            let need = cfg.min_gain_per_gib * v.req.size.memory_mib as f64 / 1024.0;
            if drop <= slack.max(0.0) || drop < need + slack {
                return None;
            }
            let penalty = if to.zone == from.zone {
                0.0
            } else {
                cfg.location_weight
            };
            Some((to.load + penalty, drop))
        }

        /// Move VM `i`'s load to host `to` (not its cores).
        fn shift(&mut self, i: usize, to: &str) {
            let cpu = self.vms[i].cpu;
            let from = self.vms[i].host.clone();
            let f = self.host_mut(&from);
            f.load -= cpu / f64::from(f.capacity.vcpus);
            let t = self.host_mut(to);
            t.load += cpu / f64::from(t.capacity.vcpus);
            self.vms[i].host = to.to_string();
        }

        /// Check a planned move against the rules and apply it.
        fn apply(&mut self, m: &Move, moved: &mut HashSet<String>) -> Result<(), TestCaseError> {
            let i = self.vm(&m.vm);
            prop_assert!(self.vms[i].candidate, "{} is not a candidate", m.vm);
            prop_assert!(moved.insert(m.vm.clone()), "{} moved twice", m.vm);
            prop_assert_eq!(&self.vms[i].host, &m.from);
            let to = self.host(&m.to).clone();
            prop_assert!(self.fits(i, &to), "{} does not fit on {}", m.vm, m.to);
            let (_, dedicated, _) = self.used(&m.to, Some(i));
            let taken: Vec<u32> = self
                .vms
                .iter()
                .filter(|v| v.host == m.to)
                .flat_map(|v| v.cores.clone())
                .collect();
            prop_assert!(m
                .cores
                .iter()
                .all(|c| !taken.contains(c) && *c < to.capacity.vcpus));
            let want = match self.vms[i].req.cpu_policy {
                CpuPolicy::Dedicated => self.vms[i].req.size.vcpus as usize,
                CpuPolicy::Shared => 0,
            };
            prop_assert_eq!(m.cores.len(), want);
            prop_assert!(dedicated + want as u32 <= to.capacity.vcpus);
            prop_assert!((m.imbalance_before - self.score()).abs() < 1e-6);
            self.shift(i, &m.to);
            self.vms[i].cores = m.cores.clone();
            prop_assert!((m.imbalance_after - self.score()).abs() < 1e-6);
            Ok(())
        }
    }

    fn model_hosts() -> impl Strategy<Value = Vec<HostInfo>> {
        proptest::collection::vec(
            (1u32..17, 1u64..17, 0u8..2, 0u8..5, 0u8..16, 0u8..3, 0u8..2),
            2..7,
        )
        .prop_map(|hs| {
            hs.into_iter()
                .enumerate()
                .map(|(i, (cores, gib, zone, up, cpu, cpu_x, mem_x))| HostInfo {
                    // Mostly hosts of one kind, so that moves are possible.
                    accel: if cpu < 2 { "kvm" } else { "tcg" }.into(),
                    cpu_model: ["EPYC", "Xeon"][usize::from(cpu % 2)].into(),
                    cpu_overcommit: [1.0, 2.0, 4.0][usize::from(cpu_x)],
                    memory_overcommit: [1.0, 1.5][usize::from(mem_x)],
                    schedulable: up > 0,
                    ..host(
                        &format!("h{i}"),
                        &format!("z{zone}"),
                        cores,
                        gib * 1024,
                        0.0,
                    )
                })
                .collect()
        })
    }

    fn model_request() -> impl Strategy<Value = Request> {
        let group = (0u8..2, any::<bool>(), any::<bool>()).prop_map(|(g, anti, hard)| Group {
            name: format!("g{g}"),
            anti,
            hard,
        });
        (
            1u32..4,
            1u64..5,
            proptest::bool::weighted(0.25),
            proptest::option::weighted(0.2, 0u8..2),
            proptest::option::weighted(0.3, group),
            0u8..3,
        )
            .prop_map(
                |(vcpus, half_gib, dedicated, zone, group, policy)| Request {
                    cpu_policy: if dedicated {
                        CpuPolicy::Dedicated
                    } else {
                        CpuPolicy::Shared
                    },
                    zone: zone.map(|z| format!("z{z}")),
                    groups: group.into_iter().collect(),
                    policy: [Policy::Pack, Policy::Spread, Policy::LoadAware][usize::from(policy)],
                    ..req(vcpus, half_gib * 512)
                },
            )
    }

    /// A cluster with VMs placed by the scheduler, host loads their VMs'
    /// use plus some of their own, and the model of it.
    fn model_cluster() -> impl Strategy<Value = (Cluster, Model, Vec<Candidate>)> {
        (
            model_hosts(),
            proptest::collection::vec((model_request(), 0u32..=100, 0u8..5), 0..24),
            proptest::collection::vec(0u8..4, 8),
        )
            .prop_map(|(hosts, vms, noise)| {
                let mut c = Cluster::default();
                for h in &hosts {
                    c.upsert_host(h.clone());
                }
                let mut model = Model {
                    hosts,
                    vms: Vec::new(),
                };
                for (n, (r, busy, movable)) in vms.into_iter().enumerate() {
                    let vm = format!("vm{n}");
                    let Ok(p) = c.place(&vm, &r) else { continue };
                    model.vms.push(ModelVm {
                        cpu: f64::from(r.size.vcpus * busy),
                        vm,
                        host: p.host,
                        cores: p.cores,
                        req: r,
                        candidate: movable > 0,
                    });
                }
                for (i, h) in model.hosts.iter_mut().enumerate() {
                    let own = [0.0, 5.0, 30.0, 60.0][usize::from(noise[i])];
                    let vms: f64 = model
                        .vms
                        .iter()
                        .filter(|v| v.host == h.name)
                        .map(|v| v.cpu)
                        .sum();
                    h.load = own + vms / f64::from(h.capacity.vcpus);
                    c.set_load(&h.name, h.load);
                }
                let mut cands: Vec<Candidate> = model
                    .vms
                    .iter()
                    .filter(|v| v.candidate)
                    .map(|v| Candidate {
                        vm: v.vm.clone(),
                        host: v.host.clone(),
                        request: v.req.clone(),
                        cpu_percent: v.cpu,
                    })
                    .collect();
                // Stale candidates are ignored.
                cands.push(Candidate {
                    vm: "ghost".into(),
                    host: "h0".into(),
                    request: req(1, 512),
                    cpu_percent: 100.0,
                });
                (c, model, cands)
            })
    }

    fn rebalance_config() -> impl Strategy<Value = RebalanceConfig> {
        (30u32..95, 0usize..8, 0u8..4, 0u8..3).prop_map(|(threshold, max_moves, gain, weight)| {
            RebalanceConfig {
                threshold: f64::from(threshold),
                max_moves,
                min_gain_per_gib: [0.0, 0.0, 0.2, 2.0][usize::from(gain)],
                location_weight: [0.0, 10.0, 50.0][usize::from(weight)],
            }
        })
    }

    /// VMs of the model on schedulable hosts above the threshold, not moved.
    fn movable(model: &Model, cfg: &RebalanceConfig, moved: &HashSet<String>) -> Vec<usize> {
        (0..model.vms.len())
            .filter(|i| {
                let v = &model.vms[*i];
                let h = model.host(&v.host);
                v.candidate && !moved.contains(&v.vm) && h.schedulable && h.load > cfg.threshold
            })
            .collect()
    }

    proptest! {
        // Small cases are cheap; many of them find the corners.
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Against the brute-force model: every move passes every
        /// constraint (seeing the moves before it), comes off an
        /// overloaded host, goes to a target that stays at or below the
        /// threshold and scores best among the targets that qualify, lowers
        /// the imbalance by what its memory costs, and moves each VM at
        /// most once; a plan shorter than max_moves leaves no qualifying
        /// move behind.
        #[test]
        fn rebalancing_matches_a_brute_force_model((c, model, cands) in model_cluster(), cfg in rebalance_config()) {
            let moves = c.plan_rebalance(&cands, &cfg);
            prop_assert!(moves.len() <= cfg.max_moves);
            let mut model = model;
            let mut moved = HashSet::new();
            for m in &moves {
                let i = model.vm(&m.vm);
                prop_assert!(movable(&model, &cfg, &moved).contains(&i), "{} is not on an overloaded host", m.vm);
                let to = model.host(&m.to).clone();
                let chosen = model.qualifies(i, &to, &cfg, -1e-7);
                prop_assert!(chosen.is_some(), "the move of {} to {} does not qualify", m.vm, m.to);
                let best = model
                    .hosts
                    .iter()
                    .filter_map(|h| model.qualifies(i, h, &cfg, 1e-7))
                    .map(|(score, _)| score)
                    .fold(f64::INFINITY, f64::min);
                prop_assert!(chosen.unwrap().0 <= best + 1e-9, "a better target than {} for {}", m.to, m.vm);
                model.apply(m, &mut moved)?;
                prop_assert!(m.imbalance_after < m.imbalance_before);
            }
            if moves.len() < cfg.max_moves {
                for i in movable(&model, &cfg, &moved) {
                    for h in &model.hosts {
                        prop_assert!(
                            model.qualifies(i, h, &cfg, 1e-7).is_none(),
                            "{} could still move to {}", model.vms[i].vm, h.name
                        );
                    }
                }
            }
        }

        /// The naive baseline keeps the constraints and the move budget too.
        #[test]
        fn naive_rebalancing_keeps_the_constraints((c, model, cands) in model_cluster(), cfg in rebalance_config()) {
            let moves = c.plan_rebalance_naive(&cands, &cfg);
            prop_assert!(moves.len() <= cfg.max_moves);
            let mut model = model;
            let mut moved = HashSet::new();
            for m in &moves {
                let i = model.vm(&m.vm);
                prop_assert!(movable(&model, &cfg, &moved).contains(&i));
                model.apply(m, &mut moved)?;
            }
        }

        /// Consolidation empties hosts of the zone below max_load
        /// completely, into hosts of the zone that keep the headroom and are
        /// not emptied themselves.
        #[test]
        fn consolidation_matches_a_brute_force_model(
            (c, model, cands) in model_cluster(),
            zone in 0u8..2,
            headroom in 0u8..3,
            max_load in 0u8..3,
            max_hosts in 0usize..4,
            quieter in 1u8..5,
        ) {
            // Consolidation is for quiet times: divide all use by `quieter`.
            let (mut c, mut model, mut cands) = (c, model, cands);
            let quieter = f64::from(quieter);
            for v in &mut model.vms {
                v.cpu /= quieter;
            }
            for h in &mut model.hosts {
                h.load /= quieter;
                c.set_load(&h.name, h.load);
            }
            for cand in &mut cands {
                cand.cpu_percent /= quieter;
            }
            let zone = format!("z{zone}");
            let cfg = ConsolidationConfig {
                headroom: [0.0, 0.1, 0.3][usize::from(headroom)],
                max_load: [30.0, 60.0, 1000.0][usize::from(max_load)],
                max_hosts,
            };
            let plan = c.plan_consolidation(&zone, &cands, &cfg);
            prop_assert!(plan.len() <= cfg.max_hosts);
            let emptied: HashSet<&str> = plan.iter().map(|(h, _)| h.as_str()).collect();
            prop_assert_eq!(emptied.len(), plan.len());
            let mut moved = HashSet::new();
            let mut receivers = HashSet::new();
            for (name, moves) in &plan {
                let h = model.host(name).clone();
                prop_assert!(h.zone == zone && h.schedulable && h.load < cfg.max_load);
                let mut on: Vec<&str> = model.vms.iter().filter(|v| v.host == *name).map(|v| v.vm.as_str()).collect();
                let mut off: Vec<&str> = moves.iter().map(|m| m.vm.as_str()).collect();
                on.sort();
                off.sort();
                prop_assert_eq!(on, off, "{} is not emptied completely", name);
                for m in moves {
                    prop_assert_eq!(&m.from, name);
                    prop_assert!(!emptied.contains(m.to.as_str()), "{} took VMs", m.to);
                    prop_assert_eq!(&model.host(&m.to).zone, &zone);
                    model.apply(m, &mut moved)?;
                    receivers.insert(m.to.clone());
                }
                model.host_mut(name).schedulable = false;
            }
            let limit = 1.0 - cfg.headroom + 1e-9;
            for r in &receivers {
                let h = model.host(r);
                let (shared, dedicated, memory) = model.used(r, None);
                let cpu = (shared as f64 / h.cpu_overcommit + f64::from(dedicated)) / f64::from(h.capacity.vcpus);
                let mem = memory as f64 / (h.capacity.memory_mib as f64 * h.memory_overcommit);
                prop_assert!(cpu <= limit && mem <= limit && h.load <= limit * 100.0, "{} is left too full", r);
            }
        }
    }
}
