//! TLS and SCRAM to PostgreSQL, against a throwaway server started with `ssl = on` and
//! pg_hba.conf demanding `hostssl ... scram-sha-256` (plain TCP refused), its certificate
//! signed by a test authority made here: every sslmode, for the control plane's admin
//! connection (sqlx) and the data plane's tenant connections (its own client, with
//! SCRAM-SHA-256-PLUS channel binding); and a cleartext password refused over plain TCP.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tenantry_proto::controlplane::v1 as cp;
use tenantry_testkit::postgres::{ServerSetup, start_server};
use tenantry_testkit::{Backend, Sandbox, SandboxOptions, int, postgres_only_tests};
use tonic::Code;

postgres_only_tests!(tls_and_scram_to_postgres);

const PASSWORD: &str = "tls-test-secret";

/// A test authority and a server certificate it signed for `localhost` (not for
/// 127.0.0.1): (CA PEM, server certificate PEM, server key PEM).
fn certificates() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Tenantry test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params
        .self_signed(&ca_key)
        .unwrap_or_else(|e| panic!("{e}"));
    let server_key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let mut server_params =
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap_or_else(|e| panic!("{e}"));
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server = server_params
        .signed_by(&server_key, &issuer)
        .unwrap_or_else(|e| panic!("{e}"));
    (ca.pem(), server.pem(), server_key.serialize_pem())
}

async fn register(sandbox: &Sandbox, name: &str, url: String) -> Result<(), tonic::Status> {
    sandbox
        .servers()
        .register_database_server(cp::RegisterDatabaseServerRequest {
            name: name.to_owned(),
            location: Some(cp::register_database_server_request::Location::PostgresAdminUrl(url)),
        })
        .await
        .map(|_| ())
}

async fn create_on(sandbox: &Sandbox, server: &str) -> String {
    let id = sandbox.tid(server);
    sandbox
        .tenants()
        .create_tenant(cp::CreateTenantRequest {
            tenant_id: id.clone(),
            database_server: server.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("create on {server}: {e}"));
    id
}

fn url(host: &str, port: u16, query: &str) -> String {
    format!("postgres://postgres:{PASSWORD}@{host}:{port}/postgres?{query}")
}

async fn tls_and_scram_to_postgres() {
    let (ca, cert, key) = certificates();
    let temp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let ca_path = temp.path().join("ca.pem");
    std::fs::write(&ca_path, &ca).unwrap_or_else(|e| panic!("{e}"));
    let setup = ServerSetup {
        tls: Some((cert, key)),
        // TLS and SCRAM for all; plain TCP only for `plainadmin` (SCRAM) and for the
        // tenant roles it makes (a cleartext password), never for `postgres`.
        hba: Some(
            "hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostssl all all ::1/128 scram-sha-256\n\
             hostnossl all plainadmin 127.0.0.1/32 scram-sha-256\n\
             hostnossl all postgres 0.0.0.0/0 reject\n\
             hostnossl all postgres ::/0 reject\n\
             hostnossl all all 127.0.0.1/32 password\n\
             hostnossl all all ::1/128 password"
                .to_owned(),
        ),
        superuser_password: Some(PASSWORD.to_owned()),
        setup_sql: Some(format!(
            "CREATE ROLE plainadmin LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
        )),
    };
    let server = tokio::task::spawn_blocking(move || start_server(&setup))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|message| {
            panic!(
                "cannot start a TLS PostgreSQL for this test: {message}. Install the \
                 PostgreSQL server binaries (Debian/Ubuntu: apt-get install postgresql)"
            )
        });
    let port = server.port;
    let sandbox = Sandbox::start_with(
        Backend::Postgres,
        SandboxOptions {
            postgres_ssl_root_cert: Some(ca_path.clone()),
            ..Default::default()
        },
    )
    .await;
    let root = format!("sslrootcert={}", ca_path.display());

    // Servers the control plane can use, and the data plane after it.
    let bound_before = tenantry_data_plane::testing::channel_bound_logins();
    for (name, host, query) in [
        ("full", "localhost", format!("sslmode=verify-full&{root}")),
        ("ca", "127.0.0.1", format!("sslmode=verify-ca&{root}")),
        ("required", "127.0.0.1", "sslmode=require".to_owned()),
        ("preferred", "127.0.0.1", "sslmode=prefer".to_owned()),
    ] {
        register(&sandbox, name, url(host, port, &query))
            .await
            .unwrap_or_else(|e| panic!("register {name}: {e}"));
        let id = create_on(&sandbox, name).await;
        // The tenant's own connection is TLS (pg_stat_ssl), authenticated by SCRAM
        // (pg_hba.conf takes nothing else), bound to the channel where the server
        // offers it (a wrong binding fails authentication).
        let rows = sandbox
            .query(
                &id,
                "SELECT count(*) AS n FROM pg_stat_ssl WHERE pid = pg_backend_pid() AND ssl",
                vec![],
            )
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(rows.rows[0].values[0], int(1), "{name}: not on TLS");
    }
    // Each of the four tenants' connections bound its SCRAM exchange to the channel
    // (the server checks the binding: a wrong one fails authentication).
    let bound = tenantry_data_plane::testing::channel_bound_logins() - bound_before;
    assert!(
        bound >= 4,
        "{bound} of the tenant connections used SCRAM-SHA-256-PLUS"
    );

    // What cannot be used is refused at registration, saying why.
    for (name, host, query, why) in [
        // The certificate is for localhost, not 127.0.0.1.
        (
            "mismatch",
            "127.0.0.1",
            format!("sslmode=verify-full&{root}"),
            "certificate",
        ),
        // Signed by an authority the system does not trust.
        (
            "untrusted",
            "localhost",
            "sslmode=verify-full".to_owned(),
            "certificate",
        ),
        // pg_hba.conf refuses plain TCP here.
        (
            "plain",
            "127.0.0.1",
            "sslmode=disable".to_owned(),
            "pg_hba.conf",
        ),
    ] {
        let status = register(&sandbox, name, url(host, port, &query))
            .await
            .err()
            .unwrap_or_else(|| panic!("{name} was registered"));
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{name}: {status:?}"
        );
        assert!(
            status.message().to_lowercase().contains(why),
            "{name}: {status:?}"
        );
    }

    // A server that asks tenants for their password in clear text over plain TCP: the
    // data plane does not send it.
    register(
        &sandbox,
        "cleartext",
        format!("postgres://plainadmin:{PASSWORD}@127.0.0.1:{port}/postgres?sslmode=disable"),
    )
    .await
    .unwrap_or_else(|e| panic!("register cleartext: {e}"));
    let id = create_on(&sandbox, "cleartext").await;
    let status = sandbox
        .query(&id, "SELECT 1", vec![])
        .await
        .err()
        .unwrap_or_else(|| panic!("a password went out in clear text"));
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("clear text"), "{status:?}");
}
