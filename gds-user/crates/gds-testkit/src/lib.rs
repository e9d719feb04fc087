//! Test support shared by the end-to-end tests (`gds-user/tests`), the guest scenarios
//! (`gds-vm-scenarios`) and xtask: the Prometheus text parser they all read `/metrics` with,
//! and starting a service (`gds-agent run`) until it serves. Never linked into the product.

pub mod promtext;
pub mod service;
