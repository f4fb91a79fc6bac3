//! The typed control API, shared by the control server (which serialises
//! these values) and the CLI (which deserialises them). Nothing here knows
//! how the daemon computes them: the daemon converts its runtime objects
//! into these views, so the wire format only changes when this module does.
//! It imports nothing from the crate but `map`'s plain data types.
//!
//! Wire format: docs/CONTROL.md. Future families (pools, cluster peers,
//! metrics) add their requests and views here, beside the ones below.

mod cluster;
mod error;
mod mirror;
mod peer;
mod fault;
mod pool;
mod report;
mod request;
mod response;
mod status;

pub use cluster::{BarrierView, CatalogView, ClusterStatus, CoordinatorView, NodeState, NodeView};
pub use error::{ApiError, ErrorKind, ExitCode};
pub use peer::{ApplyReport, BarrierReport, CatalogChange, FailsafeAck, Held, HoldOrder, PeerRequest, TableChange, VolumeRecord, CATALOG};
pub use mirror::{LegStatus, MergeKeep, MirrorList, MirrorStatus, PairReport, TrackerStatus};
pub use pool::{
    PoolCheckList, PoolCheckReport, PoolChoice, PoolLayout, PoolList, PoolStatus, PoolStoreStatus, PoolVolumeInfo, ResizeReport, UsageReport,
    VolumeCreate, VolumePriority, VolumeUsage,
};
pub use fault::{FaultErrorArg, FaultReport, FaultScopeArg};
pub use report::{GenerationRecord, MigrationList, MigrationState, MigrationStatus, ReloadReport, SwapOutcome};
pub use request::{RangeArg, Request};
pub use response::Response;
pub use status::{BackendKind, BackendStatus, ExtentStatus, ForwardView, LegView, RangeStatus, Status, VolumeStatus};
