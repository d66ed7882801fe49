//! Tests of the BitLocker policy.
