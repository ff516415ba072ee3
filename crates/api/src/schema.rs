//! Schemas of fields whose limits `#[schema(...)]` attributes cannot say
//! (the items of a list, the keys and values of a map), for
//! `#[schema(schema_with = ...)]`.

use utoipa::openapi::schema::{ArrayBuilder, Object, ObjectBuilder, Type};
use utoipa::openapi::Array;

fn string(min: usize, max: usize) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(min))
        .max_length(Some(max))
}

/// A map of strings: at most `entries` pairs, keys of 1–`key_len`
/// characters, values of at most `value_len`.
fn string_map(entries: usize, key_len: usize, value_len: usize) -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(string(1, key_len)))
        .additional_properties(Some(string(0, value_len)))
        .max_properties(Some(entries))
        .build()
}

/// Resource names (groups): at most 16, each of 1–63 characters.
pub fn name_list() -> Array {
    ArrayBuilder::new()
        .items(string(1, 63))
        .max_items(Some(16))
        .build()
}

/// A VM's metadata: at most 64 pairs, keys of 1–128 characters, values of
/// at most 1024.
pub fn metadata() -> Object {
    string_map(64, 128, 1024)
}

/// A host's labels: at most 64 pairs, keys of 1–63 characters, values of
/// at most 255.
pub fn labels() -> Object {
    string_map(64, 63, 255)
}
