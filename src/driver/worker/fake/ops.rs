//! The fake's table of operations in flight and the memory each owns.

use super::*;

/// What an fd is to the fake.
#[derive(Debug, Clone, Copy)]
pub(super) enum Use {
    /// Session `.0`'s client (0) or upstream (1) socket.
    Peer(usize, usize),
}

/// What the event of a (not cancelled) operation tells the worker, kept until
/// the worker has handled the batch it is in: if the worker cancels the
/// operation meanwhile (its event not handled yet), it ignores the event.
#[derive(Debug, Clone, Copy)]
pub(super) struct Effect {
    pub(super) s: usize,
    pub(super) side: usize,
    /// Bytes received from the peer / sent to it.
    pub(super) bytes_in: usize,
    pub(super) bytes_out: usize,
    /// An error result (the session must abort).
    pub(super) error: bool,
}

/// An operation in flight.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) token: u64,
    pub(super) op: Op,
    pub(super) cancelled: bool,
}

/// The memory an operation owns (address, capacity), to check that what goes
/// back in its last event is what came in.
pub(super) fn owned_mem(op: &Op) -> Option<(usize, usize)> {
    match op {
        Op::Send { buf, .. } => Some((buf.as_ptr() as usize, buf.capacity())),
        Op::Connect { addr, .. } => Some((&**addr as *const socket2::SockAddr as usize, 0)),
        _ => None,
    }
}

/// The same for what an event hands back.
pub(super) fn returned_mem(o: &crate::driver::backend::Owned) -> Option<(usize, usize)> {
    use crate::driver::backend::Owned;
    match o {
        Owned::Bytes(buf) => Some((buf.as_ptr() as usize, buf.capacity())),
        Owned::Addr(addr) => Some((&**addr as *const socket2::SockAddr as usize, 0)),
        _ => None,
    }
}

/// The operations in flight, by id (in submission order): a few at a time, so
/// a sorted vector.
#[derive(Debug, Default)]
pub(super) struct OpTable(pub(super) Vec<(u64, Pending)>);

impl OpTable {
    pub(super) fn at(&self, id: u64) -> Result<usize, usize> {
        self.0.binary_search_by_key(&id, |(i, _)| *i)
    }
    pub(super) fn get(&self, id: &u64) -> Option<&Pending> {
        self.at(*id).ok().map(|i| &self.0[i].1)
    }
    pub(super) fn get_mut(&mut self, id: &u64) -> Option<&mut Pending> {
        self.at(*id).ok().map(|i| &mut self.0[i].1)
    }
    pub(super) fn remove(&mut self, id: &u64) -> Option<Pending> {
        self.at(*id).ok().map(|i| self.0.remove(i).1)
    }
    pub(super) fn insert(&mut self, id: u64, p: Pending) {
        match self.at(id) {
            Ok(i) => self.0[i].1 = p,
            Err(i) => self.0.insert(i, (id, p)),
        }
    }
    pub(super) fn values(&self) -> impl Iterator<Item = &Pending> {
        self.0.iter().map(|(_, p)| p)
    }
    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &Pending)> {
        self.0.iter().map(|(i, p)| (i, p))
    }
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
