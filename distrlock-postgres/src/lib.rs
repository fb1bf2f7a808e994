//! The postgres backend of distrlock: not written yet (see its issue).
