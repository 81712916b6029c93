//! List: the rows of `ctr-img images` (one per name; `<none>` for an untagged image),
//! newest first, optionally filtered by a repository, reference or ID.

use crate::error;
use crate::state::State;
use isula_api::v1::list_response::ImageInfo;
use isula_api::v1::{ListRequest, ListResponse};
use isula_store::ImageRecord;
use isula_types::Reference;
use tonic::Status;

/// Sizes as `docker images` shows them: decimal units, three significant digits.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    let mut s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s} {}", UNITS[unit])
}

fn created(img: &ImageRecord) -> String {
    img.created
        .as_deref()
        .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "<unknown>".into())
}

fn rows(img: &ImageRecord, keep: &dyn Fn(&Reference) -> bool) -> Vec<ImageInfo> {
    let row = |repo: String, tag: String| ImageInfo {
        repository: repo,
        tag,
        id: img.id.hex()[..12].to_string(),
        created: created(img),
        size: human_size(img.size),
    };
    let named: Vec<ImageInfo> = img
        .names
        .iter()
        .filter_map(|n| Reference::parse(n).ok())
        .filter(|r| keep(r))
        .map(|r| row(r.familiar_name(), r.tag().unwrap_or("<none>").to_string()))
        .collect();
    if img.names.is_empty() {
        vec![row("<none>".into(), "<none>".into())]
    } else {
        named
    }
}

pub fn list(state: &State, req: ListRequest) -> Result<ListResponse, Status> {
    let mut images = state.store.images();
    images.sort_by(|a, b| {
        b.created
            .cmp(&a.created)
            .then_with(|| a.names.cmp(&b.names))
    });
    let filter = req.image_name.trim();
    let mut out = Vec::new();
    if filter.is_empty() {
        for img in &images {
            out.extend(rows(img, &|_| true));
        }
        return Ok(ListResponse { images: out });
    }
    // A repository (all its tags) or a reference with an explicit tag.
    if let Ok(want) = Reference::parse(filter) {
        let explicit_tag = filter
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'));
        for img in &images {
            out.extend(
                rows(img, &|r| {
                    r.name() == want.name() && (!explicit_tag || r.tag() == want.tag())
                })
                .into_iter()
                .filter(|row| row.repository != "<none>"),
            );
        }
    }
    if out.is_empty() {
        // An image ID or ID prefix.
        match state.store.resolve(filter) {
            Ok(img) => out.extend(rows(&img, &|_| true)),
            Err(isula_store::StoreError::ImageNotFound(_)) => {
                return Err(Status::not_found(format!("no such image: {filter}")))
            }
            Err(e) => return Err(error::store(e)),
        }
    }
    Ok(ListResponse { images: out })
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(5_850_000), "5.85 MB");
        assert_eq!(human_size(1_450_000), "1.45 MB");
        assert_eq!(human_size(500_000_000), "500 MB");
        assert_eq!(human_size(12_345_678), "12.3 MB");
        assert_eq!(human_size(2_000_000_000), "2 GB");
    }
}
