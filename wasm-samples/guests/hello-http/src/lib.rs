//! `hello-http`: a `wasi:http/proxy` component, the serverless function
//! sample. Every request gets a fresh instance.
//!
//! - `GET /healthz` answers `ok` (the Pod manifest's probes use it);
//! - `GET /spin?ms=N` burns N milliseconds of CPU, then answers `spun N`;
//! - `GET /alloc?mib=N` allocates and touches N MiB, then answers
//!   `allocated N`;
//! - `GET /fetch?url=http[s]://HOST[:PORT]/PATH` makes that request through
//!   `wasi:http/outgoing-handler` and answers `fetched <status> <body>`
//!   (or 502 with the error);
//! - anything else answers `hello from <HELLO_NAME> path=<path>` (the
//!   name from the container's environment, default `wasmlet`), and prints
//!   `request <method> <path>` to stdout (the container's log).

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingRequest, OutgoingResponse,
    ResponseOutparam, Scheme,
};
use wasip2::io::streams::StreamError;

struct Hello;

wasip2::http::proxy::export!(Hello);

fn query_str<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    let (_, query) = path.split_once('?')?;
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn query(path: &str, key: &str) -> Option<u64> {
    query_str(path, key).and_then(|v| v.parse().ok())
}

/// GET `url` (plain HTTP) through the host; its status and body.
fn fetch(url: &str) -> Result<(u16, String), String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err(format!("only http:// and https:// URLs: {url}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(&Method::Get).map_err(|()| "method")?;
    request.set_scheme(Some(&scheme)).map_err(|()| "scheme")?;
    request
        .set_authority(Some(authority))
        .map_err(|()| format!("authority {authority}"))?;
    request
        .set_path_with_query(Some(path))
        .map_err(|()| format!("path {path}"))?;
    let pending = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken")?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let body = response.consume().map_err(|()| "body taken")?;
    let stream = body.stream().map_err(|()| "stream taken")?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(4096) {
            Ok(chunk) => bytes.extend(chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(format!("reading the body: {e:?}")),
        }
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let headers = Fields::new();
    let _ = headers.set("content-type", &[b"text/plain".to_vec()]);
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let body = response.body().expect("the response body is taken once");
    ResponseOutparam::set(out, Ok(response));
    {
        let stream = body.write().expect("the body stream is taken once");
        for chunk in text.as_bytes().chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .expect("writing the response");
        }
    }
    OutgoingBody::finish(body, None).expect("finishing the response");
}

impl Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        let route = path.split('?').next().unwrap_or("/");
        match route {
            "/healthz" => respond(out, 200, "ok\n"),
            "/spin" => {
                let ms = query(&path, "ms").unwrap_or(10);
                let clock = wasip2::clocks::monotonic_clock::now;
                let until = clock() + ms * 1_000_000;
                let mut x = 0u64;
                while clock() < until {
                    for _ in 0..1000 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                    }
                }
                respond(out, 200, &format!("spun {ms}\n"));
            }
            "/fetch" => match fetch(query_str(&path, "url").unwrap_or("")) {
                Ok((status, body)) => respond(out, 200, &format!("fetched {status} {body}")),
                Err(e) => respond(out, 502, &format!("fetch failed: {e}\n")),
            },
            "/alloc" => {
                let mib = query(&path, "mib").unwrap_or(1) as usize;
                let held = vec![1u8; mib * 1024 * 1024];
                std::hint::black_box(&held);
                respond(out, 200, &format!("allocated {mib}\n"));
            }
            _ => {
                let method = match request.method() {
                    Method::Get => "GET".to_owned(),
                    Method::Post => "POST".to_owned(),
                    other => format!("{other:?}"),
                };
                println!("request {method} {path}");
                let name = std::env::var("HELLO_NAME").unwrap_or_else(|_| "wasmlet".to_owned());
                respond(out, 200, &format!("hello from {name} path={path}\n"));
            }
        }
    }
}
