//! The claudecluster.v1 API: messages, clients and servers generated from `proto/`, and the
//! checks every service applies to them.

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("claudecluster.v1");

    /// The encoded file descriptor set of every claudecluster.v1 proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/claudecluster_descriptor.bin"));
}

pub use prost_types::Timestamp;

pub mod admission;
mod display;
pub mod validate;

pub use display::{CarriesEvent, hide_credentials_of, human_bytes, without_credentials};
pub use validate::MAX_MESSAGE_BYTES;
