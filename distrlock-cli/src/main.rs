//! The `distrlock` command-line tool: not written yet (see its issue).
fn main() {}
