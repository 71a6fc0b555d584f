//! Hostile networks (issue 12): abuse from the network must stay bounded
//! in time, memory and effect on innocent clients. Each file is one point
//! of the issue; each test prints the figures it measured.

#[path = "hostile/files.rs"]
mod files;
#[path = "hostile/kdf.rs"]
mod kdf;
