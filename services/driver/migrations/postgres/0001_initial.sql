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
-- The append-only logs, in chunks: each row holds the events `first_seq..=last_seq` of one
-- subject as length-delimited protobufs, written by one commit.
CREATE TABLE events (
    subject TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    events BYTEA NOT NULL,
    PRIMARY KEY (subject, first_seq)
);
