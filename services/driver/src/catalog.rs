//! Entries by id and in creation order, with pages, for tasks and sessions alike.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub struct Catalog<T> {
    by_id: HashMap<String, Arc<T>>,
    by_order: BTreeMap<u64, Arc<T>>,
    next_order: u64,
}

impl<T> Default for Catalog<T> {
    fn default() -> Self {
        Catalog {
            by_id: HashMap::new(),
            by_order: BTreeMap::new(),
            next_order: 0,
        }
    }
}

impl<T> Catalog<T> {
    pub fn insert(&mut self, id: String, entry: Arc<T>) {
        self.next_order += 1;
        self.by_order.insert(self.next_order, entry.clone());
        self.by_id.insert(id, entry);
    }

    pub fn get(&self, id: &str) -> Option<Arc<T>> {
        self.by_id.get(id).cloned()
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<T>> {
        self.by_order.values()
    }

    /// Entries from position `start` on that `keep` keeps, at most `limit`, mapped by `keep`;
    /// and the position where the next page starts.
    pub fn page<V>(
        &self,
        start: u64,
        limit: usize,
        keep: impl Fn(&T) -> Option<V>,
    ) -> (Vec<V>, Option<u64>) {
        let mut page = Vec::new();
        for (order, entry) in self.by_order.range(start..) {
            let Some(value) = keep(entry) else { continue };
            if page.len() == limit {
                return (page, Some(*order));
            }
            page.push(value);
        }
        (page, None)
    }
}

/// Parses a page token the catalog handed out.
pub fn page_start(token: &str) -> Option<u64> {
    if token.is_empty() {
        Some(0)
    } else {
        token.parse().ok()
    }
}
