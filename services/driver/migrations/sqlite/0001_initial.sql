-- One row per task or session; `record` is its public protobuf, `bookkeeping` the driver's.
CREATE TABLE subjects (
    ord INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    status INTEGER NOT NULL,
    ended INTEGER NOT NULL,
    idempotency_key TEXT UNIQUE,
    record BLOB NOT NULL,
    bookkeeping BLOB NOT NULL,
    last_sequence INTEGER NOT NULL,
    end_ms INTEGER,
    compacted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX subjects_by_kind_status ON subjects (kind, status, ord);
CREATE INDEX subjects_live ON subjects (kind, ended, ord);
-- The append-only logs, in chunks: each row holds the events `first_seq..=last_seq` of one
-- subject as length-delimited protobufs, written by one commit.
CREATE TABLE events (
    subject TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    events BLOB NOT NULL,
    PRIMARY KEY (subject, first_seq)
) WITHOUT ROWID;
