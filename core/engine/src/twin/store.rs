//! The twin store trait and its in-memory implementation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use zerotouch_proto::{DeviceId, ModuleId};

use super::document::TwinDocument;
use super::TwinKey;
use crate::error::StoreError;
use crate::store::{Page, PageRequest, Precondition};

/// A twin with the key it is stored under.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTwin {
    /// Device (and module) the twin belongs to.
    pub key: TwinKey,
    /// The twin.
    pub document: TwinDocument,
}

/// Device and module twins, keyed by [`TwinKey`].
///
/// Preconditions are checked atomically with the write against the stored twin's
/// [`TwinDocument::revision`] (not its etag: reported patches leave the etag alone but must
/// still not overwrite each other). The `If-Match` of a request is checked by the document
/// operations, against the etag.
pub trait TwinStore: Send + Sync {
    /// Looks a twin up.
    ///
    /// # Errors
    /// [`StoreError::Backend`] on backend failure.
    fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError>;
    /// Writes a twin if `pre` holds.
    ///
    /// # Errors
    /// Precondition failures and backend failures.
    fn put_twin(&self, key: &TwinKey, twin: &TwinDocument, pre: &Precondition) -> Result<(), StoreError>;
    /// Deletes a twin if `pre` holds.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], precondition failures and backend failures.
    fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError>;
    /// Lists twins ordered by device id, the device twin before its module twins.
    ///
    /// # Errors
    /// Backend failures or a bad continuation token.
    fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError>;
    /// The twin of a device and the twins of all its modules.
    ///
    /// # Errors
    /// Backend failures.
    fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError>;

    /// Whether a write this thread makes now joins a store unit that is still open (see
    /// `IdentityStore::in_open_unit`, which this mirrors): the embedded hub asks it to tell
    /// which twin events a rolled-back unit takes with it. False for stores outside any unit,
    /// as the in-memory one.
    fn in_open_unit(&self) -> bool {
        false
    }
}

/// Shared twin stores: a hub engine and a service API can hold one store through an `Arc`.
impl<T: TwinStore + ?Sized> TwinStore for std::sync::Arc<T> {
    fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError> {
        (**self).twin(key)
    }
    fn put_twin(&self, key: &TwinKey, twin: &TwinDocument, pre: &Precondition) -> Result<(), StoreError> {
        (**self).put_twin(key, twin, pre)
    }
    fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError> {
        (**self).delete_twin(key, pre)
    }
    fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError> {
        (**self).twins(page)
    }
    fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError> {
        (**self).device_twins(device_id)
    }
    fn in_open_unit(&self) -> bool {
        (**self).in_open_unit()
    }
}

/// Twins in memory, for tests, embedding and single-process servers.
#[derive(Debug, Default)]
pub struct MemoryTwinStore {
    twins: RwLock<BTreeMap<TwinKey, TwinDocument>>,
}

impl MemoryTwinStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> Result<std::sync::RwLockReadGuard<'_, BTreeMap<TwinKey, TwinDocument>>, StoreError> {
        self.twins.read().map_err(|_| StoreError::Backend("twin store lock poisoned".to_owned()))
    }

    fn write(&self) -> Result<std::sync::RwLockWriteGuard<'_, BTreeMap<TwinKey, TwinDocument>>, StoreError> {
        self.twins.write().map_err(|_| StoreError::Backend("twin store lock poisoned".to_owned()))
    }
}

/// Continuation tokens name the last key of the previous page: `deviceId` or
/// `deviceId/moduleId` (`/` cannot occur in ids).
fn encode_token(key: &TwinKey) -> String {
    match &key.module_id {
        Some(m) => format!("{}/{}", key.device_id, m),
        None => key.device_id.to_string(),
    }
}

fn decode_token(token: &str) -> Result<TwinKey, StoreError> {
    let bad = |_| StoreError::Backend(format!("bad continuation token {token:?}"));
    match token.split_once('/') {
        Some((d, m)) => Ok(TwinKey {
            device_id: DeviceId::new(d).map_err(bad)?,
            module_id: Some(ModuleId::new(m).map_err(bad)?),
        }),
        None => Ok(TwinKey { device_id: DeviceId::new(token).map_err(bad)?, module_id: None }),
    }
}

impl TwinStore for MemoryTwinStore {
    fn twin(&self, key: &TwinKey) -> Result<Option<TwinDocument>, StoreError> {
        Ok(self.read()?.get(key).cloned())
    }

    fn put_twin(&self, key: &TwinKey, twin: &TwinDocument, pre: &Precondition) -> Result<(), StoreError> {
        let mut twins = self.write()?;
        pre.check(twins.get(key).map(TwinDocument::revision).as_ref())?;
        twins.insert(key.clone(), twin.clone());
        Ok(())
    }

    fn delete_twin(&self, key: &TwinKey, pre: &Precondition) -> Result<(), StoreError> {
        let mut twins = self.write()?;
        match twins.get(key) {
            None => Err(StoreError::NotFound),
            Some(current) => {
                pre.check(Some(&current.revision()))?;
                twins.remove(key);
                Ok(())
            }
        }
    }

    fn twins(&self, page: &PageRequest) -> Result<Page<StoredTwin>, StoreError> {
        let twins = self.read()?;
        let start = match &page.continuation {
            Some(token) => Bound::Excluded(decode_token(token)?),
            None => Bound::Unbounded,
        };
        let max = page.max_items.max(1);
        let mut items: Vec<StoredTwin> = twins
            .range((start, Bound::Unbounded))
            .take(max + 1)
            .map(|(key, document)| StoredTwin { key: key.clone(), document: document.clone() })
            .collect();
        let continuation = if items.len() > max {
            items.truncate(max);
            items.last().map(|t| encode_token(&t.key))
        } else {
            None
        };
        Ok(Page { items, continuation })
    }

    fn device_twins(&self, device_id: &DeviceId) -> Result<Vec<StoredTwin>, StoreError> {
        let twins = self.read()?;
        let first = TwinKey { device_id: device_id.clone(), module_id: None };
        Ok(twins
            .range(first..)
            .take_while(|(key, _)| &key.device_id == device_id)
            .map(|(key, document)| StoredTwin { key: key.clone(), document: document.clone() })
            .collect())
    }
}
