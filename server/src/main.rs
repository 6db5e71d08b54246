//! The `zerotouch` binary.

fn main() {}
