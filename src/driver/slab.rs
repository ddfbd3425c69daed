//! The worker's slot map: sessions, listeners and sockets by [`Key`], with
//! generations so that an event for a slot that was freed and reused is recognised.

/// A slot-map key: index in the low 32 bits, generation above, so that a stale
/// completion for a reused slot is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    pub idx: u32,
    pub gen: u32,
}

/// A slab of values addressed by [`Key`]; freed slots are reused with a new generation.
pub(crate) struct Slab<T> {
    entries: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            entries: Vec::new(),
            free: Vec::new(),
        }
    }
}

/// Generations are kept to 24 bits so that a key fits in user_data with a kind byte.
pub(crate) const GEN_MASK: u32 = 0x00ff_ffff;

impl<T> Slab<T> {
    pub fn insert(&mut self, v: T) -> Key {
        if let Some(idx) = self.free.pop() {
            let e = &mut self.entries[idx as usize];
            e.0 = (e.0 + 1) & GEN_MASK;
            e.1 = Some(v);
            Key { idx, gen: e.0 }
        } else {
            self.entries.push((0, Some(v)));
            Key {
                idx: (self.entries.len() - 1) as u32,
                gen: 0,
            }
        }
    }

    pub fn get_mut(&mut self, k: Key) -> Option<&mut T> {
        match self.entries.get_mut(k.idx as usize) {
            Some((g, Some(v))) if *g == k.gen => Some(v),
            _ => None,
        }
    }

    pub fn remove(&mut self, k: Key) -> Option<T> {
        match self.entries.get_mut(k.idx as usize) {
            Some((g, slot @ Some(_))) if *g == k.gen => {
                self.free.push(k.idx);
                slot.take()
            }
            _ => None,
        }
    }

    /// Values in the slab (count).
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    pub fn get(&self, k: Key) -> Option<&T> {
        match self.entries.get(k.idx as usize) {
            Some((g, Some(v))) if *g == k.gen => Some(v),
            _ => None,
        }
    }

    /// The values in the slab, in slot order (no allocation).
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().filter_map(|(_, v)| v.as_ref())
    }

    pub fn keys(&self) -> Vec<Key> {
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, (_, v))| v.is_some())
            .map(|(i, (g, _))| Key {
                idx: i as u32,
                gen: *g,
            })
            .collect()
    }
}

/// Packs a key and an op kind into a 64-bit token (io_uring user_data, epoll data):
/// bits 0..32 index, 32..56 generation, 56..64 kind.
pub(crate) fn token(kind: u8, k: Key) -> u64 {
    (kind as u64) << 56 | ((k.gen & GEN_MASK) as u64) << 32 | k.idx as u64
}

/// Unpacks [`token`].
pub(crate) fn untoken(t: u64) -> (u8, Key) {
    (
        (t >> 56) as u8,
        Key {
            idx: t as u32,
            gen: ((t >> 32) as u32) & GEN_MASK,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_generations_reject_stale_keys() {
        let mut s = Slab::default();
        let a = s.insert(1);
        assert_eq!(s.remove(a), Some(1));
        let b = s.insert(2);
        assert_eq!(a.idx, b.idx);
        assert!(s.get_mut(a).is_none());
        assert_eq!(s.get_mut(b), Some(&mut 2));
        let (kind, k) = untoken(token(7, b));
        assert_eq!((kind, k), (7, b));
    }
}
