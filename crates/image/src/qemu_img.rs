//! Running qemu-img on an untrusted file, under resource limits.

use crate::{judge, Inspected, Refusal};
use kumo_api::ImageFormat;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

/// The address space qemu-img may use while inspecting an image: 1 GiB.
/// With [`QEMU_IMG_CPU_SECONDS`] these are OpenStack's limits since
/// OSSA-2015-014 (oslo.concurrency's `prlimit` around `qemu-img info`): a
/// crafted header (a huge L1 table, say) makes qemu-img allocate or loop
/// without end, and the controller and agents must survive any upload. The
/// limits are set with util-linux's `prlimit` binary (the workspace forbids
/// the unsafe code `setrlimit` in a `pre_exec` hook would need).
pub const QEMU_IMG_ADDRESS_SPACE: u64 = 1 << 30;

/// The CPU time qemu-img may use inspecting an image: 30 s (see
/// [`QEMU_IMG_ADDRESS_SPACE`]).
pub const QEMU_IMG_CPU_SECONDS: u64 = 30;

/// Why an image could not be judged.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image is bad: the fault of whoever supplied it.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The host's fault, not the image's.
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running prlimit (util-linux)")]
    Prlimit(#[source] std::io::Error),
    #[error("qemu-img could not be run (is qemu-utils installed?): {0}")]
    QemuImg(String),
    #[error("qemu-img info printed no JSON")]
    Output(#[source] serde_json::Error),
}

/// Inspect the image file at `path` and [`judge`] it; a qcow2 is also
/// checked for corruption. `format` is the format the image is known to
/// have (an agent knows it from the import): qemu-img then reads the file
/// as that format and never probes. Without it (an import) qemu-img probes
/// once, and every later call names the format found.
pub async fn inspect(path: &Path, format: Option<ImageFormat>) -> Result<Inspected, Error> {
    // qemu-img takes `proto:rest` (`nbd:`, `json:`) in a relative path for
    // a protocol; an absolute path is always a file.
    let path = std::path::absolute(path).map_err(|source| Error::Io {
        path: path.into(),
        source,
    })?;
    let file_size = tokio::fs::metadata(&path)
        .await
        .map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?
        .len();
    // `--force-share`: inspection only reads, and must neither wait for
    // nor be refused by a lock another process holds.
    let mut args = vec!["info", "--output=json", "--force-share"];
    if let Some(format) = format {
        args.extend(["-f", format.as_str()]);
    }
    let info = qemu_img(&args, &path).await?;
    if !info.status.success() {
        return Err(Refusal::Unreadable(stderr(&info)).into());
    }
    let info = serde_json::from_slice(&info.stdout).map_err(Error::Output)?;
    let inspected = judge(&info, &path.to_string_lossy(), file_size)?;
    if inspected.format == ImageFormat::Qcow2 {
        let check = qemu_img(&["check", "-q", "--force-share", "-f", "qcow2"], &path).await?;
        // 0: clean; 3: leaked clusters only (harmless).
        if !matches!(check.status.code(), Some(0 | 3)) {
            return Err(Refusal::Corrupt(stderr(&check)).into());
        }
    }
    Ok(inspected)
}

/// `qemu-img ARGS PATH` under [`QEMU_IMG_ADDRESS_SPACE`] and
/// [`QEMU_IMG_CPU_SECONDS`]; the output of a run that ended by itself.
async fn qemu_img(args: &[&str], path: &Path) -> Result<Output, Error> {
    let out = tokio::process::Command::new("prlimit")
        .arg(format!("--as={QEMU_IMG_ADDRESS_SPACE}"))
        .arg(format!("--cpu={QEMU_IMG_CPU_SECONDS}"))
        .arg("--")
        .arg("qemu-img")
        .args(args)
        .arg(path)
        .stdin(Stdio::null())
        // A dropped request (the client hung up) stops the inspection.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(Error::Prlimit)?;
    match out.status.code() {
        // prlimit execs qemu-img; these are prlimit's own "could not
        // execute" codes (qemu-img exits with 0 to 3 or 63).
        Some(126 | 127) => Err(Error::QemuImg(stderr(&out))),
        Some(_) => Ok(out),
        // Killed: SIGXCPU at the CPU limit, SIGSEGV or SIGABRT when an
        // allocation failed at the address-space limit.
        None => Err(Refusal::Limits.into()),
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img_create(args: &[&str]) {
        let out = Command::new("qemu-img")
            .arg("create")
            .arg("-q")
            .args(args)
            .output()
            .expect("qemu-img runs");
        assert!(out.status.success(), "{out:?}");
    }

    #[tokio::test]
    async fn a_good_qcow2_passes_and_a_data_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.qcow2");
        qemu_img_create(&["-f", "qcow2", good.to_str().unwrap(), "1M"]);
        assert_eq!(
            inspect(&good, None).await.unwrap(),
            Inspected {
                format: ImageFormat::Qcow2,
                virtual_size: 1 << 20
            }
        );
        assert_eq!(
            inspect(&good, Some(ImageFormat::Qcow2))
                .await
                .unwrap()
                .format,
            ImageFormat::Qcow2
        );

        let secret = dir.path().join("identity.json");
        std::fs::write(&secret, vec![b'x'; 1 << 20]).unwrap();
        let evil = dir.path().join("evil.qcow2");
        let option = format!("data_file={},data_file_raw=on", secret.display());
        qemu_img_create(&["-f", "qcow2", "-o", &option, evil.to_str().unwrap(), "1M"]);
        let err = inspect(&evil, None).await.unwrap_err();
        assert!(
            matches!(&err, Error::Refused(Refusal::DataFile(name)) if *name == secret.to_string_lossy()),
            "{err}"
        );
        let err = inspect(&evil, Some(ImageFormat::Qcow2)).await.unwrap_err();
        assert!(matches!(err, Error::Refused(Refusal::DataFile(_))), "{err}");
        // Told the format, qemu-img never probes: read as raw, the header
        // is just bytes of the disk (and QEMU opens it as raw too).
        assert_eq!(
            inspect(&evil, Some(ImageFormat::Raw)).await.unwrap().format,
            ImageFormat::Raw
        );
    }

    #[tokio::test]
    async fn a_missing_file_is_the_hosts_fault() {
        let err = inspect(Path::new("/nonexistent/kumo-image"), None)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err}");
    }
}
