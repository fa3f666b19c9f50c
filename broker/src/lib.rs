//! ferromq broker crate: the RocketMQ remoting protocol, the message store, the name server,
//! the broker, and the client used by `mqadmin`, the operator and the tests.

pub mod client;
pub mod config;
pub mod filter;
pub mod http;
pub mod logging;
pub mod nameserver;
pub mod net;
pub mod remoting;
pub mod replication;
pub mod server;
pub mod store;
