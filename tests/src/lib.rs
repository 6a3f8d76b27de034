//! VM tests live in `tests/vm/`.
