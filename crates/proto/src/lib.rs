//! The generated updraft.v1 API: messages, clients and servers for every service.
#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("updraft.v1");
}

pub use v1::*;
