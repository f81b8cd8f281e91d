//! Credentials as CRI carries them, and the token flow that trades an
//! identity token for an access token at a registry's token service.

use oci_client::Reference;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::{Registry, error_chain, failure};
use crate::error::{Error, RegistryFailure, Result};

/// Credentials for one pull or push, as CRI's `AuthConfig` carries them.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// base64 of `username:password`.
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl Credentials {
    fn to_auth(&self) -> Result<RegistryAuth> {
        if !self.registry_token.is_empty() {
            return Ok(RegistryAuth::Bearer(self.registry_token.clone()));
        }
        if !self.username.is_empty() {
            return Ok(RegistryAuth::Basic(
                self.username.clone(),
                self.password.clone(),
            ));
        }
        if !self.auth.is_empty() {
            let decoded = decode_base64(&self.auth)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    Error::InvalidArgument("auth is not base64 of username:password".into())
                })?;
            let (user, pass) = decoded.split_once(':').ok_or_else(|| {
                Error::InvalidArgument("auth is not base64 of username:password".into())
            })?;
            return Ok(RegistryAuth::Basic(user.to_owned(), pass.to_owned()));
        }
        Ok(RegistryAuth::Anonymous)
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.trim().bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

impl Registry {
    /// The registry auth for `credentials`. An identity token (Docker's
    /// name for an OAuth2 refresh token) is exchanged at the registry's
    /// token service for an access token first.
    pub(super) async fn auth_for(
        &self,
        reference: &Reference,
        credentials: &Credentials,
        actions: &str,
    ) -> Result<RegistryAuth> {
        if credentials.identity_token.is_empty() || !credentials.registry_token.is_empty() {
            return credentials.to_auth();
        }
        let registry = reference.resolve_registry().to_owned();
        let shown = reference.whole();
        let unavailable = |e: reqwest::Error| {
            failure(
                &shown,
                RegistryFailure::Unavailable,
                format!("talking to {registry}: {}", error_chain(&e)),
            )
        };
        let http = self.http()?;
        let scheme = self.scheme(&registry);
        let probe = http
            .get(format!("{scheme}://{registry}/v2/"))
            .send()
            .await
            .map_err(unavailable)?;
        let challenge = probe
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_challenge)
            .ok_or_else(|| {
                failure(
                    &shown,
                    RegistryFailure::Unauthorized,
                    format!("registry {registry} has no token service, so an identity token cannot be used"),
                )
            })?;
        let scope = format!("repository:{}:{actions}", reference.repository());
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", credentials.identity_token.as_str()),
            ("service", challenge.service.as_str()),
            ("scope", scope.as_str()),
            ("client_id", "wasmlet"),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
        let answer = http
            .post(&challenge.realm)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(form)
            .send()
            .await
            .map_err(unavailable)?;
        let status = answer.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(failure(
                &shown,
                RegistryFailure::Unauthorized,
                format!(
                    "the token service of registry {registry} refused the identity token ({status})"
                ),
            ));
        }
        let body = answer.bytes().await.map_err(unavailable)?;
        if !status.is_success() {
            return Err(failure(
                &shown,
                RegistryFailure::Unavailable,
                format!("the token service of registry {registry} answered {status}"),
            ));
        }
        #[derive(Deserialize)]
        struct Tokens {
            access_token: Option<String>,
            token: Option<String>,
        }
        let tokens: Tokens = serde_json::from_slice(&body).map_err(|e| {
            failure(
                &shown,
                RegistryFailure::Invalid,
                format!("token service answer is not JSON: {e}"),
            )
        })?;
        let token = tokens.access_token.or(tokens.token).ok_or_else(|| {
            failure(
                &shown,
                RegistryFailure::Invalid,
                "the token service answered without an access token",
            )
        })?;
        Ok(RegistryAuth::Bearer(token))
    }
}

/// The realm and service of a `WWW-Authenticate: Bearer ...` challenge.
struct BearerChallenge {
    realm: String,
    service: String,
}

fn bearer_challenge(header: &str) -> Option<BearerChallenge> {
    let mut rest = header.strip_prefix("Bearer ")?.trim();
    let mut realm = None;
    let mut service = String::new();
    // key="quoted value" pairs separated by commas (values may hold commas).
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').map_or((after, ""), |(v, a)| (v, a)),
        };
        match key.trim() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = value.to_owned(),
            _ => {}
        }
        rest = after.trim_start_matches([',', ' ']);
    }
    Some(BearerChallenge {
        realm: realm?,
        service,
    })
}

/// `application/x-www-form-urlencoded` encoding of one value.
fn form_encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_decodes_to_basic() {
        let c = Credentials {
            auth: "dXNlcjpwYXNz".into(),
            ..Default::default()
        };
        match c.to_auth().unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("user", "pass")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Credentials::default().to_auth().unwrap(),
            RegistryAuth::Anonymous
        ));
        let bad = Credentials {
            auth: "!!!".into(),
            ..Default::default()
        };
        assert!(bad.to_auth().is_err());
    }

    #[test]
    fn bearer_challenges_and_forms() {
        let c = bearer_challenge(r#"Bearer realm="http://127.0.0.1:9/token",service="reg",scope="repository:a:pull,push""#).unwrap();
        assert_eq!(
            (c.realm.as_str(), c.service.as_str()),
            ("http://127.0.0.1:9/token", "reg")
        );
        assert!(bearer_challenge(r#"Basic realm="x""#).is_none());
        assert_eq!(
            form_encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
