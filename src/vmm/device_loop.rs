//! The device event loop: one thread running event-manager for device work that is not a
//! register access (queue processing, host I/O). Register accesses stay on vCPU threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// A device subscriber as the loop holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Ends the loop when its eventfd is written.
struct StopEvent {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopEvent {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("device loop: cannot watch its stop event: {e:?}");
        }
    }
}

/// A running device loop.
pub struct DeviceLoop {
    stop: EventFd,
    thread: JoinHandle<()>,
}

impl DeviceLoop {
    /// Starts the loop thread with `subscribers` registered.
    pub fn start(subscribers: Vec<Subscriber>) -> std::io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        let stop = crate::devices::event_fd()?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stop_sub: Subscriber = Arc::new(Mutex::new(StopEvent {
            evt: stop.try_clone()?,
            stopped: stopped.clone(),
        }));
        manager.add_subscriber(stop_sub);
        for s in subscribers {
            manager.add_subscriber(s);
        }
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                while !stopped.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        tracing::error!("device loop: {e:?}");
                        break;
                    }
                }
            })?;
        Ok(DeviceLoop { stop, thread })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}
