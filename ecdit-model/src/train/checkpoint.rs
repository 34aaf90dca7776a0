//! Atomic training checkpoints (filled in below).
