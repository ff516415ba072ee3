//! `kumo-sched`: placement as pure functions over in-memory cluster state.
//!
//! [`Cluster`] holds every host's capacity and what is placed on it, updated
//! incrementally as hosts and VMs come and go; [`Cluster::place`] checks a
//! request against each constraint, ranks the hosts that pass by the
//! request's [`Policy`] and reserves what the VM needs, or explains which
//! constraint excluded how many hosts. [`expr`] is the small language of
//! requirement and rank expressions. [`rebalance`] plans live migrations:
//! load rebalancing ([`Cluster::plan_rebalance`]) and power-saving
//! consolidation ([`Cluster::plan_consolidation`]).

mod cluster;
pub mod expr;
pub mod rebalance;

pub use cluster::{
    parse_host_expr, Capacity, Cluster, Constraint, CpuPolicy, Group, HostInfo, Placement, Policy,
    Refusal, Request,
};
pub use rebalance::{imbalance, Candidate, ConsolidationConfig, Move, RebalanceConfig};
