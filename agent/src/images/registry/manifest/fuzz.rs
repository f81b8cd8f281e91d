//! Property tests: manifests, indexes and image configs as a registry may
//! send them — well formed, subtly wrong, or noise — never panic the
//! parser, never get an invalid digest or an oversized blob past the plan
//! of a pull, and a valid one comes back as it was sent. Failing inputs
//! are kept in `agent/proptest-regressions/images/registry/manifest/fuzz.txt`.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::{
    IMAGE_CONFIG_MEDIA_TYPES, MAX_IMAGE_CONFIG, PullPlan, WASM_LAYER_MEDIA_TYPES, index_entry,
    is_wasm_platform, parse_image_config, parse_manifest, plan,
};
use crate::error::{Error, RegistryFailure};
use crate::images::rootfs::Compression;
use crate::images::store::{OCI_MANIFEST_MEDIA_TYPE, WASM_CONFIG_MEDIA_TYPE};
use crate::model::ids::Digest;
use crate::model::image::ImageConfig;

const MAX_BLOB: u64 = 1 << 20;
const REFERENCE: &str = "registry.example/fuzz:latest";

fn kind(e: &Error) -> RegistryFailure {
    match e {
        Error::Registry { kind, .. } => *kind,
        other => panic!("not a registry failure: {other:?}"),
    }
}

fn valid_digest() -> impl Strategy<Value = String> {
    "[0-9a-f]{64}".prop_map(|hex| format!("sha256:{hex}"))
}

/// Digests as a registry might get them wrong, and right ones.
fn digest() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => valid_digest(),
        1 => "[0-9A-F]{64}".prop_map(|h| format!("sha256:{h}")),
        1 => "[0-9a-f]{0,63}".prop_map(|h| format!("sha256:{h}")),
        1 => "[0-9a-f]{65,70}".prop_map(|h| format!("sha256:{h}")),
        1 => "[0-9a-f]{128}".prop_map(|h| format!("sha512:{h}")),
        1 => valid_digest().prop_map(|d| format!("{d}/../../etc")),
        1 => valid_digest().prop_map(|d| format!(" {d}")),
        1 => ".{0,20}",
    ]
}

/// Sizes, as JSON: in range, over the limits, and not sizes at all.
fn size() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (0..=MAX_BLOB).prop_map(Value::from),
        1 => prop::sample::select(vec![MAX_BLOB + 1, MAX_IMAGE_CONFIG + 1, u64::MAX])
            .prop_map(Value::from),
        1 => prop::sample::select(vec![
            json!(-1),
            json!(1.5),
            json!("12"),
            json!(null),
            json!(1e30),
            json!([]),
        ]),
    ]
}

fn media_type() -> impl Strategy<Value = String> {
    let mut known: Vec<&str> = vec![
        OCI_MANIFEST_MEDIA_TYPE,
        WASM_CONFIG_MEDIA_TYPE,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/octet-stream",
        "",
    ];
    known.extend(WASM_LAYER_MEDIA_TYPES);
    known.extend(IMAGE_CONFIG_MEDIA_TYPES);
    prop_oneof![
        8 => prop::sample::select(known).prop_map(str::to_owned),
        1 => ".{0,30}",
    ]
}

/// A descriptor, with now and then a field missing, `null`, of the wrong
/// type, or one nobody asked for.
fn descriptor() -> impl Strategy<Value = Value> {
    (
        media_type(),
        digest(),
        size(),
        prop::option::of(platform()),
        0u8..8,
    )
        .prop_map(|(media_type, digest, size, platform, quirk)| {
            let mut d = json!({ "mediaType": media_type, "digest": digest, "size": size });
            if let Some(p) = platform {
                d["platform"] = p;
            }
            match quirk {
                0 => {
                    d.as_object_mut().unwrap().remove("digest");
                }
                1 => d["digest"] = json!(null),
                2 => d["annotations"] = json!({ "x": "y".repeat(1000) }),
                3 => d["urls"] = json!(["http://example/"]),
                _ => {}
            }
            d
        })
}

fn platform() -> impl Strategy<Value = Value> {
    let os = prop::sample::select(vec!["linux", "wasip1", "wasip2", "wasi", "windows", ""]);
    let arch = prop::sample::select(vec!["amd64", "arm64", "wasm", "wasm32", ""]);
    (os, arch, any::<bool>()).prop_map(|(os, arch, variant)| {
        let mut p = json!({ "os": os, "architecture": arch });
        if variant {
            p["variant"] = json!("v8");
        }
        p
    })
}

/// A manifest or an index, top-level fields mixed.
fn document() -> impl Strategy<Value = Value> {
    (
        prop::option::of(media_type()),
        prop::option::of(descriptor()),
        prop::collection::vec(descriptor(), 0..5),
        prop::collection::vec(descriptor(), 0..4),
        any::<bool>(),
    )
        .prop_map(|(media_type, config, layers, manifests, noise)| {
            let mut m = json!({ "schemaVersion": 2 });
            if let Some(t) = media_type {
                m["mediaType"] = json!(t);
            }
            if let Some(c) = config {
                m["config"] = c;
            }
            if !layers.is_empty() {
                m["layers"] = json!(layers);
            }
            if !manifests.is_empty() {
                m["manifests"] = json!(manifests);
            }
            if noise {
                m["annotations"] = json!({ "module.wasm.image/variant": "compat" });
                m["subject"] = json!({ "digest": 7 });
            }
            m
        })
}

/// Whether every `size` in `v` (at any depth) is a `u64`.
fn sizes_are_u64(v: &Value) -> bool {
    match v {
        Value::Object(o) => o
            .iter()
            .all(|(k, v)| (k != "size" || v.is_u64()) && sizes_are_u64(v)),
        Value::Array(a) => a.iter().all(sizes_are_u64),
        _ => true,
    }
}

/// What a pull would do with `bytes`: its index entry and its plan.
fn judge(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Ok(top) = parse_manifest(REFERENCE, bytes) else {
        return Ok(());
    };
    match index_entry(REFERENCE, &top) {
        Ok(Some(entry)) => {
            // The entry chosen is a Wasm platform's, its digest valid.
            let wasm_entry = top.manifests.iter().any(|m| {
                m.digest == entry.as_str()
                    && m.platform
                        .as_ref()
                        .is_some_and(|p| is_wasm_platform(&p.os, &p.architecture))
            });
            prop_assert!(wasm_entry, "{entry} is no Wasm entry");
        }
        Ok(None) => check_plan(&top)?,
        Err(e) => prop_assert!(
            matches!(
                kind(&e),
                RegistryFailure::NotWasm | RegistryFailure::Invalid
            ),
            "{e}"
        ),
    }
    Ok(())
}

/// Whatever a plan accepts is what may be downloaded.
fn check_plan(manifest: &super::Manifest) -> Result<(), TestCaseError> {
    match plan(REFERENCE, manifest, MAX_BLOB) {
        Ok(PullPlan::Wasm { config, layer }) => {
            prop_assert!(config.descriptor.size <= MAX_IMAGE_CONFIG.min(MAX_BLOB));
            prop_assert!(layer.descriptor.size <= MAX_BLOB);
            for b in [&config, &layer] {
                prop_assert_eq!(b.digest.as_str(), &b.descriptor.digest);
                prop_assert!(Digest::parse(&b.descriptor.digest).is_ok());
            }
            prop_assert!(WASM_LAYER_MEDIA_TYPES.contains(&layer.descriptor.media_type.as_str()));
            let wasm_layers = manifest
                .layers
                .iter()
                .filter(|l| WASM_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
                .count();
            prop_assert_eq!(wasm_layers, 1);
        }
        Ok(PullPlan::Compat { config, layers }) => {
            prop_assert!(IMAGE_CONFIG_MEDIA_TYPES.contains(&config.descriptor.media_type.as_str()));
            prop_assert!(config.descriptor.size <= MAX_IMAGE_CONFIG.min(MAX_BLOB));
            prop_assert_eq!(config.digest.as_str(), &config.descriptor.digest);
            prop_assert_eq!(layers.len(), manifest.layers.len());
            prop_assert!(!layers.is_empty());
            for (b, compression) in &layers {
                prop_assert_eq!(b.digest.as_str(), &b.descriptor.digest);
                prop_assert!(b.descriptor.size <= MAX_BLOB);
                prop_assert_eq!(
                    Compression::of_media_type(&b.descriptor.media_type),
                    Some(*compression)
                );
            }
        }
        Err(e) => {
            let k = kind(&e);
            prop_assert!(
                matches!(
                    k,
                    RegistryFailure::Invalid | RegistryFailure::TooLarge | RegistryFailure::NotWasm
                ),
                "{k:?}: {e}"
            );
            prop_assert!(!e.to_string().is_empty());
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Delete(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        2 => any::<usize>().prop_map(Mutation::Delete),
    ]
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        if bytes.is_empty() {
            return;
        }
        let len = bytes.len();
        match *m {
            Mutation::Set(i, v) => bytes[i % len] = v,
            Mutation::Truncate(i) => bytes.truncate(i % len),
            Mutation::Delete(i) => {
                bytes.remove(i % len);
            }
        }
    }
}

/// A valid Wasm or compat image manifest and what its plan must say.
#[derive(Clone, Debug)]
struct Valid {
    config: (String, String, u64),
    layers: Vec<(String, String, u64)>,
    wasm: bool,
}

fn valid() -> impl Strategy<Value = Valid> {
    let wasm = (
        valid_digest(),
        0..=MAX_IMAGE_CONFIG.min(MAX_BLOB),
        prop::sample::select(WASM_LAYER_MEDIA_TYPES.to_vec()),
        valid_digest(),
        0..=MAX_BLOB,
    )
        .prop_map(|(cd, cs, lt, ld, ls)| Valid {
            config: (WASM_CONFIG_MEDIA_TYPE.to_owned(), cd, cs),
            layers: vec![(lt.to_owned(), ld, ls)],
            wasm: true,
        });
    let tar = prop::sample::select(vec![
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ]);
    let compat = (
        prop::sample::select(IMAGE_CONFIG_MEDIA_TYPES.to_vec()),
        valid_digest(),
        0..=MAX_IMAGE_CONFIG.min(MAX_BLOB),
        prop::collection::vec((tar, valid_digest(), 0..=MAX_BLOB), 1..6),
    )
        .prop_map(|(ct, cd, cs, layers)| Valid {
            config: (ct.to_owned(), cd, cs),
            layers: layers
                .into_iter()
                .map(|(t, d, s)| (t.to_owned(), d, s))
                .collect(),
            wasm: false,
        });
    prop_oneof![wasm, compat]
}

fn descriptor_json((media_type, digest, size): &(String, String, u64)) -> Value {
    json!({ "mediaType": media_type, "digest": digest, "size": size })
}

fn seen((media_type, digest, size): (&str, &str, u64)) -> (String, String, u64) {
    (media_type.to_owned(), digest.to_owned(), size)
}

/// An image config with the fields wasmlet reads, each present, absent
/// or `null`, among fields it does not read.
#[derive(Clone, Debug)]
struct Config {
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    env: Option<Vec<String>>,
    working_dir: Option<String>,
}

fn strings() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(
        prop_oneof![".{0,20}", "[A-Z_]{1,8}=.{0,20}", Just(String::new())],
        0..5,
    )
}

fn config() -> impl Strategy<Value = Config> {
    (
        prop::option::of(strings()),
        prop::option::of(strings()),
        prop::option::of(strings()),
        prop::option::of(".{0,30}"),
    )
        .prop_map(|(entrypoint, cmd, env, working_dir)| Config {
            entrypoint,
            cmd,
            env,
            working_dir,
        })
}

/// JSON nobody asked for: nested, long, or of any type.
fn noise() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn config_json(c: &Config, noise: &Value, nulls: bool) -> Value {
    let mut runtime = json!({ "ExposedPorts": { "80/tcp": {} }, "X-Unknown": noise });
    let fields = [
        ("Entrypoint", c.entrypoint.as_ref().map(|v| json!(v))),
        ("Cmd", c.cmd.as_ref().map(|v| json!(v))),
        ("Env", c.env.as_ref().map(|v| json!(v))),
        ("WorkingDir", c.working_dir.as_ref().map(|v| json!(v))),
    ];
    for (name, value) in fields {
        match value {
            Some(v) => runtime[name] = v,
            None if nulls => runtime[name] = Value::Null,
            None => {}
        }
    }
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": runtime,
        "rootfs": { "type": "layers", "diff_ids": [] },
        "history": [{ "created_by": noise }],
        "unknown": noise,
    })
}

/// `default` cases per property, or `PROPTEST_CASES` for a longer run.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn noise_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        judge(&bytes)?;
        let _ = parse_image_config(REFERENCE, &bytes);
    }

    #[test]
    fn mangled_documents_never_pass_a_bad_digest_or_size(
        doc in document(),
        mutations in prop::collection::vec(mutation(), 0..4),
    ) {
        let mut bytes = serde_json::to_vec(&doc).unwrap();
        if mutations.is_empty() && !sizes_are_u64(&doc) {
            // A size that is not a u64 is no descriptor at all.
            prop_assert!(parse_manifest(REFERENCE, &bytes).is_err());
        }
        mutate(&mut bytes, &mutations);
        judge(&bytes)?;
    }

    #[test]
    fn a_valid_manifest_plans_what_it_says(v in valid(), annotate in any::<bool>()) {
        let mut doc = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST_MEDIA_TYPE,
            "config": descriptor_json(&v.config),
            "layers": v.layers.iter().map(descriptor_json).collect::<Vec<_>>(),
        });
        if annotate {
            doc["annotations"] = json!({ "org.opencontainers.image.title": "x" });
        }
        let bytes = serde_json::to_vec(&doc).unwrap();
        let manifest = parse_manifest(REFERENCE, &bytes).unwrap();
        prop_assert!(index_entry(REFERENCE, &manifest).unwrap().is_none());
        let blob = |b: &super::Blob<'_>| {
            seen((&b.descriptor.media_type, b.digest.as_str(), b.descriptor.size))
        };
        match plan(REFERENCE, &manifest, MAX_BLOB).unwrap() {
            PullPlan::Wasm { config, layer } => {
                prop_assert!(v.wasm);
                prop_assert_eq!(blob(&config), v.config.clone());
                prop_assert_eq!(vec![blob(&layer)], v.layers.clone());
            }
            PullPlan::Compat { config, layers } => {
                prop_assert!(!v.wasm);
                prop_assert_eq!(blob(&config), v.config.clone());
                let got: Vec<_> = layers.iter().map(|(b, _)| blob(b)).collect();
                prop_assert_eq!(got, v.layers.clone());
            }
        }
    }

    #[test]
    fn an_index_resolves_to_its_best_wasm_entry(
        entries in prop::collection::vec((platform(), valid_digest()), 1..6),
        docker in any::<bool>(),
    ) {
        let media_type = if docker {
            super::DOCKER_LIST
        } else {
            super::OCI_INDEX
        };
        let doc = json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": entries.iter().map(|(p, d)| json!({
                "mediaType": OCI_MANIFEST_MEDIA_TYPE, "digest": d, "size": 100, "platform": p,
            })).collect::<Vec<_>>(),
        });
        let top = parse_manifest(REFERENCE, &serde_json::to_vec(&doc).unwrap()).unwrap();
        let rank = |p: &Value| match (p["os"].as_str().unwrap(), p["architecture"].as_str().unwrap()) {
            ("wasip2", _) => Some(0),
            ("wasip1", _) => Some(1),
            ("wasi", _) => Some(2),
            (_, "wasm" | "wasm32") => Some(3),
            _ => None,
        };
        let best = entries
            .iter()
            .filter_map(|(p, d)| Some((rank(p)?, d)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, d)| d.clone());
        match (index_entry(REFERENCE, &top), best) {
            (Ok(Some(got)), Some(want)) => prop_assert_eq!(got.as_str(), want),
            (Err(e), None) => prop_assert_eq!(kind(&e), RegistryFailure::NotWasm),
            (got, want) => prop_assert!(false, "{got:?} for {want:?}"),
        }
    }

    #[test]
    fn image_configs_read_what_they_say_and_ignore_the_rest(
        c in config(),
        noise in noise(),
        nulls in any::<bool>(),
    ) {
        let bytes = serde_json::to_vec(&config_json(&c, &noise, nulls)).unwrap();
        let got = parse_image_config(REFERENCE, &bytes).unwrap();
        prop_assert_eq!(got, ImageConfig {
            entrypoint: c.entrypoint.clone().unwrap_or_default(),
            cmd: c.cmd.clone().unwrap_or_default(),
            env: c.env.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            user: String::new(),
        });
    }

    #[test]
    fn image_configs_of_the_wrong_shape_are_invalid(
        field in prop::sample::select(vec!["Entrypoint", "Cmd", "Env", "WorkingDir"]),
        value in noise(),
        mutations in prop::collection::vec(mutation(), 0..3),
    ) {
        let wanted = if field == "WorkingDir" {
            value.is_string() || value.is_null()
        } else {
            value.is_null()
                || value.as_array().is_some_and(|a| a.iter().all(Value::is_string))
        };
        let mut bytes = serde_json::to_vec(&json!({ "config": { field: value } })).unwrap();
        let unmutated = mutations.is_empty();
        mutate(&mut bytes, &mutations);
        match parse_image_config(REFERENCE, &bytes) {
            Ok(_) => prop_assert!(wanted || !unmutated),
            Err(e) => {
                prop_assert!(!(wanted && unmutated), "{e}");
                prop_assert_eq!(kind(&e), RegistryFailure::Invalid);
            }
        }
    }
}

#[test]
fn an_oversized_config_is_refused_before_it_is_downloaded() {
    let doc = json!({
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": IMAGE_CONFIG_MEDIA_TYPES[0],
            "digest": format!("sha256:{}", "a".repeat(64)),
            "size": MAX_IMAGE_CONFIG + 1,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": format!("sha256:{}", "b".repeat(64)),
            "size": 1,
        }],
    });
    let manifest = parse_manifest(REFERENCE, &serde_json::to_vec(&doc).unwrap()).unwrap();
    let Err(e) = plan(REFERENCE, &manifest, u64::MAX) else {
        panic!("a config over the limit was planned");
    };
    assert_eq!(kind(&e), RegistryFailure::TooLarge, "{e}");
}

#[test]
fn a_bad_digest_in_a_later_layer_is_refused_before_any_download() {
    let layer = |d: &str| json!({ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 1 });
    let good = format!("sha256:{}", "b".repeat(64));
    let doc = json!({
        "config": { "mediaType": IMAGE_CONFIG_MEDIA_TYPES[1], "digest": good, "size": 2 },
        "layers": [layer(&good), layer(&good), layer("sha256:../../../etc/passwd")],
    });
    let manifest = parse_manifest(REFERENCE, &serde_json::to_vec(&doc).unwrap()).unwrap();
    let Err(e) = plan(REFERENCE, &manifest, MAX_BLOB) else {
        panic!("a bad digest was planned");
    };
    assert_eq!(kind(&e), RegistryFailure::Invalid, "{e}");
}

#[test]
fn an_index_entry_digest_must_be_sha256() {
    let doc = json!({
        "mediaType": super::OCI_INDEX,
        "manifests": [{
            "digest": format!("sha512:{}", "c".repeat(128)), "size": 1,
            "platform": { "os": "wasip1", "architecture": "wasm" },
        }],
    });
    let top = parse_manifest(REFERENCE, &serde_json::to_vec(&doc).unwrap()).unwrap();
    let e = index_entry(REFERENCE, &top).unwrap_err();
    assert_eq!(kind(&e), RegistryFailure::Invalid, "{e}");
}

#[test]
fn deep_or_huge_configs_are_errors_or_read_not_crashes() {
    let nested = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    // Skipped where wasmlet does not look, refused where it does.
    let ignored = format!("{{\"config\":{{\"X\":{nested}}}}}");
    let c = parse_image_config(REFERENCE, ignored.as_bytes()).unwrap();
    assert_eq!(c, ImageConfig::default());
    let read = format!("{{\"config\":{{\"Env\":{nested}}}}}");
    let e = parse_image_config(REFERENCE, read.as_bytes()).unwrap_err();
    assert_eq!(kind(&e), RegistryFailure::Invalid, "{e}");
    let deep = "[".repeat(100_000);
    assert!(parse_manifest(REFERENCE, deep.as_bytes()).is_err());
    // A config at the size limit is read in one piece.
    let long = "x".repeat(MAX_IMAGE_CONFIG as usize - 100);
    let bytes = serde_json::to_vec(&json!({ "config": { "Env": [format!("A={long}")] } })).unwrap();
    assert!(bytes.len() as u64 <= MAX_IMAGE_CONFIG);
    let c = parse_image_config(REFERENCE, &bytes).unwrap();
    assert_eq!(c.env[0].len(), long.len() + 2);
}
