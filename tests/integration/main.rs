//! shiftd's integration tests: the real binary against moto server, shiftd's fake IMDS and a real
//! systemd-journald. One test binary; helpers in `harness`, fixtures in `tests/fixtures`.

mod check;
mod daemon;
mod faults;
mod harness;
mod lifecycle;
mod operator;
