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
    /// A change the scheduler's allocation ledger refused (a bug).
    #[error("allocation ledger")]
    Ledger(#[from] crate::app::inventory::LedgerRefusal),
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

/// An error with its causes, outermost first, joined by `: ` (`state
/// store: SQLite store operation failed: database is locked`). Logs print
/// errors through it (`error = %Chain(&e)`), as a message does not repeat
/// its cause and the outermost one alone hides what went wrong.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let body = match self {
            Error::Api(e) => e,
            other => {
                let chain = Chain(&other).to_string();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_every_cause() {
        let codec = serde_json::from_str::<u8>("x").expect_err("not JSON");
        let cause = codec.to_string();
        let e = Error::Store(kumo_store::Error::Codec {
            key: "vms/a".into(),
            source: codec,
        });
        assert_eq!(
            Chain(&e).to_string(),
            format!(
                "state store: cannot encode or decode the JSON value of key \"vms/a\": {cause}"
            )
        );
    }
}
