use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kumo_api::{ApiError, ErrorCode};

/// The controller's one error type; [`IntoResponse`] maps it to an HTTP
/// status in this one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Api(#[from] ApiError),
    #[error("state store")]
    Store(#[from] kumo_store::Error),
    /// qemu-img could not judge an image (not the image's fault).
    #[error("inspecting the image")]
    Inspect(#[source] kumo_image::Error),
    #[error("{0}")]
    Internal(String),
}

impl Error {
    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = match self {
            Error::Api(e) => e,
            other => {
                let mut chain = other.to_string();
                let mut source = std::error::Error::source(&other);
                while let Some(s) = source {
                    chain.push_str(": ");
                    chain.push_str(&s.to_string());
                    source = s.source();
                }
                tracing::error!(error = %chain, "internal error");
                ApiError::server(ErrorCode::Internal, chain)
            }
        };
        let status =
            StatusCode::from_u16(body.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: a 401 names the scheme it wants.
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
