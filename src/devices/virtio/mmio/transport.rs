//! The register state machine of one virtio-mmio device: feature negotiation, queue set-up and the
//! device status, checked at every step because the driver is untrusted.

use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::registers::*;
use crate::devices::virtio::{status, Activation, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;

/// Errors creating a transport.
#[derive(Debug, Error)]
pub enum Error {
    /// The device asked for a queue size virtio does not allow (a bug in the device).
    #[error("virtio device type {device_type} asks for an invalid queue size {size}")]
    QueueSize {
        /// The device.
        device_type: u32,
        /// The size it asked for.
        size: u16,
    },
    /// The device's queue eventfds could not be shared with the transport.
    #[error("cannot share the virtio queue eventfds: {0}")]
    EventFd(std::io::Error),
}

/// One device behind a virtio-mmio register window. Lives on the MMIO bus; every access comes
/// from a vCPU thread.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Interrupt,
    /// Clones of the device's queue eventfds: a QueueNotify that reaches us (not caught by KVM's
    /// ioeventfd) signals them without taking the device lock.
    notify: Vec<EventFd>,
    queues: Vec<Queue>,
    device_type: u32,
    offered_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    active: bool,
}

impl MmioTransport {
    /// Puts `device` behind a register window; `interrupt` is its (already registered) line.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Interrupt,
    ) -> Result<Self, Error> {
        let (device_type, offered_features, queues, notify) = {
            let d = lock(&device);
            let device_type = d.device_type();
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|&size| Queue::new(size).map_err(|_| Error::QueueSize { device_type, size }))
                .collect::<Result<Vec<_>, _>>()?;
            let notify = d
                .queue_events()
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::EventFd)?;
            (
                device_type,
                d.features() | VIRTIO_F_VERSION_1,
                queues,
                notify,
            )
        };
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            notify,
            queues,
            device_type,
            offered_features,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            active: false,
        })
    }

    /// The device's queue eventfds, in queue order, for KVM ioeventfd registration.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.notify
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK (virtio 1.2, 3.1.1).
    fn queue_config_allowed(&self) -> bool {
        self.status & (status::FEATURES_OK | status::DRIVER_OK | status::FAILED)
            == status::FEATURES_OK
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION_REG => VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID_REG => VENDOR_ID,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size() as u32),
            QUEUE_READY => self.selected_queue().is_some_and(|q| q.ready()) as u32,
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => {
                let needs_reset = if self.interrupt.needs_reset() {
                    status::DEVICE_NEEDS_RESET
                } else {
                    0
                };
                self.status | needs_reset
            }
            // The configuration never changes under the driver's feet.
            CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => {
                if self.status != status::ACKNOWLEDGE | status::DRIVER {
                    tracing::debug!("virtio-mmio: DriverFeatures written outside negotiation");
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW
            | QUEUE_AVAIL_HIGH | QUEUE_USED_LOW | QUEUE_USED_HIGH => {
                self.write_queue_register(offset, value)
            }
            QUEUE_NOTIFY_OFFSET => {
                // KVM normally catches this write with an ioeventfd; if it reaches us (another
                // width, or no ioeventfd), deliver the same signal.
                match self.notify.get(value as usize) {
                    Some(evt) => {
                        tracing::trace!("virtio-mmio: queue {value} notified through an exit");
                        if let Err(e) = evt.write(1) {
                            tracing::debug!("virtio-mmio: queue notify: {e}");
                        }
                    }
                    None => tracing::debug!("virtio-mmio: notify for missing queue {value}"),
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(value),
            STATUS => self.write_status(value),
            _ => tracing::debug!("virtio-mmio: write to read-only or unknown register {offset:#x}"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if !self.queue_config_allowed() {
            tracing::debug!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}",
                self.status
            );
            return;
        }
        let Some(q) = self.selected_queue() else {
            tracing::debug!("virtio-mmio: queue register written for a missing queue");
            return;
        };
        // virtio-queue refuses (and keeps the old value on) sizes that are not a power of two
        // up to the maximum, and misaligned ring addresses; activation checks the rest.
        match offset {
            QUEUE_NUM => q.set_size(value.try_into().unwrap_or(0)),
            QUEUE_READY => q.set_ready(value == 1),
            QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
            QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
            QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(value), None),
            QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(value)),
            QUEUE_USED_LOW => q.set_used_ring_address(Some(value), None),
            QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// The driver may only add status bits, one step at a time, in the order of virtio 1.2
    /// (3.1.1); 0 resets. Anything else is ignored, so a confused driver cannot skip a step.
    fn write_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let added = value & !old;
        if value & old != old {
            tracing::debug!(
                "virtio-mmio: driver tried to clear status bits {old:#x} -> {value:#x}"
            );
            return;
        }
        match added {
            ACKNOWLEDGE if old == 0 => self.status = value,
            DRIVER if old == ACKNOWLEDGE => self.status = value,
            FEATURES_OK if old == ACKNOWLEDGE | DRIVER => {
                if self.features_acceptable() {
                    self.status = value;
                } else {
                    // Leaving the bit clear is how the driver learns the features were refused.
                    tracing::debug!(
                        "virtio-mmio: refusing features {:#x} (offered {:#x})",
                        self.acked_features,
                        self.offered_features
                    );
                }
            }
            DRIVER_OK if old == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.activate(value),
            FAILED => self.status |= FAILED,
            _ => tracing::debug!("virtio-mmio: ignoring status change {old:#x} -> {value:#x}"),
        }
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.offered_features == 0
            && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn activate(&mut self, value: u32) {
        match self.checked_queues() {
            Ok(queues) => {
                let activation = Activation {
                    mem: self.mem.clone(),
                    queues,
                    interrupt: self.interrupt.clone(),
                    acked_features: self.acked_features,
                };
                let result = lock(&self.device).activate(activation);
                match result {
                    Ok(()) => {
                        self.status = value;
                        self.active = true;
                    }
                    Err(e) => self.activation_failed(&e.to_string()),
                }
            }
            Err(why) => self.activation_failed(&why),
        }
    }

    /// Copies of the driver's queues, each ready one checked to lie inside guest RAM.
    fn checked_queues(&self) -> Result<Vec<Queue>, String> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                if q.ready() && !q.is_valid(&self.mem) {
                    return Err(format!("queue {i} lies outside guest RAM"));
                }
                Queue::try_from(q.state()).map_err(|e| format!("queue {i}: {e}"))
            })
            .collect()
    }

    fn activation_failed(&mut self, why: &str) {
        crate::guest_warn!(
            "virtio device type {}: the guest driver's set-up was refused: {why}",
            self.device_type
        );
        self.interrupt.signal_needs_reset();
    }

    fn reset(&mut self) {
        if self.active {
            lock(&self.device).reset();
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
    }
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            lock(&self.device).read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::debug!("virtio-mmio: {}-byte read at {offset:#x}", data.len());
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            lock(&self.device).write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!("virtio-mmio: {}-byte write at {offset:#x}", data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, DriverQueue};
    use crate::devices::virtio::ActivateError;
    use status::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[derive(Default)]
    struct Record {
        activations: Vec<(usize, u64)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    struct FakeDevice {
        events: Vec<EventFd>,
        record: Arc<Mutex<Record>>,
        refuse: bool,
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::devices::virtio::read_config_bytes(&[0xa, 0xb, 0xc, 0xd], offset, data)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.record
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            if self.refuse {
                return Err(ActivateError::QueueNotReady(0));
            }
            self.record
                .lock()
                .unwrap()
                .activations
                .push((a.queues.len(), a.acked_features));
            Ok(())
        }
        fn reset(&mut self) {
            self.record.lock().unwrap().resets += 1;
        }
    }

    struct Setup {
        t: MmioTransport,
        record: Arc<Mutex<Record>>,
        irq: Interrupt,
        mem: GuestMemoryMmap,
    }

    fn setup(refuse: bool) -> Setup {
        let mem = guest_memory(0x10_0000);
        let record = Arc::new(Mutex::new(Record::default()));
        let dev = FakeDevice {
            events: (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            record: record.clone(),
            refuse,
        };
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let t = MmioTransport::new(mem.clone(), Arc::new(Mutex::new(dev)), irq.clone()).unwrap();
        Setup {
            t,
            record,
            irq,
            mem,
        }
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport) {
        w(t, STATUS, ACKNOWLEDGE);
        w(t, STATUS, ACKNOWLEDGE | DRIVER);
        w(t, DRIVER_FEATURES_SEL, 1);
        w(t, DRIVER_FEATURES, 1); // VERSION_1
        w(t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, dq: &DriverQueue, size: u32) {
        let (desc, avail, used) = dq.addresses();
        w(t, QUEUE_SEL, index);
        w(t, QUEUE_NUM, size);
        w(t, QUEUE_DESC_LOW, desc as u32);
        w(t, QUEUE_DESC_HIGH, (desc >> 32) as u32);
        w(t, QUEUE_AVAIL_LOW, avail as u32);
        w(t, QUEUE_AVAIL_HIGH, 0);
        w(t, QUEUE_USED_LOW, used as u32);
        w(t, QUEUE_USED_HIGH, 0);
        w(t, QUEUE_READY, 1);
    }

    #[test]
    fn identity_registers() {
        let mut s = setup(false);
        assert_eq!(r(&mut s.t, MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut s.t, VERSION_REG), 2);
        assert_eq!(r(&mut s.t, DEVICE_ID), 42);
        assert_eq!(r(&mut s.t, VENDOR_ID_REG), 0);
        assert_eq!(r(&mut s.t, DEVICE_FEATURES), 1 << 3);
        w(&mut s.t, DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut s.t, DEVICE_FEATURES), 1, "VERSION_1 is offered");
        w(&mut s.t, DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut s.t, DEVICE_FEATURES), 0);
        assert_eq!(r(&mut s.t, CONFIG_GENERATION), 0);
    }

    #[test]
    fn odd_widths_and_offsets_read_zero_and_write_nothing() {
        let mut s = setup(false);
        let mut b = [0xffu8; 2];
        s.t.read(MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        let mut d = [0xffu8; 4];
        s.t.read(MAGIC_VALUE + 1, &mut d);
        assert_eq!(d, [0; 4]);
        s.t.write(STATUS, &[1]);
        assert_eq!(r(&mut s.t, STATUS), 0);
        s.t.write(STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(r(&mut s.t, STATUS), 0);
    }

    #[test]
    fn config_space_goes_to_the_device_at_any_width() {
        let mut s = setup(false);
        let mut b = [0u8; 2];
        s.t.read(CONFIG + 1, &mut b);
        assert_eq!(b, [0xb, 0xc]);
        let mut q = [0xffu8; 8];
        s.t.read(CONFIG + 2, &mut q);
        assert_eq!(q, [0xc, 0xd, 0, 0, 0, 0, 0, 0]);
        s.t.write(CONFIG + 3, &[9]);
        assert_eq!(s.record.lock().unwrap().config_writes, vec![(3, vec![9])]);
    }

    #[test]
    fn full_bring_up_activates_with_the_driver_queues() {
        let mut s = setup(false);
        negotiate(&mut s.t);
        let q0 = DriverQueue::new(&s.mem, 0x1_0000, 16);
        let q1 = DriverQueue::new(&s.mem, 0x2_0000, 8);
        setup_queue(&mut s.t, 0, &q0, 16);
        setup_queue(&mut s.t, 1, &q1, 8);
        w(&mut s.t, QUEUE_SEL, 0);
        assert_eq!(r(&mut s.t, QUEUE_READY), 1);
        assert_eq!(r(&mut s.t, QUEUE_NUM_MAX), 16);
        w(
            &mut s.t,
            STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            r(&mut s.t, STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert_eq!(
            s.record.lock().unwrap().activations,
            vec![(2, VIRTIO_F_VERSION_1)]
        );
        // Queue registers are frozen once the device runs.
        w(&mut s.t, QUEUE_SEL, 0);
        w(&mut s.t, QUEUE_READY, 0);
        assert_eq!(r(&mut s.t, QUEUE_READY), 1);

        w(&mut s.t, STATUS, 0);
        assert_eq!(r(&mut s.t, STATUS), 0);
        assert_eq!(s.record.lock().unwrap().resets, 1);
        assert_eq!(r(&mut s.t, QUEUE_READY), 0);
    }

    #[test]
    fn features_ok_needs_version_1_and_only_offered_bits() {
        let mut s = setup(false);
        w(&mut s.t, STATUS, ACKNOWLEDGE);
        w(&mut s.t, STATUS, ACKNOWLEDGE | DRIVER);
        // Legacy driver: no VERSION_1.
        w(&mut s.t, DRIVER_FEATURES, 1 << 3);
        w(&mut s.t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut s.t, STATUS), ACKNOWLEDGE | DRIVER);
        // A bit we never offered.
        w(&mut s.t, DRIVER_FEATURES_SEL, 1);
        w(&mut s.t, DRIVER_FEATURES, 1 | 1 << 5);
        w(&mut s.t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut s.t, STATUS), ACKNOWLEDGE | DRIVER);
        w(&mut s.t, DRIVER_FEATURES, 1);
        w(&mut s.t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(r(&mut s.t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        // Features are frozen after FEATURES_OK.
        w(&mut s.t, DRIVER_FEATURES, 1 | 1 << 5);
        w(
            &mut s.t,
            STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            s.record.lock().unwrap().activations,
            vec![(2, VIRTIO_F_VERSION_1 | 1 << 3)]
        );
    }

    #[test]
    fn status_steps_cannot_be_skipped_or_undone() {
        let mut s = setup(false);
        w(
            &mut s.t,
            STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(r(&mut s.t, STATUS), 0);
        w(&mut s.t, STATUS, DRIVER);
        assert_eq!(r(&mut s.t, STATUS), 0);
        negotiate(&mut s.t);
        w(&mut s.t, STATUS, ACKNOWLEDGE);
        assert_eq!(r(&mut s.t, STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        w(
            &mut s.t,
            STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED,
        );
        assert_eq!(r(&mut s.t, STATUS) & FAILED, FAILED);
        w(
            &mut s.t,
            STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | DRIVER_OK,
        );
        assert!(s.record.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn queue_registers_out_of_range_or_out_of_time_are_ignored() {
        let mut s = setup(false);
        let q0 = DriverQueue::new(&s.mem, 0x1_0000, 16);
        // Before FEATURES_OK: ignored.
        setup_queue(&mut s.t, 0, &q0, 16);
        w(&mut s.t, QUEUE_SEL, 0);
        assert_eq!(r(&mut s.t, QUEUE_READY), 0);
        negotiate(&mut s.t);
        // A queue that does not exist.
        w(&mut s.t, QUEUE_SEL, 2);
        assert_eq!(r(&mut s.t, QUEUE_NUM_MAX), 0);
        w(&mut s.t, QUEUE_READY, 1);
        assert_eq!(r(&mut s.t, QUEUE_READY), 0);
        w(&mut s.t, QUEUE_SEL, u32::MAX);
        w(&mut s.t, QUEUE_NUM, 4);
        assert_eq!(r(&mut s.t, QUEUE_NUM_MAX), 0);
        // Sizes that are too big, zero or not a power of two keep the previous size.
        for bad in [32, 0, 3, 0x1_0004] {
            setup_queue(&mut s.t, 0, &q0, bad);
            assert_eq!(s.t.queues[0].size(), 16, "size {bad}");
        }
        setup_queue(&mut s.t, 0, &q0, 4);
        assert_eq!(s.t.queues[0].size(), 4);
        // Misaligned descriptor table: refused, the old address stays.
        w(&mut s.t, QUEUE_DESC_LOW, 0x1_0008);
        assert_eq!(s.t.queues[0].desc_table(), 0x1_0000);
    }

    #[test]
    fn queues_outside_ram_fail_activation_with_needs_reset() {
        let mut s = setup(false);
        negotiate(&mut s.t);
        let q0 = DriverQueue::new(&s.mem, 0x1_0000, 16);
        setup_queue(&mut s.t, 0, &q0, 16);
        // Queue 1's used ring beyond the end of guest RAM.
        w(&mut s.t, QUEUE_SEL, 1);
        w(&mut s.t, QUEUE_NUM, 8);
        w(&mut s.t, QUEUE_DESC_LOW, 0x3_0000);
        w(&mut s.t, QUEUE_AVAIL_LOW, 0x3_1000);
        w(&mut s.t, QUEUE_USED_LOW, 0xffff_f000);
        w(&mut s.t, QUEUE_USED_HIGH, 0xffff_ffff);
        w(&mut s.t, QUEUE_READY, 1);
        w(
            &mut s.t,
            STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(s.record.lock().unwrap().activations.is_empty());
        assert_eq!(r(&mut s.t, STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
        assert_eq!(r(&mut s.t, INTERRUPT_STATUS), 2, "configuration interrupt");
        w(&mut s.t, STATUS, 0);
        assert_eq!(r(&mut s.t, STATUS), 0);
        assert_eq!(s.record.lock().unwrap().resets, 0, "never activated");
    }

    #[test]
    fn a_refusing_device_leaves_driver_ok_clear() {
        let mut s = setup(true);
        negotiate(&mut s.t);
        w(
            &mut s.t,
            STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        let st = r(&mut s.t, STATUS);
        assert_eq!(st & DRIVER_OK, 0);
        assert_eq!(st & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
    }

    #[test]
    fn notify_and_interrupt_ack() {
        let mut s = setup(false);
        w(&mut s.t, QUEUE_NOTIFY_OFFSET, 1);
        w(&mut s.t, QUEUE_NOTIFY_OFFSET, 9);
        assert_eq!(s.t.queue_events()[1].read().unwrap(), 1);
        assert!(s.t.queue_events()[0].read().is_err(), "nothing for queue 0");
        s.irq.signal_used_queue();
        assert_eq!(r(&mut s.t, INTERRUPT_STATUS), 1);
        w(&mut s.t, INTERRUPT_ACK, 1);
        assert_eq!(r(&mut s.t, INTERRUPT_STATUS), 0);
    }
}
