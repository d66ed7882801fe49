-- The devices row was written by every report, every last-seen flush and every re-sign, and it
-- held the envelope (several KiB): SQLite rewrites a whole row on update, so a last-seen flush of
-- 50,000 devices rewrote 200 MB, and a tenant-wide re-sign rewrote the reported policies with it.
-- The envelope and its facts, and the last-seen time, now live in tables of their own: each write
-- touches only what it changes.
CREATE TABLE device_envelopes (
    device_id           TEXT PRIMARY KEY NOT NULL REFERENCES devices(id),
    config_version      INTEGER NOT NULL,
    config_sha256       TEXT NOT NULL,
    envelope            TEXT NOT NULL,
    envelope_expires_at INTEGER NOT NULL
);
INSERT INTO device_envelopes (device_id, config_version, config_sha256, envelope, envelope_expires_at)
    SELECT id, config_version, config_sha256, envelope, envelope_expires_at FROM devices;

CREATE TABLE device_last_seen (
    device_id TEXT PRIMARY KEY NOT NULL REFERENCES devices(id),
    last_seen INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO device_last_seen (device_id, last_seen) SELECT id, last_seen FROM devices WHERE last_seen IS NOT NULL;

ALTER TABLE devices DROP COLUMN config_version;
ALTER TABLE devices DROP COLUMN config_sha256;
ALTER TABLE devices DROP COLUMN envelope;
ALTER TABLE devices DROP COLUMN envelope_expires_at;
ALTER TABLE devices DROP COLUMN last_seen;
