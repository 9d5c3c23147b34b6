//! The backends every end-to-end scenario runs on (SQLite and PostgreSQL, always both),
//! and the macros that turn one async scenario into a test per backend: the
//! `sqlite::name` and `postgres::name` tests of [`backend_tests!`], and the
//! `postgres_only::name` tests of [`postgres_only_tests!`] for what only PostgreSQL has.

use std::future::Future;

/// Where the registry and the tenant databases of a sandbox live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// `$1` on PostgreSQL, `?` on SQLite.
pub fn placeholder(backend: Backend, n: usize) -> String {
    match backend {
        Backend::Postgres => format!("${n}"),
        Backend::Sqlite => "?".to_owned(),
    }
}

/// Runs a test body on a fresh two-thread runtime and waits for it, as
/// `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` does: what the test
/// macros below expand to.
pub fn run_scenario<F: Future<Output = ()>>(scenario: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("cannot build the test runtime: {e}"))
        .block_on(scenario);
}

/// Runs each async scenario `name(backend: Backend)` of the calling file against both
/// backends: tests `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    $crate::backend::run_scenario(super::$name($crate::Backend::Sqlite));
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    $crate::backend::run_scenario(super::$name($crate::Backend::Postgres));
                }
            )*
        }
    };
}

/// Runs each async scenario `name()` of the calling file, which needs PostgreSQL: tests
/// `postgres_only::name`.
#[macro_export]
macro_rules! postgres_only_tests {
    ($($name:ident),* $(,)?) => {
        mod postgres_only {
            $(
                #[test]
                fn $name() {
                    $crate::backend::run_scenario(super::$name());
                }
            )*
        }
    };
}
