-- Whole lifecycles: an enrollment token can be revoked before it expires or runs out of uses.
ALTER TABLE enroll_tokens ADD COLUMN revoked_at INTEGER;
