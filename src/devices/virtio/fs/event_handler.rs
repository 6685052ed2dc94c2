//! The virtio-fs device on the device loop: it relays the backend's call eventfds to the guest's
//! interrupt line, and watches the vhost-user socket for the backend hanging up, which ends the
//! VM (the guest's file system is gone, and a hang is worse than a clear error).

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::backend::NUM_QUEUES;
use super::device::Fs;

/// Token of the vhost-user socket; queue `i`'s call eventfd has token `i`.
const SOCKET: u32 = NUM_QUEUES as u32;

impl MutEventSubscriber for Fs {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch = |events| {
            if let Err(e) = ops.add(events) {
                tracing::error!("virtio-fs: cannot watch a device event: {e:?}");
            }
        };
        for q in 0..NUM_QUEUES {
            watch(Events::with_data(
                self.call_event(q),
                q as u32,
                EventSet::IN,
            ));
        }
        // Not IN: replies are read by whoever sent the request. A hang-up (and an error) is
        // reported whatever we ask for; READ_HANG_UP adds the peer's shutdown of its side.
        watch(Events::with_data_raw(
            self.watched_socket().as_raw_fd(),
            SOCKET,
            EventSet::READ_HANG_UP,
        ));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            SOCKET => {
                self.backend_failed("the vhost-user connection hung up (did virtiofsd exit?)");
                // Level-triggered: unwatch it, or the loop would spin on it until the VM ends.
                if let Err(e) = ops.remove(Events::empty_raw(events.fd())) {
                    tracing::debug!("virtio-fs: unwatching the backend socket: {e:?}");
                }
            }
            q => self.relay_call(q as usize),
        }
    }
}
