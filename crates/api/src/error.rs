use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What went wrong, in a form a program can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A field of the request is missing, unknown, malformed or out of range
    /// (HTTP 400).
    InvalidInput,
    /// Missing or wrong bearer token (HTTP 401).
    Unauthorized,
    /// A valid token that may not call this endpoint, e.g. a host token on
    /// an admin endpoint (HTTP 403).
    Forbidden,
    /// The named resource does not exist (HTTP 404).
    NotFound,
    /// The endpoint exists but not with this method (HTTP 405; the `Allow`
    /// header lists the methods it has).
    MethodNotAllowed,
    /// A resource with that name already exists (HTTP 409).
    AlreadyExists,
    /// The resource is not in a state that allows the request (HTTP 409).
    Conflict,
    /// No host can take the VM; the message says which constraint excluded
    /// how many hosts (HTTP 409).
    NoValidHost,
    /// The request body is larger than the endpoint accepts (HTTP 413).
    PayloadTooLarge,
    /// The request's URI is longer than the server accepts (HTTP 414).
    UriTooLong,
    /// The body is encoded in a way the server does not decode, e.g.
    /// `Content-Encoding: gzip` (HTTP 415).
    UnsupportedMediaType,
    /// The host holding the resource cannot be reached (HTTP 502).
    HostUnavailable,
    /// A bug or an unexpected failure (HTTP 500).
    Internal,
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The part of the request the error is about: a body field as a path
    /// (`requirements`, `capacity.vcpus`, `vms[2].message`), a query or path
    /// parameter (`dry_run`, `name`), or `authorization`, `method`, `body`,
    /// `uri`. Every 4xx names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// An error about the request field `field`.
    pub fn new(code: ErrorCode, field: &str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }

    /// An error that no request field is to blame for (5xx).
    pub fn server(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    /// A bad value of `field`; the message starts with the field's name.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> Self {
        Self::new(
            ErrorCode::InvalidInput,
            field,
            format!("{field}: {message}"),
        )
    }

    /// A `name` that is taken.
    pub fn already_exists(kind: &str, name: &str) -> Self {
        Self::new(
            ErrorCode::AlreadyExists,
            "name",
            format!("name: {kind} {name:?} already exists; pick another name"),
        )
    }

    /// The resource of `kind` that the request field `field` names does
    /// not exist.
    pub fn not_found(field: &str, kind: &str, name: &str) -> Self {
        Self::new(
            ErrorCode::NotFound,
            field,
            format!("{kind} {name:?} not found"),
        )
    }

    pub fn status(&self) -> u16 {
        match self.code {
            ErrorCode::InvalidInput => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::AlreadyExists | ErrorCode::Conflict | ErrorCode::NoValidHost => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UriTooLong => 414,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::HostUnavailable => 502,
            ErrorCode::Internal => 500,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ApiError {}
