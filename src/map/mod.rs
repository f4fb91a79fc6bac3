//! Mapping tables: the immutable, generation-numbered translation of a
//! volume's byte range onto backing stores. Pure logic: stores are named, not
//! opened; the `volume` layer pairs a table with open backend handles.

mod diff;
mod remap;
mod table;
mod target;
mod validate;

pub use diff::*;
pub use remap::{add_leg, drop_leg, remap, rewrite};
pub use table::*;
pub use target::{stripe_place, Leg, TargetSpec, CHUNK_MIN, DEFAULT_REGION, REGION_MAX, REGION_MIN};
pub use validate::*;
