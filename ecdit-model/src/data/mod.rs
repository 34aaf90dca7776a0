//! Training data: the `Dataset` trait and the built-in world of shapes.
