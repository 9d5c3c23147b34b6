//! Authentication at connection start: SCRAM-SHA-256 (SCRAM-SHA-256-PLUS, bound to the
//! TLS channel, whenever the connection is TLS and the server offers it), MD5, and the
//! cleartext password only over TLS (the messages and the SCRAM exchange from
//! `postgres-protocol`).

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{self, sasl};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::connection::{PgConnectOptions, PgConnection};
use super::error::{DbError, PgError, encode_error, protocol, unexpected};

/// Authentications bound to their TLS channel (SCRAM-SHA-256-PLUS) since start.
static CHANNEL_BOUND_LOGINS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Test hook: how many tenant connections have authenticated with SCRAM-SHA-256-PLUS
/// in this process (a test compares it before and after).
#[cfg(feature = "testing")]
pub fn channel_bound_logins() -> u64 {
    CHANNEL_BOUND_LOGINS.load(std::sync::atomic::Ordering::Relaxed)
}

impl PgConnection {
    pub(super) async fn authenticate(&mut self, options: &PgConnectOptions) -> Result<(), PgError> {
        let password = options.password.as_bytes();
        match self.next_message().await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                if !self.socket.is_tls() {
                    return Err(PgError::Tls(
                        "the server asks for the password in clear text over a connection \
                         without TLS; this client does not send it so: have the server use \
                         scram-sha-256 (pg_hba.conf), or register it with sslmode=require or \
                         stricter"
                            .to_owned(),
                    ));
                }
                frontend::password_message(password, &mut self.write).map_err(encode_error)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = authentication::md5_hash(options.user.as_bytes(), password, body.salt());
                frontend::password_message(hash.as_bytes(), &mut self.write)
                    .map_err(encode_error)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let (mut scram, mut plus) = (false, false);
                while let Some(mechanism) = mechanisms.next().map_err(protocol)? {
                    scram |= mechanism == sasl::SCRAM_SHA_256;
                    plus |= mechanism == sasl::SCRAM_SHA_256_PLUS;
                }
                // On TLS, bind the exchange to the channel where the server can
                // (a man in the middle holding another certificate then fails it).
                let end_point = self.socket.server_end_point();
                let (mechanism, binding) = match end_point {
                    Some(end_point) if plus => (
                        sasl::SCRAM_SHA_256_PLUS,
                        sasl::ChannelBinding::tls_server_end_point(end_point),
                    ),
                    _ if !scram => {
                        return Err(PgError::Protocol(
                            "the server offers no SASL mechanism this client has \
                             (SCRAM-SHA-256, SCRAM-SHA-256-PLUS over TLS)"
                                .to_owned(),
                        ));
                    }
                    // Could bind, but the server offers no binding. (Offered but with a
                    // certificate whose hash is not defined: bind nothing, plainly.)
                    _ if self.socket.is_tls() && !plus => {
                        (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unrequested())
                    }
                    _ => (sasl::SCRAM_SHA_256, sasl::ChannelBinding::unsupported()),
                };
                tracing::debug!(mechanism, "authenticating");
                if mechanism == sasl::SCRAM_SHA_256_PLUS {
                    CHANNEL_BOUND_LOGINS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let mut scram = sasl::ScramSha256::new(password, binding);
                frontend::sasl_initial_response(mechanism, scram.message(), &mut self.write)
                    .map_err(encode_error)?;
                self.flush().await?;
                let body = match self.next_message().await? {
                    Message::AuthenticationSaslContinue(body) => body,
                    Message::ErrorResponse(body) => {
                        return Err(PgError::Db(DbError::parse(&body)));
                    }
                    _ => return Err(unexpected("SCRAM authentication")),
                };
                scram.update(body.data()).map_err(protocol)?;
                frontend::sasl_response(scram.message(), &mut self.write).map_err(encode_error)?;
                self.flush().await?;
                let body = match self.next_message().await? {
                    Message::AuthenticationSaslFinal(body) => body,
                    Message::ErrorResponse(body) => {
                        return Err(PgError::Db(DbError::parse(&body)));
                    }
                    _ => return Err(unexpected("SCRAM authentication")),
                };
                scram.finish(body.data()).map_err(protocol)?;
                return self.authenticated().await;
            }
            Message::ErrorResponse(body) => return Err(PgError::Db(DbError::parse(&body))),
            _ => {
                return Err(PgError::Protocol(
                    "the server asks for an authentication method this client does not have \
                     (it has password, md5 and SCRAM-SHA-256)"
                        .to_owned(),
                ));
            }
        }
        self.flush().await?;
        self.authenticated().await
    }

    pub(super) async fn authenticated(&mut self) -> Result<(), PgError> {
        match self.next_message().await? {
            Message::AuthenticationOk => Ok(()),
            Message::ErrorResponse(body) => Err(PgError::Db(DbError::parse(&body))),
            _ => Err(unexpected("authentication")),
        }
    }
}
