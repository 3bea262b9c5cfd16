//! vnic-tests harness.
