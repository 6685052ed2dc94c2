//! The vsock device on the device loop: which events it watches (its queue eventfds, the wake
//! eventfd, the listening socket, every connection's socket) and what each one triggers.
//!
//! Sockets are watched edge-triggered: the connection code keeps reading or writing until the
//! kernel says EWOULDBLOCK, so a socket we cannot serve right now (no guest credit, no receive
//! buffers) does not wake the loop over and over.

use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use super::muxer::{socket_events, SocketWatch, FIRST_CONN_TOKEN};

const LISTENER: u32 = 3;
const WAKE: u32 = 4;
const _: () = assert!(FIRST_CONN_TOKEN > WAKE);

/// Event-manager as the muxer's socket watch.
struct Ops<'a, 'b>(&'a mut EventOps<'b>);

impl SocketWatch for Ops<'_, '_> {
    fn watch(&mut self, fd: RawFd, token: u32) -> io::Result<()> {
        self.0
            .add(Events::with_data_raw(fd, token, socket_events()))
            .map_err(|e| io::Error::other(format!("{e:?}")))
    }

    fn unwatch(&mut self, stream: &UnixStream) -> io::Result<()> {
        self.0
            .remove(Events::empty(stream))
            .map_err(|e| io::Error::other(format!("{e:?}")))
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
            LISTENER => self.muxer.accept_all(&self.listener.socket),
            token => self.muxer.host_event(token, events.event_set()),
        }
        // Any event may have made packets possible either way (guest buffers, host data, credit).
        self.process_queues();
        self.muxer.apply_fd_changes(&mut Ops(ops));
    }
}
