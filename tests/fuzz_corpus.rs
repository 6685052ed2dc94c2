//! Replays the kept fuzzing corpus (`fuzz/corpus/TARGET/*`) and any saved crash inputs
//! (`fuzz/regressions/TARGET/*`) through microvm's fuzz entry points on the stable toolchain:
//! what the fuzzer once found stays fixed without running a fuzzer here. `scripts/fuzz` grows
//! the corpus with libFuzzer (nightly).

use std::path::Path;
use std::time::{Duration, Instant};

/// Slower than this for one input is a finding too (libFuzzer's -timeout is 1 s).
const PER_INPUT: Duration = Duration::from_secs(2);

#[test]
fn every_kept_input_of_every_target_passes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in microvm::fuzz::TARGETS {
        let mut replayed = 0;
        for dir in ["corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let started = Instant::now();
                target(&data);
                assert!(
                    started.elapsed() < PER_INPUT,
                    "{} took {:?}",
                    path.display(),
                    started.elapsed()
                );
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no corpus for fuzz target {name}");
        eprintln!("fuzz target {name}: {replayed} inputs replayed");
    }
}
