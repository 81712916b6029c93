//! rpm's sqlite database (`rpmdb.sqlite`, rpm 4.16 and later: Fedora, openEuler 22.03+,
//! Debian's rpm): the `Packages` table's `blob` column holds one header a row, read one
//! row at a time.

use crate::{AttestError, Result};
use std::path::Path;

/// Hands each header of the database at `db` (a copy the caller owns: sqlite may write its
/// shared-memory file beside it) to `each`.
pub fn for_each_header(db: &Path, each: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let bad = |e: rusqlite::Error| AttestError::bad_db(db, e.to_string());
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(bad)?;
    let mut stmt = conn
        .prepare("SELECT blob FROM Packages ORDER BY hnum")
        .map_err(bad)?;
    let mut rows = stmt.query([]).map_err(bad)?;
    while let Some(row) = rows.next().map_err(bad)? {
        let blob = row.get_ref(0).map_err(bad)?;
        let bytes = blob
            .as_blob()
            .map_err(|e| AttestError::bad_db(db, format!("a Packages row: {e}")))?;
        if bytes.len() > super::HEADER_MAX {
            return Err(AttestError::bad_db(
                db,
                format!("a header of {} bytes", bytes.len()),
            ));
        }
        each(bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_headers() {
        let dir = tempfile::tempdir().expect("tmp");
        let db = dir.path().join("rpmdb.sqlite");
        let conn = rusqlite::Connection::open(&db).expect("create");
        conn.execute_batch(
            "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL)",
        )
        .expect("table");
        for (n, v) in [("a", "1"), ("b", "2")] {
            conn.execute(
                "INSERT INTO Packages (blob) VALUES (?1)",
                [super::super::fixture::header(n, v, "1", None)],
            )
            .expect("insert");
        }
        drop(conn);
        let mut names = Vec::new();
        let mut owned = Default::default();
        super::super::collect(&db, |f| for_each_header(&db, f), &mut names, &mut owned)
            .expect("read");
        let got: Vec<_> = names.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(got, ["a", "b"]);
        // A file that is no database is named.
        std::fs::write(dir.path().join("junk"), b"not sqlite at all, really not").expect("w");
        let junk = dir.path().join("junk");
        let err = for_each_header(&junk, &mut |_| Ok(())).expect_err("refused");
        assert!(err.to_string().contains("junk"), "{err}");
    }
}
