//! The mysql backend of distrlock: not written yet (see its issue).
