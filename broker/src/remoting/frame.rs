//! Length-prefixed framing: `[i32 total][headerInfo + header + body]`, with a size limit checked
//! before anything is allocated.

use bytes::{Buf, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{RemotingCommand, RemotingError};

/// Java's default cap on a frame (`com.rocketmq.remoting.frameMaxLength`).
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Turns a byte stream into `RemotingCommand`s and back.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame: usize,
}

impl FrameCodec {
    /// A codec refusing frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        FrameCodec { max_frame }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = RemotingCommand;
    type Error = RemotingError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<RemotingCommand>, RemotingError> {
        if src.len() < 4 {
            return Ok(None);
        }
        let total = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if total > self.max_frame {
            return Err(RemotingError::FrameTooLarge {
                len: total,
                max: self.max_frame,
            });
        }
        if total < 4 {
            return Err(RemotingError::Truncated(
                "frame shorter than its header-info word",
            ));
        }
        if src.len() < 4 + total {
            src.reserve(4 + total - src.len());
            return Ok(None);
        }
        src.advance(4);
        let frame = src.split_to(total).freeze();
        RemotingCommand::decode(frame).map(Some)
    }
}

impl Encoder<RemotingCommand> for FrameCodec {
    type Error = RemotingError;

    fn encode(&mut self, cmd: RemotingCommand, dst: &mut BytesMut) -> Result<(), RemotingError> {
        cmd.encode(dst);
        Ok(())
    }
}
