//! The vsock device on the device loop: which events it watches (its queue eventfds, the wake
//! eventfd, the listening socket, every connection's socket) and what each one triggers.
//!
//! Sockets are watched edge-triggered: the connection code keeps reading or writing until the
//! kernel says EWOULDBLOCK, so a socket we cannot serve right now (no guest credit, no receive
//! buffers) does not wake the loop over and over.

use std::io;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use super::muxer::FIRST_CONN_TOKEN;

const LISTENER: u32 = 3;
const WAKE: u32 = 4;
const _: () = assert!(FIRST_CONN_TOKEN > WAKE);

fn socket_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED
}

impl Vsock {
    fn accept_host_connections(&mut self) {
        loop {
            match self.listener.socket.accept() {
                Ok((stream, _)) => match stream.set_nonblocking(true) {
                    Ok(()) => self.accept(stream),
                    Err(e) => tracing::warn!("vsock: cannot use a host connection: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // E.g. out of descriptors: the listener is edge-triggered, so the next
                // connection attempt retries rather than this loop spinning.
                Err(e) => {
                    tracing::warn!("vsock: cannot accept a host connection: {e}");
                    break;
                }
            }
        }
    }

    /// Registers new sockets and unregisters (then closes) dead ones.
    fn apply_fd_changes(&mut self, ops: &mut EventOps) {
        loop {
            let changes = std::mem::take(&mut self.muxer.fd_changes);
            if changes.added.is_empty() && changes.removed.is_empty() {
                return;
            }
            for stream in changes.removed {
                // Unregister before closing: event-manager tracks fds by number.
                if let Err(e) = ops.remove(Events::empty(&stream)) {
                    tracing::debug!("vsock: unwatching a socket: {e:?}");
                }
            }
            for (fd, token) in changes.added {
                if let Err(e) = ops.add(Events::with_data_raw(fd, token, socket_events())) {
                    tracing::warn!("vsock: cannot watch a host socket: {e:?}");
                    self.muxer.watch_failed(token);
                }
            }
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch = |events| {
            if let Err(e) = ops.add(events) {
                tracing::error!("vsock: cannot watch a device event: {e:?}");
            }
        };
        for q in [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] {
            watch(Events::with_data(
                self.queue_event(q),
                q as u32,
                EventSet::IN,
            ));
        }
        watch(Events::with_data(&self.wake, WAKE, EventSet::IN));
        watch(Events::with_data(
            &self.listener.socket,
            LISTENER,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        ));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            q @ 0..=2 => {
                // The count does not matter: we look at the whole ring.
                let _ = self.queue_event(q as usize).read();
            }
            WAKE => {
                let _ = self.wake.read();
            }
            LISTENER => self.accept_host_connections(),
            token => self.muxer.host_event(token, events.event_set()),
        }
        // Any event may have made packets possible either way (guest buffers, host data, credit).
        self.process_queues();
        self.apply_fd_changes(ops);
    }
}
