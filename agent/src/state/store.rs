//! Persistent metadata in an embedded redb database under the state root.
//!
//! Every record is a JSON document keyed by its id. Each batch of changes
//! is written in one redb transaction, so after a crash at any point a
//! record is either the old one or the new one, never half of each.
//!
//! Writes are group-committed: a caller returns only once its changes are
//! durable (fsync'd), but callers that arrive while a commit is in flight
//! are written together in the next transaction, so concurrent CRI calls
//! share one fsync instead of queueing for one each.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::model::container::ContainerRecord;
use crate::model::image::ImageRecord;
use crate::model::sandbox::SandboxRecord;

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

/// A handle on the state database.
pub struct StateStore {
    db: Database,
    queue: Mutex<Queue>,
    committed: Condvar,
}

/// Changes waiting for the next commit, and the outcome of those done.
#[derive(Default)]
struct Queue {
    next_ticket: u64,
    pending: Vec<(u64, Vec<Op>)>,
    /// Whether a caller is committing a batch now.
    committing: bool,
    /// Outcomes not yet collected by their callers: each a copy of its
    /// batch's (`Error::duplicate`).
    done: HashMap<u64, Result<()>>,
}

#[derive(Clone, Copy)]
enum Table {
    Sandboxes,
    Containers,
    Images,
}

/// A change with its record encoded, ready for any transaction.
enum Op {
    Put(Table, String, Vec<u8>),
    Delete(Table, String),
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
        Ok(Self {
            db,
            queue: Mutex::new(Queue::default()),
            committed: Condvar::new(),
        })
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

    /// Applies `changes` atomically (all or nothing) and durably: when this
    /// returns `Ok`, they survive a crash. Concurrent callers' changes may
    /// share a transaction; each caller's are applied in order, callers in
    /// the order they called.
    pub fn apply(&self, changes: &[Change<'_>]) -> Result<()> {
        let ops = changes.iter().map(Op::of).collect::<Result<Vec<_>>>()?;
        // This blocks the calling thread for the disk, as one fsync always
        // did; calls on the runtime's other workers queue their changes
        // behind it meanwhile and go in the next commit together.
        // (`block_in_place` would hand the worker off on every call, which
        // costs more than the fsync on an uncontended store.)
        self.enqueue_and_wait(ops)
    }

    fn enqueue_and_wait(&self, ops: Vec<Op>) -> Result<()> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.pending.push((ticket, ops));
        loop {
            if let Some(outcome) = queue.done.remove(&ticket) {
                return outcome;
            }
            if queue.committing {
                queue = self
                    .committed
                    .wait(queue)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Nobody is committing: commit everything pending, ours too.
            queue.committing = true;
            let batch = std::mem::take(&mut queue.pending);
            drop(queue);
            let started = std::time::Instant::now();
            let outcome = self.commit(&batch);
            crate::metrics::global().committed(
                started.elapsed(),
                batch.iter().map(|(_, ops)| ops.len()).sum(),
            );
            queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            for (t, _) in &batch {
                queue
                    .done
                    .insert(*t, outcome.as_ref().copied().map_err(Error::duplicate));
            }
            queue.committing = false;
            self.committed.notify_all();
        }
    }

    /// Writes `batch` in one transaction.
    fn commit(&self, batch: &[(u64, Vec<Op>)]) -> Result<()> {
        let txn = self.db.begin_write()?;
        {
            let mut sandboxes = txn.open_table(SANDBOXES)?;
            let mut containers = txn.open_table(CONTAINERS)?;
            let mut images = txn.open_table(IMAGES)?;
            for op in batch.iter().flat_map(|(_, ops)| ops) {
                let (table, key) = match op {
                    Op::Put(t, k, _) | Op::Delete(t, k) => (t, k.as_str()),
                };
                let table = match table {
                    Table::Sandboxes => &mut sandboxes,
                    Table::Containers => &mut containers,
                    Table::Images => &mut images,
                };
                match op {
                    Op::Put(_, _, value) => {
                        table.insert(key, value.as_slice())?;
                    }
                    Op::Delete(..) => {
                        table.remove(key)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

impl Op {
    fn of(change: &Change<'_>) -> Result<Op> {
        Ok(match change {
            Change::PutSandbox(r) => Op::Put(Table::Sandboxes, r.id.to_string(), encode(r)?),
            Change::DeleteSandbox(id) => Op::Delete(Table::Sandboxes, (*id).to_owned()),
            Change::PutContainer(r) => Op::Put(Table::Containers, r.id.to_string(), encode(r)?),
            Change::DeleteContainer(id) => Op::Delete(Table::Containers, (*id).to_owned()),
            Change::PutImage(r) => Op::Put(Table::Images, r.id.to_string(), encode(r)?),
            Change::DeleteImage(id) => Op::Delete(Table::Images, (*id).to_owned()),
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sandbox::{SandboxRecord, SandboxSpec};

    fn sandbox(hostname: &str) -> SandboxRecord {
        SandboxRecord::new(SandboxSpec {
            hostname: hostname.to_owned(),
            ..Default::default()
        })
    }

    #[test]
    fn concurrent_writers_all_land_in_order_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = std::sync::Arc::new(StateStore::open(&path).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let mut record = sandbox("v0");
                    let mut gone = sandbox("deleted");
                    for i in 0..25 {
                        record.spec.hostname = format!("t{t}-v{i}");
                        store.apply(&[Change::PutSandbox(&record)]).unwrap();
                        gone.spec.hostname = format!("t{t}-gone-{i}");
                        store.apply(&[Change::PutSandbox(&gone)]).unwrap();
                        store
                            .apply(&[Change::DeleteSandbox(gone.id.as_str())])
                            .unwrap();
                    }
                    (record.id.clone(), format!("t{t}-v24"))
                })
            })
            .collect();
        let expected: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        drop(store);
        let snapshot = StateStore::open(&path).unwrap().load().unwrap();
        assert_eq!(snapshot.sandboxes.len(), expected.len());
        for (id, hostname) in expected {
            let found = snapshot.sandboxes.iter().find(|s| s.id == id).unwrap();
            assert_eq!(found.spec.hostname, hostname);
        }
    }

    #[test]
    fn a_batch_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = StateStore::open(&path).unwrap();
        let (a, b) = (sandbox("a"), sandbox("b"));
        store
            .apply(&[Change::PutSandbox(&a), Change::PutSandbox(&b)])
            .unwrap();
        store
            .apply(&[Change::DeleteSandbox(a.id.as_str())])
            .unwrap();
        drop(store);
        let snapshot = StateStore::open(&path).unwrap().load().unwrap();
        let ids: Vec<_> = snapshot.sandboxes.iter().map(|s| s.id.clone()).collect();
        assert_eq!(ids, vec![b.id]);
    }
}
