//! The statement cache of a connection: statements prepared with their parameter types,
//! kept per connection under a key (the text plus its type signature), bounded by count
//! and by bytes, the oldest closed on the server when a new one needs room; names of types that are not built in,
//! looked up once per connection.

use std::sync::Arc;

use postgres_protocol::message::backend::{DataRowBody, Message};
use postgres_protocol::message::frontend;
use postgres_types::{Kind, Type};

use super::connection::{GroupError, PgConnection, text_row};
use super::error::{DbError, PgError, encode_error, protocol, unexpected};
use crate::backend::sql_text::{defines_code, may_prepare};
use fallible_iterator::FallibleIterator;

/// Prepared statements kept per connection (as sqlx's default cache); the oldest is
/// closed on the server when a new one needs room.
pub(super) const STATEMENT_CACHE_CAPACITY: usize = 100;

/// Most bytes of statement text (with its type signature) one connection's cache keeps,
/// over all its statements; the oldest are closed to make room.
pub(super) const STATEMENT_CACHE_BYTES: usize = 2 * 1024 * 1024;

/// Longest statement text a connection keeps prepared; a longer one is prepared for its
/// one use (SQL text may be up to 1 MiB: 100 of them would be 100 MiB per connection).
pub(super) const MAX_KEPT_STATEMENT_BYTES: usize = 64 * 1024;

/// The server-side name of a statement prepared for one use (`prepare(.., keep: false)`).
pub(super) const ONCE: &str = "tenantry_once";

/// A statement prepared on a connection.
pub(crate) struct Prepared {
    pub(super) name: String,
    pub(super) params: Vec<Type>,
    pub(super) columns: Vec<Column>,
    /// Running it may leave statements prepared by SQL in the session
    /// (`sql_text::may_prepare`), or define code that does (`Preparing::InCode`).
    pub(super) preparing: Preparing,
}

/// What a statement may do about SQL-level prepared statements (see `reset`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Preparing {
    No,
    /// It may PREPARE (directly, or in a DO block).
    Itself,
    /// It defines a function or procedure that may PREPARE when called.
    InCode,
}

impl Preparing {
    pub(super) fn of(sql: &str) -> Self {
        match (may_prepare(sql), defines_code(sql)) {
            (false, _) => Self::No,
            (true, false) => Self::Itself,
            (true, true) => Self::InCode,
        }
    }
}

impl Prepared {
    /// Kept in the connection's statement cache (not prepared for one use).
    pub(crate) fn is_kept(&self) -> bool {
        self.name != ONCE
    }

    pub(crate) fn params(&self) -> &[Type] {
        &self.params
    }

    pub(crate) fn columns(&self) -> &[Column] {
        &self.columns
    }
}

pub(crate) struct Column {
    pub(super) name: String,
    pub(super) type_: Type,
}

impl Column {
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn type_(&self) -> &Type {
        &self.type_
    }
}

impl PgConnection {
    /// The statement kept for `key` on this connection, if any.
    pub(crate) fn cached(&self, key: &str) -> Option<Arc<Prepared>> {
        self.statements.get(key).cloned()
    }

    /// The statement prepared for `key` on this connection, or a new one prepared from
    /// `sql` with the given parameter types (None: the server infers the type), kept for
    /// next time if `keep` and the key is at most `MAX_KEPT_STATEMENT_BYTES` long.
    pub(crate) async fn prepare(
        &mut self,
        key: &str,
        sql: &str,
        types: &[Option<Type>],
        keep: bool,
    ) -> Result<Arc<Prepared>, PgError> {
        if keep && let Some(statement) = self.statements.get(key) {
            return Ok(statement.clone());
        }
        let keep = keep && key.len() <= MAX_KEPT_STATEMENT_BYTES;
        self.start()?;
        self.write.clear();
        // Closes first: they take effect even if what follows fails.
        let name = if keep {
            while (self.statements.len() >= STATEMENT_CACHE_CAPACITY
                || self.statement_bytes + key.len() > STATEMENT_CACHE_BYTES)
                && let Some(oldest) = self.statement_order.pop_front()
            {
                if let Some(statement) = self.statements.remove(&oldest) {
                    self.statement_bytes = self.statement_bytes.saturating_sub(oldest.len());
                    frontend::close(b'S', &statement.name, &mut self.write)
                        .map_err(encode_error)?;
                }
            }
            self.next_statement += 1;
            format!("tenantry_{}_{}", self.statement_prefix, self.next_statement)
        } else {
            frontend::close(b'S', ONCE, &mut self.write).map_err(encode_error)?;
            ONCE.to_owned()
        };
        // Parse resolves names with the session's search_path: reset it first.
        let ahead = self.queue_reset_ahead()?;
        // A statement the tenant prepared by SQL under this name goes (Close closes
        // either kind): ours never fails to prepare for it.
        frontend::close(b'S', &name, &mut self.write).map_err(encode_error)?;
        let oids = types.iter().map(|ty| ty.as_ref().map_or(0, Type::oid));
        frontend::parse(&name, sql, oids, &mut self.write).map_err(encode_error)?;
        frontend::describe(b'S', &name, &mut self.write).map_err(encode_error)?;
        frontend::sync(&mut self.write);
        self.in_flight = true;
        self.flush().await?;
        let mut params = Vec::new();
        let mut columns = Vec::new();
        let mut ahead_left = ahead;
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::ParseComplete
                | Message::BindComplete
                | Message::CloseComplete
                | Message::NoData => {}
                Message::CommandComplete(_) => ahead_left = ahead_left.saturating_sub(1),
                Message::ParameterDescription(body) => {
                    params = body.parameters().collect().map_err(protocol)?;
                }
                Message::RowDescription(body) => {
                    columns = body
                        .fields()
                        .map(|field| Ok((field.name().to_owned(), field.type_oid())))
                        .collect()
                        .map_err(protocol)?;
                }
                Message::ErrorResponse(body) => {
                    let db = DbError::parse(&body);
                    error = Some(if ahead_left > 0 {
                        PgError::Reset(db)
                    } else {
                        PgError::Db(db)
                    });
                }
                Message::ReadyForQuery(body) => {
                    self.status = body.status();
                    break;
                }
                _ => {
                    self.broken = true;
                    return Err(unexpected("a statement's preparation"));
                }
            }
        }
        self.in_flight = false;
        if let Some(error) = error {
            if matches!(error, PgError::Reset(_)) {
                self.broken = true;
            }
            return Err(error);
        }
        if ahead > 0 {
            self.dirty = false;
        }
        self.look_up_types(columns.iter().map(|(_, oid)| *oid))
            .await?;
        let prepared = Arc::new(Prepared {
            preparing: Preparing::of(sql),
            name,
            params: params.into_iter().map(|oid| self.type_of(oid)).collect(),
            columns: columns
                .into_iter()
                .map(|(name, oid)| Column {
                    name,
                    type_: self.type_of(oid),
                })
                .collect(),
        });
        if keep {
            self.statements.insert(key.to_owned(), prepared.clone());
            self.statement_order.push_back(key.to_owned());
            self.statement_bytes += key.len();
        }
        Ok(prepared)
    }

    pub(super) fn type_of(&self, oid: u32) -> Type {
        Type::from_oid(oid)
            .or_else(|| self.types.get(&oid).cloned())
            .unwrap_or_else(|| {
                Type::new(
                    format!("oid {oid}"),
                    oid,
                    Kind::Simple,
                    "pg_catalog".to_owned(),
                )
            })
    }

    /// Learns the names of types that are not built in (a column of an extension type
    /// such as citext, an enum or a domain).
    pub(super) async fn look_up_types(
        &mut self,
        oids: impl Iterator<Item = u32>,
    ) -> Result<(), PgError> {
        let mut unknown: Vec<u32> = oids
            .filter(|oid| Type::from_oid(*oid).is_none() && !self.types.contains_key(oid))
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        unknown.sort_unstable();
        unknown.dedup();
        let list = unknown
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT t.oid, t.typname, n.nspname FROM pg_catalog.pg_type t \
             JOIN pg_catalog.pg_namespace n ON n.oid = t.typnamespace WHERE t.oid IN ({list})"
        );
        let mut found = Vec::new();
        let rows = self.simple_rows(&sql).await?;
        for row in rows {
            if let [Some(oid), Some(name), Some(schema)] = row.as_slice()
                && let Ok(oid) = oid.parse::<u32>()
            {
                found.push(Type::new(name.clone(), oid, Kind::Simple, schema.clone()));
            }
        }
        for ty in found {
            self.types.insert(ty.oid(), ty);
        }
        Ok(())
    }

    /// Runs a simple query of the data plane's own and returns its rows as text.
    pub(super) async fn simple_rows(
        &mut self,
        sql: &str,
    ) -> Result<Vec<Vec<Option<String>>>, PgError> {
        self.start()?;
        frontend::query(sql, &mut self.write).map_err(encode_error)?;
        let mut rows = Vec::new();
        let outcome = self
            .round_trip(0, false, &mut |row: &DataRowBody| {
                rows.push(text_row(row)?);
                Ok::<_, PgError>(())
            })
            .await?;
        match outcome.error {
            None => Ok(rows),
            Some(GroupError::Row(error)) => Err(error),
            Some(GroupError::TooLarge { declared, limit }) => {
                Err(PgError::TooLarge { declared, limit })
            }
            Some(GroupError::Ahead(error) | GroupError::Statement(error)) => {
                Err(PgError::Db(error))
            }
        }
    }

    /// Forgets the prepared statements kept so far: the next statement run drops them on
    /// the server.
    pub(crate) fn forget_statements(&mut self) {
        self.reset_prepared = false;
        self.cleanup_prepared = false;
        self.drops_statements = true;
        self.statements.clear();
        self.statement_order.clear();
        self.statement_bytes = 0;
    }

    /// Forgets one kept statement (the server no longer knows it).
    pub(super) fn forget_statement(&mut self, prepared: &Prepared) {
        let key = self
            .statements
            .iter()
            .find(|(_, statement)| statement.name == prepared.name)
            .map(|(key, _)| key.clone());
        if let Some(key) = key {
            self.statements.remove(&key);
            self.statement_order.retain(|kept| *kept != key);
            self.statement_bytes = self.statement_bytes.saturating_sub(key.len());
        }
    }
}
