//! ferromq broker crate: the RocketMQ remoting protocol, the message store, the name server,
//! the broker, and the client used by `mqadmin`, the operator and the tests.

pub mod remoting;
pub mod store;
pub mod config;
pub mod http;
pub mod nameserver;
pub mod server;
pub mod client;
pub mod logging;
