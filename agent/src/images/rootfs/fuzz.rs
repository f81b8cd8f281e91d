//! Property tests: hostile and mangled tar layers never panic, never touch
//! anything outside the destination, stay within the limits, and fail with
//! a typed refusal. Failing inputs are kept in
//! `agent/proptest-regressions/images/rootfs/fuzz.txt`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tar::{EntryType, Header};

use super::{Compression, Limits, RootfsError, symlink_stays_inside, unpack};

const LIMITS: Limits = Limits {
    max_bytes: 8 * 1024,
    max_entries: 24,
};

/// How an entry's long path or link name is carried.
#[derive(Clone, Copy, Debug)]
enum Long {
    /// Cut to the 100 bytes of the header field.
    Cut,
    /// A GNU `L`/`K` record before the entry.
    Gnu,
    /// A PAX `x` record before the entry.
    Pax,
}

/// One tar entry, written byte by byte so nothing the `tar` builder would
/// refuse (`..`, absolute paths) is off limits.
#[derive(Clone, Debug)]
struct Raw {
    kind: EntryType,
    path: String,
    link: String,
    data: Vec<u8>,
    /// The size the header claims, if not the data's.
    declared: Option<u64>,
    /// A PAX `size` record, overriding the header's.
    pax_size: Option<u64>,
    long: Long,
    /// Link to an earlier entry of the layer, not to `link`.
    earlier: Option<prop::sample::Index>,
}

fn block_pad(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn header(kind: EntryType, name: &[u8], link: &[u8], size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(size);
    let gnu = h.as_gnu_mut().expect("a GNU header");
    let n = name.len().min(gnu.name.len());
    gnu.name[..n].copy_from_slice(&name[..n]);
    let n = link.len().min(gnu.linkname.len());
    gnu.linkname[..n].copy_from_slice(&link[..n]);
    h.set_cksum();
    h
}

fn record(out: &mut Vec<u8>, kind: EntryType, name: &[u8], data: &[u8]) {
    out.extend_from_slice(header(kind, name, b"", data.len() as u64).as_bytes());
    out.extend_from_slice(data);
    block_pad(out);
}

/// A PAX record `"<len> key=value\n"`, whose length counts itself.
fn pax(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn write_raw(out: &mut Vec<u8>, e: &Raw) {
    let (path, link) = (e.path.as_bytes(), e.link.as_bytes());
    let mut records = Vec::new();
    match e.long {
        Long::Cut => {}
        Long::Gnu => {
            if path.len() >= 100 {
                record(
                    out,
                    EntryType::GNULongName,
                    b"././@LongLink",
                    &[path, b"\0"].concat(),
                );
            }
            if link.len() >= 100 {
                record(
                    out,
                    EntryType::GNULongLink,
                    b"././@LongLink",
                    &[link, b"\0"].concat(),
                );
            }
        }
        Long::Pax => {
            records.extend(pax("path", path));
            if !link.is_empty() {
                records.extend(pax("linkpath", link));
            }
        }
    }
    if let Some(size) = e.pax_size {
        records.extend(pax("size", size.to_string().as_bytes()));
    }
    if !records.is_empty() {
        record(out, EntryType::XHeader, b"PaxHeaders/x", &records);
    }
    let size = e.declared.unwrap_or(e.data.len() as u64);
    out.extend_from_slice(header(e.kind, path, link, size).as_bytes());
    out.extend_from_slice(&e.data);
    block_pad(out);
}

fn archive(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match e.earlier {
            Some(pick) if i > 0 => {
                let link = entries[pick.index(i)].path.clone();
                write_raw(&mut out, &Raw { link, ..e.clone() });
            }
            _ => write_raw(&mut out, e),
        }
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["a", "b", "c", "d"]).prop_map(str::to_owned),
        2 => Just("..".to_owned()),
        1 => prop::sample::select(vec![".", "", ".wh.a", ".wh..wh..opq", ".wh.", ".wh..", "...", "dev"])
            .prop_map(str::to_owned),
        1 => (90usize..300).prop_map(|n| "x".repeat(n)),
    ]
}

fn hostile_path() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(component(), 1..5)).prop_map(|(absolute, parts)| {
        format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"))
    })
}

fn plain_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b"]), 1..4)
        .prop_map(|parts| parts.join("/"))
}

/// Mostly names an image could have, so that hostile entries meet a tree
/// that earlier entries built; sometimes anything.
fn path() -> impl Strategy<Value = String> {
    prop_oneof![10 => plain_path(), 1 => hostile_path()]
}

/// A link target: mostly relative, climbing a little; sometimes anything.
fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        5 => (0usize..3, plain_path()).prop_map(|(up, p)| format!("{}{p}", "../".repeat(up))),
        1 => prop::sample::select(vec![".", "..", "a/..", "a/../..", ""]).prop_map(str::to_owned),
        1 => hostile_path(),
    ]
}

fn raw() -> impl Strategy<Value = Raw> {
    let kind = prop_oneof![
        6 => Just(EntryType::Regular),
        3 => Just(EntryType::Directory),
        4 => Just(EntryType::Symlink),
        3 => Just(EntryType::Link),
        1 => prop::sample::select(vec![
            EntryType::Char,
            EntryType::Block,
            EntryType::Fifo,
            EntryType::Continuous,
            EntryType::GNUSparse,
            EntryType::XGlobalHeader,
            EntryType::new(b'Z'),
        ]),
    ];
    let declared = prop_oneof![
        8 => Just(None),
        1 => (0u64..4096).prop_map(Some),
        1 => prop::sample::select(vec![u64::MAX, u64::MAX - 1024, 1 << 40, LIMITS.max_bytes + 1])
            .prop_map(Some),
    ];
    let pax_size = prop_oneof![
        8 => Just(None),
        1 => (0u64..4096).prop_map(Some),
        1 => prop::sample::select(vec![u64::MAX, 1 << 33, LIMITS.max_bytes + 1]).prop_map(Some),
    ];
    let long = prop::sample::select(vec![Long::Cut, Long::Gnu, Long::Pax]);
    (
        kind,
        path(),
        target(),
        prop::collection::vec(any::<u8>(), 0..700),
        declared,
        pax_size,
        long,
        prop::option::weighted(0.3, any::<prop::sample::Index>()),
    )
        .prop_map(
            |(kind, path, link, data, declared, pax_size, long, earlier)| Raw {
                kind,
                path,
                link,
                data,
                declared,
                pax_size,
                long,
                earlier,
            },
        )
}

/// Entries an image could well have — files, directories, whiteouts,
/// symlinks and hard links to each other — so that most layers unpack and
/// the tree they leave is checked.
fn linked() -> impl Strategy<Value = Raw> {
    let kind = prop::sample::select(vec![
        EntryType::Regular,
        EntryType::Directory,
        EntryType::Symlink,
        EntryType::Symlink,
        EntryType::Link,
        EntryType::Link,
    ]);
    let path = prop_oneof![
        6 => plain_path(),
        1 => (plain_path(), prop::sample::select(vec![".wh.a", ".wh.b", ".wh..wh..opq"]))
            .prop_map(|(p, w)| format!("{p}/{w}")),
    ];
    let target = prop_oneof![
        3 => (0usize..3, plain_path()).prop_map(|(up, p)| format!("{}{p}", "../".repeat(up))),
        2 => prop::sample::select(vec![".", ".", "..", "a/..", "../a/.."]).prop_map(str::to_owned),
    ];
    (
        kind,
        path,
        target,
        prop::collection::vec(any::<u8>(), 0..64),
        prop::option::weighted(0.5, any::<prop::sample::Index>()),
    )
        .prop_map(|(kind, path, link, data, earlier)| Raw {
            kind,
            path,
            link,
            data,
            declared: None,
            pax_size: None,
            long: Long::Cut,
            earlier,
        })
}

/// A directory tree as (kind, size, links, contents) per path, not
/// following symlinks. A directory's size and links change with what is
/// made in it, so they are left out.
type Snapshot = BTreeMap<PathBuf, (String, u64, u64, Vec<u8>)>;

fn snapshot(root: &Path, skip: &Path) -> Snapshot {
    let mut out = BTreeMap::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            if path == skip {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let ty = meta.file_type();
            let contents = if ty.is_file() {
                std::fs::read(&path).unwrap()
            } else if ty.is_symlink() {
                std::fs::read_link(&path)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else {
                Vec::new()
            };
            let (len, nlink) = if ty.is_dir() {
                pending.push(path.clone());
                (0, 0)
            } else {
                (meta.len(), meta.nlink())
            };
            out.insert(path, (format!("{ty:?}"), len, nlink, contents));
        }
    }
    out
}

/// Unpacks `layers` in a directory six levels down a fresh temporary tree
/// beside a sentinel, and checks what no layer may do.
fn check(layers: &[(Vec<u8>, Compression)]) -> Result<(), TestCaseError> {
    let top = tempfile::tempdir().unwrap();
    let work = top.path().join("1/2/3/4/5/6/work");
    std::fs::create_dir_all(work.join("outside")).unwrap();
    std::fs::write(work.join("outside/secret"), b"sentinel").unwrap();
    std::fs::create_dir_all(work.join("layers")).unwrap();
    let mut blobs = Vec::new();
    for (i, (bytes, compression)) in layers.iter().enumerate() {
        let blob = work.join("layers").join(format!("l{i}"));
        std::fs::write(&blob, bytes).unwrap();
        blobs.push((blob, *compression));
    }
    let dest = work.join("root");
    let before = snapshot(top.path(), &dest);

    let result = unpack(&blobs, &dest, LIMITS);

    let after = snapshot(top.path(), &dest);
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    prop_assert!(changed.is_empty(), "changed outside the root: {changed:?}");
    match result {
        Err(err) => {
            prop_assert!(
                matches!(
                    err,
                    RootfsError::Entry { .. }
                        | RootfsError::Layer { .. }
                        | RootfsError::StreamTooLarge { .. }
                ) && err.is_refusal(),
                "not a refusal of the image: {err:?}"
            );
            prop_assert!(!err.to_string().is_empty());
            prop_assert!(!dest.exists(), "a partial root is left: {err}");
        }
        Ok(()) => {
            let inside = snapshot(&dest, Path::new(""));
            prop_assert!(
                inside.len() as u64 <= LIMITS.max_entries,
                "{} entries",
                inside.len()
            );
            let mut bytes = BTreeMap::new();
            for (path, (kind, len, _, contents)) in &inside {
                let relative = path.strip_prefix(&dest).unwrap();
                let meta = std::fs::symlink_metadata(path).unwrap();
                let ty = meta.file_type();
                prop_assert!(
                    ty.is_dir() || ty.is_file() || ty.is_symlink(),
                    "{relative:?} is a {kind}"
                );
                if ty.is_symlink() {
                    let target = Path::new(std::ffi::OsStr::from_bytes(contents));
                    prop_assert!(
                        symlink_stays_inside(relative, target),
                        "{relative:?} -> {target:?} leaves the root"
                    );
                }
                if ty.is_file() {
                    bytes.insert(meta.ino(), *len);
                }
            }
            let total: u64 = bytes.values().sum();
            prop_assert!(total <= LIMITS.max_bytes, "{total} bytes unpacked");
        }
    }
    let parent: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("partial"))
        .collect();
    prop_assert!(parent.is_empty(), "left behind: {parent:?}");
    Ok(())
}

fn layer(entries: &[Raw], gz: bool) -> (Vec<u8>, Compression) {
    let bytes = archive(entries);
    if gz {
        (gzip(&bytes), Compression::Gzip)
    } else {
        (bytes, Compression::None)
    }
}

/// A well-formed archive built with `tar::Builder`, for mutating.
fn valid_archive(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(EntryType::Regular);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "a/link", "../b").unwrap();
    b.into_inner().unwrap()
}

#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
}

fn mutate(bytes: &mut Vec<u8>, mutations: &[Mutation]) {
    for m in mutations {
        if bytes.is_empty() {
            return;
        }
        match m {
            Mutation::Set(i, v) => {
                let i = i % bytes.len();
                bytes[i] = *v;
            }
            Mutation::Truncate(i) => bytes.truncate(i % bytes.len()),
            Mutation::Insert(i, data) => {
                let i = i % bytes.len();
                bytes.splice(i..i, data.iter().copied());
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        8 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::Set(i, v)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..600))
            .prop_map(|(i, d)| Mutation::Insert(i, d)),
    ]
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
    #![proptest_config(cases(192))]

    #[test]
    fn hostile_layers_stay_inside_and_within_limits(
        layers in prop::collection::vec(
            (prop::collection::vec(raw(), 1..10), any::<bool>()),
            1..3,
        ),
    ) {
        let layers: Vec<_> = layers.iter().map(|(e, gz)| layer(e, *gz)).collect();
        check(&layers)?;
    }

    #[test]
    fn linked_entries_leave_no_way_out(
        layers in prop::collection::vec(prop::collection::vec(linked(), 1..12), 1..3),
    ) {
        let layers: Vec<_> = layers.iter().map(|e| layer(e, false)).collect();
        check(&layers)?;
    }

    #[test]
    fn mangled_archives_are_refused_or_unpacked_safely(
        files in prop::collection::vec(
            ("[a-c]{1,2}(/[a-c]{1,2}){0,2}", prop::collection::vec(any::<u8>(), 0..600)),
            1..5,
        ),
        mutations in prop::collection::vec(mutation(), 1..6),
        gz in any::<bool>(),
    ) {
        let mut bytes = valid_archive(&files);
        let compression = if gz {
            bytes = gzip(&bytes);
            Compression::Gzip
        } else {
            Compression::None
        };
        mutate(&mut bytes, &mutations);
        check(&[(bytes, compression)])?;
    }
}

fn entry(kind: EntryType, path: &str, link: &str, data: &[u8]) -> Raw {
    Raw {
        kind,
        path: path.to_owned(),
        link: link.to_owned(),
        data: data.to_vec(),
        declared: None,
        pax_size: None,
        long: Long::Pax,
        earlier: None,
    }
}

fn refusal(layers: &[(Vec<u8>, Compression)]) -> RootfsError {
    let dir = tempfile::tempdir().unwrap();
    let mut blobs = Vec::new();
    for (i, (bytes, compression)) in layers.iter().enumerate() {
        let blob = dir.path().join(format!("l{i}"));
        std::fs::write(&blob, bytes).unwrap();
        blobs.push((blob, *compression));
    }
    unpack(&blobs, &dir.path().join("root"), LIMITS).unwrap_err()
}

#[test]
fn a_pax_size_counts_not_the_header_size() {
    let mut big = entry(EntryType::Regular, "big", "", &[7; 16 * 1024]);
    big.declared = Some(0);
    big.pax_size = Some(16 * 1024);
    let err = refusal(&[layer(&[big], false)]);
    assert!(err.is_too_large(), "{err:?}");
}

#[test]
fn a_hard_link_to_a_symlink_cannot_move_it_out_of_reach() {
    let err = refusal(&[layer(
        &[
            entry(EntryType::Directory, "a/b", "", b""),
            entry(EntryType::Symlink, "a/b/up", "../../x", b""),
            entry(EntryType::Link, "up", "a/b/up", b""),
        ],
        false,
    )]);
    assert!(err.to_string().contains("leaves the image root"), "{err}");
}

#[test]
fn a_symlink_below_a_symlink_is_judged_where_it_lands() {
    let err = refusal(&[layer(
        &[
            entry(EntryType::Symlink, "here", ".", b""),
            entry(EntryType::Symlink, "here/here/l", "../../x", b""),
        ],
        false,
    )]);
    assert!(err.to_string().contains("leaves the image root"), "{err}");
}

#[test]
fn deep_paths_count_their_directories() {
    let deep = vec!["d"; 40].join("/") + "/f";
    let err = refusal(&[layer(&[entry(EntryType::Regular, &deep, "", b"x")], false)]);
    assert!(err.is_too_large(), "{err:?}");
}

#[test]
fn a_gzip_bomb_in_a_long_name_ends_in_an_error() {
    // A GNU long name record claiming 64 MiB of zeros: the tar reader
    // would hold it all in memory.
    let mut tar = Vec::new();
    let size = 64 * 1024 * 1024;
    tar.extend_from_slice(header(EntryType::GNULongName, b"././@LongLink", b"", size).as_bytes());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let zeros = vec![0u8; 1024 * 1024];
    for _ in 0..64 {
        gz.write_all(&zeros).unwrap();
    }
    let started = std::time::Instant::now();
    let err = refusal(&[(gz.finish().unwrap(), Compression::Gzip)]);
    assert!(
        matches!(err, RootfsError::StreamTooLarge { .. }) && err.is_too_large(),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn a_pax_global_header_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let blob = dir.path().join("l");
    let mut global = entry(
        EntryType::XGlobalHeader,
        "pax_global_header",
        "",
        &pax("comment", b"x"),
    );
    global.long = Long::Cut;
    std::fs::write(
        &blob,
        archive(&[global, entry(EntryType::Regular, "f", "", b"x")]),
    )
    .unwrap();
    let dest = dir.path().join("root");
    unpack(&[(blob, Compression::None)], &dest, LIMITS).unwrap();
    assert!(dest.join("f").is_file());
}
