//! Thumbnails of jobs' image outputs, kept beside the ledger (a
//! `thumbnails/` folder beside the embedded queue's ledger, or objects
//! under the status prefix on S3) for the monitor to serve.

use super::{Ledger, LedgerError};

const FOLDER: &str = "thumbnails/";

/// A thumbnail's name: `MESSAGE_ID/N.jpg`, of the job's Nth image output.
pub fn thumbnail_name(message_id: &str, n: usize) -> String {
    format!("{message_id}/{n}.jpg")
}

/// Whether `name` is one [`thumbnail_name`] makes (so a request cannot
/// reach outside the folder).
fn valid(name: &str) -> bool {
    let Some((id, file)) = name.split_once('/') else {
        return false;
    };
    uuid::Uuid::parse_str(id).is_ok()
        && file
            .strip_suffix(".jpg")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl Ledger {
    /// Stores a thumbnail under `name`.
    pub async fn put_thumbnail(&self, name: &str, jpeg: Vec<u8>) -> Result<(), LedgerError> {
        if !valid(name) {
            return Err(LedgerError(format!("not a thumbnail name: {name}")));
        }
        match self {
            Ledger::Local(conn) => {
                let path = super::cancels::ledger_dir(conn)?.join(FOLDER).join(name);
                let write = async {
                    tokio::fs::create_dir_all(path.parent().expect("a thumbnail has a folder"))
                        .await?;
                    tokio::fs::write(&path, jpeg).await
                };
                write
                    .await
                    .map_err(|e| LedgerError(format!("{}: {e}", path.display())))
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let key = format!("{prefix}{FOLDER}{name}");
                client
                    .put_object()
                    .bucket(bucket)
                    .key(&key)
                    .content_type("image/jpeg")
                    .body(jpeg.into())
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| LedgerError(format!("{key}: {}", crate::aws::describe(&e))))
            }
        }
    }

    /// A thumbnail's bytes; `None` when there is none by that name.
    pub async fn thumbnail(&self, name: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        if !valid(name) {
            return Ok(None);
        }
        match self {
            Ledger::Local(conn) => {
                let path = super::cancels::ledger_dir(conn)?.join(FOLDER).join(name);
                match tokio::fs::read(&path).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(LedgerError(format!("{}: {e}", path.display()))),
                }
            }
            Ledger::S3 {
                client,
                bucket,
                prefix,
                ..
            } => {
                let key = format!("{prefix}{FOLDER}{name}");
                match client.get_object().bucket(bucket).key(&key).send().await {
                    Ok(object) => {
                        let bytes = object
                            .body
                            .collect()
                            .await
                            .map_err(|e| LedgerError(format!("{key}: {e}")))?;
                        Ok(Some(bytes.into_bytes().to_vec()))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                    Err(e) => Err(LedgerError(format!("{key}: {}", crate::aws::describe(&e)))),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_made_names_are_valid() {
        let id = uuid::Uuid::new_v4().to_string();
        assert!(valid(&thumbnail_name(&id, 3)));
        for bad in [
            "../x/1.jpg",
            "x/1.jpg",
            &format!("{id}/../1.jpg"),
            &format!("{id}/1.png"),
            &format!("{id}/.jpg"),
        ] {
            assert!(!valid(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_thumbnail_is_kept_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::local(dir.path()).unwrap();
        let name = thumbnail_name(&uuid::Uuid::new_v4().to_string(), 0);
        assert_eq!(ledger.thumbnail(&name).await.unwrap(), None);
        ledger.put_thumbnail(&name, b"jpeg".to_vec()).await.unwrap();
        assert_eq!(
            ledger.thumbnail(&name).await.unwrap().as_deref(),
            Some(&b"jpeg"[..])
        );
    }
}
