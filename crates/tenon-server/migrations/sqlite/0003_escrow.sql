-- Recovery-key escrow. Keys are sealed on the device to the server's escrow public key
-- (tenon-core policy::escrow), so this table never holds a recovery password in the clear.
-- It is an archive: every upload is a new row, a row is never deleted, and a key replaced by a
-- rotation is marked superseded, not overwritten.

CREATE TABLE recovery_keys (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id      TEXT NOT NULL,
    mount          TEXT NOT NULL,
    protector_id   TEXT NOT NULL,
    sealed         TEXT NOT NULL,            -- SealedRecoveryKey JSON (re-sealed on escrow-key rotation)
    escrow_key_id  TEXT NOT NULL,            -- SHA-256 hex of the escrow public key it is sealed to
    received_at    INTEGER NOT NULL,
    replaces       TEXT,                     -- protector id this key rotated out, as the device said
    superseded_by  TEXT,                     -- protector id of the key that rotated this one out
    superseded_at  INTEGER,
    read_count     INTEGER NOT NULL DEFAULT 0,
    last_read_at   INTEGER,
    resealed_at    INTEGER
);
CREATE INDEX recovery_keys_by_device ON recovery_keys (device_id, protector_id, id);

-- A rotation is asked for when an administrator reads a key; it is done when the device escrows
-- a new key with `replaces` = that protector.
CREATE TABLE recovery_key_rotations (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id    TEXT NOT NULL,
    protector_id TEXT NOT NULL,
    requested_at INTEGER NOT NULL,
    requested_by TEXT NOT NULL,
    completed_at INTEGER,
    replaced_by  TEXT
);
CREATE INDEX recovery_key_rotations_open ON recovery_key_rotations (device_id, completed_at);
