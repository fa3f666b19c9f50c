//! Small JSON state files (topics, consumer offsets, checkpoint), replaced atomically so a
//! crash leaves either the old or the new version, never a torn one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::commitlog::{read, sync_dir, write};
use super::StoreError;

/// Writes `value` as JSON to `path` via a temp file, fsync and rename.
pub fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let tmp = path.with_extension("tmp");
    let data = serde_json::to_vec_pretty(value).map_err(|e| StoreError::Json {
        path: path.to_path_buf(),
        source: e,
    })?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| StoreError::io(&tmp, e))?;
    f.write_all(&data).map_err(|e| StoreError::io(&tmp, e))?;
    f.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Reads JSON from `path`; `None` if the file does not exist.
pub fn load_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    match std::fs::read(path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| StoreError::Json {
                path: path.to_path_buf(),
                source: e,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// A table kept in memory and saved whole to its JSON file on every change (topics,
/// subscription groups: changes are rare).
#[derive(Debug)]
pub struct JsonTable<T> {
    /// Where it is saved; none for a table kept in memory only.
    path: Option<PathBuf>,
    inner: RwLock<T>,
    /// Serializes changes, so the file's save runs without the read side locked: a pull
    /// reading the table does not wait for an fsync.
    writer: Mutex<()>,
}

impl<T: Serialize + DeserializeOwned + Default + Clone> JsonTable<T> {
    /// Loads the table from `path`, or starts empty.
    pub fn load(path: PathBuf) -> Result<JsonTable<T>, StoreError> {
        let inner = load_json::<T>(&path)?.unwrap_or_default();
        Ok(JsonTable {
            path: Some(path),
            inner: RwLock::new(inner),
            writer: Mutex::new(()),
        })
    }

    /// An empty table that is never saved (a name server run without a KV config file).
    pub fn in_memory() -> JsonTable<T> {
        JsonTable {
            path: None,
            inner: RwLock::new(T::default()),
            writer: Mutex::new(()),
        }
    }

    /// The table as it is now.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        read(&self.inner)
    }

    /// Applies `edit` to a copy of the table and, if it changed anything, saves the copy and
    /// only then takes it: a change whose save failed is not kept in memory, where it would
    /// be served until a restart lost it and, asked for again, look already made.
    pub fn change(&self, edit: impl FnOnce(&mut T) -> bool) -> Result<bool, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = read(&self.inner).clone();
        if !edit(&mut changed) {
            return Ok(false);
        }
        if let Some(path) = &self.path {
            save_json(path, &changed)?;
        }
        *write(&self.inner) = changed;
        Ok(true)
    }
}
