//! Layer conversion throughput: a gzip layer of about 100 MB (unpacked) made from this host's
//! /usr (real binaries, libraries and text), converted to squashfs by the image store
//! (decompress -> rewrite -> tar2sqfs -> fsync -> rename), against `gzip -dc` alone on the
//! same layer. Medians; the target is at least 0.7x gzip -dc.
//!
//! Run: `cargo bench --bench convert` (BENCH_RUNS=N, default 7; BENCH_MB=N, default 100).
//! Needs tar2sqfs (squashfs-tools-ng).

use std::io::Write;
#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use microvm::image::{Digest, Store};
use sha2::Digest as _;

/// Regular files under `roots`, sorted, until `budget` bytes.
fn pick_files(roots: &[&str], budget: u64) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut total = 0;
    let mut stack: Vec<PathBuf> = roots.iter().rev().map(PathBuf::from).collect();
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        let mut subdirs = Vec::new();
        for p in entries {
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                subdirs.push(p);
            } else if m.is_file() && total + m.len() <= budget {
                total += m.len();
                out.push((p, m.len()));
            }
        }
        stack.extend(subdirs.into_iter().rev());
        if total + 4096 > budget {
            break;
        }
    }
    out
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs = common::env_number("BENCH_RUNS", 7);
    let mb = common::env_number("BENCH_MB", 100) as u64;
    if Command::new("tar2sqfs")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        println!("SKIPPED convert benchmark: tar2sqfs missing (apt-get install squashfs-tools-ng)");
        return;
    }
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("bench-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // The layer: a tar of host files, gzip level 6 (docker's default).
    let files = pick_files(
        &["/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share"],
        mb * 1_000_000,
    );
    let mut tar = tar::Builder::new(Vec::new());
    for (path, _) in &files {
        let name = path.strip_prefix("/").unwrap();
        if tar.append_path_with_name(path, name).is_err() {
            continue; // unreadable file
        }
    }
    let tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();

    // An OCI layout holding it, loaded into a scratch store.
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8], mt: &str| {
        let d = sha256(bytes);
        std::fs::write(blobs.join(&d[7..]), bytes).unwrap();
        serde_json::json!({"mediaType": mt, "digest": d, "size": bytes.len()})
    };
    let layer = put(&gz, "application/vnd.oci.image.layer.v1.tar+gzip");
    let cfg = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256(&tar)]}});
    let cfg = put(
        &serde_json::to_vec(&cfg).unwrap(),
        "application/vnd.oci.image.config.v1+json",
    );
    let manifest = serde_json::json!({"schemaVersion": 2, "config": cfg, "layers": [layer]});
    let manifest = put(
        &serde_json::to_vec(&manifest).unwrap(),
        "application/vnd.oci.image.manifest.v1+json",
    );
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let store = Store::open(&work.join("store"))
        .unwrap()
        .with_progress(false);
    let image = store.load(&format!("oci:{}", layout.display())).unwrap();
    let layer_digest = Digest::parse(&image.layers[0]).unwrap();
    let blob = store.blob_path(&layer_digest);

    let gunzip = |blob: &Path| {
        let t = Instant::now();
        let ok = Command::new("gzip")
            .arg("-dc")
            .arg(blob)
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok);
        t.elapsed().as_secs_f64()
    };
    let convert = || {
        let _ = std::fs::remove_file(store.layer_image_path(&layer_digest));
        let t = Instant::now();
        store.layer_images(&image).unwrap();
        t.elapsed().as_secs_f64()
    };
    // One warm-up of each (page cache, tar2sqfs binary).
    gunzip(&blob);
    convert();
    let mut g = Vec::new();
    let mut c = Vec::new();
    for _ in 0..runs {
        g.push(gunzip(&blob));
        c.push(convert());
    }
    let (g, c) = (common::median(g), common::median(c));
    let out_len = std::fs::metadata(store.layer_image_path(&layer_digest))
        .unwrap()
        .len();
    let mbs = |secs: f64| tar.len() as f64 / 1e6 / secs;
    println!(
        "layer: {} files, {:.1} MB tar, {:.1} MB gzip -> {:.1} MB squashfs ({})",
        files.len(),
        tar.len() as f64 / 1e6,
        gz.len() as f64 / 1e6,
        out_len as f64 / 1e6,
        microvm::image::SQUASHFS_COMPRESSOR.join(" ")
    );
    println!(
        "gzip -dc          median {:.3} s  {:>6.1} MB/s (unpacked)",
        g,
        mbs(g)
    );
    println!(
        "convert (store)   median {:.3} s  {:>6.1} MB/s (unpacked)",
        c,
        mbs(c)
    );
    println!(
        "convert / gzip -dc throughput: {:.2}x (target >= 0.70x), {runs} runs",
        g / c
    );
    let _ = std::fs::remove_dir_all(&work);
}
