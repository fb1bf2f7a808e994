//! The sqlite backend of distrlock: not written yet (see its issue).
