//! Disk images are untrusted input: one inspection, used by the controller
//! when an image is imported and by every agent on each image it downloads
//! before first use.
//!
//! An image file is more than a disk's bytes: a qcow2 header may name other
//! files that QEMU then opens on the host. A qcow2 whose header names an
//! external data file (`qemu-img create -f qcow2 -o
//! data_file=/some/host/file,data_file_raw=on`) makes a guest booted from it
//! see that host file as its disk (OpenStack's OSSA-2024-001); a backing
//! file does the same through the backing chain; and a crafted header can
//! make `qemu-img` itself spend unbounded memory or CPU (OSSA-2015-014).
//!
//! [`judge`] is the policy, a pure function over what `qemu-img info
//! --output=json` reports; [`inspect`] runs qemu-img on a file (under
//! resource limits, see [`QEMU_IMG_ADDRESS_SPACE`]) and applies it. An
//! image passes only if
//!
//! - its format is one kumo runs, qcow2 or raw;
//! - it names no other file or protocol: no backing file, no external data
//!   file, no `json:` or protocol filename anywhere in the report;
//! - it is not encrypted (kumo holds no keys);
//! - its sizes are sane: a non-empty file, a virtual size of at most
//!   [`MAX_VIRTUAL_SIZE`], a raw file of whole 512-byte sectors;
//! - a qcow2 passes `qemu-img check`.

mod judge;
mod qemu_img;

pub use judge::{judge, Inspected, Refusal, MAX_VIRTUAL_SIZE};
pub use qemu_img::{inspect, Error, QEMU_IMG_ADDRESS_SPACE, QEMU_IMG_CPU_SECONDS};
