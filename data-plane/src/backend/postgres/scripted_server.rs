//! The wire client against a scripted fake PostgreSQL server on loopback: a tool to test
//! our own protocol code where a real server will not misbehave on cue (answers split at
//! every byte, asynchronous messages anywhere, an error or a FATAL in the middle of a
//! pipeline, an unexpected message, the connection dropped at every point of an answer,
//! a message declaring more than the limit). It comes on top of the tests against a real
//! PostgreSQL, not instead of them. Plus a property test over arbitrary server bytes.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::backend::DataRowBody;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::connection::{PgConnectOptions, PgConnection};
use super::error::{PgError, RunError};
use super::pipeline::Piped;
use super::run::Bound;

/// One server message: tag, then length (itself included) and body.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn ready() -> Vec<u8> {
    message(b'Z', b"I")
}

fn command_complete(tag: &str) -> Vec<u8> {
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    message(b'C', &body)
}

/// A DataRow of one int8 column.
fn int8_row(value: i64) -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i16(1);
    body.put_i32(8);
    body.put_i64(value);
    message(b'D', &body)
}

/// A RowDescription of one int8 column named `n`.
fn int8_description() -> Vec<u8> {
    let mut body = BytesMut::new();
    body.put_i16(1);
    body.put_slice(b"n\0");
    body.put_i32(0); // table
    body.put_i16(0); // column
    body.put_u32(20); // int8
    body.put_i16(8);
    body.put_i32(-1);
    body.put_i16(1); // binary
    message(b'T', &body)
}

fn error(severity: &str, code: &str, text: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', text),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    message(b'E', &body)
}

/// Messages a server may send at any time.
fn asynchronous() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(message(b'N', b"SNOTICE\0Mhello\0\0"));
    out.extend(message(b'S', b"TimeZone\0UTC\0"));
    let mut notification = 42i32.to_be_bytes().to_vec();
    notification.extend_from_slice(b"channel\0payload\0");
    out.extend(message(b'A', &notification));
    out
}

/// What `prepare` of a one-int8-column statement is answered with.
fn prepared_answer() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(message(b'3', b"")); // CloseComplete (of a same-named leftover)
    out.extend(message(b'1', b"")); // ParseComplete
    out.extend(message(b't', &0i16.to_be_bytes())); // no parameters
    out.extend(int8_description());
    out.extend(ready());
    out
}

/// What running that statement is answered with: one row, `value`.
fn run_answer(value: i64) -> Vec<u8> {
    let mut out = message(b'2', b""); // BindComplete
    out.extend(int8_row(value));
    out.extend(command_complete("SELECT 1"));
    out.extend(ready());
    out
}

/// How the fake server writes an answer.
#[derive(Clone, Copy)]
enum Delivery {
    /// In one write.
    Whole,
    /// One byte per write, each flushed on its own.
    ByteByByte,
    /// The first `n` bytes, then the connection is closed.
    CutAfter(usize),
}

/// A fake server: accepts one connection, answers the startup, then for each group of
/// frontend messages up to a Sync (or a startup-free simple Query), writes the next
/// scripted answer as `Delivery` says. Ends when the script does.
async fn scripted(answers: Vec<(Vec<u8>, Delivery)>) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let port = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .port();
    let server = tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let _ = socket.set_nodelay(true);
        // Startup message: length, then the rest.
        let Ok(length) = socket.read_i32().await else {
            return;
        };
        let mut startup = vec![0u8; usize::try_from(length).unwrap_or(4).saturating_sub(4)];
        if socket.read_exact(&mut startup).await.is_err() {
            return;
        }
        let mut hello = message(b'R', &0i32.to_be_bytes());
        let mut key = 7i32.to_be_bytes().to_vec();
        key.extend_from_slice(&99i32.to_be_bytes());
        hello.extend(message(b'K', &key));
        hello.extend(ready());
        if socket.write_all(&hello).await.is_err() {
            return;
        }
        for (answer, delivery) in answers {
            if !read_group(&mut socket).await {
                return;
            }
            match delivery {
                Delivery::Whole => {
                    let _ = socket.write_all(&answer).await;
                }
                Delivery::ByteByByte => {
                    for byte in answer {
                        if socket.write_all(&[byte]).await.is_err() {
                            return;
                        }
                        let _ = socket.flush().await;
                        tokio::task::yield_now().await;
                    }
                }
                Delivery::CutAfter(n) => {
                    let _ = socket.write_all(&answer[..n.min(answer.len())]).await;
                    return;
                }
            }
        }
        // Hold the connection until the client goes.
        let mut rest = [0u8; 1024];
        while matches!(socket.read(&mut rest).await, Ok(n) if n > 0) {}
    });
    (port, server)
}

/// Reads frontend messages up to a Sync or a simple Query. False: the client went.
async fn read_group(socket: &mut TcpStream) -> bool {
    loop {
        let Ok(tag) = socket.read_u8().await else {
            return false;
        };
        let Ok(length) = socket.read_i32().await else {
            return false;
        };
        let mut body = vec![0u8; usize::try_from(length).unwrap_or(4).saturating_sub(4)];
        if socket.read_exact(&mut body).await.is_err() {
            return false;
        }
        if matches!(tag, b'S' | b'Q') {
            return true;
        }
        if tag == b'X' {
            return false;
        }
    }
}

async fn connect(port: u16) -> PgConnection {
    let mut options = PgConnectOptions::new("127.0.0.1", port, "db", "user", "secret");
    options.session_reset = false;
    tokio::time::timeout(Duration::from_secs(10), PgConnection::connect(&options))
        .await
        .unwrap_or_else(|_| panic!("connect timed out"))
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Prepares the one-int8-column statement, then runs it; returns the rows read and the
/// run's outcome.
async fn prepare_and_run(
    connection: &mut PgConnection,
) -> (Vec<i64>, Result<u64, RunError<PgError>>) {
    let prepared = connection
        .prepare("SELECT n", "SELECT n", &[], true)
        .await
        .unwrap_or_else(|e| panic!("prepare: {e}"));
    let mut rows = Vec::new();
    let ran = connection
        .run(
            &prepared,
            std::iter::empty::<i64>(),
            None,
            None,
            |row: &DataRowBody| {
                let buffer = row.buffer();
                let value = buffer
                    .get(buffer.len().saturating_sub(8)..)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(i64::from_be_bytes)
                    .ok_or_else(|| PgError::Protocol("short row".to_owned()))?;
                rows.push(value);
                Ok::<_, PgError>(())
            },
        )
        .await;
    (rows, ran)
}

#[tokio::test]
async fn answers_split_at_every_byte_read_the_same() {
    let (port, server) = scripted(vec![
        (prepared_answer(), Delivery::ByteByByte),
        (run_answer(41), Delivery::ByteByByte),
    ])
    .await;
    let mut connection = connect(port).await;
    let (rows, ran) = prepare_and_run(&mut connection).await;
    assert_eq!(rows, [41]);
    assert!(matches!(ran, Ok(1)));
    assert!(connection.usable());
    drop(connection);
    let _ = server.await;
}

#[tokio::test]
async fn asynchronous_messages_anywhere_are_skipped() {
    let interleave = |answer: Vec<u8>| {
        // Cut the answer into its messages and put the asynchronous ones before each.
        let mut out = Vec::new();
        let mut rest = answer.as_slice();
        while rest.len() >= 5 {
            let length = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            out.extend(asynchronous());
            out.extend_from_slice(&rest[..=length]);
            rest = &rest[length + 1..];
        }
        out.extend(asynchronous());
        out
    };
    let (port, server) = scripted(vec![
        (interleave(prepared_answer()), Delivery::Whole),
        (interleave(run_answer(7)), Delivery::ByteByByte),
    ])
    .await;
    let mut connection = connect(port).await;
    let (rows, ran) = prepare_and_run(&mut connection).await;
    assert_eq!(rows, [7]);
    assert!(matches!(ran, Ok(1)));
    drop(connection);
    let _ = server.await;
}

/// Three statements in one write: the second fails (an ERROR, then its ReadyForQuery);
/// each gets exactly its own answer. Then a FATAL in the middle: the failed one gets the
/// server's error, those behind it "closed" (they never ran: not "outcome unknown").
#[tokio::test]
async fn an_error_in_the_middle_of_a_pipeline_answers_only_its_statement() {
    let mut pipeline = run_answer(1);
    pipeline.extend(message(b'2', b""));
    pipeline.extend(error("ERROR", "22012", "division by zero"));
    pipeline.extend(ready());
    pipeline.extend(run_answer(3));
    let mut fatal = run_answer(1);
    fatal.extend(error("FATAL", "57P01", "terminating connection"));
    let (port, server) = scripted(vec![
        (prepared_answer(), Delivery::Whole),
        (pipeline, Delivery::ByteByByte),
        // The server closes the connection after a FATAL.
        (fatal.clone(), Delivery::CutAfter(fatal.len())),
    ])
    .await;
    let mut connection = connect(port).await;
    let prepared = connection
        .prepare("SELECT n", "SELECT n", &[], true)
        .await
        .unwrap_or_else(|e| panic!("prepare: {e}"));
    for (expected, closes) in [
        (vec!["ok", "db 22012", "ok"], false),
        // Behind the FATAL the backend is gone: those statements never ran.
        (vec!["ok", "db 57P01", "other connection closed"], true),
    ] {
        let runs: Vec<_> = (0..3)
            .map(|_| {
                let bound = Bound::new(&prepared, std::iter::empty::<i64>(), None)
                    .unwrap_or_else(|e| panic!("{e}"));
                (&*prepared, bound)
            })
            .collect();
        let mut answers = vec![String::new(); 3];
        connection
            .run_pipelined(&runs, |event: Piped<'_, PgError>| {
                if let Piped::Done(n, result) = event {
                    answers[n] = match result {
                        Ok(_) => "ok".to_owned(),
                        Err(RunError::Postgres(PgError::Db(db))) => format!("db {}", db.code),
                        Err(RunError::Postgres(PgError::OutcomeUnknown(_))) => "unknown".to_owned(),
                        Err(RunError::Postgres(other)) => format!("other {other}"),
                        Err(RunError::Row(other)) => format!("row {other}"),
                    };
                }
                Ok(())
            })
            .await;
        assert_eq!(answers, expected);
        assert_eq!(connection.usable(), !closes);
    }
    drop(connection);
    let _ = server.await;
}

#[tokio::test]
async fn an_unexpected_message_fails_the_request_and_the_connection() {
    let mut answer = message(b'2', b"");
    answer.extend(message(b'W', &[0, 0, 0])); // CopyBothResponse: never sent here
    answer.extend(command_complete("SELECT 1"));
    answer.extend(ready());
    let (port, server) = scripted(vec![
        (prepared_answer(), Delivery::Whole),
        (answer, Delivery::Whole),
    ])
    .await;
    let mut connection = connect(port).await;
    let (_, ran) = prepare_and_run(&mut connection).await;
    assert!(ran.is_err());
    assert!(
        !connection.usable(),
        "a connection with unread input is lent again"
    );
    drop(connection);
    let _ = server.await;
}

/// The connection dropped after every prefix of an answer: the request gets a clean
/// error (outcome unknown: the statement was sent), never a wrong answer, and the
/// connection is never lent again.
#[tokio::test]
async fn a_connection_dropped_at_any_point_fails_cleanly() {
    let answer = run_answer(5);
    for cut in 0..answer.len() {
        let (port, server) = scripted(vec![
            (prepared_answer(), Delivery::Whole),
            (answer.clone(), Delivery::CutAfter(cut)),
        ])
        .await;
        let mut connection = connect(port).await;
        let (_, ran) = prepare_and_run(&mut connection).await;
        assert!(
            matches!(ran, Err(RunError::Postgres(PgError::OutcomeUnknown(_)))),
            "cut after {cut} bytes: {}",
            match ran {
                Ok(n) => format!("Ok({n})"),
                Err(RunError::Postgres(error)) => error.to_string(),
                Err(RunError::Row(error)) => error.to_string(),
            }
        );
        assert!(!connection.usable(), "cut after {cut} bytes: lent again");
        drop(connection);
        let _ = server.await;
    }
}

/// A DataRow declaring 100 MB against a 1 MB limit: refused from its header, with
/// nothing of its body read.
#[tokio::test]
async fn a_message_over_the_limit_is_refused_from_its_header() {
    let mut answer = message(b'2', b"");
    answer.push(b'D');
    answer.extend_from_slice(&(100_000_000u32).to_be_bytes());
    answer.extend_from_slice(&[0u8; 64]);
    let (port, server) = scripted(vec![
        (prepared_answer(), Delivery::Whole),
        (answer, Delivery::Whole),
    ])
    .await;
    let mut options = PgConnectOptions::new("127.0.0.1", port, "db", "user", "secret");
    options.session_reset = false;
    options.max_message_bytes = 1024 * 1024;
    let mut connection = PgConnection::connect(&options)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (_, ran) = prepare_and_run(&mut connection).await;
    assert!(
        matches!(
            ran,
            Err(RunError::Postgres(PgError::TooLarge {
                declared: 100_000_001,
                limit: 1_048_576
            }))
        ),
        "not refused from its header"
    );
    assert!(connection.read_capacity() < 1024 * 1024);
    assert!(!connection.usable());
    drop(connection);
    let _ = server.await;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever bytes a server answers with, split however, the client answers the
    /// request with a result or an error: it never panics, never hangs, never holds
    /// more than its limit.
    #[test]
    fn any_server_answer_is_handled(
        answer in proptest::collection::vec(any::<u8>(), 0..256),
        valid_prefix in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        runtime.block_on(async {
            let mut bytes = if valid_prefix { message(b'2', b"") } else { Vec::new() };
            bytes.extend(answer);
            let (port, server) = scripted(vec![
                (prepared_answer(), Delivery::Whole),
                (bytes, Delivery::CutAfter(usize::MAX)),
            ])
            .await;
            let mut options = PgConnectOptions::new("127.0.0.1", port, "db", "user", "secret");
            options.session_reset = false;
            options.max_message_bytes = 64 * 1024;
            let mut connection = PgConnection::connect(&options)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let outcome = tokio::time::timeout(
                Duration::from_secs(10),
                prepare_and_run(&mut connection),
            )
            .await;
            assert!(outcome.is_ok(), "the client hung on a garbled answer");
            assert!(connection.read_capacity() <= 64 * 1024 + 8192);
            drop(connection);
            let _ = server.await;
        });
    }
}
