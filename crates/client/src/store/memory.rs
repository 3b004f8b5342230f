//! The `memory` store: a bounded queue in the process.

use std::collections::VecDeque;

use super::Pending;
use crate::config::MemoryParams;

pub(crate) struct MemoryStore {
    events: VecDeque<Pending>,
    bytes: u64,
    max_events: u64,
    max_bytes: u64,
}

impl MemoryStore {
    pub(crate) fn new(params: &MemoryParams) -> MemoryStore {
        MemoryStore {
            events: VecDeque::new(),
            bytes: 0,
            max_events: params.max_events,
            max_bytes: params.max_bytes,
        }
    }

    pub(crate) fn append(&mut self, events: &[Pending]) -> usize {
        let mut taken = 0;
        for e in events {
            let len = e.payload.len() as u64;
            if self.events.len() as u64 >= self.max_events || self.bytes + len > self.max_bytes {
                break;
            }
            self.bytes += len;
            self.events.push_back(e.clone());
            taken += 1;
        }
        taken
    }

    pub(crate) fn peek(&self, max: usize) -> Vec<Pending> {
        self.events.iter().take(max).cloned().collect()
    }

    pub(crate) fn remove(&mut self, n: usize) {
        for e in self.events.drain(..n.min(self.events.len())) {
            self.bytes -= e.payload.len() as u64;
        }
    }

    pub(crate) fn events(&self) -> u64 {
        self.events.len() as u64
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::pending;

    #[test]
    fn bounded_by_events_and_bytes_in_order() {
        let mut store = MemoryStore::new(&MemoryParams {
            max_events: 3,
            max_bytes: 1 << 20,
        });
        let events: Vec<Pending> = (0..5).map(|_| pending()).collect();
        assert_eq!(store.append(&events), 3);
        assert_eq!(store.append(&events[3..]), 0);
        let peeked = store.peek(10);
        assert_eq!(
            peeked.iter().map(|p| p.id).collect::<Vec<_>>(),
            events[..3].iter().map(|p| p.id).collect::<Vec<_>>()
        );
        store.remove(2);
        assert_eq!(store.events(), 1);
        assert_eq!(store.bytes(), events[2].payload.len() as u64);
        assert_eq!(store.append(&events[3..]), 2);

        // Exactly the first two events' bytes (the synthetic events differ in size, so not
        // twice the first one's: that let only one in when the second was larger).
        let two = (events[0].payload.len() + events[1].payload.len()) as u64;
        let mut by_bytes = MemoryStore::new(&MemoryParams {
            max_events: 100,
            max_bytes: two,
        });
        assert_eq!(by_bytes.append(&events), 2);
    }
}
