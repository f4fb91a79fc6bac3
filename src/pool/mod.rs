//! Storage space on backends: today where a migration's destination goes;
//! later (SPEC §6) the pool allocator — classes of stores, free lists,
//! thin allocation — grows here, on the same pure placement functions.

pub mod placement;
