"""The PostgreSQL catalog's schema and protocol between writers: its tables, the statements
too long to read inline, the advisory lock keys and the notification channel every writer
uses, and the connection options of every connection to it (postgres.py, listener.py)."""

from __future__ import annotations

import math
from typing import Any

from batchserve.storage.catalog import PRUNE_BATCH, PRUNED_SEQ

#: LISTEN/NOTIFY channel of the change log; the payload is the last seq committed.
CHANNEL = "batchserve_changes"

#: Advisory locks in the two-int key space: (batchserve's class, lock). Part of the protocol
#: between writers: anything else that writes the catalog takes them as this module does.
LOCK_CLASS = 0x62737276  # "bsrv"
SCHEMA_LOCK = (LOCK_CLASS, 1)
LOG_LOCK = (LOCK_CLASS, 2)
#: Held by the one replica pruning the log at a time (the others skip their pass).
PRUNE_LOCK = (LOCK_CLASS, 3)

#: TCP keepalives: a server gone without closing the connection (a host down, a network
#: partition) fails a waiting call after about 20 s instead of never.
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def libpq_timeout_s(seconds: float) -> int:
    """libpq's ``connect_timeout``: whole seconds, at least 2."""
    return max(2, math.ceil(seconds))


SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    fid bigserial PRIMARY KEY,
    id text NOT NULL UNIQUE,
    label text,
    class text,
    metadata jsonb NOT NULL DEFAULT '{}',
    embedding bytea NOT NULL,
    created double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS thumbnails (
    fid bigint PRIMARY KEY REFERENCES items (fid) ON DELETE CASCADE,
    jpeg bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS sources (
    fid bigint PRIMARY KEY REFERENCES items (fid) ON DELETE CASCADE,
    sha256 text NOT NULL
);
CREATE TABLE IF NOT EXISTS features (
    fid bigint PRIMARY KEY REFERENCES items (fid) ON DELETE CASCADE,
    orb bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS changes (
    seq bigserial PRIMARY KEY,
    op text NOT NULL CHECK (op IN ('add', 'del')),
    fid bigint NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (
    id text PRIMARY KEY,
    applied_seq bigint NOT NULL,
    seen timestamptz NOT NULL
);
DO $$ BEGIN  -- a log from before retention: its changes count as logged now
    IF NOT EXISTS (SELECT FROM information_schema.columns WHERE table_schema = current_schema()
                   AND table_name = 'changes' AND column_name = 'at') THEN
        ALTER TABLE changes ADD COLUMN at timestamptz NOT NULL DEFAULT now();
        ALTER TABLE changes ALTER COLUMN at SET DEFAULT clock_timestamp();
    END IF;
END $$;
"""

#: One pruning statement (rule 8): forget expired replicas; delete the oldest PRUNE_BATCH
#: changes up to what every live replica applied, stopping at the first one younger than the
#: retention; raise ``pruned_seq`` to the last deleted.
PRUNE = f"""
WITH expired AS (
    DELETE FROM replicas WHERE seen < now() - make_interval(secs => %(expiry_s)s)
), bound AS (
    SELECT least(%(upto)s, min(applied_seq)) AS seq FROM replicas
    WHERE seen >= now() - make_interval(secs => %(expiry_s)s)
), batch AS (
    SELECT seq, at FROM changes WHERE seq <= (SELECT seq FROM bound)
    ORDER BY seq LIMIT {PRUNE_BATCH}
), young AS (
    SELECT min(seq) AS seq FROM batch
    WHERE at > clock_timestamp() - make_interval(secs => %(keep_s)s)
), gone AS (
    DELETE FROM changes WHERE seq IN (SELECT seq FROM batch
        WHERE seq < coalesce((SELECT seq FROM young), (SELECT seq FROM bound) + 1))
    RETURNING seq
), horizon AS (
    INSERT INTO meta SELECT '{PRUNED_SEQ}', max(seq)::text FROM gone HAVING count(*) > 0
    ON CONFLICT (key) DO UPDATE SET value = excluded.value
    WHERE meta.value::bigint < excluded.value::bigint
)
SELECT count(*) FROM gone
"""

INSERT_ITEM = """
WITH added AS (
    INSERT INTO items (id, label, class, metadata, embedding, created)
    VALUES (%(id)s, %(label)s, %(class)s, %(metadata)s, %(embedding)s, %(created)s)
    RETURNING fid
), thumbnail AS (
    INSERT INTO thumbnails (fid, jpeg)
    SELECT fid, %(jpeg)s::bytea FROM added WHERE %(jpeg)s::bytea IS NOT NULL
), source AS (
    INSERT INTO sources (fid, sha256)
    SELECT fid, %(digest)s::text FROM added WHERE %(digest)s::text IS NOT NULL
), feature AS (
    INSERT INTO features (fid, orb)
    SELECT fid, %(features)s::bytea FROM added WHERE %(features)s::bytea IS NOT NULL
)
SELECT fid FROM added
"""

ITEM_COLUMNS = "SELECT fid, id, label, class, metadata, created FROM items"
