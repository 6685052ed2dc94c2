//! The network device on the device loop: it watches its two queue eventfds (the driver's
//! kicks), its wake eventfd and the backend fd, and after every event brings the backend fd's
//! interest up to date: readable only while the driver runs and no frame waits for its buffers,
//! writable only while a frame waits for the backend, and not at all once the backend failed.
//!
//! The backend fd is level-triggered: what a batch leaves unread is reported again.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Net, RX_QUEUE, TX_QUEUE};

const WAKE: u32 = 2;
const BACKEND: u32 = 3;

impl Net {
    fn sync_interest(&mut self, ops: &mut EventOps) {
        let want = self.backend_interest();
        let Some(watched) = self.watched else {
            return;
        };
        match want {
            Some(w) if w == watched => {}
            Some(w) => match ops.modify(Events::with_data_raw(self.backend_fd(), BACKEND, w)) {
                Ok(()) => self.watched = Some(w),
                Err(e) => tracing::warn!(
                    "virtio-net: cannot change what the backend fd is watched for: {e:?}"
                ),
            },
            None => {
                // Failed: a hung-up fd would wake the level-triggered loop forever.
                if let Err(e) = ops.remove(Events::empty_raw(self.backend_fd())) {
                    tracing::debug!("virtio-net: unwatching the backend: {e:?}");
                }
                self.watched = None;
            }
        }
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch = |events| {
            let ok = ops.add(events);
            if let Err(e) = &ok {
                tracing::error!("virtio-net: cannot watch a device event: {e:?}");
            }
            ok.is_ok()
        };
        for q in [RX_QUEUE, TX_QUEUE] {
            watch(Events::with_data(
                self.queue_event(q),
                q as u32,
                EventSet::IN,
            ));
        }
        watch(Events::with_data(&self.wake, WAKE, EventSet::IN));
        if let Some(interest) = self.backend_interest() {
            if watch(Events::with_data_raw(self.backend_fd(), BACKEND, interest)) {
                self.watched = Some(interest);
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        // Eventfd counts do not matter: the whole ring is looked at.
        match events.data() {
            q if q == RX_QUEUE as u32 => {
                let _ = self.queue_event(RX_QUEUE).read();
                self.process_rx();
            }
            q if q == TX_QUEUE as u32 => {
                let _ = self.queue_event(TX_QUEUE).read();
                self.process_tx();
            }
            WAKE => {
                let _ = self.wake.read();
                self.process_tx();
                self.process_rx();
            }
            _ => self.backend_event(events.event_set()),
        }
        self.sync_interest(ops);
    }
}
