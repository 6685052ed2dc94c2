//! URLs as the registry client needs them: where a `Location` points, whether a URL is on the
//! registry's own origin (the only place credentials go), query encoding, and URLs fit for
//! messages (a storage service's signed query left out).

use ureq::http::Uri;

/// Percent-encodes a query value.
pub(crate) fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A URL without its query (which may hold a storage service's signature), for messages.
pub(crate) fn strip_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// Scheme, host and port of a URL, lower-cased, the port made explicit.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, host, port))
}

/// Whether `url` is on the registry's own origin: only there do credentials go.
pub(crate) fn same_origin(url: &str, base: &str) -> bool {
    match (origin(url), origin(base)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// A reference (RFC 3986: absolute, `//host/...`, `/path` or a relative path) resolved against
/// the URL `current`; only http and https URLs come out.
pub(crate) fn resolve(current: &str, location: &str) -> Option<String> {
    let cur: Uri = current.parse().ok()?;
    let scheme = cur.scheme_str()?;
    let out = if location.starts_with("https://") || location.starts_with("http://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{}{location}", cur.authority()?.as_str())
    } else if location.is_empty()
        || location
            .split('/')
            .next()
            .is_some_and(|first| first.contains(':'))
    {
        return None; // another scheme (file:, data:, ...), or nothing
    } else {
        let path = cur.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{scheme}://{}{dir}{location}", cur.authority()?.as_str())
    };
    let parsed: Uri = out.parse().ok()?;
    matches!(parsed.scheme_str(), Some("http" | "https")).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_on_the_registry_origin() {
        let base = "https://reg.example:5000";
        assert!(same_origin("https://reg.example:5000/v2/x", base));
        assert!(same_origin("https://REG.example:5000/v2/x", base));
        assert!(!same_origin("https://reg.example/v2/x", base));
        assert!(!same_origin("http://reg.example:5000/v2/x", base));
        assert!(!same_origin("https://s3.example/blob?sig=1", base));
        assert!(same_origin("https://r.io/v2/", "https://r.io:443"));
        assert!(!same_origin("not a url", base));
    }

    #[test]
    fn locations_resolve_and_odd_ones_are_refused() {
        let cur = "https://r.io:5000/v2/a/blobs/sha256:x";
        assert_eq!(
            resolve(cur, "/v2/b").as_deref(),
            Some("https://r.io:5000/v2/b")
        );
        assert_eq!(
            resolve(cur, "http://s3/b?sig=1").as_deref(),
            Some("http://s3/b?sig=1")
        );
        assert_eq!(resolve(cur, "//s3/x").as_deref(), Some("https://s3/x"));
        assert_eq!(
            resolve("https://r.io/v2/a/blobs/uploads/", "u1?_state=x").as_deref(),
            Some("https://r.io/v2/a/blobs/uploads/u1?_state=x")
        );
        assert_eq!(
            resolve("https://r.io/", "v2/x").as_deref(),
            Some("https://r.io/v2/x")
        );
        assert_eq!(resolve(cur, "file:///etc/passwd"), None);
        assert_eq!(resolve(cur, "javascript:alert(1)"), None);
        assert_eq!(resolve(cur, ""), None);
    }

    #[test]
    fn queries_encode_and_messages_drop_them() {
        assert_eq!(
            encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
        assert_eq!(strip_query("https://s/x?sig=secret"), "https://s/x");
    }
}
