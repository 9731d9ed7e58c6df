//! Enums that grow: what a newer server may send that an older client must still read.
//!
//! Such an enum has a last variant `Other(String)`, `#[serde(untagged)]`, which takes any
//! name none of the known variants has. Its OpenAPI schema lists only the known names
//! (this version never sends `Other`); [`known_names_schema!`] writes that schema from the
//! known variants' serde names, so the two cannot drift apart.

/// Implements `utoipa::ToSchema` for `$ty`: a string, one of the wire names of the listed
/// unit variants (as serde writes them), described by `$doc`.
macro_rules! known_names_schema {
    ($ty:ident, $doc:literal, [$($variant:ident),+ $(,)?]) => {
        impl $ty {
            /// The wire names of the variants this version knows.
            pub fn known_names() -> Vec<String> {
                [$($ty::$variant),+]
                    .into_iter()
                    .map(|v| match serde_json::to_value(v) {
                        Ok(serde_json::Value::String(name)) => name,
                        other => unreachable!("a unit variant is a string: {other:?}"),
                    })
                    .collect()
            }
        }

        impl utoipa::PartialSchema for $ty {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .description(Some($doc))
                    .enum_values(Some($ty::known_names()))
                    .into()
            }
        }

        impl utoipa::ToSchema for $ty {}
    };
}

pub(crate) use known_names_schema;
