#![doc = include_str!("../README.md")]

pub mod backends;
pub mod checker;
pub mod history;
pub mod process;
