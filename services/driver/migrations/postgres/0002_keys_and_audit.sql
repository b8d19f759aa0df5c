-- API keys made with CreateApiKey: the SHA-256 of the key, never the key.
CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    scopes TEXT NOT NULL,
    quotas BYTEA NOT NULL,
    created_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);
-- Who did what: one row per action or refusal.
CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);
