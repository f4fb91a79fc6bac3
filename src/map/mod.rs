//! Mapping tables: the immutable, generation-numbered translation of a
//! volume's byte range onto backing stores. Pure logic: stores are named, not
//! opened; the `volume` layer pairs a table with open backend handles.

mod diff;
mod remap;
mod table;
mod target;
mod validate;

pub use diff::*;
pub use remap::remap;
pub use table::*;
pub use target::TargetSpec;
pub use validate::*;
