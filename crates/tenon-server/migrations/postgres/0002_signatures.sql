-- PostgreSQL form of migrations/sqlite/0002_signatures.sql: the same tables, columns and indexes (INTEGER is BIGINT,
-- AUTOINCREMENT an identity column). A test compares the two schemas (tests/store_parity.rs).
-- Outlook signature templates (issue 6). Placeholders stay unfilled here; the compiler fills in
-- each user's directory values per device payload.

CREATE TABLE signatures (
    name        TEXT PRIMARY KEY,          -- file name stem on the device: NAME.htm, NAME.txt, ...
    html        TEXT NOT NULL,
    txt         TEXT,                      -- the admin's text version; NULL: derived from the HTML
    default_use TEXT,                      -- new | reply | both | NULL
    groups      TEXT NOT NULL,             -- JSON array of group names ("All Users" for everyone)
    images      TEXT NOT NULL DEFAULT '{}',-- JSON object: image file name -> base64 content
    updated_at  BIGINT NOT NULL
);
