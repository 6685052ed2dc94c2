//! The block device on the device loop: it watches its queue eventfd (the driver's kicks, via
//! KVM's ioeventfd) and its wake eventfd, and serves the queue on either.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::Block;
use crate::devices::virtio::VirtioDevice;

const QUEUE: u32 = 0;
const WAKE: u32 = 1;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        let events = [
            Events::with_data(&self.queue_events()[0], QUEUE, EventSet::IN),
            Events::with_data(&self.wake, WAKE, EventSet::IN),
        ];
        for e in events {
            if let Err(e) = ops.add(e) {
                tracing::error!("virtio-blk: cannot watch a device event: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // The counts do not matter: the whole ring is looked at.
        let _ = match events.data() {
            QUEUE => self.queue_events()[0].read(),
            _ => self.wake.read(),
        };
        self.process_queue();
    }
}
