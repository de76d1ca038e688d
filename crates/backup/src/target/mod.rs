//! Where a push job writes: for now a remote NBD server ([`nbd`]); files
//! and qcow2 images come with the job engine.

pub mod nbd;
