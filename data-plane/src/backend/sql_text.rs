//! SQL text classification, before anything runs: comments, leading words, what a
//! tenant statement may not do (transaction control, COPY), which statements may share a write with
//! others, and the highest `$N` placeholder of a PostgreSQL text. Scanners only: they
//! never parse SQL beyond what these questions need.

use crate::error::{DataPlaneError, Result};

/// If a SQL comment (`-- ...` to the end of the line, or a nested `/* ... */`) starts at
/// byte `i`, the index just after it.
pub(crate) fn comment_end(bytes: &[u8], i: usize) -> Option<usize> {
    match (bytes.get(i), bytes.get(i + 1)) {
        (Some(b'-'), Some(b'-')) => {
            let mut end = i;
            while end < bytes.len() && bytes[end] != b'\n' {
                end += 1;
            }
            Some(end)
        }
        (Some(b'/'), Some(b'*')) => {
            let mut depth = 1;
            let mut end = i + 2;
            while end < bytes.len() && depth > 0 {
                if bytes[end] == b'/' && bytes.get(end + 1) == Some(&b'*') {
                    depth += 1;
                    end += 2;
                } else if bytes[end] == b'*' && bytes.get(end + 1) == Some(&b'/') {
                    depth -= 1;
                    end += 2;
                } else {
                    end += 1;
                }
            }
            Some(end)
        }
        _ => None,
    }
}

/// Leading words of a statement, skipping whitespace (any Unicode whitespace, vertical
/// tab included), semicolons and comments of both kinds (upper-cased).
pub(crate) fn leading_words(sql: &str, count: usize) -> Vec<String> {
    let bytes = sql.as_bytes();
    let mut words = Vec::new();
    let mut i = 0;
    while words.len() < count {
        let Some(c) = sql.get(i..).and_then(|rest| rest.chars().next()) else {
            break;
        };
        match c {
            '-' | '/' if comment_end(bytes, i).is_some() => {
                i = comment_end(bytes, i).unwrap_or(bytes.len());
            }
            c if c.is_ascii_alphabetic() => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                words.push(sql[start..i].to_ascii_uppercase());
            }
            c if c.is_whitespace() || c == ';' => i += c.len_utf8(),
            _ => break,
        }
    }
    words
}

/// Refuses, before anything reaches the server, what a tenant statement may not do
/// through the data plane: transaction control (every call is its own session, and Batch
/// is the one way to run statements in a transaction; on PostgreSQL such a statement is
/// always a top-level command, so its first words tell) and COPY (no COPY sub-protocol
/// through the data plane; `COPY (INSERT ... RETURNING) TO STDOUT` would have run its
/// INSERT before the refusal).
pub(crate) fn refuse_unavailable_statement(sql: &str) -> Result<()> {
    let words = leading_words(sql, 2);
    let first = words.first().map(String::as_str).unwrap_or("");
    let second = words.get(1).map(String::as_str).unwrap_or("");
    let controls_transaction = matches!(
        first,
        "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE"
    ) || (first == "PREPARE" && second == "TRANSACTION");
    if controls_transaction {
        return Err(DataPlaneError::InvalidArgument(format!(
            "{first} is refused: each call runs on its own; use Batch to run several \
             statements in one transaction"
        )));
    }
    if first == "COPY" {
        return Err(DataPlaneError::InvalidArgument(
            "COPY is not available through the data plane: insert rows with parameters \
             (Execute, or Batch for many), and read them with Query"
                .to_owned(),
        ));
    }
    Ok(())
}

/// Statements whose requests may share a write with other requests' (PostgreSQL
/// pipelining): the ones that read and write rows. Not VACUUM and the like, which cannot
/// run in a pipeline, nor anything that changes what later statements see of the session.
const PIPELINED_WORDS: [&str; 7] = [
    "SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "TABLE",
];

pub(crate) fn may_pipeline(sql: &str) -> bool {
    leading_words(sql, 1)
        .first()
        .is_some_and(|word| PIPELINED_WORDS.contains(&word.as_str()))
}

/// Whether the statement drops the connection's prepared statements on the server
/// (DEALLOCATE, DISCARD ALL/PLANS).
/// Whether running `sql` may leave a statement prepared by SQL (`PREPARE`, directly or
/// through `EXECUTE` in a `DO` block or a function it defines): the text names
/// PREPARE anywhere, in any case. Over-approximate on purpose: a false yes costs one
/// clean-up in the next session reset.
pub(crate) fn may_prepare(sql: &str) -> bool {
    sql.as_bytes()
        .windows(7)
        .any(|window| window.eq_ignore_ascii_case(b"prepare"))
}

/// Whether `sql` defines code that runs later (a function or procedure), whose calls
/// do not show what it does.
pub(crate) fn defines_code(sql: &str) -> bool {
    let words = leading_words(sql, 4);
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        words.as_slice(),
        ["CREATE", "FUNCTION" | "PROCEDURE", ..]
            | ["CREATE", "OR", "REPLACE", "FUNCTION" | "PROCEDURE"]
    )
}

pub(crate) fn drops_prepared_statements(sql: &str) -> bool {
    matches!(
        leading_words(sql, 1).first().map(String::as_str),
        Some("DEALLOCATE" | "DISCARD")
    )
}

/// Highest `$N` placeholder in PostgreSQL SQL text, skipping string literals, quoted
/// identifiers, dollar-quoted strings and comments.
pub(crate) fn max_placeholder(sql: &str) -> usize {
    let bytes = sql.as_bytes();
    let mut max = 0;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\'' => {
                // E'...' strings may escape quotes with a backslash.
                let escapes = i > 0 && matches!(bytes[i - 1], b'e' | b'E');
                i += 1;
                while i < bytes.len() {
                    if escapes && bytes[i] == b'\\' {
                        i += 2;
                        continue;
                    }
                    if bytes[i] == b'\'' {
                        if bytes.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += 1;
                }
                i += 1;
            }
            b'-' | b'/' if comment_end(bytes, i).is_some() => {
                i = comment_end(bytes, i).unwrap_or(bytes.len());
            }
            b'$' => {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && bytes[end].is_ascii_digit() {
                    end += 1;
                }
                let part_of_identifier =
                    i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                if end > start && !part_of_identifier {
                    max = max.max(sql[start..end].parse().unwrap_or(0));
                    i = end;
                    continue;
                }
                // A dollar quote: $tag$ ... $tag$ (tag may be empty).
                let mut tag_end = start;
                while tag_end < bytes.len()
                    && (bytes[tag_end].is_ascii_alphanumeric() || bytes[tag_end] == b'_')
                {
                    tag_end += 1;
                }
                if !part_of_identifier && bytes.get(tag_end) == Some(&b'$') {
                    let tag = &sql[i..=tag_end];
                    match sql[tag_end + 1..].find(tag) {
                        Some(offset) => i = tag_end + 1 + offset + tag.len(),
                        None => i = bytes.len(),
                    }
                    continue;
                }
                i += 1;
            }
            _ => i += 1,
        }
    }
    max
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_placeholders_outside_literals_and_comments() {
        assert_eq!(max_placeholder("SELECT 1"), 0);
        assert_eq!(max_placeholder("SELECT $1, $2"), 2);
        assert_eq!(max_placeholder("SELECT $2 -- $9"), 2);
        assert_eq!(
            max_placeholder("SELECT '$7', \"$8\", $1 /* $9 /* $9 */ */"),
            1
        );
        assert_eq!(max_placeholder("SELECT $$ $5 $$, $tag$ $6 $tag$, $3"), 3);
        assert_eq!(max_placeholder("SELECT E'it\\'s $4', 'it''s $5', $1"), 1);
        assert_eq!(max_placeholder("SELECT a$1 FROM t WHERE x = $10"), 10);
    }

    #[test]
    fn finds_transaction_control_behind_comments() {
        for sql in [
            "BEGIN",
            "  begin;",
            "-- x\nCOMMIT",
            "/* a /* b */ */ rollback to s",
            "PREPARE TRANSACTION 'x'",
            "start transaction",
            "end",
        ] {
            assert!(refuse_unavailable_statement(sql).is_err(), "{sql:?}");
        }
        for sql in [
            "SELECT 'BEGIN'",
            "INSERT INTO t VALUES (1)",
            "PREPARE q AS SELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "",
            "(SELECT 1)",
        ] {
            assert!(refuse_unavailable_statement(sql).is_ok(), "{sql:?}");
        }
    }

    /// A piece of PostgreSQL text for the placeholder scanner.
    #[derive(Clone, Debug)]
    enum Piece {
        Code(&'static str),
        Placeholder(usize),
        /// `$N` inside a string, quoted identifier, comment or dollar quote.
        Hidden(usize, u8),
    }

    fn piece() -> impl proptest::strategy::Strategy<Value = Piece> {
        use proptest::prelude::*;
        prop_oneof![
            proptest::sample::select(vec![
                "SELECT", "a", "x_1", "=", ",", "(", ")", "'it''s'", "e'\\''", "1"
            ])
            .prop_map(Piece::Code),
            (1usize..200).prop_map(Piece::Placeholder),
            (1usize..500, 0u8..5).prop_map(|(n, how)| Piece::Hidden(n, how)),
        ]
    }

    fn text_of(pieces: &[Piece]) -> String {
        pieces
            .iter()
            .map(|piece| match piece {
                Piece::Code(code) => (*code).to_owned(),
                Piece::Placeholder(n) => format!("${n}"),
                Piece::Hidden(n, 0) => format!("'${n}'"),
                Piece::Hidden(n, 1) => format!("\"${n}\""),
                Piece::Hidden(n, 2) => format!("-- ${n}\n"),
                Piece::Hidden(n, 3) => format!("/* ${n} /* ${n} */ */"),
                Piece::Hidden(n, _) => format!("$q$ ${n} $q$"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    proptest::proptest! {
        #[test]
        fn the_highest_placeholder_outside_quotes_and_comments(
            pieces in proptest::collection::vec(piece(), 0..20)
        ) {
            let expected = pieces
                .iter()
                .filter_map(|piece| match piece {
                    Piece::Placeholder(n) => Some(*n),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            let text = text_of(&pieces);
            proptest::prop_assert_eq!(max_placeholder(&text), expected, "{}", text);
        }

        #[test]
        fn scanners_never_panic(sql in ".{0,200}") {
            let _ = max_placeholder(&sql);
            let _ = leading_words(&sql, 3);
            let _ = refuse_unavailable_statement(&sql);
            let _ = may_pipeline(&sql);
        }
    }

    /// What may stand before a statement's first word.
    fn prefix() -> impl proptest::strategy::Strategy<Value = String> {
        proptest::collection::vec(
            proptest::sample::select(vec![
                " ",
                "\t",
                "\n",
                "\r",
                "\u{0B}",
                "\u{0C}",
                "\u{A0}",
                "\u{2003}",
                ";",
                "; ;",
                "-- c\n",
                "/* c */",
                "/* a /* b */ c */",
                "--\n",
            ]),
            0..6,
        )
        .prop_map(|pieces| pieces.concat())
    }

    /// Randomly upper-, lower- or mixed-cases ASCII letters.
    fn any_case(text: &str, seed: u64) -> String {
        text.chars()
            .enumerate()
            .map(|(i, c)| {
                if (seed >> (i % 64)) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            })
            .collect()
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #[test]
        fn refused_spellings_are_refused_whatever_stands_before_them(
            prefix in prefix(),
            seed: u64,
            statement in proptest::sample::select(vec![
                "begin", "begin transaction", "start transaction", "commit", "end",
                "rollback", "rollback to savepoint s", "abort", "savepoint s",
                "release savepoint s", "prepare transaction 'x'", "commit prepared 'x'",
                "copy t to stdout", "copy (insert into w (v) values ('x') returning v) to stdout",
                "copy t from stdin",
            ]),
        ) {
            let sql = format!("{prefix}{}", any_case(statement, seed));
            proptest::prop_assert!(refuse_unavailable_statement(&sql).is_err(), "{:?}", sql);
        }

        #[test]
        fn statements_that_only_mention_them_pass(
            prefix in prefix(),
            statement in proptest::sample::select(vec![
                "SELECT 'BEGIN'", "select 1 -- commit", "insert into copy_log values (1)",
                "with x as (select 1) select * from x", "(select 1)", "PREPARE q AS SELECT 1",
                "UPDATE t SET begun = true", "values (1)",
            ]),
        ) {
            let sql = format!("{prefix}{statement}");
            proptest::prop_assert!(refuse_unavailable_statement(&sql).is_ok(), "{:?}", sql);
        }
    }
}
