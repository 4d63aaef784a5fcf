//! The appliance's typed configuration, end to end.
//!
//! * [`spec`]: what users write (YAML/JSON, `apiVersion: dva/v1`, `kind: Appliance`). Unknown fields are
//!   rejected and every error names the field path and the offending value.
//! * [`validate`](spec::ApplianceSpec::validate): semantic checks that serde cannot do (references between
//!   interfaces and rules, layout bounds, address families).
//! * [`role`]: the compiled, per-role configuration a unit runs (dispatcher: interfaces, routes, bucket
//!   table, data-plane addresses, service addresses, health checks, backplane keys; data plane: the
//!   service chain and its firewall rules, NAT and load-balancer configs, bucket table, peers and
//!   backups). Versioned so a unit can ACK/NACK exactly what it was given.
//! * [`channel`]: the messages between units, their manager and the management tool (configs,
//!   ACK/NACK, reports), newline-delimited JSON.
//!
//! Nothing here does I/O: parsing takes text, compilation takes a spec and a placement.
#![forbid(unsafe_code)]

pub mod channel;
pub mod role;
pub mod spec;

pub use role::{
    compile, DataplaneConfig, DispatcherConfig, InterfaceConfig, Placement, RoleConfig,
    RouteConfig, RuntimeConfig, UnitEndpoint,
};
pub use spec::{ApplianceSpec, SpecError};
