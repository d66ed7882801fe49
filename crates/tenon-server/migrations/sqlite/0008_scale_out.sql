-- Several servers, one database. Each server keeps the directory and the devices in memory and
-- answers check-ins from there; a write on one must reach the others' memory.
--
-- `changes`: every write that another server must apply appends what it touched here, in the
-- write's own transaction, and notifies after commit (PostgreSQL NOTIFY). A server reads the rows
-- above the last one it applied, on a notification, after a reconnect and every few seconds. All
-- writes hold the one write lock (`store::begin_write`), so rows become visible in `seq` order and
-- a reader that saw row N has seen every row below it. Rows are pruned after a day; a server that
-- was away longer reloads everything. On SQLite (one server) nothing is appended.
CREATE TABLE changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    origin TEXT NOT NULL,               -- the server that wrote it (which applied it already)
    kind   TEXT NOT NULL,               -- directory | device | rotation
    target TEXT NOT NULL DEFAULT ''     -- a device id, or '' for the directory
);
-- The highest `seq` pruned: a server whose last applied row is below it missed rows.
CREATE TABLE changes_horizon (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through INTEGER NOT NULL
);
INSERT INTO changes_horizon (id, pruned_through) VALUES (1, 0);

-- Jobs that must run on one server at a time (escrow verification, report pruning, envelope
-- refresh): the holder renews its lease; when it stops renewing, another server takes over.
CREATE TABLE leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);

-- The public half of the keys this database is served with. A server whose data dir holds
-- other keys refuses to start: it would sign envelopes the fleet rejects, or be unable to open
-- the escrowed recovery keys.
CREATE TABLE store_identity (
    name  TEXT PRIMARY KEY,             -- root_key | signing_key | escrow_key
    value TEXT NOT NULL
);

-- Admin tokens are listed oldest first; several are created within one second, so the order of
-- creation is kept as a number (SQLite's rowid did this before; PostgreSQL has none).
ALTER TABLE admin_tokens ADD COLUMN created_seq INTEGER NOT NULL DEFAULT 0;
UPDATE admin_tokens SET created_seq = rowid;
