//! Images: disk images VMs boot from. An image is untrusted input: an
//! import is judged by [`kumo_image::inspect`] (the same inspection every
//! agent repeats on the image it downloads): qcow2 or raw only, no backing
//! file, external data file or other name of a host file or protocol,
//! bounded sizes, qcow2 checked for corruption, qemu-img run under memory
//! and CPU limits (see docs/images.md). A refused upload is answered 400
//! naming `file` and leaves nothing behind; an accepted one is checksummed
//! and kept under `<data-dir>/images/<id>`.

use super::records::image_key;
use super::{lookup, now_ms, App, Batch};
use crate::error::Result;
use kumo_api::{validate_name, ApiError, ErrorCode, Image, DEFAULT_PROJECT};
use std::path::{Path, PathBuf};
use uuid::Uuid;

/// Judge an uploaded file with the inspection every agent repeats on
/// download: a bad image is the uploader's fault (400, `file`), a failure
/// to run qemu-img the controller's (500).
async fn inspect(upload: &Path) -> Result<kumo_image::Inspected> {
    kumo_image::inspect(upload, None)
        .await
        .map_err(|e| match e {
            // qemu-img's words name the upload's path on the controller:
            // the uploader knows it as "the upload".
            kumo_image::Error::Refused(refusal) => ApiError::invalid(
                "file",
                refusal
                    .to_string()
                    .replace(&upload.display().to_string(), "the upload"),
            )
            .into(),
            other => crate::Error::Inspect(other),
        })
}

impl App {
    pub fn image_path(&self, id: Uuid) -> PathBuf {
        self.data_dir().join("images").join(id.to_string())
    }

    /// Where an upload is written before it is checked.
    pub fn image_upload_path(&self) -> PathBuf {
        self.data_dir()
            .join("images")
            .join(format!("upload-{}", Uuid::new_v4()))
    }

    pub async fn image_list(&self) -> Vec<Image> {
        self.inv.read().await.images.values().cloned().collect()
    }

    pub async fn image_get(&self, name_or_id: &str) -> Result<Image> {
        let inv = self.inv.read().await;
        inv.images
            .values()
            .find(|i| i.name == name_or_id || i.id.to_string() == name_or_id)
            .cloned()
            .ok_or_else(|| ApiError::not_found("name", "image", name_or_id).into())
    }

    /// Fail early, before an upload, when the name is unusable.
    pub async fn image_check_name(&self, name: &str) -> Result<()> {
        validate_name("name", name)?;
        if self.inv.read().await.images.contains_key(name) {
            return Err(ApiError::already_exists("image", name).into());
        }
        Ok(())
    }

    /// Turn an uploaded file into an image. The upload is removed on error.
    pub async fn image_import(
        &self,
        name: &str,
        upload: &Path,
        size: u64,
        sha256: String,
    ) -> Result<Image> {
        let result = self.image_import_inner(name, upload, size, sha256).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(upload).await;
        }
        result
    }

    async fn image_import_inner(
        &self,
        name: &str,
        upload: &Path,
        size: u64,
        sha256: String,
    ) -> Result<Image> {
        self.image_check_name(name).await?;
        let kumo_image::Inspected {
            format,
            virtual_size: virtual_size_bytes,
        } = inspect(upload).await?;
        let image = Image {
            id: Uuid::new_v4(),
            name: name.to_string(),
            project: DEFAULT_PROJECT.to_string(),
            format,
            size_bytes: size,
            virtual_size_bytes,
            sha256,
            created_at: now_ms(),
        };
        let mut inv = self.inv.write().await;
        if inv.images.contains_key(name) {
            return Err(ApiError::already_exists("image", name).into());
        }
        tokio::fs::rename(upload, self.image_path(image.id))
            .await
            .map_err(crate::Error::internal)?;
        let mut batch = Batch::default();
        batch.put(image_key(name), &image);
        batch.event(
            "image.imported",
            format!("image/{name}"),
            &image.project,
            format!(
                "{} image, {} bytes, sha256 {}",
                format.as_str(),
                size,
                image.sha256
            ),
        );
        if let Err(e) = self.commit(&mut inv, batch).await {
            let _ = tokio::fs::remove_file(self.image_path(image.id)).await;
            return Err(e);
        }
        inv.images.insert(name.to_string(), image.clone());
        Ok(image)
    }

    pub async fn image_delete(&self, name: &str) -> Result<()> {
        let mut inv = self.inv.write().await;
        let image = lookup(&inv.images, "image", name)?.clone();
        let users: Vec<_> = inv
            .vms()
            .values()
            .filter(|v| v.image_id == image.id)
            .map(|v| v.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                "name",
                format!("image {name:?} is used by VM(s) {users:?}"),
            )
            .into());
        }
        let mut batch = Batch::default();
        batch.delete(image_key(name));
        batch.event(
            "image.deleted",
            format!("image/{name}"),
            &image.project,
            "image deleted".into(),
        );
        self.commit(&mut inv, batch).await?;
        inv.images.remove(name);
        let _ = tokio::fs::remove_file(self.image_path(image.id)).await;
        Ok(())
    }
}
