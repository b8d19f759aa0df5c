//! The configuration of every ClaudeCluster service, in one schema.
//!
//! Layers, later ones winning: built-in defaults, a YAML file, then environment variables
//! named `CLAUDECLUSTER_<SECTION>__<KEY>__<KEY>` (for example
//! `CLAUDECLUSTER_WORKER__PROCESS_POOL__MAX_PROCESSES=8`). YAML files may use `${VAR}` and
//! `${VAR:-default}`. The result is validated once; every error names the key and where its
//! value came from.

mod error;
mod limits;
mod load;
mod schema;
mod substitute;
mod units;

pub use error::ConfigError;
pub use load::{FileLayout, load};
pub use schema::*;
pub use substitute::substitute_env;
pub use units::{ByteSize, Millis, Seconds, StringList};
