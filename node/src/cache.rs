//! The mapping-table cache that every node and client keeps: page id -> replicas (primary
//! first), each entry tagged with the config epoch it was learned in. Mappings change only
//! when the epoch does (a node declared dead), so an entry is good exactly while its epoch
//! is the current one.

use std::collections::HashMap;
use std::sync::RwLock;

use pmgas_layout::gat::Mapping;
use pmgas_layout::wire::Replica;
use pmgas_layout::{Epoch, PageId};

#[derive(Default)]
pub(crate) struct MappingCache(RwLock<HashMap<PageId, (Epoch, Vec<Replica>)>>);

impl MappingCache {
    /// The cached mapping of `page_id` if it was learned in `epoch`.
    pub(crate) fn get(&self, page_id: PageId, epoch: Epoch) -> Option<Mapping> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        let (e, replicas) = map.get(&page_id)?;
        (*e == epoch).then(|| Mapping {
            page_id,
            replicas: replicas.clone(),
            freed: false,
            revision: 0,
        })
    }

    pub(crate) fn insert(&self, page_id: PageId, epoch: Epoch, replicas: &[Replica]) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(page_id, (epoch, replicas.to_vec()));
    }

    pub(crate) fn remove(&self, page_id: PageId) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&page_id);
    }

    /// Drops every entry learned before `epoch`; returns how many.
    pub(crate) fn drop_older_than(&self, epoch: Epoch) -> usize {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        let before = map.len();
        map.retain(|_, (e, _)| *e >= epoch);
        before - map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pmgas_layout::{NodeId, PageIndex};

    #[test]
    fn an_entry_serves_only_its_epoch() {
        let c = MappingCache::default();
        let r = [Replica {
            node: NodeId(1),
            page: PageIndex(3),
        }];
        c.insert(PageId(7), Epoch(1), &r);
        assert_eq!(
            c.get(PageId(7), Epoch(1)).map(|m| m.replicas),
            Some(r.to_vec())
        );
        assert!(c.get(PageId(7), Epoch(2)).is_none());
        assert_eq!(c.drop_older_than(Epoch(2)), 1);
        assert!(c.get(PageId(7), Epoch(1)).is_none());
    }
}
