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
-- The append-only logs; `kept` marks what compaction keeps (status changes, the result).
CREATE TABLE events (
    subject TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kept INTEGER NOT NULL,
    event BLOB NOT NULL,
    PRIMARY KEY (subject, seq)
) WITHOUT ROWID;
