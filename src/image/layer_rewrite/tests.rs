//! The rewrite alone, tar in and tar out, read back with the tar crate.

use super::*;

/// One input entry: raw path bytes, type, data or link target, PAX records.
struct In<'a> {
    path: &'a [u8],
    kind: EntryType,
    data: &'a [u8],
    link: &'a [u8],
    pax: &'a [(&'a str, &'a [u8])],
}

fn ent<'a>(path: &'a [u8], kind: EntryType) -> In<'a> {
    In {
        path,
        kind,
        data: b"",
        link: b"",
        pax: &[],
    }
}

/// Builds a tar from raw headers (the tar crate's Builder would refuse hostile names).
fn layer(entries: &[In<'_>]) -> Vec<u8> {
    let mut out = TarWriter::new(Vec::new());
    for e in entries {
        let mut meta = Meta {
            mode: if e.kind == EntryType::Directory {
                0o755
            } else {
                0o644
            },
            ..Meta::default()
        };
        meta.xattrs = e
            .pax
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        let link = (!e.link.is_empty()).then_some(e.link);
        let mut data = e.data;
        let size = e.data.len() as u64;
        out.write(e.path, e.kind, &meta, link, (1, 3), size, Some(&mut data))
            .unwrap();
    }
    out.finish().unwrap();
    out.w
}

/// An output entry: path, type byte, link target, xattrs.
type Out = (String, char, String, Vec<(String, Vec<u8>)>);

/// Each output entry.
fn read_back(tar: &[u8]) -> Vec<Out> {
    let mut a = tar::Archive::new(tar);
    let mut v = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let t = e.header().entry_type().as_byte() as char;
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let mut x = Vec::new();
        if let Some(p) = e.pax_extensions().unwrap() {
            for r in p {
                let r = r.unwrap();
                if let Some(k) = r.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    x.push((k.to_string(), r.value_bytes().to_vec()));
                }
            }
        }
        v.push((path, t, link, x));
    }
    v
}

fn run(entries: &[In<'_>]) -> Result<(Vec<Out>, Summary), RewriteError> {
    let mut out = Vec::new();
    let s = rewrite(&layer(entries)[..], &mut out)?;
    Ok((read_back(&out), s))
}

fn hostile_msg(entries: &[In<'_>]) -> String {
    match run(entries) {
        Err(RewriteError::Hostile(m)) => m,
        other => panic!("expected a rejection, got {:?}", other.map(|r| r.0)),
    }
}

#[test]
fn whiteouts_become_char_devices_and_opaque_markers_xattrs() {
    let (out, s) = run(&[
        ent(b"etc/", EntryType::Directory),
        ent(b"etc/.wh.gone", EntryType::Regular),
        ent(b"etc/app/.wh..wh..opq", EntryType::Regular),
        In {
            data: b"new",
            ..ent(b"etc/app/new", EntryType::Regular)
        },
        ent(b".wh..wh.plnk", EntryType::Regular),
    ])
    .unwrap();
    let find = |p: &str| {
        out.iter()
            .find(|e| e.0 == p)
            .unwrap_or_else(|| panic!("{p} missing from {out:?}"))
    };
    assert_eq!(find("etc/gone").1, '3');
    assert_eq!(find("etc/app").1, '5');
    assert_eq!(
        find("etc/app").3,
        vec![("trusted.overlay.opaque".to_string(), b"y".to_vec())]
    );
    assert_eq!(find("etc/app/new").1, '0');
    assert!(out.iter().all(|e| !e.0.contains(".wh.")), "{out:?}");
    assert_eq!((s.whiteouts, s.opaque_dirs), (1, 1));
    // Files first, then the held-back whiteouts and directories, each directory once.
    let etc: Vec<_> = out.iter().filter(|e| e.0 == "etc").collect();
    assert_eq!(etc.len(), 1);
}

#[test]
fn a_whiteout_next_to_a_new_entry_of_the_same_name_hides_only_lower_layers() {
    let (out, _) = run(&[
        ent(b".wh.f", EntryType::Regular),
        In {
            data: b"x",
            ..ent(b"f", EntryType::Regular)
        },
        ent(b".wh.d", EntryType::Regular),
        ent(b"d/x", EntryType::Regular),
    ])
    .unwrap();
    let f: Vec<_> = out.iter().filter(|e| e.0 == "f").collect();
    assert_eq!((f.len(), f[0].1), (1, '0'));
    let d = out.iter().find(|e| e.0 == "d").unwrap();
    assert_eq!(
        (d.1, d.3.len()),
        ('5', 1),
        "a replaced directory must be opaque"
    );
}

#[test]
fn paths_are_normalised() {
    let (out, _) = run(&[
        ent(b"/abs/file", EntryType::Regular),
        ent(b"./a/./b/../c", EntryType::Regular),
        ent(b"x//y", EntryType::Regular),
    ])
    .unwrap();
    let paths: Vec<&str> = out.iter().map(|e| e.0.as_str()).collect();
    assert!(
        paths.contains(&"abs/file") && paths.contains(&"a/c") && paths.contains(&"x/y"),
        "{paths:?}"
    );
}

#[test]
fn hostile_entries_are_rejected() {
    assert!(hostile_msg(&[ent(b"../../etc/passwd", EntryType::Regular)]).contains("climbs above"));
    assert!(hostile_msg(&[ent(b"a/../../x", EntryType::Regular)]).contains("climbs above"));
    let m = hostile_msg(&[
        In {
            link: b"/etc",
            ..ent(b"evil", EntryType::Symlink)
        },
        ent(b"evil/passwd", EntryType::Regular),
    ]);
    assert!(m.contains("not a directory"), "{m}");
    let m = hostile_msg(&[In {
        link: b"/etc/shadow",
        ..ent(b"h", EntryType::Link)
    }]);
    assert!(m.contains("hard link"), "{m}");
    let m = hostile_msg(&[In {
        link: b"../../../etc/shadow",
        ..ent(b"h", EntryType::Link)
    }]);
    assert!(m.contains("climbs above"), "{m}");
    let long = [b'n'; 256];
    assert!(hostile_msg(&[ent(&long, EntryType::Regular)]).contains("longer than 255"));
    assert!(
        hostile_msg(&[ent(b"f", EntryType::Regular), ent(b"f", EntryType::Regular)])
            .contains("twice")
    );
    assert!(hostile_msg(&[
        ent(b"d/", EntryType::Directory),
        ent(b"d", EntryType::Regular)
    ])
    .contains("both"));
    assert!(hostile_msg(&[ent(b"a/.wh..", EntryType::Regular)]).contains("whiteout"));
    assert!(hostile_msg(&[ent(b"/", EntryType::Regular)]).contains("root"));
}

#[test]
fn hard_links_to_earlier_files_and_odd_names_are_kept() {
    let odd: &[u8] = b"we ird/new\nline/\xff\xfe-bytes";
    let deep: Vec<u8> = [[b'p'; 200].as_slice(); 6].join(&b'/');
    let (out, _) = run(&[
        In {
            data: b"x",
            ..ent(b"f", EntryType::Regular)
        },
        In {
            link: b"/f",
            ..ent(b"h", EntryType::Link)
        },
        ent(odd, EntryType::Regular),
        ent(&deep, EntryType::Regular),
        In {
            link: b"../../../../etc/passwd",
            ..ent(b"rel", EntryType::Symlink)
        },
    ])
    .unwrap();
    let h = out.iter().find(|e| e.0 == "h").unwrap();
    assert_eq!((h.1, h.2.as_str()), ('1', "f"));
    assert!(out
        .iter()
        .any(|e| e.0.as_bytes() == String::from_utf8_lossy(odd).as_bytes()));
    assert!(
        out.iter().any(|e| e.0.len() == deep.len()),
        "long paths survive through PAX"
    );
    let rel = out.iter().find(|e| e.0 == "rel").unwrap();
    assert_eq!(
        rel.2, "../../../../etc/passwd",
        "symlink targets are kept verbatim: they resolve in the guest"
    );
}

#[test]
fn overlay_xattrs_of_the_layer_itself_are_dropped() {
    let (out, s) = run(&[In {
        pax: &[
            ("trusted.overlay.redirect", b"/etc"),
            ("user.keep", b"1"),
            ("trusted.overlay.opaque", b"y"),
        ],
        ..ent(b"d/", EntryType::Directory)
    }])
    .unwrap();
    let d = out.iter().find(|e| e.0 == "d").unwrap();
    assert_eq!(d.3, vec![("user.keep".to_string(), b"1".to_vec())]);
    assert_eq!(s.dropped_overlay_xattrs, 2);
}

#[test]
fn corrupt_input_is_an_input_error() {
    let mut tar = layer(&[In {
        data: b"hello",
        ..ent(b"f", EntryType::Regular)
    }]);
    tar[100] ^= 0xff; // the mode field: checksum no longer matches
    assert!(matches!(
        rewrite(&tar[..], Vec::new()),
        Err(RewriteError::Input(_))
    ));
    let tar = layer(&[In {
        data: &[7; 2000],
        ..ent(b"f", EntryType::Regular)
    }]);
    assert!(matches!(
        rewrite(&tar[..1024], Vec::new()),
        Err(RewriteError::Input(_))
    ));
}

#[test]
fn pax_record_lengths_count_themselves() {
    for n in [0, 1, 5, 80, 95, 96, 97, 990, 9990] {
        let mut out = Vec::new();
        pax_record(&mut out, "k", &vec![b'v'; n]);
        let sp = out.iter().position(|&b| b == b' ').unwrap();
        let len: usize = std::str::from_utf8(&out[..sp]).unwrap().parse().unwrap();
        assert_eq!(len, out.len(), "value of {n} bytes");
    }
}
