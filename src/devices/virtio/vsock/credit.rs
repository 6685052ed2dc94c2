//! Credit-based flow control of one connection (virtio 1.2, 5.10.6.3). Each side tells the other
//! how big its receive buffer is (`buf_alloc`) and how many bytes it has consumed from it
//! (`fwd_cnt`, wrapping); a sender may have at most `buf_alloc` bytes in flight. Counters wrap at
//! 2^32, so all differences use wrapping arithmetic.

use std::num::Wrapping;

/// Both directions' accounting for one connection.
#[derive(Debug, Clone)]
pub struct Credit {
    /// Our receive buffer for guest-to-host bytes not yet written to the host socket.
    buf_alloc: u32,
    /// Guest-to-host bytes received, ever.
    rx_cnt: Wrapping<u32>,
    /// Guest-to-host bytes written to the host socket, ever.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer, as it last told us.
    peer_buf_alloc: u32,
    /// The guest's consumed count, as it last told us.
    peer_fwd_cnt: Wrapping<u32>,
    /// Host-to-guest bytes sent, ever.
    tx_cnt: Wrapping<u32>,
}

/// The guest sent more than we gave it credit for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the guest sent {sent} bytes with only {free} bytes of credit")]
pub struct CreditOverrun {
    /// Bytes in the packet.
    pub sent: u32,
    /// Credit it had.
    pub free: u32,
}

impl Credit {
    /// A connection whose receive buffer is `buf_alloc` bytes.
    pub fn new(buf_alloc: u32) -> Self {
        Credit {
            buf_alloc,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
        }
    }

    /// Records the guest's buffer state, which every guest packet carries.
    pub fn update_peer(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = Wrapping(fwd_cnt);
    }

    /// Bytes we may still send the guest. A guest whose counters make no sense (more consumed
    /// than we sent, or a shrunken buffer) gets no credit rather than a wrapped-around huge one.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// `n` bytes went to the guest.
    pub fn sent_to_guest(&mut self, n: u32) {
        self.tx_cnt += Wrapping(n);
    }

    /// Bytes from the guest we hold and have not written to the host yet.
    pub fn buffered(&self) -> u32 {
        (self.rx_cnt - self.fwd_cnt).0
    }

    /// Accounts for `n` bytes from the guest, refusing them if they exceed its credit.
    pub fn receive_from_guest(&mut self, n: u32) -> Result<(), CreditOverrun> {
        let free = self.buf_alloc.saturating_sub(self.buffered());
        if n > free {
            return Err(CreditOverrun { sent: n, free });
        }
        self.rx_cnt += Wrapping(n);
        Ok(())
    }

    /// `n` buffered guest bytes reached the host socket.
    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt += Wrapping(n);
    }

    /// The (buf_alloc, fwd_cnt) to put in a packet to the guest; the guest learns them.
    pub fn stamp(&mut self) -> (u32, u32) {
        self.fwd_cnt_sent = self.fwd_cnt;
        (self.buf_alloc, self.fwd_cnt.0)
    }

    /// Whether the guest should hear of freed space now: it believes less than half our buffer
    /// is free, and we have freed some since we last told it. Without this a guest that used up
    /// its credit would wait forever.
    pub fn update_due(&self) -> bool {
        let believed_used = (self.rx_cnt - self.fwd_cnt_sent).0;
        let believed_free = self.buf_alloc.saturating_sub(believed_used);
        self.fwd_cnt != self.fwd_cnt_sent && believed_free < self.buf_alloc / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn we_never_exceed_the_guest_credit() {
        let mut c = Credit::new(1000);
        assert_eq!(c.peer_credit(), 0, "no credit before the guest speaks");
        c.update_peer(100, 0);
        assert_eq!(c.peer_credit(), 100);
        c.sent_to_guest(60);
        assert_eq!(c.peer_credit(), 40);
        c.sent_to_guest(40);
        assert_eq!(c.peer_credit(), 0);
        c.update_peer(100, 30);
        assert_eq!(c.peer_credit(), 30);
        // Zero buffer: nothing may be sent.
        c.update_peer(0, 100);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn lying_guest_counters_give_no_credit() {
        let mut c = Credit::new(1000);
        c.sent_to_guest(10);
        // Claims to have consumed more than we ever sent: in-flight wraps to ~4 GiB.
        c.update_peer(u32::MAX, 11);
        assert_eq!(c.peer_credit(), 0);
        // Shrinks its buffer below what is already in flight.
        c.update_peer(5, 0);
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn counters_wrap() {
        let mut c = Credit::new(1000);
        c.sent_to_guest(u32::MAX - 5);
        c.update_peer(100, u32::MAX - 5);
        c.sent_to_guest(50); // tx_cnt wraps to 44
        assert_eq!(c.peer_credit(), 50);
        c.update_peer(100, 10); // peer_fwd_cnt wrapped too
        assert_eq!(c.peer_credit(), 66);
    }

    #[test]
    fn guest_overruns_are_refused() {
        let mut c = Credit::new(100);
        c.receive_from_guest(60).unwrap();
        assert_eq!(
            c.receive_from_guest(41),
            Err(CreditOverrun { sent: 41, free: 40 })
        );
        c.receive_from_guest(40).unwrap();
        assert_eq!(c.buffered(), 100);
        c.forwarded(100);
        assert_eq!(c.buffered(), 0);
        c.receive_from_guest(100).unwrap();
        assert!(c.receive_from_guest(1).is_err());
    }

    #[test]
    fn updates_are_due_when_the_guest_runs_low() {
        let mut c = Credit::new(100);
        assert_eq!(c.stamp(), (100, 0));
        c.receive_from_guest(60).unwrap();
        assert!(!c.update_due(), "low, but nothing freed yet");
        c.forwarded(10);
        assert!(c.update_due(), "guest believes 40 are free; 10 more are");
        assert_eq!(c.stamp(), (100, 10));
        assert!(!c.update_due(), "the guest now knows");
        c.forwarded(50);
        assert!(!c.update_due(), "guest believes 50 are free: not low");
    }
}
