//! The manager's conformance cases (placeholder).
