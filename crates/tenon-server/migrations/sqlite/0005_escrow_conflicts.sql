-- Escrow conflicts and reported retirements.
--
-- A protector's recovery password never changes on a real volume, so a second, different password
-- uploaded under the same protector id is a conflict: both rows are kept and flagged, shown with a
-- warning and reported to the device. An identical re-upload adds no row.
--
-- A rotation (or a surplus key) is complete only when the device reports the protector gone from
-- the volume; `retired_at` records that report, and such rows are no longer current keys.

ALTER TABLE recovery_keys ADD COLUMN conflict INTEGER NOT NULL DEFAULT 0;
ALTER TABLE recovery_keys ADD COLUMN retired_at INTEGER;
CREATE INDEX recovery_keys_conflicts ON recovery_keys (device_id) WHERE conflict = 1 AND retired_at IS NULL;
