//! Placement: which database server a new tenant lives on, and what its database and
//! role are called there. The scheduler honours a pinned server; otherwise it picks the
//! server with the fewest tenants (ties by name, so the choice is repeatable).

use std::collections::HashMap;

use rand::Rng;
use rand::distr::Alphanumeric;
use tenantry_shared::TenantId;

use super::error::{ProvisionError, ProvisionResult};
use crate::registry::{Backend, DatabaseServer, Placement};

/// Chooses a server for a tenant from the registered ones.
pub(crate) struct Scheduler<'a> {
    pub servers: Vec<DatabaseServer>,
    /// Tenants per server name (servers without tenants may be missing).
    pub tenant_counts: &'a HashMap<String, i64>,
}

impl Scheduler<'_> {
    /// The pinned server (`requested_server`, "" for none), or the least loaded one.
    pub(crate) fn choose(self, requested_server: &str) -> ProvisionResult<DatabaseServer> {
        if !requested_server.is_empty() {
            return self
                .servers
                .into_iter()
                .find(|server| server.name == requested_server)
                .ok_or_else(|| ProvisionError::UnknownServer(requested_server.to_owned()));
        }
        let counts = self.tenant_counts;
        self.servers
            .into_iter()
            .min_by_key(|server| {
                (
                    counts.get(&server.name).copied().unwrap_or(0),
                    server.name.clone(),
                )
            })
            .ok_or(ProvisionError::NoServer)
    }
}

/// The tenant's database name and role on `server` (PostgreSQL: a role named after the
/// tenant with a fresh random password; SQLite: a file named after the tenant).
pub(crate) fn plan(tenant_id: &TenantId, server: &DatabaseServer) -> Placement {
    let (database_name, username, password) = match server.backend {
        Backend::Postgres => (
            format!("tenantry_{}", tenant_id.as_identifier_part()),
            Some(format!("tenantry_{}", tenant_id.as_identifier_part())),
            Some(random_password()),
        ),
        Backend::Sqlite => (format!("{tenant_id}.sqlite3"), None, None),
    };
    Placement {
        server: server.name.clone(),
        backend: server.backend,
        database_name,
        username,
        password,
    }
}

/// 32 random letters and digits (about 190 bits).
fn random_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, backend: Backend) -> DatabaseServer {
        DatabaseServer {
            name: name.to_owned(),
            backend,
            location: format!("/srv/{name}"),
            create_time: chrono::Utc::now(),
        }
    }

    fn servers() -> Vec<DatabaseServer> {
        vec![
            server("b", Backend::Sqlite),
            server("a", Backend::Sqlite),
            server("c", Backend::Postgres),
        ]
    }

    fn chosen(counts: &[(&str, i64)], requested: &str) -> ProvisionResult<String> {
        let tenant_counts = counts
            .iter()
            .map(|(name, count)| ((*name).to_owned(), *count))
            .collect();
        Scheduler {
            servers: servers(),
            tenant_counts: &tenant_counts,
        }
        .choose(requested)
        .map(|server| server.name)
    }

    #[test]
    fn picks_the_least_loaded_server_then_the_first_name() {
        assert_eq!(
            chosen(&[("a", 2), ("b", 1), ("c", 1)], "").ok(),
            Some("b".into())
        );
        assert_eq!(chosen(&[("a", 1), ("b", 1)], "").ok(), Some("c".into()));
        assert_eq!(chosen(&[], "").ok(), Some("a".into()));
    }

    #[test]
    fn honours_a_pinned_server() {
        assert_eq!(chosen(&[("a", 9)], "a").ok(), Some("a".into()));
        assert!(matches!(
            chosen(&[], "missing"),
            Err(ProvisionError::UnknownServer(name)) if name == "missing"
        ));
    }

    #[test]
    fn needs_a_server() {
        let counts = HashMap::new();
        let none = Scheduler {
            servers: Vec::new(),
            tenant_counts: &counts,
        }
        .choose("");
        assert!(matches!(none, Err(ProvisionError::NoServer)));
    }

    #[test]
    fn names_the_database_and_role_after_the_tenant() {
        let tenant_id = TenantId::parse("acme-eu").unwrap_or_else(|e| panic!("{e}"));
        let on_postgres = plan(&tenant_id, &server("c", Backend::Postgres));
        assert_eq!(on_postgres.database_name, "tenantry_acme_eu");
        assert_eq!(on_postgres.username.as_deref(), Some("tenantry_acme_eu"));
        assert_eq!(on_postgres.password.map(|p| p.len()), Some(32));
        let on_sqlite = plan(&tenant_id, &server("a", Backend::Sqlite));
        assert_eq!(on_sqlite.database_name, "acme-eu.sqlite3");
        assert_eq!((on_sqlite.username, on_sqlite.password), (None, None));
    }
}
