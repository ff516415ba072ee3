//! The machine a VM runs as: the devices its host is sent as data
//! ([`kumo_api::Machine`]) and builds the guest from.

use kumo_api::{Image, ImageRef, Machine, Vm};

/// The machine of `vm`, created from `image`, on a host where its vCPUs
/// are pinned to `cores` (one each; empty for shared VMs). Every VM has
/// the single-disk machine for now: volumes and virtual networks add
/// disks and NICs here.
pub fn for_vm(vm: &Vm, image: &Image, cores: Vec<u32>) -> Machine {
    let image = ImageRef {
        id: image.id,
        sha256: image.sha256.clone(),
        format: image.format,
        size_bytes: image.size_bytes,
    };
    Machine::single_disk(vm.id, vm.size, image, cores)
}
