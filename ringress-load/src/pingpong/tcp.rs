//! TCP ping-pong: one connection's writes, reads and checks.

use std::io::{self, Read, Write};

use super::{Outcome, Worker};

impl Worker {
    /// TCP: writes and reads running connection `slot` until it would block.
    pub(super) fn pump_tcp(&mut self, slot: usize) -> Outcome {
        let Some(c) = self.conns[slot].as_mut() else {
            return Outcome::Ok;
        };
        let size = self.payload.len();
        loop {
            // Write what is left of the message.
            while c.wpos < size {
                match (&c.sock).write(&self.payload[c.wpos..]) {
                    Ok(n) => c.wpos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Outcome::Failed(format!("write: {e}")),
                }
            }
            // Read the echo.
            while c.rpos < size {
                let want = (size - c.rpos).min(self.rbuf.len());
                match (&c.sock).read(&mut self.rbuf[..want]) {
                    Ok(0) => {
                        return Outcome::Failed("server closed the connection (EOF)".into());
                    }
                    Ok(n) => {
                        if self.rbuf[..n] != self.payload[c.rpos..c.rpos + n] {
                            return Outcome::Failed("echo differs from what was sent".into());
                        }
                        c.rpos += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Outcome::Ok,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Outcome::Failed(format!("read: {e}")),
                }
            }
            // A whole round trip: record it and start the next message at once.
            Worker::round_trip(c, &mut self.hist, &mut self.counters, self.measure_from);
        }
    }
}
