//! The one way a stored record held under its object's lock changes, in
//! the spirit of containerd's `UpdateSync`: change, commit, or roll back.

use std::sync::MutexGuard;

use crate::error::Result;
use crate::model::container::ContainerRecord;
use crate::model::sandbox::SandboxRecord;
use crate::state::store::{Change, StateStore};

/// A record the state store keeps for one object.
pub(crate) trait Record: Clone {
    /// The change that writes this record.
    fn put(&self) -> Change<'_>;
}

impl Record for SandboxRecord {
    fn put(&self) -> Change<'_> {
        Change::PutSandbox(self)
    }
}

impl Record for ContainerRecord {
    fn put(&self) -> Change<'_> {
        Change::PutContainer(self)
    }
}

impl StateStore {
    /// Changes the record `guard` holds with `change` and commits it: the
    /// record others read under the lock is always the one the store holds.
    ///
    /// `change` edits the record in place and returns whether it changed
    /// anything; only then is it written. If `change` fails, or the commit
    /// does, the record is put back as it was and the error returned.
    ///
    /// Returns whether the record changed (and was written).
    pub(crate) fn update_sync<R: Record>(
        &self,
        guard: &mut MutexGuard<'_, R>,
        change: impl FnOnce(&mut R) -> Result<bool>,
    ) -> Result<bool> {
        let record: &mut R = guard;
        let before = record.clone();
        let outcome = change(record).and_then(|changed| {
            if changed {
                self.apply(&[record.put()])?;
            }
            Ok(changed)
        });
        if outcome.is_err() {
            *record = before;
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::error::Error;
    use crate::model::sandbox::{SandboxSpec, SandboxState};

    fn sandbox() -> Mutex<SandboxRecord> {
        Mutex::new(SandboxRecord::new(SandboxSpec {
            hostname: "before".to_owned(),
            ..Default::default()
        }))
    }

    fn stored(path: &std::path::Path) -> Vec<SandboxRecord> {
        StateStore::open(path).unwrap().load().unwrap().sandboxes
    }

    #[test]
    fn a_change_is_committed_and_a_failed_one_rolled_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = StateStore::open(&path).unwrap();
        let record = sandbox();
        let mut guard = record.lock().unwrap();

        let changed = store
            .update_sync(&mut guard, |r| {
                r.spec.hostname = "after".to_owned();
                Ok(r.stop())
            })
            .unwrap();
        assert!(changed);

        let err = store
            .update_sync(&mut guard, |r| {
                r.spec.hostname = "half-done".to_owned();
                Err(Error::FailedPrecondition("refused".to_owned()))
            })
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)));
        assert_eq!(guard.spec.hostname, "after", "the failed change is undone");
        assert_eq!(guard.state, SandboxState::NotReady);

        drop(guard);
        drop(store);
        let stored = stored(&path);
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].spec.hostname, "after");
    }

    #[test]
    fn an_unchanged_record_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let store = StateStore::open(&path).unwrap();
        let record = sandbox();
        let changed = store
            .update_sync(&mut record.lock().unwrap(), |_| Ok(false))
            .unwrap();
        assert!(!changed);
        drop(store);
        assert!(stored(&path).is_empty());
    }
}
