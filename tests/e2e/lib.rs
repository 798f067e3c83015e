//! End-to-end suites; the tests live in tests/e2e and tests/*.rs
