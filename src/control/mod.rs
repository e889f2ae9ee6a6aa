//! The control socket: a versioned, line-delimited JSON protocol between the
//! supervisor (`server`) and the commands that drive it (`client`).

pub mod access;
pub mod client;
pub mod protocol;
pub mod server;

pub use client::{ClientError, ControlClient};
pub use server::ControlServer;
