//! Column-aligned tables as docker prints them: every column but the last as wide as its widest
//! cell, three spaces between columns.

/// Prints `titles` and `rows` aligned on standard output.
pub fn print(titles: &[String], rows: &[Vec<String>]) {
    let n = titles.len();
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .chain(std::iter::once(&titles[i]))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate().take(n) {
            if i + 1 == n {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        out
    };
    println!("{}", line(titles));
    for r in rows {
        println!("{}", line(r));
    }
}
