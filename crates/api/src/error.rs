use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// What went wrong, in a form a program can act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// A field of the request is missing or out of range (HTTP 400).
    InvalidInput,
    /// Missing or wrong bearer token (HTTP 401).
    Unauthorized,
    /// The named resource does not exist (HTTP 404).
    NotFound,
    /// A resource with that name already exists (HTTP 409).
    AlreadyExists,
    /// The resource is not in a state that allows the request (HTTP 409).
    Conflict,
    /// No host can take the VM; the message says which constraint excluded
    /// how many hosts (HTTP 409).
    NoValidHost,
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
    /// The request field the error is about, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidInput,
            message: format!("{field}: {}", message.into()),
            field: Some(field.to_string()),
        }
    }

    /// A `name` that is taken.
    pub fn already_exists(kind: &str, name: &str) -> Self {
        Self {
            code: ErrorCode::AlreadyExists,
            message: format!("name: {kind} {name:?} already exists; pick another name"),
            field: Some("name".into()),
        }
    }

    pub fn not_found(kind: &str, name: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{kind} {name:?} not found"))
    }

    pub fn status(&self) -> u16 {
        match self.code {
            ErrorCode::InvalidInput => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Conflict | ErrorCode::NoValidHost => 409,
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
