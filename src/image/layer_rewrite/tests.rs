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

/// One raw 512-byte header (GNU format, so 'L', 'K' and 'S' are what they claim).
fn raw_header(name: &[u8], kind: EntryType, size: u64) -> Vec<u8> {
    let mut h = Header::new_gnu();
    set_name(&mut h, name);
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// `data` padded to whole 512-byte blocks.
fn blocks(data: &[u8]) -> Vec<u8> {
    let mut v = data.to_vec();
    v.resize(data.len().div_ceil(512) * 512, 0);
    v
}

fn hostile_in(input: impl Read) -> String {
    match rewrite(input, io::sink()) {
        Err(RewriteError::Hostile(m)) => m,
        Err(e) => panic!("expected a rejection, got {e}"),
        Ok(s) => panic!("expected a rejection, got {s:?}"),
    }
}

#[test]
fn extension_headers_are_refused_by_their_claimed_size_before_being_read() {
    // 512 MiB of zeros behind a PAX header: refused at its header, none of it buffered (the
    // tar crate alone read it all into memory).
    let huge = 512u64 << 20;
    let pax = raw_header(b"././@PaxHeader", EntryType::XHeader, huge);
    let m = hostile_in(io::Cursor::new(pax).chain(io::repeat(0).take(huge)));
    assert!(m.contains("PAX header of 536870912 bytes"), "{m}");
    for kind in [EntryType::GNULongName, EntryType::GNULongLink] {
        let long = raw_header(b"././@LongLink", kind, 1 << 20);
        let m = hostile_in(io::Cursor::new(long).chain(io::repeat(b'a').take(1 << 20)));
        assert!(m.contains("GNU long") && m.contains("65536 allowed"), "{m}");
    }
}

#[test]
fn sparse_files_are_refused() {
    let mut tar = raw_header(b"holes", EntryType::GNUSparse, 0);
    tar.extend(vec![0; 1024]);
    let m = hostile_in(&tar[..]);
    assert!(m.contains("\"holes\" is a sparse file"), "{m}");
    // The PAX flavours of sparse files (GNU.sparse.* records) too.
    let mut records = Vec::new();
    pax_record(&mut records, "GNU.sparse.major", b"1");
    let mut tar = raw_header(b"././@PaxHeader", EntryType::XHeader, records.len() as u64);
    tar.extend(blocks(&records));
    tar.extend(raw_header(b"holes", EntryType::Regular, 0));
    tar.extend(vec![0; 1024]);
    assert!(hostile_in(&tar[..]).contains("sparse"));
}

#[test]
fn a_pax_size_over_a_zero_header_size_is_the_files_size() {
    // How Go's archive/tar and Python's tarfile write a file too big for the header's field.
    let data = b"hello, world";
    let mut records = Vec::new();
    pax_record(&mut records, "size", data.len().to_string().as_bytes());
    pax_record(&mut records, "path", b"dir/a-long-name");
    let mut tar = raw_header(b"././@PaxHeader", EntryType::XHeader, records.len() as u64);
    tar.extend(blocks(&records));
    tar.extend(raw_header(b"short", EntryType::Regular, 0));
    tar.extend(blocks(data));
    tar.extend(raw_header(b"after", EntryType::Regular, 3));
    tar.extend(blocks(b"abc"));
    tar.extend(vec![0; 1024]);
    let mut out = Vec::new();
    rewrite(&tar[..], &mut out).unwrap();
    let mut a = tar::Archive::new(&out[..]);
    let mut files = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut body = Vec::new();
        e.read_to_end(&mut body).unwrap();
        files.push((String::from_utf8_lossy(&e.path_bytes()).into_owned(), body));
    }
    files.retain(|(p, _)| !p.ends_with('/'));
    assert_eq!(
        files,
        [
            ("dir/a-long-name".to_string(), data.to_vec()),
            ("after".to_string(), b"abc".to_vec())
        ]
    );
    // A PAX size and a different non-zero header size: two readings of one tar.
    let mut tar = raw_header(b"././@PaxHeader", EntryType::XHeader, records.len() as u64);
    tar.extend(blocks(&records));
    tar.extend(raw_header(b"short", EntryType::Regular, 3));
    tar.extend(blocks(data));
    assert!(hostile_in(&tar[..]).contains("a header size of 3"));
}

#[test]
fn extension_headers_must_describe_an_entry() {
    let mut tar = raw_header(b"././@LongLink", EntryType::GNULongName, 4);
    tar.extend(blocks(b"name"));
    tar.extend(vec![0; 1024]);
    assert!(hostile_in(&tar[..]).contains("describe no entry"));
    let mut tar = Vec::new();
    for _ in 0..2 {
        tar.extend(raw_header(b"././@LongLink", EntryType::GNULongName, 4));
        tar.extend(blocks(b"name"));
    }
    assert!(hostile_in(&tar[..]).contains("two GNU long names"));
}

#[test]
fn deep_paths_cannot_take_unbounded_memory() {
    // Every ancestor of a path is kept: a 4 KB path 2,000 directories deep costs 4 MB, and 200
    // such entries took 900 MiB. Now the layer is refused once its checks hold 256 MiB.
    let deep = "a/".repeat(2000);
    let paths: Vec<Vec<u8>> = (0..200)
        .map(|i| format!("{i}/{}", &deep[..deep.len() - 10]).into_bytes())
        .collect();
    let entries: Vec<In<'_>> = paths.iter().map(|p| ent(p, EntryType::Fifo)).collect();
    let m = hostile_msg(&entries);
    assert!(m.contains("more than 256 MiB of memory to check"), "{m}");
}

#[test]
fn a_layer_over_its_data_cap_is_refused_naming_the_setting() {
    let tar = layer(&[
        In {
            data: &[1; 600],
            ..ent(b"a", EntryType::Regular)
        },
        In {
            data: &[2; 600],
            ..ent(b"b", EntryType::Regular)
        },
    ]);
    let mut out = TarWriter::new(io::sink());
    let mut rw = Rewriter::new(&mut out, None);
    rw.max_data = Some(1000);
    match rw.run(&tar[..]) {
        Err(RewriteError::Hostile(m)) => {
            assert!(
                m.contains("more than 1000 bytes") && m.contains("\"b\""),
                "{m}"
            );
            assert!(m.contains(MAX_LAYER_SIZE_VAR), "{m}");
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn names_with_nul_bytes_are_refused() {
    // Through a PAX path and through a GNU long name (a header's own name ends at its NUL).
    let mut records = Vec::new();
    pax_record(&mut records, "path", b"etc/pass\0wd");
    let mut tar = raw_header(b"././@PaxHeader", EntryType::XHeader, records.len() as u64);
    tar.extend(blocks(&records));
    tar.extend(raw_header(b"x", EntryType::Regular, 0));
    tar.extend(vec![0; 1024]);
    assert!(hostile_in(&tar[..]).contains("contains a NUL byte"));
    let name = b"etc/shadow\0-not-really\0";
    let mut tar = raw_header(b"././@LongLink", EntryType::GNULongName, name.len() as u64);
    tar.extend(blocks(name));
    tar.extend(raw_header(b"x", EntryType::Regular, 0));
    tar.extend(vec![0; 1024]);
    assert!(hostile_in(&tar[..]).contains("contains a NUL byte"));
    // A long name's own terminating NUL is fine.
    let name = b"a/long/enough/name\0";
    let mut tar = raw_header(b"././@LongLink", EntryType::GNULongName, name.len() as u64);
    tar.extend(blocks(name));
    tar.extend(raw_header(b"x", EntryType::Regular, 0));
    tar.extend(vec![0; 1024]);
    let mut out = Vec::new();
    rewrite(&tar[..], &mut out).unwrap();
    assert!(read_back(&out).iter().any(|e| e.0 == "a/long/enough/name"));
}

#[test]
fn hard_links_are_counted_by_what_they_keep() {
    // One long file, then links to it through a one-byte name: each link keeps the file's
    // 4 KB path twice, so these must reach the cap (counted by the link's own target, they
    // were ~140 bytes each and 1.9 million fit, about 15 GiB).
    let long = format!("{}{}/f", "d".repeat(200), "/e".repeat(1900));
    let mut entries = vec![ent(long.as_bytes(), EntryType::Regular)];
    let names: Vec<String> = (0..40_000).map(|i| format!("l{i}")).collect();
    entries.push(In {
        link: long.as_bytes(),
        ..ent(b"a", EntryType::Link)
    });
    for n in &names {
        entries.push(In {
            link: b"a",
            ..ent(n.as_bytes(), EntryType::Link)
        });
    }
    let m = hostile_msg(&entries);
    assert!(m.contains("memory to check"), "{m}");
}

#[test]
fn data_claimed_by_any_member_counts_toward_the_cap() {
    let tar = layer(&[In {
        data: &[0; 3000],
        ..ent(b"dir", EntryType::Directory)
    }]);
    match rewrite_capped(&tar[..], io::sink(), 1000) {
        Err(RewriteError::Hostile(m)) => assert!(m.contains("more than 1000 bytes"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}
