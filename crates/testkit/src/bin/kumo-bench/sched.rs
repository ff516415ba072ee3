//! The scheduler alone (one core, no I/O): placement throughput and
//! latency, and packing quality on a churn stream against first-fit and
//! best-fit measured in the same run.

use kumo_api::Resources;
use kumo_sched::{Cluster, HostInfo, Policy, Request};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Zones the benchmark hosts are spread over.
pub(super) const ZONES: usize = 4;

/// Host `i`, in zone `z{i % ZONES}`.
pub(super) fn host(i: usize, capacity: Resources, cpu_overcommit: f64) -> HostInfo {
    HostInfo {
        name: format!("h{i:05}"),
        zone: format!("z{}", i % ZONES),
        capacity,
        cpu_overcommit,
        memory_overcommit: 1.0,
        cpu_model: "EPYC".into(),
        accel: "tcg".into(),
        labels: BTreeMap::new(),
        schedulable: true,
        load: 0.0,
    }
}

/// A VM shape from the mix in the issue: 1/2/4/8 vCPUs at 50/25/11/14 %,
/// 2–8 GiB per vCPU.
fn shape(rng: &mut StdRng) -> Resources {
    let vcpus = match rng.random_range(0..100) {
        0..50 => 1,
        50..75 => 2,
        75..86 => 4,
        _ => 8,
    };
    let gib_per_vcpu = rng.random_range(2..=8);
    Resources {
        vcpus,
        memory_mib: u64::from(vcpus) * gib_per_vcpu * 1024,
        disk_gib: 10,
    }
}

/// Place VMs one by one until `fill` of the cluster's memory is taken,
/// timing every decision.
pub fn throughput(hosts: usize, fill: f64) {
    let mut rng = StdRng::seed_from_u64(7);
    let mut cluster = Cluster::default();
    let capacity = Resources {
        vcpus: 64,
        memory_mib: 512 * 1024,
        disk_gib: 4096,
    };
    for i in 0..hosts {
        cluster.upsert_host(host(i, capacity, 4.0));
    }
    let target = (capacity.memory_mib as f64 * hosts as f64 * fill) as u64;
    let mut used = 0u64;
    let mut times = Vec::new();
    let start = Instant::now();
    for n in 0.. {
        if used >= target {
            break;
        }
        let req = Request {
            size: shape(&mut rng),
            ..Request::default()
        };
        used += req.size.memory_mib;
        let t = Instant::now();
        let placed = cluster.place(&format!("vm{n}"), &req).is_ok();
        times.push(t.elapsed());
        if !placed {
            println!("  cluster full after {n} placements");
            break;
        }
    }
    let total = start.elapsed();
    times.sort();
    let q = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    println!(
        "{hosts:>6} hosts: {:>7.0} placements/s  p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>7.1} µs  ({} placements)",
        times.len() as f64 / total.as_secs_f64(),
        micros(q(0.5)),
        micros(q(0.99)),
        micros(*times.last().expect("placed some")),
        times.len()
    );
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A simple model of hosts for the baselines: capacity and what is used.
struct Bins {
    capacity: Resources,
    used: Vec<Resources>,
    count: Vec<u32>,
}

impl Bins {
    fn fits(&self, i: usize, r: &Resources) -> bool {
        r.add(&self.used[i]).vcpus <= self.capacity.vcpus
            && r.add(&self.used[i]).memory_mib <= self.capacity.memory_mib
    }

    /// First fit: the first host (by index) with room.
    fn first_fit(&self, r: &Resources) -> Option<usize> {
        (0..self.used.len()).find(|i| self.fits(*i, r))
    }

    /// Best fit: the host left with the least room (CPU and memory shares).
    fn best_fit(&self, r: &Resources) -> Option<usize> {
        let left = |i: usize| {
            let u = self.used[i].add(r);
            (1.0 - f64::from(u.vcpus) / f64::from(self.capacity.vcpus))
                + (1.0 - u.memory_mib as f64 / self.capacity.memory_mib as f64)
        };
        (0..self.used.len())
            .filter(|i| self.fits(*i, r))
            .min_by(|a, b| left(*a).total_cmp(&left(*b)))
    }
}

/// One arrival or departure of the churn stream.
enum Event {
    Arrive(usize, Resources),
    Leave(usize),
}

/// VMs arriving and leaving with heavy-tailed (Pareto) lifetimes.
fn churn(events: usize, seed: u64) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut leaving: BTreeMap<(u64, usize), ()> = BTreeMap::new();
    let mut out = Vec::new();
    let mut now = 0u64;
    let mut next = 0usize;
    while out.len() < events {
        now += 1;
        while let Some((&(t, id), _)) = leaving.first_key_value() {
            if t > now {
                break;
            }
            leaving.remove(&(t, id));
            out.push(Event::Leave(id));
        }
        let size = shape(&mut rng);
        // Pareto, shape 1.5, scale 2,000 steps: most VMs short, a few very
        // long; about 6,000 VMs live at once.
        let u: f64 = rng.random_range(1e-9..1.0);
        let life = (2000.0 / u.powf(1.0 / 1.5)) as u64;
        leaving.insert((now + life, next), ());
        out.push(Event::Arrive(next, size));
        next += 1;
    }
    out
}

/// Hosts in use over the lower bound max_r ⌈Σ demand_r / capacity_r⌉,
/// averaged over the stream after a warm-up.
pub fn packing(events: usize, seed: u64) {
    let capacity = Resources {
        vcpus: 64,
        memory_mib: 512 * 1024,
        disk_gib: u64::MAX / 4,
    };
    let hosts = 2000;
    let stream = churn(events, seed);
    let warmup = events / 5;
    let mut results = Vec::new();
    for name in ["first-fit", "best-fit", "kumo pack"] {
        let mut bins = Bins {
            capacity,
            used: vec![Resources::default(); hosts],
            count: vec![0; hosts],
        };
        let mut cluster = Cluster::default();
        if name == "kumo pack" {
            for i in 0..hosts {
                cluster.upsert_host(host(i, capacity, 1.0));
            }
        }
        let mut placed: BTreeMap<usize, (usize, Resources)> = BTreeMap::new();
        let mut demand = Resources::default();
        let (mut ratio_sum, mut samples) = (0.0, 0u64);
        for (n, e) in stream.iter().enumerate() {
            match e {
                Event::Arrive(id, r) => {
                    let at = match name {
                        "first-fit" => bins.first_fit(r),
                        "best-fit" => bins.best_fit(r),
                        _ => {
                            let req = Request {
                                size: *r,
                                policy: Policy::Pack,
                                ..Request::default()
                            };
                            cluster
                                .place(&id.to_string(), &req)
                                .ok()
                                .map(|p| p.host[1..].parse::<usize>().expect("host index"))
                        }
                    };
                    let Some(at) = at else { continue };
                    bins.used[at] = bins.used[at].add(r);
                    bins.count[at] += 1;
                    demand = demand.add(r);
                    placed.insert(*id, (at, *r));
                }
                Event::Leave(id) => {
                    let Some((at, r)) = placed.remove(id) else {
                        continue;
                    };
                    bins.used[at] = bins.used[at].saturating_sub(&r);
                    bins.count[at] -= 1;
                    demand = demand.saturating_sub(&r);
                    cluster.release(&id.to_string());
                }
            }
            if n >= warmup {
                let in_use = bins.count.iter().filter(|c| **c > 0).count() as f64;
                let bound = (f64::from(demand.vcpus) / f64::from(capacity.vcpus))
                    .ceil()
                    .max((demand.memory_mib as f64 / capacity.memory_mib as f64).ceil())
                    .max(1.0);
                ratio_sum += in_use / bound;
                samples += 1;
            }
        }
        results.push((name, ratio_sum / samples as f64));
    }
    for (name, ratio) in &results {
        println!("  {name:<10} hosts in use / lower bound: {ratio:.4}");
    }
}
