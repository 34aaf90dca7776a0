//! Training metrics: `metrics.csv` (filled in below).
