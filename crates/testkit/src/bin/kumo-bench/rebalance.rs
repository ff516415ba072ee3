//! The rebalancing and consolidation planners alone (one core, no I/O), on a
//! large cluster with skewed measured load: kumo's planner against the naive
//! baseline (the busiest VM of the most loaded host to the least loaded host
//! that fits), measured in the same run.

use super::sched::ZONES;
use kumo_api::Resources;
use kumo_sched::{
    imbalance, Candidate, Cluster, ConsolidationConfig, CpuPolicy, Group, HostInfo, Move, Policy,
    RebalanceConfig, Request,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Share of hot hosts per zone: the load is skewed across zones too.
const HOT_SHARE: [f64; ZONES] = [0.30, 0.20, 0.10, 0.05];

/// A cluster with its VMs placed and their measured use.
struct Fleet {
    cluster: Cluster,
    candidates: Vec<Candidate>,
}

/// Every fifth host is twice as large, so that moving a VM changes the
/// loads of its two hosts by different amounts.
fn host(i: usize) -> HostInfo {
    let big = i % 5 == 0;
    let capacity = Resources {
        vcpus: if big { 64 } else { 32 },
        memory_mib: if big { 512 } else { 256 } * 1024,
        disk_gib: 8192,
    };
    super::sched::host(i, capacity, 4.0)
}

/// A VM: 1/2/4/8 vCPUs at 50/25/11/14 %, 1–4 GiB per vCPU; a few with
/// dedicated cores, a few in hard anti-affinity groups of three.
fn request(rng: &mut StdRng, n: usize) -> Request {
    let vcpus = match rng.random_range(0..100) {
        0..50 => 1,
        50..75 => 2,
        75..86 => 4,
        _ => 8,
    };
    let gib_per_vcpu: u64 = rng.random_range(1..=4);
    let groups = if rng.random_bool(0.05) {
        vec![Group {
            name: format!("db{}", n % 500),
            anti: true,
            hard: true,
        }]
    } else {
        Vec::new()
    };
    Request {
        size: Resources {
            vcpus,
            memory_mib: u64::from(vcpus) * gib_per_vcpu * 1024,
            disk_gib: 10,
        },
        cpu_policy: if rng.random_bool(0.05) {
            CpuPolicy::Dedicated
        } else {
            CpuPolicy::Shared
        },
        groups,
        policy: Policy::Spread,
        ..Request::default()
    }
}

/// Place `vms` VMs on `hosts` hosts, give each host a measured load from
/// `host_load` (hot or not), split that load over its VMs, and record each
/// host's load as the sum of its VMs' use over its cores.
fn fleet(
    hosts: usize,
    vms: usize,
    seed: u64,
    host_load: impl Fn(&mut StdRng, bool) -> f64,
) -> Fleet {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut cluster = Cluster::default();
    for i in 0..hosts {
        cluster.upsert_host(host(i));
    }
    let mut on_host: HashMap<String, Vec<(String, Request)>> = HashMap::new();
    for n in 0..vms {
        let vm = format!("vm{n:06}");
        let req = request(&mut rng, n);
        if let Ok(p) = cluster.place(&vm, &req) {
            on_host.entry(p.host).or_default().push((vm, req));
        }
    }
    let mut candidates = Vec::new();
    for i in 0..hosts {
        let info = host(i);
        let zone = i % ZONES;
        let hot = rng.random_bool(HOT_SHARE[zone]);
        let target = host_load(&mut rng, hot);
        let cores = f64::from(info.capacity.vcpus);
        let vms = on_host.remove(&info.name).unwrap_or_default();
        let weights: Vec<f64> = vms
            .iter()
            .map(|(_, r)| f64::from(r.size.vcpus) * rng.random_range(0.2..1.0))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut load = 0.0;
        for ((vm, req), w) in vms.into_iter().zip(weights) {
            let cpu = (target * cores * w / total).min(f64::from(req.size.vcpus) * 100.0);
            load += cpu / cores;
            candidates.push(Candidate {
                vm,
                host: info.name.clone(),
                request: req,
                cpu_percent: cpu,
            });
        }
        cluster.set_load(&info.name, load);
    }
    Fleet {
        cluster,
        candidates,
    }
}

/// What a plan leaves behind, by the load accounting the planner uses.
struct Outcome {
    time: Duration,
    moves: usize,
    imbalance: f64,
    overloaded: usize,
    max_load: f64,
    cross_zone: usize,
    gib_copied: f64,
}

fn outcome(f: &Fleet, moves: &[Move], time: Duration, threshold: f64) -> Outcome {
    let mut after = f.cluster.clone();
    let by_vm: HashMap<&str, &Candidate> =
        f.candidates.iter().map(|c| (c.vm.as_str(), c)).collect();
    let mut cross_zone = 0;
    let mut gib_copied = 0.0;
    for m in moves {
        let c = by_vm[m.vm.as_str()];
        let from = after.host(&m.from).expect("known host").clone();
        let to = after.host(&m.to).expect("known host").clone();
        after.set_load(
            &from.name,
            from.load - c.cpu_percent / f64::from(from.capacity.vcpus),
        );
        after.set_load(
            &to.name,
            to.load + c.cpu_percent / f64::from(to.capacity.vcpus),
        );
        cross_zone += usize::from(from.zone != to.zone);
        gib_copied += c.request.size.memory_mib as f64 / 1024.0;
    }
    Outcome {
        time,
        moves: moves.len(),
        imbalance: imbalance(&after),
        overloaded: overloaded(&after, threshold),
        max_load: after.hosts().map(|h| h.load).fold(0.0, f64::max),
        cross_zone,
        gib_copied,
    }
}

fn overloaded(c: &Cluster, threshold: f64) -> usize {
    c.hosts().filter(|h| h.load > threshold).count()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How many times `a` is of `b`.
fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "-".into()
    } else {
        format!("{:.2}x", a / b)
    }
}

pub fn rebalance(hosts: usize, vms: usize, seed: u64, max_moves: usize) {
    let f = fleet(hosts, vms, seed, |rng, hot| {
        if hot {
            rng.random_range(82.0..100.0)
        } else {
            rng.random_range(5.0..60.0)
        }
    });
    let cfg = RebalanceConfig {
        max_moves,
        ..RebalanceConfig::default()
    };
    let before = imbalance(&f.cluster);
    let overloaded_before = overloaded(&f.cluster, cfg.threshold);
    println!(
        "rebalance: {hosts} hosts in {ZONES} zones, {} VMs placed (seed {seed}), threshold {:.0}%, \
         at most {max_moves} moves, min gain {}/GiB, location weight {}",
        f.candidates.len(),
        cfg.threshold,
        cfg.min_gain_per_gib,
        cfg.location_weight
    );
    println!(
        "  before: imbalance {before:.3}, {overloaded_before} hosts overloaded, max load {:.1}%",
        f.cluster.hosts().map(|h| h.load).fold(0.0, f64::max)
    );
    let t = Instant::now();
    let kumo = f.cluster.plan_rebalance(&f.candidates, &cfg);
    let kumo = outcome(&f, &kumo, t.elapsed(), cfg.threshold);
    // Location aside, as the naive baseline ignores it.
    let anywhere = RebalanceConfig {
        location_weight: 0.0,
        ..cfg
    };
    let t = Instant::now();
    let kumo_anywhere = f.cluster.plan_rebalance(&f.candidates, &anywhere);
    let kumo_anywhere = outcome(&f, &kumo_anywhere, t.elapsed(), cfg.threshold);
    let t = Instant::now();
    let naive = f.cluster.plan_rebalance_naive(&f.candidates, &cfg);
    let naive = outcome(&f, &naive, t.elapsed(), cfg.threshold);
    let all = [&kumo, &kumo_anywhere, &naive];
    let row = |label: &str, figure: &dyn Fn(&Outcome) -> String| {
        let [k, a, n] = all.map(figure);
        println!("  {label:<28} {k:>12} {a:>16} {n:>12}");
    };
    println!(
        "  {:<28} {:>12} {:>16} {:>12}",
        "", "kumo", "kumo, weight 0", "naive"
    );
    row("planning time (ms)", &|o| format!("{:.1}", ms(o.time)));
    row("moves", &|o| o.moves.to_string());
    row("imbalance after", &|o| format!("{:.3}", o.imbalance));
    row("overloaded hosts after", &|o| o.overloaded.to_string());
    row("max host load after (%)", &|o| format!("{:.1}", o.max_load));
    row("moves across zones", &|o| o.cross_zone.to_string());
    row("guest memory copied (GiB)", &|o| {
        format!("{:.0}", o.gib_copied)
    });
    for (label, k) in [("kumo", &kumo), ("kumo, weight 0", &kumo_anywhere)] {
        println!(
            "  {label} / naive: time {}, moves {}, imbalance reduction {}, overloaded hosts fixed {}, \
             memory copied {}, moves across zones {}",
            ratio(ms(k.time), ms(naive.time)),
            ratio(k.moves as f64, naive.moves as f64),
            ratio(before - k.imbalance, before - naive.imbalance),
            ratio(
                (overloaded_before - k.overloaded) as f64,
                (overloaded_before - naive.overloaded) as f64
            ),
            ratio(k.gib_copied, naive.gib_copied),
            ratio(k.cross_zone as f64, naive.cross_zone as f64),
        );
    }
    // The controller's usual call: a few moves per period.
    let usual = RebalanceConfig::default();
    let t = Instant::now();
    let moves = f.cluster.plan_rebalance(&f.candidates, &usual);
    println!(
        "  one period with the default max_moves {}: {} moves planned in {:.1} ms",
        usual.max_moves,
        moves.len(),
        ms(t.elapsed())
    );
}

pub fn consolidation(hosts: usize, vms: usize, seed: u64) {
    // A quiet night: half the VMs, nobody busy.
    let f = fleet(hosts, vms / 2, seed, |rng, _| rng.random_range(2.0..25.0));
    let cfg = ConsolidationConfig {
        max_hosts: hosts,
        ..ConsolidationConfig::default()
    };
    println!(
        "consolidation: {hosts} hosts, {} VMs placed, load 2-25%, headroom {:.0}%, hosts below {:.0}% emptied:",
        f.candidates.len(),
        cfg.headroom * 100.0,
        cfg.max_load
    );
    let memory_mib: HashMap<&str, u64> = f
        .candidates
        .iter()
        .map(|c| (c.vm.as_str(), c.request.size.memory_mib))
        .collect();
    let (mut total_time, mut total_hosts, mut total_moves) = (Duration::ZERO, 0, 0);
    for z in 0..ZONES {
        let zone = format!("z{z}");
        let in_zone = f.cluster.hosts().filter(|h| h.zone == zone).count();
        let t = Instant::now();
        let plan = f.cluster.plan_consolidation(&zone, &f.candidates, &cfg);
        let time = t.elapsed();
        let moves: usize = plan.iter().map(|(_, m)| m.len()).sum();
        let gib: f64 = plan
            .iter()
            .flat_map(|(_, m)| m)
            .map(|m| memory_mib[m.vm.as_str()] as f64 / 1024.0)
            .sum();
        println!(
            "  zone {zone}: {} of {in_zone} hosts emptied ({:.0}%), {moves} moves, {gib:.0} GiB to copy, planned in {:.1} ms",
            plan.len(),
            plan.len() as f64 * 100.0 / in_zone as f64,
            ms(time)
        );
        total_time += time;
        total_hosts += plan.len();
        total_moves += moves;
    }
    println!(
        "  all zones: {total_hosts} of {hosts} hosts emptied, {total_moves} moves, planned in {:.1} ms",
        ms(total_time)
    );
}
