//! Images: disk images VMs boot from. An import is checked with qemu-img
//! (format detected, qcow2 checked for corruption, backing files refused)
//! and checksummed; the file is kept under `<data-dir>/images/<id>`.

use super::{lookup, now_ms, App, Batch};
use crate::error::Result;
use kumo_api::{validate_name, ApiError, ErrorCode, Image, ImageFormat, DEFAULT_PROJECT};
use std::path::{Path, PathBuf};
use uuid::Uuid;

pub const PREFIX: &str = "images/";

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// What `qemu-img info` says of a file.
#[derive(serde::Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
}

fn invalid_file(message: String) -> crate::Error {
    ApiError::invalid("file", message).into()
}

async fn inspect(path: &Path, size: u64) -> Result<(ImageFormat, u64)> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|e| crate::Error::internal(format!("running qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(invalid_file(format!(
            "not a readable disk image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: QemuImgInfo = serde_json::from_slice(&out.stdout).map_err(crate::Error::internal)?;
    let format = match info.format.as_str() {
        "qcow2" => ImageFormat::Qcow2,
        "raw" => ImageFormat::Raw,
        other => {
            return Err(invalid_file(format!(
                "format {other} is not supported; allowed: qcow2, raw (convert with `qemu-img convert -O qcow2`)"
            )))
        }
    };
    if info.backing_filename.is_some() {
        return Err(invalid_file(
            "the qcow2 image has a backing file; flatten it first (`qemu-img convert`)".into(),
        ));
    }
    match format {
        ImageFormat::Raw if size == 0 || size % 512 != 0 => Err(invalid_file(format!(
            "{size} bytes is not a raw disk image: expected a non-empty whole number of 512-byte sectors"
        ))),
        ImageFormat::Qcow2 => {
            let check = tokio::process::Command::new("qemu-img")
                .args(["check", "-q", "-f", "qcow2"])
                .arg(path)
                .output()
                .await
                .map_err(|e| crate::Error::internal(format!("running qemu-img: {e}")))?;
            // 0: clean, 3: leaked clusters only (harmless).
            match check.status.code() {
                Some(0 | 3) => Ok((format, info.virtual_size)),
                _ => Err(invalid_file(format!(
                    "the qcow2 image is corrupt: {}",
                    String::from_utf8_lossy(&check.stderr).trim()
                ))),
            }
        }
        ImageFormat::Raw => Ok((format, info.virtual_size)),
    }
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
        let (format, virtual_size_bytes) = inspect(upload, size).await?;
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
        batch.put(key(name), &image);
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
        batch.delete(key(name));
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
