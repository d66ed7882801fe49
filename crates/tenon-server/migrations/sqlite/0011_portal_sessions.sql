-- The administrator's web portal (issue 17): server-side sessions.
-- A session is what a signed-in browser holds instead of the admin token: its cookie carries a
-- random 32-byte id, of which only the SHA-256 is stored (a database dump opens no session).
-- Every request checks the session and its admin token (revoking the token ends its sessions).
CREATE TABLE portal_sessions (
    id_sha256       TEXT PRIMARY KEY,           -- hex SHA-256 of the cookie's session id
    admin_token_id  TEXT NOT NULL REFERENCES admin_tokens(id),
    created_at      INTEGER NOT NULL,
    last_seen_at    INTEGER NOT NULL,           -- refreshed at most every minute (idle expiry)
    idle_secs       INTEGER NOT NULL,           -- idle expiry: last_seen_at + idle_secs
    expires_at      INTEGER NOT NULL,           -- absolute expiry, whatever the activity
    source          TEXT                        -- the address it signed in from, for the audit view
);

CREATE INDEX portal_sessions_token ON portal_sessions (admin_token_id);
