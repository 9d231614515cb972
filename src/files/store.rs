//! Where captured files go: an `object_store` (local filesystem or any S3-compatible endpoint),
//! written as a multipart stream so no file is ever held whole in memory (one part per download at
//! most), and aborted (leaving nothing) when a download fails.

use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};

use crate::config::FilesConfig;

/// Part size of multipart writes to S3 (its minimum for every part but the last): the floor of
/// `files.max_buffer_bytes`, which the configuration owns, so that every download's share fits.
pub(crate) const S3_PART_BYTES: usize = crate::config::MIN_BUFFER_BYTES as usize;
/// Part size of writes to a local disk, which has no minimum: smaller parts let the capture
/// memory budget (`files.max_buffer_bytes`) run more downloads at once.
const LOCAL_PART_BYTES: usize = 1024 * 1024;

/// Why the file store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `files.store` is malformed: the value and what is wrong with it.
    #[error("invalid files.store {0:?}: {1}")]
    Config(String, String),
    /// The object store refused: bad credentials, missing bucket, a failed part upload.
    #[error(transparent)]
    Store(#[from] object_store::Error),
    /// A local directory cannot be created or examined: the path and the error.
    #[error("cannot create {0}: {1}")]
    Io(String, std::io::Error),
}

pub(crate) struct FileStore {
    store: Arc<dyn ObjectStore>,
    /// Set for `file://` stores: reports where a key really lands on disk (object_store
    /// percent-encodes some characters of file names there).
    local: Option<Arc<LocalFileSystem>>,
    /// The URL prefix reported as `location` of S3 objects (`s3://bucket/`).
    location_base: String,
    /// Key prefix inside the store (the `prefix` of `s3://bucket/prefix`).
    prefix: String,
    /// Bytes of one multipart part: the most a download's writer holds in memory.
    part_bytes: usize,
}

impl FileStore {
    /// # Errors
    /// The store URL is malformed or its directory cannot be created.
    pub(crate) fn from_config(cfg: &FilesConfig) -> Result<FileStore, StoreError> {
        let bad = |why: &str| StoreError::Config(cfg.store.clone(), why.to_owned());
        if let Some(dir) = cfg.store.strip_prefix("file://") {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(dir.to_owned(), e))?;
            let abs = std::fs::canonicalize(dir).map_err(|e| StoreError::Io(dir.to_owned(), e))?;
            // Every write is synced before it returns (the file, then the directories it created
            // and the one it landed in), so that an object outlives a crash of the machine as the
            // spool's records pointing at it do: a capture's `stored` result, a claim check.
            let store = Arc::new(LocalFileSystem::new_with_prefix(&abs)?.with_fsync(true));
            return Ok(FileStore {
                store: store.clone(),
                local: Some(store),
                location_base: String::new(),
                prefix: String::new(),
                part_bytes: LOCAL_PART_BYTES,
            });
        }
        let rest = cfg.store.strip_prefix("s3://").ok_or_else(|| bad("expected file:// or s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket).with_allow_http(cfg.s3.allow_http);
        if let Some(e) = &cfg.s3.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &cfg.s3.region {
            b = b.with_region(r);
        }
        if let Some(k) = &cfg.s3.access_key_id {
            b = b.with_access_key_id(k.expose());
        }
        if let Some(s) = &cfg.s3.secret_access_key {
            b = b.with_secret_access_key(s.expose());
        }
        Ok(FileStore {
            store: Arc::new(b.build()?),
            local: None,
            location_base: format!("s3://{bucket}/"),
            prefix: prefix.trim_matches('/').to_owned(),
            part_bytes: S3_PART_BYTES,
        })
    }

    /// The most memory one download's writer holds: one part, buffered or being uploaded.
    pub(crate) fn part_bytes(&self) -> usize {
        self.part_bytes
    }

    /// Starts a streamed write of `rel` (a `/`-separated relative key).
    ///
    /// # Errors
    /// The store refused to start the upload.
    pub(crate) async fn writer(&self, rel: &str) -> Result<(Writer, String), StoreError> {
        let (path, location) = self.path_and_location(rel)?;
        let upload = self.store.put_multipart(&path).await?;
        Ok((Writer(WriteMultipart::new_with_chunk_size(upload, self.part_bytes)), location))
    }

    /// The store path of a `/`-separated relative key, and the location reported for it.
    fn path_and_location(&self, rel: &str) -> Result<(StorePath, String), StoreError> {
        let key = if self.prefix.is_empty() { rel.to_owned() } else { format!("{}/{rel}", self.prefix) };
        let path = StorePath::from_iter(key.split('/'));
        let location = match &self.local {
            Some(fs) => format!("file://{}", fs.path_to_filesystem(&path)?.display()),
            None => format!("{}{}", self.location_base, path.as_ref()),
        };
        Ok((path, location))
    }

    /// Stores `bytes` whole under `rel`, replacing what was there, and returns its location. On a
    /// `file://` store the file and its directories are synced before this returns (as every write
    /// to it is), so the object outlives a crash of the machine as the spool's events do.
    ///
    /// # Errors
    /// The store refused the write, or the sync failed.
    pub(crate) async fn put(&self, rel: &str, bytes: &[u8]) -> Result<String, StoreError> {
        let (path, location) = self.path_and_location(rel)?;
        self.store.put(&path, bytes.to_vec().into()).await?;
        Ok(location)
    }

    /// Reads the whole object at `location` (as [`FileStore::put`] or a file capture reported it).
    /// Only locations inside this store are read.
    ///
    /// # Errors
    /// The location is not in this store, or the store could not read it.
    pub(crate) async fn get(&self, location: &str) -> Result<Vec<u8>, StoreError> {
        let outside = || StoreError::Config(location.to_owned(), "not a location in the configured files.store".into());
        if let Some(fs) = &self.local {
            let file = std::path::Path::new(location.strip_prefix("file://").ok_or_else(outside)?);
            let probe = fs.path_to_filesystem(&StorePath::from("x"))?;
            let root = probe.parent().ok_or_else(outside)?;
            let rel = file.strip_prefix(root).map_err(|_| outside())?;
            if rel.as_os_str().is_empty() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(outside());
            }
            return tokio::fs::read(file).await.map_err(|e| StoreError::Io(location.to_owned(), e));
        }
        let key = location.strip_prefix(&self.location_base).ok_or_else(outside)?;
        let path = StorePath::parse(key).map_err(|_| outside())?;
        Ok(self.store.get(&path).await?.bytes().await?.to_vec())
    }

    /// Bytes available to this process on a `file://` store's filesystem; `None` for object stores.
    ///
    /// # Errors
    /// `statvfs` failed.
    pub(crate) fn free_bytes(&self) -> Option<Result<u64, StoreError>> {
        let root = self.local.as_ref()?.path_to_filesystem(&StorePath::from("x")).ok()?;
        let dir = root.parent()?.to_owned();
        Some(crate::clock::free_bytes(&dir).map_err(|e| StoreError::Io(dir.display().to_string(), e)))
    }
}

/// A streamed upload in progress.
pub(crate) struct Writer(WriteMultipart);

impl Writer {
    /// # Errors
    /// A part upload failed.
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        // A full part is uploaded before more is buffered: one part per download in memory at
        // most (plus the chunk being written), which is what the capture budget reserves.
        self.0.wait_for_capacity(1).await?;
        self.0.write(chunk);
        Ok(())
    }

    /// Completes the upload. On a `file://` store the file and its directories are synced before
    /// this returns; an S3 upload is durable once completed.
    ///
    /// # Errors
    /// Completing the upload or syncing it failed (the caller aborts nothing more: the store
    /// discards it).
    pub(crate) async fn finish(self) -> Result<(), StoreError> {
        self.0.finish().await?;
        Ok(())
    }

    pub(crate) async fn abort(self) {
        if let Err(e) = self.0.abort().await {
            tracing::warn!(error = %e, "aborting a partial file upload failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An fsync cannot be observed from a unit test; what can be is that the `file://` store every
    /// write goes through (a capture's multipart writer as well as [`FileStore::put`]) is the one
    /// object_store syncs: the file before its rename into place, then the directories created for
    /// it and the one it landed in, before the write returns.
    #[tokio::test]
    async fn every_write_to_a_local_store_is_synced_before_it_returns() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let cfg = FilesConfig { store: format!("file://{}", dir.path().join("files").display()), ..Default::default() };
        let store = FileStore::from_config(&cfg).expect("a local store");
        let local = store.local.as_ref().expect("a file:// store");
        assert!(format!("{local:?}").ends_with("fsync: true }"), "the store does not sync its writes: {local:?}");
        // The capture's writer uses that very store: a key in directories yet to be made lands whole.
        let (mut writer, location) = store.writer("c/2025/01/02/e/0/a.bin").await.expect("a writer");
        writer.write(b"captured").await.expect("written");
        writer.finish().await.expect("finished");
        assert_eq!(store.get(&location).await.expect("read back"), b"captured");
    }
}
