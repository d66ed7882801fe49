-- Directory sources (issue 16)
-- Directory sources: Microsoft Graph (Entra ID) and Active Directory over LDAP, read on an
-- interval. What each source last reported is kept per object (directory_objects), so a delta
-- read changes only what it names; the users table holds the merged view the compiler reads.
CREATE TABLE directory_sources (
    name            TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,              -- graph | ldap
    config          TEXT NOT NULL,              -- JSON, never a secret
    secret          TEXT,                       -- sealed with a key derived from the escrow key (base64)
    interval_secs   INTEGER NOT NULL,
    created_seq     INTEGER NOT NULL,                -- order added: the source added first owns a UPN
    created_at      INTEGER NOT NULL,
    cursor          TEXT,                       -- the reader's own (delta links, uSN high-water mark)
    last_full_at    INTEGER,
    last_run_at     INTEGER,
    last_success_at INTEGER,
    last_error      TEXT,
    users           INTEGER NOT NULL DEFAULT 0,
    groups          INTEGER NOT NULL DEFAULT 0,
    skipped         INTEGER NOT NULL DEFAULT 0,      -- users without a usable UPN
    held_deletions  TEXT NOT NULL DEFAULT '[]', -- JSON: ids of users the deletion guard holds
    collisions      TEXT NOT NULL DEFAULT '[]'  -- JSON: UPNs another source owns
);

CREATE TABLE directory_objects (
    source      TEXT NOT NULL REFERENCES directory_sources(name) ON DELETE CASCADE,
    kind        TEXT NOT NULL,                  -- user | group
    external_id TEXT NOT NULL,
    data        TEXT NOT NULL,                  -- JSON: tenon_core::dirsync::HeldUser or HeldGroup
    PRIMARY KEY (source, kind, external_id)
);

-- The source that owns a user; NULL for users imported from a file (tenonctl users import).
ALTER TABLE users ADD COLUMN source TEXT;
