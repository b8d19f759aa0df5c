-- One row per task or session; `record` is its public protobuf, `bookkeeping` the driver's.
CREATE TABLE subjects (
    ord BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind BIGINT NOT NULL,
    status BIGINT NOT NULL,
    ended BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    record BYTEA NOT NULL,
    bookkeeping BYTEA NOT NULL,
    last_sequence BIGINT NOT NULL,
    end_ms BIGINT,
    compacted BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX subjects_by_kind_status ON subjects (kind, status, ord);
CREATE INDEX subjects_live ON subjects (kind, ended, ord);
-- The append-only logs; `kept` marks what compaction keeps (status changes, the result).
CREATE TABLE events (
    subject TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kept BIGINT NOT NULL,
    event BYTEA NOT NULL,
    PRIMARY KEY (subject, seq)
);
