use super::{ApiPath, ApiQuery, AppState};
use crate::error::Result;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use kumo_api::{ApiError, ErrorCode, Image, ImportImageParams};
use sha2::Digest;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

pub fn routes() -> Router<Arc<crate::app::App>> {
    Router::new()
        .route(
            "/v1/images",
            get(list).post(import).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/images/{name}", get(show).delete(delete))
        .route("/v1/images/{name}/data", get(data))
}

/// List images.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = [Image])))]
pub async fn list(state: AppState) -> Json<Vec<Image>> {
    Json(state.image_list().await)
}

/// Import a qcow2 or raw disk image; the body is the image file.
#[utoipa::path(post, path = "/v1/images", params(ImportImageParams),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Image), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn import(
    state: AppState,
    ApiQuery(params): ApiQuery<ImportImageParams>,
    body: Body,
) -> Result<(StatusCode, Json<Image>)> {
    if let Err(e) = state.image_check_name(&params.name).await {
        // Read the upload to its end before answering: clients that are
        // still sending would otherwise see a reset instead of the error.
        let mut stream = body.into_data_stream();
        while let Some(Ok(_)) = stream.next().await {}
        return Err(e);
    }
    let upload = state.image_upload_path();
    let (size, sha256) = match receive(body, &upload).await {
        Ok(v) => v,
        Err(e) => {
            let _ = tokio::fs::remove_file(&upload).await;
            return Err(e);
        }
    };
    let image = state
        .image_import(&params.name, &upload, size, sha256)
        .await?;
    Ok((StatusCode::CREATED, Json(image)))
}

/// The largest image file an upload may carry: the largest virtual disk an
/// image may describe, plus room for a qcow2's own metadata.
const MAX_UPLOAD_BYTES: u64 = kumo_image::MAX_VIRTUAL_SIZE + (1 << 30);

/// Stream the request body to a file, hashing it on the way; a 413 past
/// [`MAX_UPLOAD_BYTES`].
async fn receive(body: Body, path: &std::path::Path) -> Result<(u64, String)> {
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(crate::Error::internal)?;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid("file", format!("upload interrupted: {e}")))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        if size > MAX_UPLOAD_BYTES {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                "body",
                format!("body: an image file is at most {MAX_UPLOAD_BYTES} bytes (the largest disk kumo takes)"),
            )
            .into());
        }
        file.write_all(&chunk)
            .await
            .map_err(crate::Error::internal)?;
    }
    file.sync_all().await.map_err(crate::Error::internal)?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// Show an image (by name or id).
#[utoipa::path(get, path = "/v1/images/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Image), (status = 404, body = ApiError)))]
pub async fn show(state: AppState, ApiPath(name): ApiPath) -> Result<Json<Image>> {
    Ok(Json(state.image_get(&name).await?))
}

/// Delete an image no VM uses.
#[utoipa::path(delete, path = "/v1/images/{name}", params(("name" = String, Path)),
    responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete(state: AppState, ApiPath(name): ApiPath) -> Result<StatusCode> {
    state.image_delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download an image file (agents fetch images this way).
#[utoipa::path(get, path = "/v1/images/{name}/data", params(("name" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ApiError)))]
pub async fn data(state: AppState, ApiPath(name): ApiPath) -> Result<Response> {
    let image = state.image_get(&name).await?;
    let file = tokio::fs::File::open(state.image_path(image.id))
        .await
        .map_err(crate::Error::internal)?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, image.size_bytes.to_string()),
        ],
        body,
    )
        .into_response())
}
