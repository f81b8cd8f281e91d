//! Persistent metadata in an embedded redb database under the state root.
//!
//! Every record is a JSON document keyed by its id. Each write is one redb
//! transaction, so after a crash at any point a record is either the old one
//! or the new one, never half of each.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use crate::container::ContainerRecord;
use crate::error::{Error, Result};
use crate::image::ImageRecord;
use crate::sandbox::SandboxRecord;

const SANDBOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("sandboxes");
const CONTAINERS: TableDefinition<&str, &[u8]> = TableDefinition::new("containers");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// Everything the store holds, as loaded at start-up.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub sandboxes: Vec<SandboxRecord>,
    pub containers: Vec<ContainerRecord>,
    pub images: Vec<ImageRecord>,
}

/// A handle on the state database. Cheap calls; each is its own transaction.
pub struct StateStore {
    db: Database,
}

/// One change in a batch written atomically.
pub enum Change<'a> {
    PutSandbox(&'a SandboxRecord),
    DeleteSandbox(&'a str),
    PutContainer(&'a ContainerRecord),
    DeleteContainer(&'a str),
    PutImage(&'a ImageRecord),
    DeleteImage(&'a str),
}

/// The state database's page cache.
const STATE_CACHE_BYTES: usize = 32 * 1024 * 1024;

impl StateStore {
    /// Opens (creating if needed) the database at `path`. Fails if another
    /// process holds it open.
    pub fn open(path: &Path) -> Result<Self> {
        // redb caches up to 1 GiB by default, which an agent would keep
        // resident; the state of thousands of pods is a few MiB.
        let db = Database::builder()
            .set_cache_size(STATE_CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::FailedPrecondition(format!(
                    "state database {path:?} is in use by another wasmlet process"
                )),
                other => Error::Store(format!("opening {path:?}: {other}")),
            })?;
        let txn = db.begin_write()?;
        txn.open_table(SANDBOXES)?;
        txn.open_table(CONTAINERS)?;
        txn.open_table(IMAGES)?;
        txn.commit()?;
        Ok(Self { db })
    }

    /// Loads every record. A record that does not decode is reported, not
    /// silently dropped.
    pub fn load(&self) -> Result<Snapshot> {
        let txn = self.db.begin_read()?;
        Ok(Snapshot {
            sandboxes: read_all(&txn.open_table(SANDBOXES)?, "sandbox")?,
            containers: read_all(&txn.open_table(CONTAINERS)?, "container")?,
            images: read_all(&txn.open_table(IMAGES)?, "image")?,
        })
    }

    /// Applies `changes` in one transaction: all or nothing.
    pub fn apply(&self, changes: &[Change<'_>]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut sandboxes = txn.open_table(SANDBOXES)?;
            let mut containers = txn.open_table(CONTAINERS)?;
            let mut images = txn.open_table(IMAGES)?;
            for change in changes {
                match change {
                    Change::PutSandbox(r) => {
                        sandboxes.insert(r.id.as_str(), encode(r)?.as_slice())?;
                    }
                    Change::DeleteSandbox(id) => {
                        sandboxes.remove(*id)?;
                    }
                    Change::PutContainer(r) => {
                        containers.insert(r.id.as_str(), encode(r)?.as_slice())?;
                    }
                    Change::DeleteContainer(id) => {
                        containers.remove(*id)?;
                    }
                    Change::PutImage(r) => {
                        images.insert(r.id.as_str(), encode(r)?.as_slice())?;
                    }
                    Change::DeleteImage(id) => {
                        images.remove(*id)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

fn encode<T: Serialize>(record: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(record).map_err(|e| Error::Internal(format!("encoding record: {e}")))
}

fn read_all<T: DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    kind: &str,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        let record = serde_json::from_slice(value.value()).map_err(|e| {
            Error::Store(format!(
                "{kind} record {:?} does not decode: {e}",
                key.value()
            ))
        })?;
        out.push(record);
    }
    Ok(out)
}
