//! Container names: docker's rule for what a name may be, and generated `adjective_noun`
//! names for containers created without `--name`.

/// Checks a name given with `--name` (docker's `[a-zA-Z0-9][a-zA-Z0-9_.-]*`, a leading `/`
/// dropped as docker does).
pub fn validate(name: &str) -> Result<String, String> {
    let n = name.strip_prefix('/').unwrap_or(name);
    let mut chars = n.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && n.len() <= 128;
    if ok {
        Ok(n.to_string())
    } else {
        Err(format!(
            "invalid container name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at most 128 characters"
        ))
    }
}

const ADJECTIVES: &[&str] = &[
    "agile", "bold", "brave", "bright", "calm", "clever", "cool", "crisp", "eager", "fast", "fond",
    "gentle", "happy", "keen", "kind", "lively", "lucid", "merry", "neat", "nimble", "proud",
    "quick", "quiet", "rapid", "sharp", "shy", "sleek", "snug", "steady", "swift", "tidy", "vivid",
    "warm", "wise", "witty", "zen",
];

const NOUNS: &[&str] = &[
    "acorn", "badger", "beacon", "birch", "canyon", "comet", "cedar", "delta", "ember", "falcon",
    "fjord", "glacier", "harbor", "heron", "island", "jaguar", "kestrel", "lagoon", "lynx",
    "maple", "meadow", "nebula", "orchid", "otter", "pebble", "quartz", "raven", "reef", "sparrow",
    "summit", "tundra", "valley", "walrus", "willow", "yak", "zephyr",
];

/// A name made from `random` (callers retry with fresh randomness if it is taken).
pub fn generate(random: u64) -> String {
    let a = ADJECTIVES[(random % ADJECTIVES.len() as u64) as usize];
    let n = NOUNS[((random >> 16) % NOUNS.len() as u64) as usize];
    format!("{a}_{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_docker() {
        assert_eq!(validate("web-1").unwrap(), "web-1");
        assert_eq!(validate("/db.main_2").unwrap(), "db.main_2");
        for bad in ["", "-x", ".x", "a b", "a/b", "ä", &"x".repeat(129)] {
            assert!(validate(bad).is_err(), "{bad}");
        }
        for r in [0, 1, 1 << 20, u64::MAX] {
            assert!(validate(&generate(r)).is_ok());
        }
    }
}
