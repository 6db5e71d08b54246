//! Runnable scenarios live beside this file as examples; this crate has no library code.
