//! The host's image cache: images fetched from the controller once, checked
//! against their SHA-256 and inspected again as the controller did on
//! import ([`kumo_image::inspect`], defense in depth: an image names no
//! host file, whatever put it in the controller's store), kept as
//! `<data-dir>/images/<sha256>` — or in the shared datastore's `images/`,
//! where disks there find their backing file under the same path on every
//! host.

use crate::controller::Controller;
use anyhow::{bail, Context};
use futures_util::StreamExt;
use kumo_api::ImageRef;
use sha2::Digest;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// Where a driver finds the images its disks are overlays of.
#[async_trait::async_trait]
pub trait ImageStore: Send + Sync {
    /// The path of `image` on this host, fetched and checked first if it
    /// is not there yet.
    async fn ensure(&self, image: &ImageRef) -> anyhow::Result<PathBuf>;
}

/// The host's image cache: where images are kept and where they come from.
pub struct ImageCache {
    dir: PathBuf,
    /// Names this host's partial downloads (hosts sharing a datastore may
    /// fetch the same image at once).
    host_name: String,
    controller: Arc<Controller>,
    /// One lock per image being fetched, so two VMs never download it twice.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

impl ImageCache {
    /// A cache in `dir` (`<data-dir>/images`, or `<datastore>/images`),
    /// filled from `controller`.
    pub fn new(dir: PathBuf, host_name: String, controller: Arc<Controller>) -> ImageCache {
        ImageCache {
            dir,
            host_name,
            controller,
            locks: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait::async_trait]
impl ImageStore for ImageCache {
    async fn ensure(&self, image: &ImageRef) -> anyhow::Result<PathBuf> {
        let dir = &self.dir;
        let path = dir.join(&image.sha256);
        let lock = {
            let mut locks = self.locks.lock().await;
            locks
                .entry(image.sha256.clone())
                .or_insert_with(|| Arc::new(Mutex::new(())))
                .clone()
        };
        let _guard = lock.lock().await;
        if tokio::fs::try_exists(&path).await? {
            return Ok(path);
        }
        kumo_private_fs::create_dir(dir)?;
        let tmp = dir.join(format!(".{}.{}.part", image.sha256, self.host_name));
        let resp = self
            .controller
            .image(image.id)
            .await
            .context("downloading the image")?;
        let mut file = tokio::fs::File::create(&tmp).await?;
        let mut hasher = sha2::Sha256::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("downloading the image")?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        let got = hex::encode(hasher.finalize());
        if got != image.sha256 {
            let _ = tokio::fs::remove_file(&tmp).await;
            bail!(
                "image {} arrived with sha256 {got}, expected {}",
                image.id,
                image.sha256
            );
        }
        // Read as the format the controller recorded, as QEMU will open it.
        if let Err(e) = kumo_image::inspect(&tmp, Some(image.format)).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            let what = match e {
                kumo_image::Error::Refused(_) => "refused",
                _ => "could not be inspected",
            };
            return Err(anyhow::Error::new(e).context(format!("image {} {what}", image.id)));
        }
        tokio::fs::rename(&tmp, &path).await?;
        tracing::info!(image = %image.id, bytes = image.size_bytes, "image cached");
        Ok(path)
    }
}
