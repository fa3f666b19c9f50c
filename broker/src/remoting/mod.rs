//! The RocketMQ remoting protocol: frames, commands, codes and typed headers.
//!
//! Everything here is pure: it turns bytes into commands and back, and never panics on input
//! from the network.

pub mod body;
pub mod code;
pub mod command;
pub mod connection;
pub mod event_loop;
pub mod ext;
pub mod frame;
pub mod header;

#[cfg(test)]
mod tests;

pub use code::{RequestCode, ResponseCode};
pub use command::{RemotingCommand, SerializeType};
pub use ext::ExtFields;
pub use frame::FrameCodec;

/// Why bytes from the network could not become a command.
#[derive(Debug, thiserror::Error)]
pub enum RemotingError {
    /// The peer announced a frame larger than we accept.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The frame ended before a field did.
    #[error("frame truncated while reading {0}")]
    Truncated(&'static str),
    /// The header length is larger than the frame.
    #[error("header length {header} exceeds the {frame} bytes left in the frame")]
    HeaderLength {
        /// Announced header length.
        header: usize,
        /// Bytes in the frame after the header-info word.
        frame: usize,
    },
    /// Serialize type byte is neither JSON (0) nor ROCKETMQ (1).
    #[error("unknown header serialize type {0}")]
    UnknownSerializeType(u8),
    /// A JSON header could not be parsed.
    #[error("malformed JSON header: {0}")]
    Json(#[source] serde_json::Error),
    /// A header carries more fields than any real one does.
    #[error("header carries more than {0} fields")]
    TooManyFields(usize),
    /// A header, or a string in a binary header, is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// The socket failed.
    #[error("connection I/O: {0}")]
    Io(#[from] std::io::Error),
}
