//! What both backends share in building an answer: NULL values, rows added under the
//! response limit, and the refusals that read the same whatever the database.

use tenantry_proto::dataplane::v1 as pb;

use crate::error::{DataPlaneError, Result};

/// Room above `max_response_bytes` for one value or server message (a row's framing,
/// column headers): anything larger can never fit a response.
pub(crate) const VALUE_MARGIN: usize = 64 * 1024;

/// The refusal for a wrong number of parameters.
pub(crate) fn parameter_count_error(expected: usize, given: usize) -> DataPlaneError {
    DataPlaneError::InvalidArgument(format!(
        "the statement takes {expected} parameter(s) but the request gave {given}"
    ))
}

/// The refusal for a column whose type has no `Value` mapping.
pub(crate) fn unsupported_column(column: &str, type_name: &str) -> DataPlaneError {
    DataPlaneError::InvalidArgument(format!(
        "column {column:?} has type {type_name}, which Tenantry cannot return; cast it in SQL \
         (for example `{column}::text`)"
    ))
}

/// Adds a row to a response, refusing once the response would pass the limit.
pub(crate) fn push_row(
    response: &mut pb::QueryResponse,
    size: &mut usize,
    row: pb::Row,
    max_response_bytes: usize,
) -> Result<()> {
    *size += prost::Message::encoded_len(&row) + 4;
    if *size > max_response_bytes {
        return Err(DataPlaneError::ResourceExhausted(format!(
            "the result is larger than the response limit of {} bytes (max_response_bytes; \
             stopped after {} rows); add a LIMIT or fetch it in pages",
            max_response_bytes,
            response.rows.len()
        )));
    }
    response.rows.push(row);
    Ok(())
}

fn value(kind: pb::value::Kind) -> pb::Value {
    pb::Value { kind: Some(kind) }
}

pub(crate) fn null_value() -> pb::Value {
    value(pb::value::Kind::Null(true))
}

/// Prefixes an error with the position of the batch statement that caused it.
pub(crate) fn at_statement(position: usize) -> impl FnOnce(DataPlaneError) -> DataPlaneError {
    move |error| match error {
        DataPlaneError::InvalidArgument(message) => {
            DataPlaneError::InvalidArgument(format!("statement {position}: {message}"))
        }
        other => other,
    }
}
