//! `microvm load`, `images`, `rmi` and `prune`: the image store from the command line.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};

use super::{error_line, EXIT_MICROVM_ERROR};
use crate::image::{ImageSummary, Store};

/// Flags of `microvm load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// What to load: oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME:TAG], or a
    /// path to a layout directory or an archive (`docker save` output).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Only copy the blobs; convert the layers on first run instead.
    #[arg(long)]
    pub no_convert: bool,
}

/// Output formats of `microvm images`.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// A table like docker's.
    Table,
    /// One JSON object per image, one per line.
    Json,
}

/// Flags of `microvm images`.
#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Flags of `microvm rmi`.
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// Image names (`busybox` means `busybox:latest`) or IDs.
    #[arg(value_name = "IMAGE", required = true)]
    pub images: Vec<String>,
}

/// The image store, or the exit status after its error line.
pub(super) fn open_store() -> Result<Store, i32> {
    Store::open(&crate::host::data_dir()).map_err(|e| {
        error_line(e);
        EXIT_MICROVM_ERROR
    })
}

/// Runs `microvm load`: prints the loaded image's name.
pub fn load(args: LoadArgs) -> i32 {
    let store = match open_store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = store.load(&args.reference).and_then(|image| {
        if !args.no_convert {
            store.layer_images(&image)?;
        }
        Ok(image)
    });
    match result {
        Ok(image) => {
            println!("{}", image.name);
            0
        }
        Err(e) => {
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}

/// Runs `microvm images`.
pub fn images(args: ImagesArgs) -> i32 {
    let store = match open_store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let list = match store.list() {
        Ok(l) => l,
        Err(e) => {
            error_line(e);
            return EXIT_MICROVM_ERROR;
        }
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    match args.format {
        Format::Table => print!("{}", table(&list, now)),
        Format::Json => {
            for s in &list {
                let v = serde_json::json!({
                    "Repository": s.repository,
                    "Tag": s.tag,
                    "ID": s.id,
                    "Digest": s.digest,
                    "CreatedAt": s.created,
                    "CreatedSince": created_since(s.created.as_deref(), now),
                    "Size": human_size(s.size),
                    "SizeBytes": s.size,
                });
                println!("{v}");
            }
        }
    }
    0
}

/// Runs `microvm rmi`.
pub fn rmi(args: RmiArgs) -> i32 {
    let store = match open_store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut status = 0;
    for name in &args.images {
        match store.remove(name) {
            Ok(removed) => println!("Untagged: {removed}"),
            Err(e) => {
                error_line(e);
                status = EXIT_MICROVM_ERROR;
            }
        }
    }
    status
}

/// Runs `microvm prune`.
pub fn prune() -> i32 {
    let store = match open_store() {
        Ok(s) => s,
        Err(code) => return code,
    };
    match store.prune() {
        Ok(r) => {
            println!(
                "Deleted {} blobs, {} layer images and {} temporary files",
                r.blobs_removed, r.layer_images_removed, r.temp_files_removed
            );
            if r.layer_images_in_use > 0 {
                println!(
                    "Kept {} unused layer images that running VMs hold",
                    r.layer_images_in_use
                );
            }
            println!("Total reclaimed space: {}", human_size(r.bytes_freed));
            0
        }
        Err(e) => {
            error_line(e);
            EXIT_MICROVM_ERROR
        }
    }
}

fn table(list: &[ImageSummary], now: i64) -> String {
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|s| {
            let id = s.id.strip_prefix("sha256:").unwrap_or(&s.id);
            [
                s.repository.clone(),
                s.tag.clone(),
                id[..id.len().min(12)].to_string(),
                created_since(s.created.as_deref(), now),
                human_size(s.size),
            ]
        })
        .collect();
    let head = ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: [&str; 5]| {
        for (i, c) in cells.iter().enumerate() {
            if i == 4 {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(head);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3], &r[4]]);
    }
    out
}

/// docker's sizes: decimal units, four significant digits (`4.26MB`, `123.5MB`).
fn human_size(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i < units.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    let decimals = if v >= 100.0 {
        1
    } else if v >= 10.0 {
        2
    } else {
        3
    };
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    format!("{s}{}", units[i])
}

/// "3 days ago", from an RFC 3339 time; "N/A" when there is none.
fn created_since(created: Option<&str>, now: i64) -> String {
    let Some(t) = created.and_then(parse_rfc3339) else {
        return "N/A".to_string();
    };
    let secs = (now - t).max(0);
    let (n, unit) = match secs {
        s if s < 60 => return "Less than a minute ago".to_string(),
        s if s < 3600 => (s / 60, "minute"),
        s if s < 86400 => (s / 3600, "hour"),
        s if s < 14 * 86400 => (s / 86400, "day"),
        s if s < 60 * 86400 => (s / (7 * 86400), "week"),
        s if s < 730 * 86400 => (s / (30 * 86400), "month"),
        s => (s / (365 * 86400), "year"),
    };
    if n == 1 {
        let article = if unit == "hour" { "An" } else { "A" };
        format!("{article} {unit} ago")
    } else {
        format!("{n} {unit}s ago")
    }
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) => {
            let oh: i64 = r.get(1..3)?.parse().ok()?;
            let om: i64 = r.get(4..6)?.parse().ok()?;
            let o = oh * 3600 + om * 60;
            if r.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + sec - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T12:00:00.123456789Z"),
            Some(1709208000)
        );
        assert_eq!(parse_rfc3339("2024-02-29T14:00:00+02:00"), Some(1709208000));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn sizes_and_ages_read_like_docker() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(4_260_000), "4.26MB");
        assert_eq!(human_size(1_000_000), "1MB");
        assert_eq!(human_size(123_456_789), "123.5MB");
        assert_eq!(
            created_since(Some("1970-01-01T00:00:00Z"), 3 * 86400),
            "3 days ago"
        );
        assert_eq!(
            created_since(Some("1970-01-01T00:00:00Z"), 3600),
            "An hour ago"
        );
        assert_eq!(created_since(None, 0), "N/A");
    }
}
