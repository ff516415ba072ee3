//! kumo's public REST types: the resources served under `/v1`, the requests
//! that create or change them, the agent protocol, and the one error body.
//!
//! Everything here is plain data shared by the controller (`kumod`), the
//! agent, the client and the CLI; the OpenAPI document is derived from it.

mod agent;
mod error;
mod resources;
pub mod schema;

pub use agent::*;
pub use error::*;
pub use resources::*;

/// The project every resource belongs to until multi-tenancy arrives.
pub const DEFAULT_PROJECT: &str = "default";

/// Check a resource name: 1–63 characters, lowercase letters, digits and
/// `-`, starting with a letter (a valid hostname label, since VM names become
/// guest hostnames).
pub fn validate_name(field: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!(
                "{name:?} is not a valid name: use 1-63 lowercase letters, digits and '-', \
                 starting with a letter and not ending with '-'"
            ),
        ))
    }
}

/// The token of an `Authorization: Bearer <token>` header value; the
/// scheme is case-insensitive (RFC 9110 §11.1). None for another scheme or
/// an empty token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_fit_their_schema() {
        let long = "é".repeat(MAX_STATUS_MESSAGE + 10);
        let cut = bounded_message(long);
        assert_eq!(cut.chars().count(), MAX_STATUS_MESSAGE);
        assert!(cut.ends_with('…'));
        assert_eq!(bounded_message("short".into()), "short");
    }

    #[test]
    fn bearer_tokens() {
        for (value, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("Bearerabc", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }

    #[test]
    fn names() {
        for good in ["a", "web-1", "mail2"] {
            assert!(validate_name("name", good).is_ok(), "{good}");
        }
        for bad in ["", "1abc", "Web", "a_b", "a-", &"a".repeat(64)] {
            let err = validate_name("name", bad).unwrap_err();
            assert_eq!(err.field.as_deref(), Some("name"));
        }
    }
}
