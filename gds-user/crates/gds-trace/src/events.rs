//! Ring buffer records, as the kernel wrote them (named and given context by
//! `model::decode`).

use gds_common::{EVENT_URING_SLOW, SlowUringEvent};

/// The slow-request record in `bytes`; `None` for records of unknown kind or size.
pub fn raw_event(bytes: &[u8]) -> Option<SlowUringEvent> {
    let kind = u32::from_ne_bytes(bytes.get(0..4)?.try_into().ok()?);
    if kind != EVENT_URING_SLOW || bytes.len() < size_of::<SlowUringEvent>() {
        return None;
    }
    // SAFETY: the length was checked and SlowUringEvent is plain old data.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}
