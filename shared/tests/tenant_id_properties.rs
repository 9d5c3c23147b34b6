//! Property tests of `TenantId` over the whole input space: every id of the documented
//! pattern `^[a-z]([a-z0-9-]{0,46}[a-z0-9])?$` is accepted and round-trips; every other
//! string or byte string is refused with the error that names its first fault, and
//! nothing panics. The oracle below restates the module's rules independently.

use proptest::prelude::*;
use tenantry_shared::tenant_id::MAX_TENANT_ID_LEN;
use tenantry_shared::{InvalidTenantId, TenantId};

/// The documented pattern.
const PATTERN: &str = "[a-z]([a-z0-9-]{0,46}[a-z0-9])?";

/// What `TenantId` must answer for `raw`, restated from the module comment: `Ok(())` for
/// a valid id, else the first rule it breaks, in the order the rules are documented
/// (empty, too long, a character outside the alphabet, a trailing '-').
fn expected(raw: &[u8]) -> Result<(), InvalidTenantId> {
    if raw.is_empty() {
        return Err(InvalidTenantId::Empty);
    }
    if raw.len() > MAX_TENANT_ID_LEN {
        return Err(InvalidTenantId::TooLong { len: raw.len() });
    }
    let first_bad = raw.iter().enumerate().position(|(position, byte)| {
        let letter = byte.is_ascii_lowercase();
        let digit_or_hyphen = byte.is_ascii_digit() || *byte == b'-';
        !(letter || (position > 0 && digit_or_hyphen))
    });
    if let Some(position) = first_bad {
        // The message's wording is the module's; the position is the rule.
        return match TenantId::parse_bytes(raw) {
            Err(InvalidTenantId::BadCharacter { found, .. }) => {
                Err(InvalidTenantId::BadCharacter { found, position })
            }
            other => panic!("{raw:?}: expected a bad character at {position}, got {other:?}"),
        };
    }
    if raw.last() == Some(&b'-') {
        return Err(InvalidTenantId::TrailingHyphen);
    }
    Ok(())
}

/// Strings close to ids: mostly the id alphabet, some characters just outside it.
fn near_ids() -> impl Strategy<Value = String> {
    let character = prop_oneof![
        8 => prop::char::range('a', 'z'),
        3 => prop::char::range('0', '9'),
        2 => Just('-'),
        1 => prop::sample::select(vec!['_', 'A', 'Z', ' ', '.', ';', '\0', '\u{e9}', '\u{4e16}']),
    ];
    prop::collection::vec(character, 0..=MAX_TENANT_ID_LEN + 4)
        .prop_map(|characters| characters.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Every id of the pattern is accepted and comes back unchanged through every view.
    #[test]
    fn ids_of_the_pattern_round_trip(raw in PATTERN) {
        let id = TenantId::parse(&raw).map_err(|e| TestCaseError::fail(format!("{raw:?}: {e}")))?;
        prop_assert_eq!(id.as_str(), raw.as_str());
        prop_assert_eq!(id.to_string(), raw.clone());
        prop_assert_eq!(format!("{id:?}"), format!("TenantId({raw})"));
        prop_assert_eq!(raw.parse::<TenantId>(), Ok(id.clone()));
        prop_assert_eq!(TenantId::parse_bytes(raw.as_bytes()), Ok(id.clone()));
        prop_assert_eq!(TenantId::parse(id.as_str()), Ok(id.clone()));
    }

    /// The identifier form has no '-' and maps back to the id: one id, one identifier.
    #[test]
    fn identifier_part_maps_back(raw in PATTERN) {
        let id = TenantId::parse(&raw).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let part = id.as_identifier_part();
        prop_assert!(!part.contains('-'), "{}", part);
        prop_assert!(part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
        prop_assert_eq!(part.replace('_', "-"), raw);
    }

    /// Ids compare, order and are equal exactly as their strings do.
    #[test]
    fn ids_order_as_their_strings(a in PATTERN, b in PATTERN) {
        let (id_a, id_b) = match (TenantId::parse(&a), TenantId::parse(&b)) {
            (Ok(id_a), Ok(id_b)) => (id_a, id_b),
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(id_a.cmp(&id_b), a.cmp(&b));
        prop_assert_eq!(id_a == id_b, a == b);
        prop_assert_eq!(id_a.as_identifier_part() == id_b.as_identifier_part(), a == b);
    }

    /// Near-ids: accepted exactly when the documented rules accept them, refused with the
    /// first broken rule (and, for a bad character, its position) otherwise.
    #[test]
    fn near_ids_follow_the_documented_rules(raw in near_ids()) {
        let parsed = TenantId::parse(&raw);
        let want = expected(raw.as_bytes());
        prop_assert_eq!(parsed.clone().map(|_| ()), want.clone(), "{:?}", raw);
        prop_assert_eq!(TenantId::parse_bytes(raw.as_bytes()), parsed.clone());
        prop_assert_eq!(raw.parse::<TenantId>(), parsed.clone());
        match parsed {
            Ok(id) => prop_assert_eq!(id.as_str(), raw.as_str()),
            Err(error) => {
                let message = error.to_string();
                prop_assert!(message.starts_with("tenant id"), "{}", message);
                if let InvalidTenantId::BadCharacter { position, .. } = error {
                    let at = format!("at byte {position}");
                    prop_assert!(message.ends_with(&at), "{}", message);
                }
            }
        }
    }

    /// Any string at all: never a panic, the same answer as the rules and as the bytes.
    #[test]
    fn any_string_is_judged_by_the_rules(raw in any::<String>()) {
        let parsed = TenantId::parse(&raw);
        prop_assert_eq!(parsed.clone().map(|_| ()), expected(raw.as_bytes()), "{:?}", raw);
        prop_assert_eq!(TenantId::parse_bytes(raw.as_bytes()), parsed);
    }

    /// Any bytes (metadata need not be UTF-8): never a panic; accepted only when they are
    /// an id's text.
    #[test]
    fn any_bytes_are_judged_by_the_rules(raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let parsed = TenantId::parse_bytes(&raw);
        prop_assert_eq!(parsed.clone().map(|_| ()), expected(&raw), "{:?}", raw);
        if let Ok(id) = parsed {
            prop_assert_eq!(id.as_str().as_bytes(), raw.as_slice());
            prop_assert_eq!(std::str::from_utf8(&raw).map(TenantId::parse).ok(), Some(Ok(id)));
        }
    }
}
