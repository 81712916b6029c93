//! Output helpers: the images table, byte sizes, streaming daemon lines verbatim, and
//! turning gRPC errors into the message the user reads.

use std::io::Write;

/// The message of an error; for a gRPC status, just the daemon's text.
pub fn error_message(e: &anyhow::Error) -> String {
    if let Some(s) = e.downcast_ref::<tonic::Status>() {
        return s.message().to_string();
    }
    format!("{e:#}")
}

/// Prints a server stream's lines as they arrive (they carry their own newlines).
pub async fn print_stream<T>(
    mut stream: tonic::Streaming<T>,
    text: fn(T) -> String,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    while let Some(item) = stream.message().await? {
        out.write_all(text(item).as_bytes())?;
        out.flush()?;
    }
    Ok(())
}

/// Prints a server stream whose messages are text or progress events: the text verbatim,
/// and with `live` (stdout is a terminal) the events as a live block under it.
pub async fn print_events<T>(
    mut stream: tonic::Streaming<T>,
    split: fn(T) -> (String, Option<isula_api::v1::Progress>),
    live: bool,
) -> anyhow::Result<()> {
    let mut block = live.then(crate::progress::Live::new);
    let mut out = std::io::stdout();
    let result = async {
        while let Some(item) = stream.message().await? {
            let (text, event) = split(item);
            match (&mut block, event) {
                (Some(b), Some(p)) => b.event(p),
                (Some(b), None) => {
                    if !text.is_empty() {
                        b.text(&text)
                    }
                }
                (None, _) => {
                    out.write_all(text.as_bytes())?;
                    out.flush()?;
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    if let Some(b) = &mut block {
        b.finish();
    }
    result
}

/// A table with dashed rules above and below its header and at its end, as the manual
/// shows `ctr-img images`.
pub fn table(headers: &[&str], min_widths: &[usize], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let content = rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
            min_widths[i].max(content.max(h.len()) + 2)
        })
        .collect();
    let rule = widths
        .iter()
        .map(|w| "-".repeat(*w))
        .collect::<Vec<_>>()
        .join("  ");
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s
    };
    let mut out = String::new();
    out.push_str(&rule);
    out.push('\n');
    out.push_str(&line(headers.to_vec()));
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
        out.push('\n');
    }
    out.push_str(&rule);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout() {
        let t = table(&["A", "B"], &[4, 3], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(
            t,
            "-----  ---\nA      B\n-----  ---\nxyz    1\n-----  ---\n"
        );
    }
}
