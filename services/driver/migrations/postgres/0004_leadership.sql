-- Which leadership of the drivers sharing the store is the latest: each driver that takes the
-- lead counts one up, so that a leader that lost its lock can tell whether another led since.
CREATE TABLE leadership (
    id INTEGER PRIMARY KEY,
    epoch BIGINT NOT NULL
);
