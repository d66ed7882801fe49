-- Tenon schema v1. Credentials are stored only as SHA-256 hashes of their secret part.

CREATE TABLE admin_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    roles         TEXT NOT NULL,            -- JSON array of role names
    created_at    INTEGER NOT NULL,
    revoked_at    INTEGER
);

CREATE TABLE enroll_tokens (
    id            TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    uses_total    INTEGER NOT NULL,
    uses_left     INTEGER NOT NULL,
    expires_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    created_by    TEXT NOT NULL
);

CREATE TABLE users (
    upn        TEXT PRIMARY KEY,               -- lower case
    id         TEXT,                           -- directory object id
    record     TEXT NOT NULL,                  -- the Graph-shaped object as imported
    updated_at INTEGER NOT NULL
);

CREATE TABLE groups (
    name     TEXT PRIMARY KEY,
    priority INTEGER NOT NULL DEFAULT 0        -- higher wins when a user is in several groups
);

CREATE TABLE user_groups (
    upn        TEXT NOT NULL REFERENCES users(upn) ON DELETE CASCADE,
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    PRIMARY KEY (upn, group_name)
);

CREATE TABLE settings (
    scope_kind TEXT NOT NULL,                  -- tenant | group | user
    scope_name TEXT NOT NULL,                  -- '' for tenant
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,                  -- JSON, or the word undefined
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (scope_kind, scope_name, key)
);

CREATE TABLE devices (
    id                  TEXT PRIMARY KEY,
    hostname            TEXT NOT NULL,
    credential_sha256   TEXT NOT NULL,
    enrolled_at         INTEGER NOT NULL,
    enroll_token_id     TEXT,
    status              TEXT NOT NULL DEFAULT 'active',   -- active | decommissioned
    decommissioned_at   INTEGER,
    primary_user        TEXT,
    last_seen           INTEGER,
    agent_version       TEXT,
    config_version      INTEGER NOT NULL,
    config_sha256       TEXT NOT NULL,
    envelope            TEXT NOT NULL,
    envelope_expires_at INTEGER NOT NULL,
    reported_version    INTEGER,
    reported_sha256     TEXT,
    last_error          TEXT,
    last_report_at      INTEGER,
    signed_in_users     TEXT NOT NULL DEFAULT '[]',
    policies            TEXT NOT NULL DEFAULT '{}'
);

-- Who signs in where: drives `payload.users` and the primary-user mismatch report.
CREATE TABLE device_users (
    device_id  TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    upn        TEXT NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    sightings  INTEGER NOT NULL,
    PRIMARY KEY (device_id, upn)
);

-- Every report a device sent, for history.
CREATE TABLE reports (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    report      TEXT NOT NULL
);
CREATE INDEX reports_by_device ON reports (device_id, id);

CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      INTEGER NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT,
    details TEXT NOT NULL DEFAULT '{}'
);
