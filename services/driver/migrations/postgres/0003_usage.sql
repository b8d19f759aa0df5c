-- What each task run and session message cost, once it ended: the roll-ups of GetUsage and
-- the budgets are sums over these rows.
CREATE TABLE usage_records (
    subject TEXT NOT NULL,
    turn BIGINT NOT NULL,
    session BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    tree TEXT NOT NULL,
    owner TEXT NOT NULL,
    worker TEXT NOT NULL,
    model TEXT NOT NULL,
    cost_usd DOUBLE PRECISION NOT NULL,
    metered_cost_usd DOUBLE PRECISION NOT NULL,
    -- TokenUsage as protobuf: reported, then metered.
    tokens BYTEA NOT NULL,
    metered_tokens BYTEA NOT NULL,
    PRIMARY KEY (subject, turn)
);
CREATE INDEX usage_records_by_time ON usage_records (time_ms);
