-- PostgreSQL form of migrations/sqlite/0009_packages.sql (INTEGER is BIGINT).
-- Software packages. Content lives in the data dir by SHA-256 (packages/content/<sha256>); these
-- rows hold what the plan needs. One row per package name: a new upload of a name replaces its
-- version (the devices upgrade at their next check-in).
CREATE TABLE packages (
    name           TEXT PRIMARY KEY,
    version        TEXT NOT NULL,
    kind           TEXT NOT NULL,            -- msi | exe | script
    sha256         TEXT NOT NULL,
    size           BIGINT NOT NULL,
    file_name      TEXT NOT NULL,
    install_args   TEXT NOT NULL DEFAULT '',
    uninstall_args TEXT NOT NULL DEFAULT '',
    detect         TEXT NOT NULL,            -- the rule as written (tenon_core::packages::DetectRule)
    depends_on     TEXT NOT NULL DEFAULT '[]', -- JSON array of names
    sort_order     BIGINT NOT NULL DEFAULT 0,
    timeout_secs   BIGINT NOT NULL,
    msi_product_name    TEXT,
    msi_product_version TEXT,
    uploaded_at    BIGINT NOT NULL,
    uploaded_by    TEXT NOT NULL,
    self_update    INTEGER NOT NULL DEFAULT 0  -- the Tenon agent's own MSI (by its UpgradeCode)
);

CREATE TABLE package_assignments (
    package     TEXT NOT NULL REFERENCES packages(name),
    target_kind TEXT NOT NULL,               -- tenant | group | user
    target_name TEXT NOT NULL DEFAULT '',    -- '' for the tenant
    intent      TEXT NOT NULL,               -- required | available | uninstall
    users       TEXT NOT NULL,               -- primary | secondary | both
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (package, target_kind, target_name)
);

-- What the device last reported per package (JSON object by name), and the install requests
-- administrators made for it (JSON object name -> request number, delivered in its plan).
ALTER TABLE devices ADD COLUMN packages TEXT;
ALTER TABLE devices ADD COLUMN package_requests TEXT;
