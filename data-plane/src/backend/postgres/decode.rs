//! Result values: how each PostgreSQL type's binary value becomes a `Value` (24 types
//! and `citext`; others are refused before anything runs, naming the column and a cast).

use postgres_protocol::message::backend::DataRowBody;
use postgres_types::{FromSql, Type};
use tenantry_proto::dataplane::v1 as pb;
use tenantry_proto::dataplane::v1::value::Kind;

use super::statements::{Column, Prepared};
use crate::backend::answer::{null_value, unsupported_column};
use crate::error::{DataPlaneError, Result};

/// A Value decoder for every column of `prepared`, or the error naming the first
/// column that has no Value mapping (refused before anything runs).
pub(super) fn decoders_of(prepared: &Prepared) -> Result<Vec<Decoder>> {
    prepared
        .columns()
        .iter()
        .map(|column| {
            decoder_for(column.type_())
                .ok_or_else(|| unsupported_column(column.name(), column.type_().name()))
        })
        .collect()
}

/// How a column's binary values become `Value`s.
#[derive(Clone, Copy, Debug)]
pub(super) enum Decoder {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Text,
    Char,
    Bytea,
    Numeric,
    Date,
    Time,
    Timestamp,
    Timestamptz,
    Interval,
    Uuid,
    Json,
    Jsonb,
    /// A function that returns nothing (`SELECT pg_sleep(1)`): NULL.
    Void,
}

pub(super) const DECODERS: [(Type, Decoder); 24] = [
    (Type::BOOL, Decoder::Bool),
    (Type::INT2, Decoder::Int2),
    (Type::INT4, Decoder::Int4),
    (Type::INT8, Decoder::Int8),
    (Type::OID, Decoder::Oid),
    (Type::FLOAT4, Decoder::Float4),
    (Type::FLOAT8, Decoder::Float8),
    (Type::TEXT, Decoder::Text),
    (Type::VARCHAR, Decoder::Text),
    (Type::BPCHAR, Decoder::Text),
    (Type::NAME, Decoder::Text),
    (Type::UNKNOWN, Decoder::Text),
    (Type::CHAR, Decoder::Char),
    (Type::BYTEA, Decoder::Bytea),
    (Type::NUMERIC, Decoder::Numeric),
    (Type::DATE, Decoder::Date),
    (Type::TIME, Decoder::Time),
    (Type::TIMESTAMP, Decoder::Timestamp),
    (Type::TIMESTAMPTZ, Decoder::Timestamptz),
    (Type::INTERVAL, Decoder::Interval),
    (Type::UUID, Decoder::Uuid),
    (Type::JSON, Decoder::Json),
    (Type::JSONB, Decoder::Jsonb),
    (Type::VOID, Decoder::Void),
];

pub(super) fn decoder_for(ty: &Type) -> Option<Decoder> {
    if let Some((_, decoder)) = DECODERS.iter().find(|(known, _)| known == ty) {
        return Some(*decoder);
    }
    // An extension type, found by name: its text is the value.
    (ty.name() == "citext").then_some(Decoder::Text)
}

pub(super) fn decode_row(
    row: &DataRowBody,
    columns: &[Column],
    decoders: &[Decoder],
) -> Result<pb::Row> {
    use fallible_iterator::FallibleIterator;
    let buffer = row.buffer();
    let mut ranges = row.ranges();
    let mut values = Vec::with_capacity(decoders.len());
    for (index, (column, decoder)) in columns.iter().zip(decoders).enumerate() {
        let range = ranges
            .next()
            .ok()
            .flatten()
            .ok_or_else(|| DataPlaneError::Internal(format!("cannot read column {index}")))?;
        let value = match range {
            None => null_value(),
            Some(range) => {
                decode_value(&buffer[range], *decoder, column.type_()).map_err(|error| {
                    DataPlaneError::Internal(format!(
                        "cannot decode column {:?} of type {}: {error}",
                        column.name(),
                        column.type_().name()
                    ))
                })?
            }
        };
        values.push(value);
    }
    Ok(pb::Row { values })
}

pub(super) type DecodeResult<T> = std::result::Result<T, Box<dyn std::error::Error + Sync + Send>>;

pub(super) fn decode_value(raw: &[u8], decoder: Decoder, ty: &Type) -> DecodeResult<pb::Value> {
    use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
    let kind = match decoder {
        Decoder::Bool => Kind::Bool(bool::from_sql(ty, raw)?),
        Decoder::Int2 => Kind::Int64(i64::from(i16::from_sql(ty, raw)?)),
        Decoder::Int4 => Kind::Int64(i64::from(i32::from_sql(ty, raw)?)),
        Decoder::Int8 => Kind::Int64(i64::from_sql(ty, raw)?),
        Decoder::Oid => Kind::Int64(i64::from(u32::from_sql(ty, raw)?)),
        Decoder::Float4 => Kind::Double(f64::from(f32::from_sql(ty, raw)?)),
        Decoder::Float8 => Kind::Double(f64::from_sql(ty, raw)?),
        Decoder::Text => Kind::Text(std::str::from_utf8(raw)?.to_owned()),
        Decoder::Char => Kind::Text((i8::from_sql(ty, raw)? as u8 as char).to_string()),
        Decoder::Bytea => Kind::Bytes(raw.to_vec()),
        Decoder::Numeric => Kind::Text(numeric_text(raw)?),
        Decoder::Date => Kind::Text(NaiveDate::from_sql(ty, raw)?.format("%Y-%m-%d").to_string()),
        Decoder::Time => Kind::Text(
            NaiveTime::from_sql(ty, raw)?
                .format("%H:%M:%S%.f")
                .to_string(),
        ),
        Decoder::Timestamp => Kind::Text(
            NaiveDateTime::from_sql(ty, raw)?
                .format("%Y-%m-%dT%H:%M:%S%.f")
                .to_string(),
        ),
        Decoder::Timestamptz => Kind::Text(
            DateTime::<Utc>::from_sql(ty, raw)?
                .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        ),
        Decoder::Interval => Kind::Text(interval_text(raw)?),
        Decoder::Uuid => Kind::Text(uuid_text(raw)?),
        Decoder::Json => Kind::Text(json_text(raw)?),
        Decoder::Jsonb => match raw.split_first() {
            Some((1, json)) => Kind::Text(json_text(json)?),
            _ => return Err("unsupported jsonb format version".into()),
        },
        Decoder::Void => return Ok(null_value()),
    };
    Ok(pb::Value { kind: Some(kind) })
}

/// JSON in its compact form (object keys in their order).
pub(super) fn json_text(raw: &[u8]) -> DecodeResult<String> {
    Ok(serde_json::from_slice::<serde_json::Value>(raw)?.to_string())
}

/// A binary `uuid` (16 bytes) as hyphenated lowercase hex.
pub(super) fn uuid_text(raw: &[u8]) -> DecodeResult<String> {
    if raw.len() != 16 {
        return Err(format!("a uuid is 16 bytes, got {}", raw.len()).into());
    }
    let hex: String = raw.iter().map(|byte| format!("{byte:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// A binary `interval` (microseconds, days, months; big-endian) in ISO 8601.
pub(super) fn interval_text(raw: &[u8]) -> DecodeResult<String> {
    let bytes: [u8; 16] = raw
        .try_into()
        .map_err(|_| format!("an interval is 16 bytes, got {}", raw.len()))?;
    let [
        m0,
        m1,
        m2,
        m3,
        m4,
        m5,
        m6,
        m7,
        d0,
        d1,
        d2,
        d3,
        n0,
        n1,
        n2,
        n3,
    ] = bytes;
    Ok(iso8601_interval(
        i32::from_be_bytes([n0, n1, n2, n3]),
        i32::from_be_bytes([d0, d1, d2, d3]),
        i64::from_be_bytes([m0, m1, m2, m3, m4, m5, m6, m7]),
    ))
}

/// PostgreSQL's own text for a binary `numeric` (exact, with its display scale):
/// ndigits, weight, sign, dscale, then base-10000 digits, all big-endian 16-bit.
pub(super) fn numeric_text(bytes: &[u8]) -> DecodeResult<String> {
    let word = |i: usize| -> DecodeResult<i32> {
        let pair = bytes
            .get(i * 2..i * 2 + 2)
            .ok_or("numeric value is truncated")?;
        Ok(i32::from(i16::from_be_bytes([pair[0], pair[1]])))
    };
    let ndigits = usize::try_from(word(0)?).map_err(|_| "negative digit count")?;
    let weight = word(1)?;
    let sign = word(2)? as u16;
    let dscale = usize::from(word(3)? as u16);
    let digits: Vec<i32> = (0..ndigits)
        .map(|i| word(4 + i))
        .collect::<std::result::Result<_, _>>()?;
    match sign {
        0xC000 => return Ok("NaN".to_owned()),
        0xD000 => return Ok("Infinity".to_owned()),
        0xF000 => return Ok("-Infinity".to_owned()),
        _ => {}
    }
    let digit_at = |index: i32| -> i32 {
        usize::try_from(index)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        for index in 0..=weight {
            if index == 0 {
                text.push_str(&digit_at(index).to_string());
            } else {
                text.push_str(&format!("{:04}", digit_at(index)));
            }
        }
    }
    if dscale > 0 {
        let mut fraction = String::new();
        let mut k = 1;
        while fraction.len() < dscale {
            fraction.push_str(&format!("{:04}", digit_at(weight + k)));
            k += 1;
        }
        fraction.truncate(dscale);
        text.push('.');
        text.push_str(&fraction);
    }
    Ok(text)
}

/// ISO 8601 duration: `P{months}M{days}DT{seconds}S`, e.g. `P1M2DT3.5S`.
pub(super) fn iso8601_interval(months: i32, days: i32, micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let abs = micros.unsigned_abs();
    let seconds = abs / 1_000_000;
    let fraction = abs % 1_000_000;
    let seconds_text = if fraction == 0 {
        format!("{sign}{seconds}")
    } else {
        let fraction = format!("{fraction:06}");
        format!("{sign}{seconds}.{}", fraction.trim_end_matches('0'))
    };
    format!("P{months}M{days}DT{seconds_text}S")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric_bytes(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for word in [digits.len() as i16, weight, sign as i16, dscale as i16] {
            bytes.extend_from_slice(&word.to_be_bytes());
        }
        for digit in digits {
            bytes.extend_from_slice(&digit.to_be_bytes());
        }
        bytes
    }

    #[test]
    fn formats_numeric_like_postgres() -> DecodeResult<()> {
        // 12345678901234567890.123
        let big = numeric_bytes(4, 0, 3, &[1234, 5678, 9012, 3456, 7890, 1230]);
        assert_eq!(numeric_text(&big)?, "12345678901234567890.123");
        assert_eq!(
            numeric_text(&numeric_bytes(-1, 0x4000, 4, &[5]))?,
            "-0.0005"
        );
        assert_eq!(numeric_text(&numeric_bytes(0, 0, 2, &[0]))?, "0.00");
        assert_eq!(numeric_text(&numeric_bytes(1, 0, 0, &[1]))?, "10000");
        assert_eq!(numeric_text(&numeric_bytes(0, 0xC000, 0, &[]))?, "NaN");
        Ok(())
    }

    /// A decimal `mantissa / 10^scale` in PostgreSQL's binary `numeric` format.
    fn encode_numeric(negative: bool, mantissa: u64, scale: usize) -> Vec<u8> {
        let text = format!("{mantissa:0>width$}", width = scale + 1);
        let (int_part, fraction) = text.split_at(text.len() - scale);
        let int_part = format!(
            "{int_part:0>width$}",
            width = int_part.len().div_ceil(4) * 4
        );
        let fraction = format!(
            "{fraction:0<width$}",
            width = fraction.len().div_ceil(4) * 4
        );
        let groups = |digits: &str| -> Vec<i16> {
            digits
                .as_bytes()
                .chunks(4)
                .map(|chunk| std::str::from_utf8(chunk).map_or(0, |g| g.parse().unwrap_or(0)))
                .collect()
        };
        let mut digits = groups(&int_part);
        let mut weight = digits.len() as i16 - 1;
        digits.extend(groups(&fraction));
        while digits.first() == Some(&0) {
            digits.remove(0);
            weight -= 1;
        }
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            weight = 0;
        }
        let sign = if negative && mantissa != 0 { 0x4000 } else { 0 };
        numeric_bytes(weight, sign, scale as u16, &digits)
    }

    proptest::proptest! {
        #[test]
        fn numeric_text_is_the_exact_decimal(
            negative: bool,
            mantissa: u64,
            scale in 0usize..30,
        ) {
            let text = format!("{mantissa:0>width$}", width = scale + 1);
            let (int_part, fraction) = text.split_at(text.len() - scale);
            let mut expected = String::new();
            if negative && mantissa != 0 {
                expected.push('-');
            }
            let int_part = int_part.trim_start_matches('0');
            expected.push_str(if int_part.is_empty() { "0" } else { int_part });
            if scale > 0 {
                expected.push('.');
                expected.push_str(fraction);
            }
            let decoded = numeric_text(&encode_numeric(negative, mantissa, scale))
                .map_err(|error| proptest::test_runner::TestCaseError::fail(error.to_string()))?;
            proptest::prop_assert_eq!(decoded, expected);
        }

        #[test]
        fn numeric_text_never_panics(bytes: Vec<u8>) {
            let _ = numeric_text(&bytes);
        }

        #[test]
        fn interval_text_gives_back_its_parts(months: i32, days: i32, micros: i64) {
            let mut raw = Vec::new();
            raw.extend_from_slice(&micros.to_be_bytes());
            raw.extend_from_slice(&days.to_be_bytes());
            raw.extend_from_slice(&months.to_be_bytes());
            let text = interval_text(&raw)
                .map_err(|error| proptest::test_runner::TestCaseError::fail(error.to_string()))?;
            let body = text.strip_prefix('P').and_then(|t| t.strip_suffix('S'));
            let Some(body) = body else {
                return Err(proptest::test_runner::TestCaseError::fail(text));
            };
            let (months_text, rest) = body.split_once('M').unwrap_or_default();
            let (days_text, seconds_text) = rest.split_once("DT").unwrap_or_default();
            proptest::prop_assert_eq!(months_text.parse::<i32>().ok(), Some(months));
            proptest::prop_assert_eq!(days_text.parse::<i32>().ok(), Some(days));
            let (sign, unsigned) = match seconds_text.strip_prefix('-') {
                Some(unsigned) => (-1i128, unsigned),
                None => (1, seconds_text),
            };
            let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
            proptest::prop_assert!(fraction.len() <= 6 && !fraction.ends_with('0'), "{}", text);
            let fraction_micros = format!("{fraction:0<6}").parse::<i128>().unwrap_or(-1);
            let total = sign * (whole.parse::<i128>().unwrap_or(-1) * 1_000_000 + fraction_micros);
            proptest::prop_assert_eq!(total, i128::from(micros), "{}", text);
        }

        #[test]
        fn uuid_text_is_the_bytes_in_hyphenated_hex(bytes: [u8; 16]) {
            let text = uuid_text(&bytes)
                .map_err(|error| proptest::test_runner::TestCaseError::fail(error.to_string()))?;
            let groups: Vec<usize> = text.split('-').map(str::len).collect();
            proptest::prop_assert_eq!(groups, vec![8, 4, 4, 4, 12]);
            let hex: String = bytes.iter().map(|byte| format!("{byte:02x}")).collect();
            proptest::prop_assert_eq!(text.replace('-', ""), hex);
        }
    }
}
