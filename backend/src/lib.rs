//! vnic-backend.
