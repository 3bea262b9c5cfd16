//! vnic-guest: placeholder until the driver lands.
