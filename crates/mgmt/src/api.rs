//! The HTTP/JSON API (to be written).
