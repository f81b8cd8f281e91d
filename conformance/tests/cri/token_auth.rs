//! Pulling and pushing through the Docker/OCI token flow, as Docker Hub, GHCR
//! and Harbor authorize: the registry answers 401 with a `Bearer` challenge,
//! the client gets a JWT from the token server the challenge names (with
//! basic auth when it has credentials) and retries with it.
//!
//! The registry is a [`Registry::start_token`] fixture and the token server a
//! [`TokenServer`], both on `127.0.0.1`. The token server grants `pull` to
//! anonymous requests or nothing, per test, and `pull,push` to its one user;
//! wrong credentials are answered 401. Its request log shows the flow really
//! went through it. The registry's raw client sends no token, so images are
//! pushed with the real CLI. The Wasm pushed is the echo sample with a custom
//! section naming the test appended, so every pull really downloads.

use std::path::PathBuf;
use std::time::Duration;

use wasmlet_conformance::fixtures::registry::{Registry, Request, send};
use wasmlet_conformance::fixtures::token_server::{SERVICE, TOKEN_PATH, TokenOptions, TokenServer};
use wasmlet_conformance::{
    Code, ContainerConfigBuilder, CriClient, Stream, assert_code, cri, read_cri_log, stream_lines,
};

use crate::GUEST_TIMEOUT;
use crate::daemon::{Wasmlet, is_image_id};
use crate::registry_common::{bounded, unique_echo};

/// Bounds each test: key, registry and daemon start-up, a push, pulls (a
/// failing one retries for about 1.4 s), and a guest run to exit.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The repository every test pushes to.
const REPO: &str = "token/echo";

/// The token server's one user, who may pull and push.
const USER: &str = "pusher";
const PASSWORD: &str = "t0ken-pass";

/// The arguments the echo guest is run with; it prints `arg[i]=VALUE`.
/// The identity (OAuth2 refresh) token the token server knows for [`USER`].
const IDENTITY_TOKEN: &str = "identity-token-of-the-pusher";

const ECHO_ARGS: [&str; 2] = ["hello", "with a token"];

/// A token server knowing [`USER`], granting anonymous pulls if
/// `anonymous_pull`, and a registry trusting it.
async fn token_registry(anonymous_pull: bool) -> (TokenServer, Registry) {
    let tokens = TokenServer::start(TokenOptions {
        anonymous_pull,
        users: vec![(USER.into(), PASSWORD.into())],
        refresh_tokens: vec![(IDENTITY_TOKEN.into(), USER.into())],
    })
    .await
    .expect("start token server");
    let registry = Registry::start_token(&tokens)
        .await
        .expect("start token registry");
    (tokens, registry)
}

/// A daemon (every sample imported) that reaches `registry` over plain HTTP.
async fn daemon_for(registry: &Registry) -> Wasmlet {
    Wasmlet::builder()
        .config(format!(
            "[registry]\ninsecure = [\"{}\"]\n",
            registry.host()
        ))
        .start()
        .await
}

/// Runs `wasmlet image push --insecure FILE REFERENCE` with `login`, on a
/// blocking thread so that the token server keeps serving meanwhile;
/// returns whether it succeeded, its stdout and its stderr.
async fn push(
    file: PathBuf,
    reference: &str,
    login: Option<(&str, &str)>,
) -> (bool, String, String) {
    let reference = reference.to_owned();
    let login = login.map(|(user, password)| (user.to_owned(), password.to_owned()));
    let output = tokio::task::spawn_blocking(move || {
        let login = login.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
        Wasmlet::push_output(&file, &reference, login)
    })
    .await
    .expect("the push thread panicked");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Pushes the echo module made unique to `tag` as `REPO:tag` with [`USER`]'s
/// credentials, asserting success; returns the reference and the manifest
/// digest.
async fn push_echo(wasmlet: &Wasmlet, registry: &Registry, tag: &str) -> (String, String) {
    let file = unique_echo(&wasmlet.scratch("token"), tag);
    let reference = format!("{}/{REPO}:{tag}", registry.host());
    let (pushed, digest, stderr) = push(file, &reference, Some((USER, PASSWORD))).await;
    assert!(
        pushed,
        "wasmlet image push {reference} as {USER} failed: {stderr}\nregistry log:\n{}",
        registry.log()
    );
    assert!(
        is_image_id(&digest),
        "image push printed {digest:?}, not sha256:<64 hex>"
    );
    (reference, digest)
}

/// CRI `AuthConfig` for [`USER`] with `password`.
fn user_password(password: &str) -> cri::AuthConfig {
    cri::AuthConfig {
        username: USER.to_owned(),
        password: password.to_owned(),
        ..Default::default()
    }
}

/// Asserts that ImageStatus of `reference` is the image `id` pulled, with
/// `repository@manifest_digest` among its repo digests.
async fn assert_pulled(cri: &mut CriClient, reference: &str, id: &str, manifest_digest: &str) {
    assert!(is_image_id(id), "PullImage answered {id:?}");
    let image = cri
        .image_status(reference)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("ImageStatus of the pulled {reference} is empty"));
    assert_eq!(image.id, id, "{image:?}");
    let repository = reference.rsplit_once(':').unwrap().0;
    let repo_digest = format!("{repository}@{manifest_digest}");
    assert!(image.repo_digests.contains(&repo_digest), "{image:?}");
}

/// Runs the echo guest of `image` in a pod of its own and asserts it exited
/// 0 having printed [`ECHO_ARGS`].
async fn run_echo(wasmlet: &Wasmlet, image: &str) {
    let mut cri = wasmlet.cri();
    let pod = cri.run_pod(wasmlet.pod().build()).await.unwrap();
    let config = ContainerConfigBuilder::new("echo", image)
        .args(ECHO_ARGS)
        .build();
    let log = pod.container_log(&config);
    let status = cri.run_to_exit(&pod, config, GUEST_TIMEOUT).await.unwrap();
    let stdout = stream_lines(&read_cri_log(&log).unwrap(), Stream::Stdout);
    assert_eq!(status.exit_code, 0, "{status:?}\n{stdout:#?}");
    for (i, arg) in ECHO_ARGS.iter().enumerate() {
        let line = format!("arg[{}]={arg}", i + 1);
        assert!(stdout.contains(&line), "no {line:?} in {stdout:#?}");
    }
}

/// The scope a pull of [`REPO`] asks for.
fn pull_scope() -> String {
    format!("repository:{REPO}:pull")
}

/// The fixture itself, without wasmlet: the registry challenges with the
/// token server's realm, and a token it issues is accepted for what it
/// grants and nothing more.
#[tokio::test]
async fn the_registry_accepts_the_token_servers_tokens() {
    bounded(TEST_TIMEOUT, async {
        let (tokens, registry) = token_registry(true).await;
        let tags = format!("/v2/{REPO}/tags/list");

        let challenged = send(registry.addr(), &Request::get(&tags)).await.unwrap();
        assert_eq!(challenged.status, 401, "{}", challenged.text());
        let challenge = challenged.header("WWW-Authenticate").unwrap_or_default();
        for part in [
            format!("Bearer realm=\"{}\"", tokens.realm()),
            format!("service=\"{SERVICE}\""),
            format!("scope=\"{}\"", pull_scope()),
        ] {
            assert!(challenge.contains(&part), "{part} not in {challenge:?}");
        }

        let token_server = tokens.addr();
        let token_for = |request: Request| async move {
            let answer = send(token_server, &request).await.unwrap();
            assert_eq!(answer.status, 200, "{}", answer.text());
            let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
            json["token"].as_str().expect("a token").to_owned()
        };
        let query = format!("{TOKEN_PATH}?service={SERVICE}&scope=repository:{REPO}:pull,push");
        let anonymous = token_for(Request::get(&query)).await;
        let user = token_for(Request::get(&query).basic_auth(USER, PASSWORD)).await;

        // Authorized, the repository is simply unknown.
        let listed = send(
            registry.addr(),
            &Request::get(&tags).header("Authorization", &format!("Bearer {anonymous}")),
        )
        .await
        .unwrap();
        assert_eq!(listed.status, 404, "{}\n{}", listed.text(), registry.log());
        // The anonymous token grants no push, the user's does.
        let uploads = format!("/v2/{REPO}/blobs/uploads/");
        let with = |token: &str| {
            Request::new("POST", &uploads).header("Authorization", &format!("Bearer {token}"))
        };
        let refused = send(registry.addr(), &with(&anonymous)).await.unwrap();
        assert_eq!(refused.status, 401, "{}", refused.text());
        let opened = send(registry.addr(), &with(&user)).await.unwrap();
        assert_eq!(opened.status, 202, "{}\n{}", opened.text(), registry.log());

        // A token signed by a key the registry does not trust grants nothing.
        let stranger = TokenServer::start(TokenOptions {
            anonymous_pull: true,
            ..Default::default()
        })
        .await
        .expect("start a second token server");
        let forged = send(stranger.addr(), &Request::get(&query)).await.unwrap();
        let forged: serde_json::Value = serde_json::from_slice(&forged.body).unwrap();
        let forged = forged["token"].as_str().expect("a token");
        let refused = send(
            registry.addr(),
            &Request::get(&tags).header("Authorization", &format!("Bearer {forged}")),
        )
        .await
        .unwrap();
        assert_eq!(refused.status, 401, "{}", refused.text());

        let wrong = send(
            tokens.addr(),
            &Request::get(&query).basic_auth(USER, "wrong"),
        )
        .await
        .unwrap();
        assert_eq!(wrong.status, 401, "{}", wrong.text());
        let granted: Vec<_> = tokens
            .requests()
            .into_iter()
            .map(|r| (r.user, r.status, r.granted))
            .collect();
        let scope = |actions: &str| vec![format!("repository:{REPO}:{actions}")];
        assert_eq!(
            granted,
            [
                (None, 200, scope("pull")),
                (Some(USER.to_owned()), 200, scope("pull,push")),
                (Some(USER.to_owned()), 401, vec![]),
            ]
        );
    })
    .await;
}

#[tokio::test]
async fn image_push_gets_a_push_token_with_the_users_credentials() {
    bounded(TEST_TIMEOUT, async {
        let (tokens, registry) = token_registry(true).await;
        let dir = tempfile::tempdir().unwrap();
        let file = unique_echo(dir.path(), "token-push");
        let reference = format!("{}/{REPO}:token-push", registry.host());

        let (anonymous, stdout, _) = push(file.clone(), &reference, None).await;
        assert!(!anonymous, "an anonymous push was accepted: {stdout}");
        let (wrong, stdout, _) = push(file.clone(), &reference, Some((USER, "wrong"))).await;
        assert!(
            !wrong,
            "a push with a wrong password was accepted: {stdout}"
        );
        let (pushed, digest, stderr) = push(file, &reference, Some((USER, PASSWORD))).await;
        assert!(
            pushed,
            "wasmlet image push as {USER} failed: {stderr}\nregistry log:\n{}",
            registry.log()
        );
        assert!(is_image_id(&digest), "image push printed {digest:?}");

        let push_scope = format!("repository:{REPO}:pull,push");
        let requests = tokens.requests();
        assert!(
            requests.iter().any(|r| r.user.as_deref() == Some(USER)
                && r.status == 200
                && r.scopes.contains(&push_scope)
                && r.granted.contains(&push_scope)),
            "no push token was issued to {USER}: {requests:#?}"
        );
        assert!(
            requests
                .iter()
                .any(|r| r.user.as_deref() == Some(USER) && r.status == 401),
            "the wrong password never reached the token server: {requests:#?}"
        );
    })
    .await;
}

#[tokio::test]
async fn an_anonymous_pull_gets_a_pull_token_and_the_image_runs() {
    bounded(TEST_TIMEOUT, async {
        let (tokens, registry) = token_registry(true).await;
        let wasmlet = daemon_for(&registry).await;
        let (reference, manifest_digest) = push_echo(&wasmlet, &registry, "anonymous").await;
        let before = tokens.requests().len();

        let mut cri = wasmlet.cri();
        let id = cri.pull_image(&reference).await.unwrap_or_else(|e| {
            panic!(
                "PullImage {reference}: {e}\ntoken requests: {:#?}\nregistry log:\n{}",
                tokens.requests(),
                registry.log()
            )
        });
        let pulls: Vec<_> = tokens.requests().split_off(before);
        assert!(
            pulls
                .iter()
                .any(|r| r.user.is_none() && r.status == 200 && r.granted.contains(&pull_scope())),
            "the pull got no anonymous pull token: {pulls:#?}"
        );
        assert_pulled(&mut cri, &reference, &id, &manifest_digest).await;
        run_echo(&wasmlet, &reference).await;
    })
    .await;
}

#[tokio::test]
async fn without_credentials_a_private_repository_is_permission_denied() {
    bounded(TEST_TIMEOUT, async {
        let (tokens, registry) = token_registry(false).await;
        let wasmlet = daemon_for(&registry).await;
        let (reference, _) = push_echo(&wasmlet, &registry, "private-anonymous").await;
        let before = tokens.requests().len();

        let mut cri = wasmlet.cri();
        let images = cri.list_images(None).await.unwrap();
        let status = assert_code(cri.pull_image(&reference).await, Code::PermissionDenied);
        assert!(
            status.message().contains(&registry.host()),
            "the message does not name the registry: {status:?}"
        );
        let pulls: Vec<_> = tokens.requests().split_off(before);
        assert!(
            pulls.iter().any(|r| r.user.is_none() && r.status == 200),
            "the pull did not ask for an anonymous token: {pulls:#?}"
        );
        assert!(
            pulls
                .iter()
                .all(|r| r.granted.iter().all(|g| g.ends_with(':'))),
            "an anonymous request was granted something: {pulls:#?}"
        );
        assert_eq!(cri.list_images(None).await.unwrap(), images);
    })
    .await;
}

#[tokio::test]
async fn with_username_and_password_a_private_repository_is_pulled_and_runs() {
    bounded(TEST_TIMEOUT, async {
        let (tokens, registry) = token_registry(false).await;
        let wasmlet = daemon_for(&registry).await;
        let (reference, manifest_digest) = push_echo(&wasmlet, &registry, "private-user").await;
        let before = tokens.requests().len();

        let mut cri = wasmlet.cri();
        let id = cri
            .pull_image_with_auth(&reference, user_password(PASSWORD))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PullImage {reference} as {USER}: {e}\ntoken requests: {:#?}\nregistry log:\n{}",
                    tokens.requests(),
                    registry.log()
                )
            });
        let pulls: Vec<_> = tokens.requests().split_off(before);
        assert!(
            pulls.iter().any(|r| r.user.as_deref() == Some(USER)
                && r.status == 200
                && r.granted.contains(&pull_scope())),
            "the pull got no pull token for {USER}: {pulls:#?}"
        );
        assert_pulled(&mut cri, &reference, &id, &manifest_digest).await;
        run_echo(&wasmlet, &reference).await;
    })
    .await;
}

#[tokio::test]
async fn with_a_wrong_password_a_private_repository_is_permission_denied() {
    bounded(TEST_TIMEOUT, async {
        let (tokens, registry) = token_registry(false).await;
        let wasmlet = daemon_for(&registry).await;
        let (reference, _) = push_echo(&wasmlet, &registry, "private-wrong").await;
        let before = tokens.requests().len();

        let mut cri = wasmlet.cri();
        let images = cri.list_images(None).await.unwrap();
        let status = assert_code(
            cri.pull_image_with_auth(&reference, user_password("wrong"))
                .await,
            Code::PermissionDenied,
        );
        assert!(status.message().contains(&registry.host()), "{status:?}");
        let pulls: Vec<_> = tokens.requests().split_off(before);
        assert!(
            pulls
                .iter()
                .any(|r| r.user.as_deref() == Some(USER) && r.status == 401),
            "the wrong password never reached the token server: {pulls:#?}"
        );
        assert!(
            pulls.iter().all(|r| r.status != 200),
            "a token was issued for a wrong password: {pulls:#?}"
        );
        assert_eq!(cri.list_images(None).await.unwrap(), images);
    })
    .await;
}

fn identity(token: &str) -> cri::AuthConfig {
    cri::AuthConfig {
        identity_token: token.to_owned(),
        ..Default::default()
    }
}

/// An `AuthConfig.identity_token` is exchanged at the token service
/// (OAuth2 `grant_type=refresh_token`) for an access token, as Docker does.
#[tokio::test]
async fn with_an_identity_token_a_private_repository_is_pulled_and_runs() {
    bounded(TEST_TIMEOUT, async {
        let (tokens, registry) = token_registry(false).await;
        let wasmlet = daemon_for(&registry).await;
        let (reference, manifest_digest) = push_echo(&wasmlet, &registry, "private-identity").await;
        let before = tokens.requests().len();

        let mut cri = wasmlet.cri();
        let id = cri
            .pull_image_with_auth(&reference, identity(IDENTITY_TOKEN))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "PullImage with an identity token: {e}\n{:#?}",
                    tokens.requests()
                )
            });
        let pulls: Vec<_> = tokens.requests().split_off(before);
        assert!(
            pulls.iter().any(|r| r.user.as_deref() == Some(USER)
                && r.status == 200
                && r.granted.contains(&pull_scope())),
            "no pull token for the identity token's user: {pulls:#?}"
        );
        assert_pulled(&mut cri, &reference, &id, &manifest_digest).await;
        run_echo(&wasmlet, &reference).await;

        let status = assert_code(
            wasmlet
                .cri()
                .pull_image_with_auth(&reference, identity("not-a-known-token"))
                .await,
            Code::PermissionDenied,
        );
        assert!(status.message().contains("identity token"), "{status:?}");
    })
    .await;
}
