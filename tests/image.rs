//! The image store end to end: loading OCI layouts, oci-archives and docker archives, converting
//! layers to squashfs (whiteouts, hostile entries), concurrency, crash safety, prune and the CLI.

mod common;
mod image_fixtures;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image_fixtures::*;
use microvm::image::{Error, Store};

fn microvm(root: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_microvm"));
    c.env("MICROVM_ROOT", root);
    c
}

fn tools_or_skip(test: &str) -> bool {
    ["tar2sqfs", "rdsquashfs", "unsquashfs"]
        .iter()
        .all(|t| tool_or_skip(test, t))
}

fn store(dir: &TempDir) -> Store {
    Store::open(&dir.join("store"))
        .unwrap()
        .with_progress(false)
}

/// A one-image layout at `dir/NAME` with the given layers; returns its path.
fn layout(dir: &TempDir, name: &str, layers: &[(Vec<u8>, &str)]) -> PathBuf {
    let path = dir.join(name);
    let mut l = Layout::new(&path);
    let m = l.image("amd64", layers, &["/bin/sh"]);
    l.add(m, Some("latest"), None);
    l.finish();
    path
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("bin/")
        .file("bin/tool", b"#!/bin/sh\necho tool\n")
        .dir("etc/")
        .file("etc/gone", b"gone")
        .dir("etc/app/")
        .file("etc/app/old", b"old")
        .tar()
}

#[test]
fn umoci_layout_loads_with_its_run_config_and_whiteouts() {
    let test = "umoci_layout_loads_with_its_run_config_and_whiteouts";
    if !tools_or_skip(test) || !tool_or_skip(test, "umoci") {
        return;
    }
    let dir = TempDir::new("umoci");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make-test-images.sh");
    let out = Command::new(script).arg(dir.join("imgs")).output().unwrap();
    assert!(
        out.status.success(),
        "make-test-images.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = store(&dir);
    for reference in [
        format!("oci:{}", dir.join("imgs/demo").display()),
        format!(
            "oci-archive:{}:latest",
            dir.join("imgs/demo.oci.tar").display()
        ),
    ] {
        let img = s.load(&reference).unwrap();
        assert_eq!(img.name, "demo:latest", "{reference}");
        assert_eq!(img.config.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(img.config.cmd, ["echo hello"]);
        assert_eq!(img.config.env, ["PATH=/bin", "GREETING=hi"]);
        assert_eq!(
            (img.config.working_dir.as_str(), img.config.user.as_str()),
            ("/work", "1000:1000")
        );
        assert_eq!(img.layers.len(), 2);
        let images = s.layer_images(&img).unwrap();
        let lower = listing(&images[0]);
        assert!(
            line_of(&lower, "bin/busybox").unwrap().starts_with("-rwx"),
            "{lower}"
        );
        assert!(line_of(&lower, "bin/sh").unwrap().contains("-> busybox"));
        assert!(line_of(&lower, "tmp").unwrap().starts_with("drwxrwxrwt"));
        let upper = listing(&images[1]);
        for gone in ["etc/gone", "etc/app/old", "etc/app/keep"] {
            let l = line_of(&upper, gone).unwrap_or_else(|| panic!("{gone} not in {upper}"));
            assert!(l.starts_with("c---------") && l.contains(" 0,  0 "), "{l}");
        }
        assert_eq!(cat(&images[1], "etc/app/new"), b"new\n");
    }
    assert_eq!(
        s.list().unwrap().len(),
        1,
        "both references name the image demo:latest"
    );
}

#[test]
fn oci_layout_and_archive_pick_the_tag_asked_for() {
    if !tools_or_skip("oci_layout_and_archive_pick_the_tag_asked_for") {
        return;
    }
    let dir = TempDir::new("tags");
    let path = dir.join("app");
    let mut l = Layout::new(&path);
    let v1 = l.image(
        "amd64",
        &[(Layer::new().file("v", b"1").tar(), TAR_GZ)],
        &["/one"],
    );
    let v2 = l.image(
        "amd64",
        &[(Layer::new().file("v", b"2").tar(), TAR_ZST)],
        &["/two"],
    );
    l.add(v1, Some("v1"), None);
    l.add(v2, Some("latest"), None);
    l.finish();
    tar_dir(&path, &dir.join("app.tar"));
    let s = store(&dir);
    let img = s.load(&format!("oci:{}:v1", path.display())).unwrap();
    assert_eq!(
        (img.name.as_str(), img.config.entrypoint[0].as_str()),
        ("app:v1", "/one")
    );
    let img = s
        .load(&format!("oci-archive:{}", dir.join("app.tar").display()))
        .unwrap();
    assert_eq!(
        (img.name.as_str(), img.config.entrypoint[0].as_str()),
        ("app:latest", "/two")
    );
    assert_eq!(cat(&s.layer_images(&img).unwrap()[0], "v"), b"2");
    let img = s
        .load(&format!("oci-archive:{}:v1", dir.join("app.tar").display()))
        .unwrap();
    assert_eq!(cat(&s.layer_images(&img).unwrap()[0], "v"), b"1");
    let e = s
        .load(&format!("oci:{}:v3", path.display()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no image tagged \"v3\"") && e.contains("v1, latest"),
        "{e}"
    );
    // A tag that is a full name names the image.
    let mut l = Layout::new(&dir.join("named"));
    let m = l.image(
        "amd64",
        &[(Layer::new().file("x", b"x").tar(), TAR)],
        &["/x"],
    );
    l.add(m, Some("registry.example/team/tool:2.1"), None);
    l.finish();
    let img = s
        .load(&format!("oci:{}", dir.join("named").display()))
        .unwrap();
    assert_eq!(img.name, "registry.example/team/tool:2.1");
}

#[test]
fn docker_archives_load_in_legacy_and_oci_forms() {
    if !tools_or_skip("docker_archives_load_in_legacy_and_oci_forms") {
        return;
    }
    let dir = TempDir::new("docker");
    let l1 = base_layer();
    let l2 = Layer::new()
        .dir("etc/")
        .file("etc/.wh.gone", b"")
        .file("etc/new", b"new")
        .tar();
    let l2_gz = gzip(&l2);
    let cfg = config_json("amd64", &[digest(&l1), digest(&l2)], &["/bin/tool"], &["x"]);
    let cfg_name = format!("{}.json", &digest(&cfg)[7..]);
    // Legacy `docker save`: uncompressed layer.tar per layer, a second image whose shared layer
    // is a symlink to the first one's (as docker writes it), a gzip layer (as some tools do).
    let cfg_b = config_json("amd64", &[digest(&l1)], &["/b"], &[]);
    let cfg_b_name = format!("{}.json", &digest(&cfg_b)[7..]);
    let manifest = serde_json::json!([
        {"Config": cfg_name, "RepoTags": ["docker.io/library/legacy:1.0"], "Layers": ["aaa/layer.tar", "bbb/layer.tar"]},
        {"Config": cfg_b_name, "RepoTags": ["other:2"], "Layers": ["ccc/layer.tar"]},
    ]);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let archive = dir.join("legacy.tar");
    tar_members(
        &archive,
        &[
            ("manifest.json", &manifest),
            (&cfg_name, &cfg),
            (&cfg_b_name, &cfg_b),
            ("aaa/layer.tar", &l1),
            ("bbb/layer.tar", &l2_gz),
        ],
        &[("ccc/layer.tar", "../aaa/layer.tar")],
    );
    let s = store(&dir);
    let e = s
        .load(&format!("docker-archive:{}", archive.display()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("several images") && e.contains("legacy:1.0, other:2"),
        "{e}"
    );
    let img = s
        .load(&format!("docker-archive:{}:legacy:1.0", archive.display()))
        .unwrap();
    assert_eq!(img.name, "legacy:1.0");
    assert_eq!(img.config.entrypoint, ["/bin/tool"]);
    assert_eq!(
        img.layers[0],
        digest(&l1),
        "an uncompressed layer's blob digest is its diff ID"
    );
    assert_eq!(img.layers[1], digest(&l2_gz));
    let images = s.layer_images(&img).unwrap();
    assert_eq!(cat(&images[0], "bin/tool"), b"#!/bin/sh\necho tool\n");
    let upper = listing(&images[1]);
    assert!(
        line_of(&upper, "etc/gone")
            .unwrap()
            .starts_with("c---------"),
        "{upper}"
    );
    let b = s
        .load(&format!("docker-archive:{}:@1", archive.display()))
        .unwrap();
    assert_eq!(
        (b.name.as_str(), b.layers[0].as_str()),
        ("other:2", img.layers[0].as_str())
    );
    assert_eq!(
        s.layer_images(&b).unwrap()[0],
        images[0],
        "one converted image per layer, shared"
    );
    // `docker save | gzip` output loads as it is.
    let gz = dir.join("legacy.tar.gz");
    std::fs::write(&gz, gzip(&std::fs::read(&archive).unwrap())).unwrap();
    let again = s
        .load(&format!("docker-archive:{}:other:2", gz.display()))
        .unwrap();
    assert_eq!(again, b);
    assert!(
        files_in(&dir.join("store/tmp")).is_empty(),
        "the unpacked archive is not kept"
    );
    let e = s.load(&format!(
        "docker-archive:{}",
        dir.join("missing.tar").display()
    ));
    assert!(e.unwrap_err().to_string().contains("missing.tar"));

    // The newer form (docker 25+): blobs/sha256 members, an OCI layout beside manifest.json.
    let cfg_member = format!("blobs/sha256/{}", &digest(&cfg)[7..]);
    let l1_member = format!("blobs/sha256/{}", &digest(&l1)[7..]);
    let l2_member = format!("blobs/sha256/{}", &digest(&l2_gz)[7..]);
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": cfg_member, "RepoTags": ["modern:latest"], "Layers": [l1_member, l2_member]}
    ]))
    .unwrap();
    let archive = dir.join("modern.tar");
    tar_members(
        &archive,
        &[
            ("manifest.json", &manifest),
            ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
            (&cfg_member, &cfg),
            (&l1_member, &l1),
            (&l2_member, &l2_gz),
        ],
        &[],
    );
    let img = s.load(archive.to_str().unwrap()).unwrap();
    assert_eq!(img.name, "modern:latest");
    assert_eq!(img.layers, [digest(&l1), digest(&l2_gz)]);
    let img = s
        .load(&format!("docker-archive:{}:renamed:v9", archive.display()))
        .unwrap();
    assert_eq!(img.name, "renamed:v9");
}

#[test]
fn a_corrupt_blob_is_rejected_naming_its_digest() {
    let dir = TempDir::new("corrupt");
    let layer = Layer::new().file("f", &[7u8; 10_000]).tar();
    let path = layout(&dir, "bad", &[(layer.clone(), TAR)]);
    let blob = path.join("blobs/sha256").join(&digest(&layer)[7..]);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    let s = store(&dir);
    let err = s.load(&format!("oci:{}", path.display())).unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&digest(&layer)) && msg.contains("corrupt"),
        "{msg}"
    );
    assert!(!s
        .blob_path(&microvm::image::Digest::parse(&digest(&layer)).unwrap())
        .exists());
    assert!(s.list().unwrap().is_empty(), "nothing named");
    assert!(
        files_in(&dir.join("store/blobs/sha256"))
            .iter()
            .all(|f| !f.starts_with(".tmp")),
        "temporary file left"
    );
    // A blob of the wrong size is caught by its descriptor's size.
    std::fs::write(&blob, &bytes[..bytes.len() - 1]).unwrap();
    let msg = s
        .load(&format!("oci:{}", path.display()))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("expected") && msg.contains("bytes"), "{msg}");
}

#[test]
fn truncated_archives_are_rejected() {
    let dir = TempDir::new("trunc");
    let layer = Layer::new().file("big", &vec![9u8; 200_000]).tar();
    let path = layout(&dir, "img", &[(layer, TAR)]);
    tar_dir(&path, &dir.join("img.tar"));
    let full = std::fs::read(dir.join("img.tar")).unwrap();
    let s = store(&dir);
    for cut in [full.len() / 2, full.len() - 1536, 700] {
        std::fs::write(dir.join("cut.tar"), &full[..cut]).unwrap();
        let e = s
            .load(&format!("oci-archive:{}", dir.join("cut.tar").display()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("truncated")
                || e.contains("incomplete")
                || e.contains("no index.json")
                || e.contains("not an OCI"),
            "cut at {cut}: {e}"
        );
    }
    // docker-archive, cut inside a layer.
    let l1 = Layer::new().file("a", &vec![1u8; 100_000]).tar();
    let cfg = config_json("amd64", &[digest(&l1)], &["/a"], &[]);
    let m = serde_json::to_vec(
        &serde_json::json!([{"Config": "c.json", "RepoTags": ["t:1"], "Layers": ["l/layer.tar"]}]),
    )
    .unwrap();
    tar_members(
        &dir.join("d.tar"),
        &[
            ("manifest.json", &m),
            ("c.json", &cfg),
            ("l/layer.tar", &l1),
        ],
        &[],
    );
    let full = std::fs::read(dir.join("d.tar")).unwrap();
    std::fs::write(dir.join("d-cut.tar"), &full[..full.len() - 30_000]).unwrap();
    let e = s
        .load(&format!(
            "docker-archive:{}",
            dir.join("d-cut.tar").display()
        ))
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn an_index_with_several_platforms_yields_linux_amd64_even_nested() {
    if !tools_or_skip("an_index_with_several_platforms_yields_linux_amd64_even_nested") {
        return;
    }
    let dir = TempDir::new("platforms");
    let path = dir.join("multi");
    let mut l = Layout::new(&path);
    let arm = l.image(
        "arm64",
        &[(Layer::new().file("arch", b"arm64").tar(), TAR_GZ)],
        &["/arm"],
    );
    let amd = l.image(
        "amd64",
        &[(Layer::new().file("arch", b"amd64").tar(), TAR_GZ)],
        &["/amd"],
    );
    let mut arm_p = arm.clone();
    arm_p["platform"] =
        serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let mut amd_p = amd.clone();
    amd_p["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
    let attestation = serde_json::json!({"mediaType": MANIFEST, "digest": arm["digest"], "size": arm["size"], "platform": {"os": "unknown", "architecture": "unknown"}});
    let inner = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": [arm_p, amd_p, attestation]});
    let inner = l.blob(INDEX, &serde_json::to_vec(&inner).unwrap());
    let outer = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX, "manifests": [inner]});
    let outer = l.blob(INDEX, &serde_json::to_vec(&outer).unwrap());
    l.add(outer, Some("latest"), None);
    l.finish();
    let s = store(&dir);
    let img = s.load(&format!("oci:{}", path.display())).unwrap();
    assert_eq!(img.config.entrypoint, ["/amd"]);
    assert_eq!(cat(&s.layer_images(&img).unwrap()[0], "arch"), b"amd64");

    let only_arm = dir.join("arm");
    let mut l = Layout::new(&only_arm);
    let arm = l.image("arm64", &[(Layer::new().tar(), TAR)], &["/arm"]);
    l.add(arm.clone(), Some("latest"), Some(("linux", "arm64")));
    l.add(arm, Some("latest"), Some(("linux", "s390x")));
    l.finish();
    let e = s
        .load(&format!("oci:{}", only_arm.display()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no linux/amd64 image") && e.contains("linux/arm64, linux/s390x"),
        "{e}"
    );
    // A lone manifest without a platform whose config says arm64 is refused by its config.
    let lone = dir.join("lone");
    let mut l = Layout::new(&lone);
    let arm = l.image("arm64", &[(Layer::new().tar(), TAR)], &["/arm"]);
    l.add(arm, None, None);
    l.finish();
    let e = s
        .load(&format!("oci:{}", lone.display()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("linux/arm64") && e.contains("runs linux/amd64"),
        "{e}"
    );
}

#[test]
fn whiteouts_and_opaque_directories_take_overlayfs_form() {
    if !tools_or_skip("whiteouts_and_opaque_directories_take_overlayfs_form") {
        return;
    }
    let dir = TempDir::new("whiteout");
    let upper = Layer::new()
        .dir("etc/")
        .file("etc/.wh.gone", b"")
        .entry(b"etc/app/", Kind::Dir, 0o750, &[("user.note", b"kept")])
        .file("etc/app/.wh..wh..opq", b"")
        .file("etc/app/new", b"new")
        .file(".wh.olddir", b"")
        .file("olddir/fresh", b"fresh")
        .tar();
    let path = layout(&dir, "wh", &[(base_layer(), TAR_GZ), (upper, TAR_GZ)]);
    let s = store(&dir);
    let img = s.load(&format!("oci:{}", path.display())).unwrap();
    let images = s.layer_images(&img).unwrap();
    let list = listing(&images[1]);
    let gone = line_of(&list, "etc/gone").unwrap();
    assert!(
        gone.starts_with("c---------") && gone.contains("0,  0"),
        "{gone}"
    );
    let app = line_of(&list, "etc/app").unwrap();
    assert!(
        app.starts_with("drwxr-x---"),
        "the directory keeps its own mode: {app}"
    );
    let x = xattrs(&images[1], "/etc/app");
    assert!(
        x.contains("trusted.overlay.opaque=y") && x.contains("user.note=kept"),
        "{x}"
    );
    assert!(
        xattrs(&images[1], "/olddir").contains("trusted.overlay.opaque=y"),
        "a replaced directory is opaque"
    );
    assert!(!xattrs(&images[1], "/etc").contains("opaque"));
    assert!(!list.contains(".wh."), "{list}");
    assert!(
        !listing(&images[0]).contains("c---------"),
        "lower layer has no whiteouts"
    );
}

/// Loads a one-layer image of `layer`; returns the result of converting it.
fn convert_one(dir: &TempDir, layer: Vec<u8>) -> Result<PathBuf, Error> {
    let path = layout(dir, "hostile", &[(layer, TAR)]);
    let s = store(dir);
    let img = s.load(&format!("oci:{}", path.display()))?;
    Ok(s.layer_images(&img)?.remove(0))
}

#[test]
fn hostile_absolute_paths_land_inside_the_image() {
    if !tools_or_skip("hostile_absolute_paths_land_inside_the_image") {
        return;
    }
    let dir = TempDir::new("abs");
    let host_target = dir.join("host-file");
    let layer = Layer::new()
        .file("/etc/abs-marker", b"x")
        .entry(
            host_target.to_str().unwrap().as_bytes(),
            Kind::File(b"owned"),
            0o644,
            &[],
        )
        .file("a/../b", b"b")
        .file("./c/./d", b"d")
        .tar();
    let img = convert_one(&dir, layer).unwrap();
    let list = listing(&img);
    assert!(line_of(&list, "etc/abs-marker").is_some(), "{list}");
    let rel = host_target.to_str().unwrap().trim_start_matches('/');
    assert!(line_of(&list, rel).is_some(), "{list}");
    assert!(
        line_of(&list, "b").is_some() && line_of(&list, "c/d").is_some(),
        "{list}"
    );
    assert!(!host_target.exists(), "nothing is written on the host");
    assert!(!list.contains(".."), "{list}");
}

#[test]
fn hostile_dotdot_escapes_are_rejected() {
    let dir = TempDir::new("dotdot");
    let escape = dir.join("escaped");
    let name = format!("../../../../../../../..{}", escape.display());
    let err = convert_one(
        &dir,
        Layer::new()
            .file("ok", b"")
            .entry(name.as_bytes(), Kind::File(b"x"), 0o644, &[])
            .tar(),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::HostileLayer { .. }) && msg.contains("climbs above the image's root"),
        "{msg}"
    );
    assert!(!escape.exists());
    assert!(
        files_in(&dir.join("store/layers")).is_empty(),
        "no layer image, no temporary file"
    );
}

#[test]
fn hostile_writes_through_a_symlink_are_rejected() {
    let dir = TempDir::new("symlink");
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for target in [
        "/etc".to_string(),
        outside.display().to_string(),
        "../../../../../../..".to_string(),
    ] {
        let layer = Layer::new()
            .symlink("evil", &target)
            .file("evil/passwd", b"root::0:0::/:/bin/sh")
            .tar();
        let msg = convert_one(&dir, layer).unwrap_err().to_string();
        assert!(
            msg.contains("lies beneath \"evil\", which is not a directory"),
            "{msg}"
        );
    }
    assert!(files_in(&outside).is_empty());
    // A symlink alone is fine, its target kept verbatim (it resolves inside the guest).
    let img = convert_one(
        &dir,
        Layer::new()
            .symlink("etc-link", "/etc")
            .symlink("up", "../../..")
            .tar(),
    );
    if tools_or_skip("hostile_writes_through_a_symlink_are_rejected") {
        let list = listing(&img.unwrap());
        assert!(
            line_of(&list, "etc-link").unwrap().ends_with("-> /etc"),
            "{list}"
        );
        assert!(
            line_of(&list, "up").unwrap().ends_with("-> ../../.."),
            "{list}"
        );
    }
}

#[test]
fn hostile_hardlinks_to_host_paths_are_rejected() {
    let dir = TempDir::new("hardlink");
    for target in [&b"/etc/shadow"[..], b"etc/shadow", b"../../etc/shadow"] {
        let layer = Layer::new()
            .entry(b"h", Kind::Hardlink(target), 0o644, &[])
            .tar();
        let msg = convert_one(&dir, layer).unwrap_err().to_string();
        assert!(
            msg.contains("hard link") || msg.contains("climbs above"),
            "{msg}"
        );
    }
    if !tools_or_skip("hostile_hardlinks_to_host_paths_are_rejected") {
        return;
    }
    let img = convert_one(
        &dir,
        Layer::new()
            .file("f", b"data")
            .entry(b"g", Kind::Hardlink(b"/f"), 0o644, &[])
            .tar(),
    )
    .unwrap();
    assert_eq!(cat(&img, "g"), b"data");
    let list = listing(&img);
    assert!(line_of(&list, "f").is_some() && line_of(&list, "g").is_some());
}

#[test]
fn hostile_device_nodes_and_setuid_files_stay_inside_the_image() {
    if !tools_or_skip("hostile_device_nodes_and_setuid_files_stay_inside_the_image") {
        return;
    }
    let dir = TempDir::new("devices");
    let host_dev = dir.join("host-null");
    let layer = Layer::new()
        .entry(b"dev/null", Kind::Char(1, 3), 0o666, &[])
        .entry(b"dev/sda", Kind::Block(8, 0), 0o660, &[])
        .entry(b"dev/pipe", Kind::Fifo, 0o600, &[])
        .entry(
            host_dev.to_str().unwrap().as_bytes(),
            Kind::Char(1, 1),
            0o666,
            &[],
        )
        .entry(b"bin/su", Kind::File(b"su"), 0o4755, &[])
        .entry(b"bin/wall", Kind::File(b"wall"), 0o2755, &[])
        .entry(b"tmp/", Kind::Dir, 0o1777, &[])
        .tar();
    let img = convert_one(&dir, layer).unwrap();
    let list = listing(&img);
    assert!(
        line_of(&list, "dev/null")
            .unwrap()
            .starts_with("crw-rw-rw-"),
        "{list}"
    );
    assert!(
        line_of(&list, "dev/null").unwrap().contains("1,  3"),
        "{list}"
    );
    assert!(
        line_of(&list, "dev/sda").unwrap().starts_with("brw-rw----"),
        "{list}"
    );
    assert!(
        line_of(&list, "dev/pipe")
            .unwrap()
            .starts_with("prw-------"),
        "{list}"
    );
    assert!(
        line_of(&list, "bin/su").unwrap().starts_with("-rwsr-xr-x"),
        "{list}"
    );
    assert!(
        line_of(&list, "bin/wall")
            .unwrap()
            .starts_with("-rwxr-sr-x"),
        "{list}"
    );
    assert!(
        line_of(&list, "tmp").unwrap().starts_with("drwxrwxrwt"),
        "{list}"
    );
    assert!(!host_dev.exists(), "no device node made on the host");
}

#[test]
fn hostile_huge_and_odd_names() {
    let dir = TempDir::new("names");
    let too_long = "n".repeat(256);
    let msg = convert_one(&dir, Layer::new().file(&too_long, b"").tar())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("longer than 255 bytes"), "{msg}");
    let too_deep = vec!["d".repeat(200); 21].join("/");
    let msg = convert_one(&dir, Layer::new().file(&too_deep, b"").tar())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("longer than 4095"), "{msg}");
    if !tools_or_skip("hostile_huge_and_odd_names") {
        return;
    }
    let max = "m".repeat(255);
    let deep = vec!["p".repeat(200); 15].join("/");
    let layer = Layer::new()
        .file(&max, b"max")
        .file(&deep, b"deep")
        .file("new\nline", b"nl")
        .entry(b"bytes-\xff\xfe", Kind::File(b"raw"), 0o644, &[])
        .file("-rf --no-preserve-root", b"dash")
        .file("sp ace/tab\there", b"ws")
        .tar();
    let img = convert_one(&dir, layer).unwrap();
    assert_eq!(cat(&img, &max), b"max");
    assert_eq!(cat(&img, &deep), b"deep");
    assert_eq!(cat(&img, "new\nline"), b"nl");
    assert_eq!(cat(&img, "-rf --no-preserve-root"), b"dash");
    assert_eq!(cat(&img, "sp ace/tab\there"), b"ws");
    let out = Command::new("rdsquashfs")
        .args(["-l", "/"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.stdout.windows(8).any(|w| w == b"bytes-\xff\xfe"),
        "non-UTF-8 name kept byte for byte"
    );
}

#[test]
fn hostile_overlay_xattrs_are_dropped_and_others_kept() {
    if !tools_or_skip("hostile_overlay_xattrs_are_dropped_and_others_kept") {
        return;
    }
    let dir = TempDir::new("xattr");
    let layer = Layer::new()
        .entry(b"d/", Kind::Dir, 0o755, &[("trusted.overlay.redirect", b"/etc"), ("trusted.overlay.opaque", b"y"), ("user.overlay.origin", b"x")])
        .entry(b"ping", Kind::File(b"p"), 0o755, &[("security.capability", b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"), ("user.mime", b"text/plain")])
        .tar();
    let img = convert_one(&dir, layer).unwrap();
    let d = xattrs(&img, "/d");
    assert!(!d.contains("overlay"), "{d}");
    let p = xattrs(&img, "/ping");
    assert!(
        p.contains("security.capability") && p.contains("user.mime=text/plain"),
        "{p}"
    );
}

#[test]
fn tar2sqfs_opens_nothing_the_layer_names() {
    let test = "tar2sqfs_opens_nothing_the_layer_names";
    if !tools_or_skip(test) || !tool_or_skip(test, "strace") {
        return;
    }
    let dir = TempDir::new("strace");
    let marker = dir.join("host-marker-dir");
    std::fs::create_dir_all(&marker).unwrap();
    let m = marker.display().to_string();
    let layer = Layer::new()
        .entry(format!("{m}/abs").as_bytes(), Kind::File(b"x"), 0o644, &[])
        .symlink("link", &m)
        .entry(
            b"hl",
            Kind::Hardlink(format!("{m}/abs").as_bytes()),
            0o644,
            &[],
        )
        .entry(format!("{m}/dev").as_bytes(), Kind::Char(1, 3), 0o666, &[])
        .tar();
    let path = layout(&dir, "img", &[(layer, TAR_GZ)]);
    let log = dir.join("strace.log");
    // microvm and its tar2sqfs child, every file system call they make.
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=%file", "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_microvm"))
        .args(["load", &format!("oci:{}", path.display())])
        .env("MICROVM_ROOT", dir.join("store"));
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("execve(\"/usr/bin/tar2sqfs\"") || text.contains("tar2sqfs"),
        "strace saw no tar2sqfs"
    );
    let touched: Vec<&str> = text.lines().filter(|l| l.contains(&m)).collect();
    assert!(
        touched.is_empty(),
        "host paths the layer names were touched: {touched:?}"
    );
    assert!(files_in(&marker).is_empty());
    let img = dir.join("store/layers").join(format!(
        "{}.sqfs",
        &layout_blob(&path).file_name().unwrap().to_string_lossy()
    ));
    let list = listing(&img);
    assert!(
        line_of(&list, &format!("{}/abs", m.trim_start_matches('/'))).is_some(),
        "{list}"
    );
}

/// The single layer blob of a layout made by [`layout`].
fn layout_blob(path: &Path) -> PathBuf {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path.join("blobs/sha256").join(&m[7..])).unwrap())
            .unwrap();
    let l = manifest["layers"][0]["digest"].as_str().unwrap();
    path.join("blobs/sha256").join(&l[7..])
}

#[test]
fn layer_compression_is_told_by_magic_bytes() {
    if !tools_or_skip("layer_compression_is_told_by_magic_bytes") {
        return;
    }
    let dir = TempDir::new("magic");
    let t = Layer::new().file("f", b"content").tar();
    // Descriptors that lie about compression: the bytes decide.
    let path = dir.join("lying");
    let mut l = Layout::new(&path);
    let layers = [
        l.blob(TAR_GZ, &zstd(&t)),
        l.blob(TAR_ZST, &t),
        l.blob(TAR, &gzip(&t)),
    ];
    let cfg = l.blob(
        "application/vnd.oci.image.config.v1+json",
        &config_json("amd64", &[digest(&t), digest(&t), digest(&t)], &["/x"], &[]),
    );
    let m = serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": layers});
    let m = l.blob(MANIFEST, &serde_json::to_vec(&m).unwrap());
    l.add(m, None, None);
    l.finish();
    let s = store(&dir);
    let img = s.load(&format!("oci:{}", path.display())).unwrap();
    for image in s.layer_images(&img).unwrap() {
        assert_eq!(cat(&image, "f"), b"content");
    }
    // An empty layer (end-of-archive blocks only) and an empty blob make empty images.
    let path = dir.join("empty");
    let mut l = Layout::new(&path);
    let empty_tar = Layer::new().tar();
    let layers = [l.blob(TAR, &empty_tar), l.blob(TAR, b"")];
    let cfg = l.blob(
        "application/vnd.oci.image.config.v1+json",
        &config_json("amd64", &[digest(&empty_tar), digest(b"")], &["/x"], &[]),
    );
    let m = serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": layers});
    let m = l.blob(MANIFEST, &serde_json::to_vec(&m).unwrap());
    l.add(m, None, None);
    l.finish();
    let img = s.load(&format!("oci:{}", path.display())).unwrap();
    for image in s.layer_images(&img).unwrap() {
        assert_eq!(
            listing(&image)
                .lines()
                .filter(|l| l.contains("squashfs-root"))
                .count(),
            1
        );
    }
    // xz is refused with a hint.
    let mut l = Layout::new(&dir.join("xz"));
    let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 0, 0];
    let layer = l.blob(TAR, &xz);
    let cfg = l.blob(
        "application/vnd.oci.image.config.v1+json",
        &config_json("amd64", &[digest(&xz)], &["/x"], &[]),
    );
    let m = serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST, "config": cfg, "layers": [layer]});
    let m = l.blob(MANIFEST, &serde_json::to_vec(&m).unwrap());
    l.add(m, None, None);
    l.finish();
    let img = s
        .load(&format!("oci:{}", dir.join("xz").display()))
        .unwrap();
    let e = s.layer_images(&img).unwrap_err().to_string();
    assert!(e.contains("xz and bzip2"), "{e}");
}

/// A layer of about `mb` MB that compresses poorly, so converting it takes a while.
fn big_layer(mb: usize) -> Vec<u8> {
    let mut l = Layer::new().dir("data/");
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for i in 0..mb {
        let chunk: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        l = l.file(&format!("data/f{i}"), &chunk);
    }
    l.tar()
}

#[test]
fn concurrent_loads_of_one_image_both_succeed_and_leave_one_copy() {
    if !tools_or_skip("concurrent_loads_of_one_image_both_succeed_and_leave_one_copy") {
        return;
    }
    let dir = TempDir::new("concurrent");
    let path = layout(
        &dir,
        "conc",
        &[(big_layer(24), TAR_GZ), (base_layer(), TAR)],
    );
    let root = dir.join("store");
    let reference = format!("oci:{}", path.display());
    let children: Vec<_> = (0..3)
        .map(|_| {
            microvm(&root)
                .args(["load", &reference])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "conc:latest");
    }
    let layers = files_in(&root.join("layers"));
    assert_eq!(layers.len(), 2, "{layers:?}");
    assert!(
        layers
            .iter()
            .all(|l| l.ends_with(".sqfs") && !l.starts_with('.')),
        "{layers:?}"
    );
    assert!(files_in(&root.join("blobs/sha256"))
        .iter()
        .all(|f| !f.starts_with('.')));
    let s = Store::open(&root).unwrap();
    assert_eq!(s.list().unwrap().len(), 1);
}

#[test]
fn a_killed_conversion_leaves_nothing_trusted() {
    if !tools_or_skip("a_killed_conversion_leaves_nothing_trusted") {
        return;
    }
    let dir = TempDir::new("kill");
    let path = layout(&dir, "killme", &[(big_layer(64), TAR_ZST)]);
    let root = dir.join("store");
    let reference = format!("oci:{}", path.display());
    let mut child = microvm(&root)
        .args(["load", &reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let layers_dir = root.join("layers");
    let tmp = loop {
        let tmp = files_in(&layers_dir)
            .into_iter()
            .find(|f| f.starts_with(".tmp-"));
        if let Some(t) =
            tmp.filter(|t| std::fs::metadata(layers_dir.join(t)).is_ok_and(|m| m.len() > 0))
        {
            break t;
        }
        assert!(Instant::now() < deadline, "conversion never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "load finished before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let left = files_in(&layers_dir);
    assert!(
        left.iter()
            .all(|f| !f.ends_with(".sqfs") || f.starts_with(".tmp-")),
        "a half image was trusted: {left:?}"
    );
    // tar2sqfs died with its parent: the temporary file stops growing.
    let size = |t: &str| {
        std::fs::metadata(layers_dir.join(t))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let s1 = size(&tmp);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s1, size(&tmp), "tar2sqfs outlived microvm");
    // The next use converts again, removes the stale file, and the image reads back whole.
    let s = Store::open(&root).unwrap().with_progress(false);
    let img = s.resolve("killme").unwrap();
    let images = s.layer_images(&img).unwrap();
    assert!(!layers_dir.join(&tmp).exists(), "stale temporary file kept");
    assert_eq!(cat(&images[0], "data/f63").len(), 1 << 20);
}

#[test]
fn prune_removes_only_what_no_image_uses() {
    if !tools_or_skip("prune_removes_only_what_no_image_uses") {
        return;
    }
    let dir = TempDir::new("prune");
    let shared = base_layer();
    let only_a = Layer::new().file("a", b"a").tar();
    let only_b = Layer::new().file("b", b"b").tar();
    let pa = layout(
        &dir,
        "a",
        &[(shared.clone(), TAR_GZ), (only_a.clone(), TAR_GZ)],
    );
    let pb = layout(&dir, "b", &[(shared.clone(), TAR_GZ), (only_b, TAR_GZ)]);
    let s = store(&dir);
    let a = s.load(&format!("oci:{}", pa.display())).unwrap();
    let b = s.load(&format!("oci:{}", pb.display())).unwrap();
    let a_layers = s.layer_images(&a).unwrap();
    let b_layers = s.layer_images(&b).unwrap();
    assert_eq!(a_layers[0], b_layers[0]);
    let blobs_before = files_in(&dir.join("store/blobs/sha256")).len();
    assert_eq!(blobs_before, 2 + 2 + 3, "2 manifests, 2 configs, 3 layers");
    std::fs::write(dir.join("store/blobs/sha256/.tmp-dead-1"), b"half").unwrap();
    std::fs::write(dir.join("store/layers/.tmp-dead-2.sqfs"), b"half").unwrap();

    let r = s.prune().unwrap();
    assert_eq!(
        (
            r.blobs_removed,
            r.layer_images_removed,
            r.temp_files_removed
        ),
        (0, 0, 2),
        "{r:?}"
    );

    s.remove("a").unwrap();
    // A running VM holds image a's layers: prune keeps the one that would go.
    let lease = s.lease_layer_images(&a).unwrap();
    let r = s.prune().unwrap();
    assert_eq!(
        (
            r.blobs_removed,
            r.layer_images_removed,
            r.layer_images_in_use
        ),
        (3, 0, 1),
        "{r:?}"
    );
    drop(lease);
    let r = s.prune().unwrap();
    assert_eq!((r.blobs_removed, r.layer_images_removed), (0, 1), "{r:?}");
    assert!(!a_layers[1].exists());
    assert!(a_layers[0].exists() && b_layers[1].exists());
    let mtime = std::fs::metadata(&b_layers[0]).unwrap().modified().unwrap();
    let again = s.layer_images(&s.resolve("b").unwrap()).unwrap();
    assert_eq!(again, b_layers);
    assert_eq!(
        std::fs::metadata(&b_layers[0]).unwrap().modified().unwrap(),
        mtime,
        "not converted again"
    );
    assert_eq!(files_in(&dir.join("store/blobs/sha256")).len(), 4);
}

#[test]
fn rmi_resolve_and_the_cli() {
    if !tools_or_skip("rmi_resolve_and_the_cli") {
        return;
    }
    let dir = TempDir::new("cli");
    let path = layout(&dir, "demo", &[(base_layer(), TAR_GZ)]);
    let root = dir.join("store");
    let out = microvm(&root)
        .args(["load", &format!("oci:{}", path.display())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "demo:latest\n");
    assert!(
        out.stderr.is_empty(),
        "no progress bars without a terminal: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = microvm(&root).arg("images").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let head = lines.next().unwrap();
    assert!(
        head.starts_with("REPOSITORY")
            && head.contains("TAG")
            && head.contains("IMAGE ID")
            && head.contains("CREATED")
            && head.ends_with("SIZE"),
        "{text}"
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(&row[..2], ["demo", "latest"]);
    assert_eq!(row[2].len(), 12);

    let out = microvm(&root)
        .args(["images", "--format", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["Repository"].as_str(), v["Tag"].as_str()),
        (Some("demo"), Some("latest"))
    );
    assert_eq!(v["CreatedAt"], "2024-01-02T03:04:05Z");
    let id = v["ID"].as_str().unwrap().to_string();

    let s = Store::open(&root).unwrap();
    assert_eq!(s.resolve("demo").unwrap().name, "demo:latest");
    assert_eq!(s.resolve("demo:latest").unwrap().config_digest, id);
    assert_eq!(
        s.resolve(&id[7..19]).unwrap().name,
        "demo:latest",
        "by short image ID"
    );
    let e = s.resolve("nothere").unwrap_err().to_string();
    assert!(
        e.contains("no image named \"nothere\"") && e.contains("microvm load"),
        "{e}"
    );
    // A transport reference is loaded on the fly.
    assert_eq!(
        s.resolve(&format!("oci:{}:latest", path.display()))
            .unwrap()
            .name,
        "demo:latest"
    );

    let out = microvm(&root).args(["rmi", "demo"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Untagged: demo:latest\n"
    );
    let out = microvm(&root).args(["rmi", "demo"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    // rmi of a name that is gone says so, without suggesting a load.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("microvm: no such image: demo"), "{err}");
    assert!(!err.contains("load"), "{err}");
    let out = microvm(&root).arg("prune").output().unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Deleted 3 blobs, 1 layer images"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = microvm(&root)
        .args(["load", "no-such:thing"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("microvm: invalid image reference") && err.lines().count() == 1,
        "{err}"
    );
}

/// `TYPE PATH` of every entry in a listing (`d`, `-`, `l`, `c`...), symlink targets dropped.
fn tree_of(listing: &str) -> Vec<String> {
    let mut v: Vec<String> = listing
        .lines()
        .filter_map(|l| {
            let at = l.find(" squashfs-root")?;
            let path = l[at + " squashfs-root".len()..].trim_start_matches('/');
            let path = path.split(" -> ").next().unwrap_or(path);
            (!path.is_empty()).then(|| format!("{} {path}", &l[..1]))
        })
        .collect();
    v.sort();
    v
}

/// Seven layers exercising every way a higher layer changes a lower one, then two more.
fn nine_layers(top: &str) -> Vec<(Vec<u8>, &'static str)> {
    let hl = |l: Layer, path: &str, target: &str| {
        l.entry(
            path.as_bytes(),
            Kind::Hardlink(target.as_bytes()),
            0o644,
            &[],
        )
    };
    let l0 = Layer::new()
        .dir("bin/")
        .file("bin/tool", b"tool")
        .dir("etc/")
        .file("etc/gone", b"gone")
        .file("etc/keep", b"keep")
        .file("etc/orig", b"orig");
    let l0 = hl(l0, "etc/hl", "etc/orig");
    let l0 = hl(l0, "etc/hl2", "/etc/orig")
        .dir("etc/app/")
        .file("etc/app/old", b"old")
        .file("data/a", b"a file")
        .dir("var/x/")
        .file("var/x/f", b"f")
        .file("srv/file", b"srv")
        .tar();
    let l1 = Layer::new()
        .file("etc/.wh.gone", b"")
        .file("data/.wh.a", b"")
        .dir("data/a/")
        .file("data/a/inner", b"inner")
        .tar();
    let l2 = Layer::new()
        .file("var/x", b"now a file")
        .entry(b"etc/app/", Kind::Dir, 0o750, &[])
        .file("etc/app/.wh..wh..opq", b"")
        .file("etc/app/new", b"new")
        .tar();
    let l3 = Layer::new()
        .file("opt/new1", b"new1")
        .file("etc/orig", b"replaced")
        .tar();
    let l4 = Layer::new()
        .file("usr/lib/x", b"x")
        .file(".wh.srv", b"")
        .tar();
    let l5 = Layer::new()
        .file("data/a/inner2", b"inner2")
        .file("tmp2/only", b"only")
        .tar();
    let l6 = Layer::new()
        .file("tmp2/.wh.only", b"")
        .symlink("etc/link", "app/new")
        .tar();
    let l7 = Layer::new().file("top/seven", b"7").tar();
    let l8 = Layer::new().file(top, b"8").tar();
    [l0, l1, l2, l3, l4, l5, l6, l7, l8]
        .into_iter()
        .map(|t| (t, TAR_GZ))
        .collect()
}

#[test]
fn the_lowest_layers_merge_into_one_image_as_overlayfs_shows_them() {
    if !tools_or_skip("the_lowest_layers_merge_into_one_image_as_overlayfs_shows_them") {
        return;
    }
    let dir = TempDir::new("merge");
    let pa = layout(&dir, "a", &nine_layers("top/a"));
    let pb = layout(&dir, "b", &nine_layers("top/b"));
    let s = store(&dir);
    let a = s.load(&format!("oci:{}", pa.display())).unwrap();
    let plain = s.layer_images(&a).unwrap();
    assert_eq!(plain.len(), 9);

    let lease = s.lease_layer_images_at_most(&a, 3).unwrap();
    let paths = lease.paths().to_vec();
    assert_eq!(paths.len(), 3);
    assert_eq!(
        &paths[1..],
        &plain[7..],
        "the top layers are the plain ones"
    );
    let merged = &paths[0];
    assert!(!plain.contains(merged));
    let list = listing(merged);
    let want = [
        "- bin/tool",
        "- data/a/inner",
        "- data/a/inner2",
        "- etc/app/new",
        "- etc/hl",
        "- etc/hl2",
        "- etc/keep",
        "- etc/orig",
        "- opt/new1",
        "- usr/lib/x",
        "- var/x",
        "d bin",
        "d data",
        "d data/a",
        "d etc",
        "d etc/app",
        "d opt",
        "d tmp2",
        "d usr",
        "d usr/lib",
        "d var",
        "l etc/link",
    ];
    assert_eq!(tree_of(&list), want, "{list}");
    assert_eq!(cat(merged, "var/x"), b"now a file");
    assert_eq!(cat(merged, "etc/orig"), b"replaced");
    // The hard links survive their replaced target with the data they had.
    assert_eq!(cat(merged, "etc/hl"), b"orig");
    assert_eq!(cat(merged, "etc/hl2"), b"orig");
    assert_eq!(cat(merged, "data/a/inner"), b"inner");
    assert!(
        line_of(&list, "etc/app").unwrap().starts_with("drwxr-x---"),
        "the highest layer's directory attributes win: {list}"
    );
    assert!(line_of(&list, "etc/link").unwrap().ends_with("-> app/new"));
    for d in ["/", "/etc/app", "/data/a", "/etc"] {
        assert!(!xattrs(merged, d).contains("overlay"), "{d} is not opaque");
    }

    // Image b shares the seven base layers: same merged image, not made again.
    let made = std::fs::metadata(merged).unwrap().modified().unwrap();
    let b = s.load(&format!("oci:{}", pb.display())).unwrap();
    let lease_b = s.lease_layer_images_at_most(&b, 3).unwrap();
    assert_eq!(&lease_b.paths()[0], merged);
    assert_ne!(lease_b.paths()[2], paths[2]);
    assert_eq!(std::fs::metadata(merged).unwrap().modified().unwrap(), made);
    drop((lease, lease_b));

    // Enough slots: the plain layers.
    for max in [9, 20] {
        let l = s.lease_layer_images_at_most(&a, max).unwrap();
        assert_eq!(l.paths(), &plain[..]);
    }
    // One slot: everything merged.
    let one = s.lease_layer_images_at_most(&a, 1).unwrap();
    assert_eq!(one.paths().len(), 1);
    let all = tree_of(&listing(&one.paths()[0]));
    assert!(all.contains(&"- top/a".to_string()) && all.contains(&"- top/seven".to_string()));
    assert!(s.lease_layer_images_at_most(&a, 0).is_err());
    drop(one);

    // Prune keeps merged images of named images, and drops them with the image.
    s.prune().unwrap();
    assert!(merged.exists());
    s.remove("a").unwrap();
    s.remove("b").unwrap();
    s.prune().unwrap();
    assert!(!merged.exists());
    assert_eq!(files_in(&dir.join("store/layers")), Vec::<String>::new());
}

/// An 8-layer image boots on QEMU (5 layer disks at most beside vsock, the scratch disk and the
/// network device): its 4 lowest layers run merged.
#[test]
fn an_image_with_more_layers_than_qemu_has_disks_runs() {
    let kernel = Path::new("/var/lib/microvm/kernel/vmlinux");
    let busybox = Path::new("/bin/busybox");
    if !kernel.is_file() || !busybox.is_file() {
        eprintln!("SKIPPED an_image_with_more_layers_than_qemu_has_disks_runs: no guest kernel or busybox-static");
        return;
    }
    if !tools_or_skip("an_image_with_more_layers_than_qemu_has_disks_runs")
        || !tool_or_skip(
            "an_image_with_more_layers_than_qemu_has_disks_runs",
            "qemu-system-x86_64",
        )
    {
        return;
    }
    let dir = TempDir::new("merge-run");
    let mut base = Layer::new()
        .dir("bin/")
        .entry(
            b"bin/busybox",
            Kind::File(&std::fs::read(busybox).unwrap()),
            0o755,
            &[],
        )
        .dir("w/")
        .file("etc/gone", b"gone")
        .file("etc/app/old", b"old");
    for applet in ["sh", "cat", "ls", "test"] {
        base = base.symlink(&format!("bin/{applet}"), "busybox");
    }
    let mut layers = vec![
        base.tar(),
        Layer::new()
            .file("etc/.wh.gone", b"")
            .file("data/f", b"file")
            .tar(),
        Layer::new()
            .file("data/.wh.f", b"")
            .file("data/f/inner", b"inner\n")
            .file("etc/app/.wh..wh..opq", b"")
            .file("etc/app/new", b"")
            .tar(),
    ];
    for n in 3..8 {
        layers.push(Layer::new().file(&format!("layers/{n}"), b"").tar());
    }
    let layers: Vec<(Vec<u8>, &str)> = layers.into_iter().map(|t| (t, TAR_GZ)).collect();
    let path = layout(&dir, "eight", &layers);
    let script = "cat /data/f/inner; ls -1 /etc/app /layers; test -e /etc/gone && echo present || echo absent";
    let out = common::qemu_run(&mut microvm(&dir.join("store")), kernel, 120)
        .arg(format!("oci:{}", path.display()))
        .args(["-c", script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "inner\n/etc/app:\nnew\n\n/layers:\n3\n4\n5\n6\n7\nabsent\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    let merged = files_in(&dir.join("store/layers"))
        .into_iter()
        .filter(|f| f.starts_with("merged-"))
        .count();
    assert_eq!(merged, 1);
}
