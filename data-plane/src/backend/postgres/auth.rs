//! Authentication at connection start: cleartext, MD5 and SCRAM-SHA-256 (the messages
//! and the SCRAM exchange from `postgres-protocol`).

use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{self, sasl};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::connection::{PgConnectOptions, PgConnection};
use super::error::{DbError, PgError, encode_error, protocol, unexpected};

impl PgConnection {
    pub(super) async fn authenticate(&mut self, options: &PgConnectOptions) -> Result<(), PgError> {
        let password = options.password.as_bytes();
        match self.next_message().await? {
            Message::AuthenticationOk => return Ok(()),
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password, &mut self.write).map_err(encode_error)?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = authentication::md5_hash(options.user.as_bytes(), password, body.salt());
                frontend::password_message(hash.as_bytes(), &mut self.write)
                    .map_err(encode_error)?;
            }
            Message::AuthenticationSasl(body) => {
                let mut mechanisms = body.mechanisms();
                let mut scram = false;
                while let Some(mechanism) = mechanisms.next().map_err(protocol)? {
                    scram |= mechanism == sasl::SCRAM_SHA_256;
                }
                if !scram {
                    return Err(PgError::Protocol(
                        "the server offers no SASL mechanism this client has (SCRAM-SHA-256)"
                            .to_owned(),
                    ));
                }
                let mut scram =
                    sasl::ScramSha256::new(password, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    sasl::SCRAM_SHA_256,
                    scram.message(),
                    &mut self.write,
                )
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
