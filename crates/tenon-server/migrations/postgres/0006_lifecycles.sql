-- PostgreSQL form of migrations/sqlite/0006_lifecycles.sql: the same tables, columns and indexes (INTEGER is BIGINT,
-- AUTOINCREMENT an identity column). A test compares the two schemas (tests/store_parity.rs).
-- Whole lifecycles: an enrollment token can be revoked before it expires or runs out of uses.
ALTER TABLE enroll_tokens ADD COLUMN revoked_at BIGINT;
