-- Runtime queries, looked up by name (see bemi_pg.queries). Placeholders are psycopg's.

-- name: session_setup
SET client_encoding = 'UTF8'; SET client_connection_check_interval = '1s'; SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; SET extra_float_digits = 1; SET bytea_output = 'hex'

-- name: lock
-- In a transaction: lock_timeout is local to it, the session-level lock outlives it.
SELECT pg_catalog.set_config('lock_timeout', %(timeout)s, true), pg_catalog.pg_advisory_lock(%(key)s::bigint)

-- name: lock_key
SELECT pg_catalog.hashtextextended('bemi-pg poller ' || %(slot)s, 0)

-- name: lock_holder
SELECT l.pid FROM pg_catalog.pg_locks l
 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
   AND l.classid = %(hi)s::bigint::oid AND l.objid = %(lo)s::bigint::oid
   AND l.pid <> pg_catalog.pg_backend_pid()
 LIMIT 1

-- name: slot_info
SELECT s.plugin, s.database, s.wal_status, s.active_pid, s.confirmed_flush_lsn::text,
       pg_catalog.pg_current_wal_lsn()::text AS current_lsn,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,
       s.restart_lsn::text
  FROM pg_catalog.pg_replication_slots s
 WHERE s.slot_name = %(slot)s

-- name: slot_metrics
-- What the metrics show of the slot; keep_size_bytes is null where max_slot_wal_keep_size is -1 (no limit).
SELECT s.wal_status,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint AS lag_bytes,
       (SELECT NULLIF(c.setting::bigint, -1) * 1024 * 1024
          FROM pg_catalog.pg_settings c WHERE c.name = 'max_slot_wal_keep_size') AS keep_size_bytes
  FROM pg_catalog.pg_replication_slots s
 WHERE s.slot_name = %(slot)s

-- name: create_slot
SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot(%(slot)s, 'wal2json')

-- name: create_failover_slot
-- PostgreSQL 17+: failover => true, so that standbys with sync_replication_slots keep a copy.
SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot(%(slot)s, 'wal2json', false, false, true)

-- name: slot_failover
SELECT s.failover FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = %(slot)s

-- name: failover_primary
-- What a failover slot needs of the primary (PostgreSQL 17+): the physical slots that logical
-- decoding waits for, and whether commits wait for a standby.
SELECT pg_catalog.current_setting('synchronized_standby_slots') AS standby_slots,
       pg_catalog.current_setting('synchronous_standby_names') AS sync_names,
       pg_catalog.current_setting('synchronous_commit') AS sync_commit,
       ARRAY(SELECT s.slot_name::text FROM pg_catalog.pg_replication_slots s WHERE s.slot_type = 'physical'
              ORDER BY 1) AS physical_slots

-- name: failover_standby
-- What slot synchronization needs of a standby (PostgreSQL 17+). primary_conninfo is visible
-- only to superusers and pg_read_all_settings: null for the others.
SELECT pg_catalog.pg_is_in_recovery() AS in_recovery,
       pg_catalog.current_setting('wal_level') AS wal_level,
       pg_catalog.current_setting('sync_replication_slots') AS sync_replication_slots,
       pg_catalog.current_setting('hot_standby_feedback') AS hot_standby_feedback,
       pg_catalog.current_setting('primary_slot_name') AS primary_slot_name,
       (SELECT c.setting FROM pg_catalog.pg_settings c WHERE c.name = 'primary_conninfo') AS primary_conninfo,
       (SELECT s.synced AND NOT s.temporary AND s.invalidation_reason IS NULL
          FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = %(slot)s) AS slot_ready

-- name: drop_slot
SELECT pg_catalog.pg_drop_replication_slot(slot_name)
  FROM pg_catalog.pg_replication_slots WHERE slot_name = %(slot)s

-- name: heartbeat
SELECT pg_catalog.pg_logical_emit_message(true, '_bemi_heartbeat', pg_catalog.now()::text)::text

-- name: current_lsn
SELECT pg_catalog.pg_current_wal_lsn()::text

-- name: peek
SELECT data FROM pg_catalog.pg_logical_slot_peek_changes(%(slot)s, %(upto_lsn)s::pg_lsn, %(upto_nchanges)s, VARIADIC %(options)s::text[])

-- name: peek_test_decoding
SELECT xid::text::bigint, data FROM pg_catalog.pg_logical_slot_peek_changes(%(slot)s, %(upto_lsn)s::pg_lsn, NULL, 'include-xids', '1', 'skip-empty-xacts', '1')

-- name: copy_slot_test_decoding
SELECT slot_name FROM pg_catalog.pg_copy_logical_replication_slot(%(slot)s, %(copy)s, true, 'test_decoding')

-- name: advance_slot
SELECT end_lsn::text FROM pg_catalog.pg_replication_slot_advance(%(slot)s, %(lsn)s::pg_lsn)

-- name: types
SELECT t.oid::bigint, t.typtype::text, t.typcategory::text, t.typelem::bigint, coalesce(e.typdelim, t.typdelim)::text,
       t.typbasetype::bigint
  FROM pg_catalog.pg_type t LEFT JOIN pg_catalog.pg_type e ON e.oid = t.typelem
 WHERE t.oid = ANY(%(oids)s::oid[])

-- name: recorded_types
-- What bemi.track_table recorded of types since dropped (a value of one may still be decoded).
SELECT ct.oid::bigint, ct.typtype::text, ct.typcategory::text, ct.typelem::bigint, ct.typdelim::text, ct.typbasetype::bigint
  FROM bemi.column_type ct
 WHERE ct.oid = ANY(%(oids)s::oid[])

-- name: recorded_name
-- The partition tree's root of a table (the table itself when it is no partition).
SELECT rn.nspname::text, r.relname::text
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_class r ON r.oid = coalesce(pg_catalog.pg_partition_root(c.oid), c.oid)
  JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
 WHERE n.nspname = %(schema)s AND c.relname = %(table)s

-- name: primary_key_order
SELECT a.attname::text
  FROM pg_catalog.pg_index i
  JOIN pg_catalog.pg_class c ON c.oid = i.indrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
 WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND i.indisprimary
 ORDER BY pg_catalog.array_position(i.indkey::int2[], a.attnum)

-- name: checkpoint
SELECT commit_position, end_position, changes_written, updated_at, refused
  FROM bemi.checkpoint WHERE source = %(source)s AND slot_name = %(slot)s

-- name: changes_estimate
-- The rows of the changes table (all its sources, its partitions too) as the last ANALYZE or
-- VACUUM counted them: the explorer's overview, where count(*) would read the whole trail. NULL
-- where none of them was ever analyzed (reltuples -1: a new, so far small, table).
SELECT CASE WHEN pg_catalog.bool_or(c.reltuples >= 0) THEN pg_catalog.sum(greatest(c.reltuples, 0))::bigint END
  FROM pg_catalog.pg_class c
 WHERE c.relkind = 'r'
   AND (c.oid = %(table)s::regclass
        OR c.oid IN (SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent = %(table)s::regclass))

-- name: save_checkpoint
INSERT INTO bemi.checkpoint (source, "database", slot_name, commit_position, end_position, changes_written, updated_at)
VALUES (%(source)s, %(database)s, %(slot)s, %(commit_position)s, %(end_position)s, %(written)s, pg_catalog.now())
ON CONFLICT (source, slot_name) DO UPDATE
   SET commit_position = excluded.commit_position,
       end_position = excluded.end_position,
       changes_written = bemi.checkpoint.changes_written + excluded.changes_written,
       updated_at = excluded.updated_at,
       refused = NULL

-- name: save_refusal
-- A source refused before any batch was written gets a row that skips nothing (positions -1).
INSERT INTO bemi.checkpoint (source, "database", slot_name, commit_position, end_position, refused)
VALUES (%(source)s, %(database)s, %(slot)s, -1, -1, %(refused)s)
ON CONFLICT (source, slot_name) DO UPDATE SET refused = excluded.refused

-- name: register_source
-- At install: the destination knows the source at once (positions -1: nothing written, nothing skipped).
INSERT INTO bemi.checkpoint (source, "database", slot_name, commit_position, end_position)
VALUES (%(source)s, %(database)s, %(slot)s, -1, -1)
ON CONFLICT (source, slot_name) DO NOTHING

-- name: end_periods
-- The trail of a source stops (a lost slot): its open tracking periods end where it does.
SELECT bemi.end_periods(%(source)s, %(reason)s)

-- name: begin_periods
-- A new trail of every tracked table starts in this transaction (after a lost slot).
SELECT pg_catalog.set_config('bemi.period_cause', %(reason)s, true),
       (SELECT pg_catalog.count(bemi.record_period(tt.period_schema, tt.period_table, 'began')) FROM bemi.tracked_table AS tt),
       pg_catalog.set_config('bemi.period_cause', '', true)

-- name: trail_periods
-- A source's tracking periods, for status.
SELECT "schema" || '.' || "table", began_at, began_reason, ended_at, ended_reason
  FROM bemi.trail_periods(%(source)s) ORDER BY 1, 2

-- name: installed_version
SELECT version, settings FROM bemi.installation

-- name: installation
SELECT pg_catalog.to_jsonb(i) FROM bemi.installation AS i

-- name: source_identity
SELECT s.system_identifier::text || '/' || pg_catalog.current_database() FROM pg_catalog.pg_control_system() AS s

-- name: adopt_source
SELECT bemi.adopt_source(%(source)s, %(database)s)

-- name: record_destination
UPDATE bemi.installation SET destination = %(destination)s WHERE destination IS DISTINCT FROM %(destination)s

-- name: tracked_tables
SELECT n.nspname, c.relname
  FROM pg_catalog.pg_trigger t
  JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE t.tgname IN ('bemi_capture', 'bemi_capture_truncate')
 ORDER BY 1, 2

-- name: tables_without_pk
SELECT n.nspname, c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%(schemas)s::text[])
   AND NOT (n.nspname || '.' || c.relname) = ANY(%(untracked)s::text[])
   AND NOT EXISTS (SELECT FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)
 ORDER BY 1, 2

-- name: tables_unlogged
-- Logical decoding cannot see an UNLOGGED table's changes (they are not in the WAL).
SELECT n.nspname, c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND c.relpersistence = 'u' AND n.nspname = ANY(%(schemas)s::text[])
   AND NOT (n.nspname || '.' || c.relname) = ANY(%(untracked)s::text[])
 ORDER BY 1, 2

-- name: changes_table_clash
-- The destination table's name, when a relation of that name exists that is not a changes table:
-- its kind, and which of the changes table's columns it lacks.
SELECT c.relkind::text AS relkind,
       ARRAY(SELECT col FROM pg_catalog.unnest(%(columns)s::text[]) AS col
              WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_attribute a
                                 WHERE a.attrelid = c.oid AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped)) AS missing
  FROM pg_catalog.pg_class c
 WHERE c.oid = pg_catalog.to_regclass(%(table)s)

-- name: tables_not_owned
SELECT n.nspname, c.relname
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY(%(schemas)s::text[])
   AND NOT (n.nspname || '.' || c.relname) = ANY(%(untracked)s::text[])
   AND NOT pg_catalog.pg_has_role(c.relowner, 'USAGE')
 ORDER BY 1, 2

-- name: role_info
SELECT r.rolsuper, r.rolreplication,
       pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE') AS can_create,
       pg_catalog.current_database() AS database,
       pg_catalog.current_setting('wal_level') AS wal_level,
       pg_catalog.current_setting('max_replication_slots')::int AS max_slots,
       (SELECT count(*) FROM pg_catalog.pg_replication_slots)::int AS used_slots,
       pg_catalog.current_setting('server_version_num')::int AS version_num
  FROM pg_catalog.pg_roles r WHERE r.rolname = current_user

-- name: oldest_transaction
SELECT a.datname, a.pid, a.usename, a.application_name, a.state,
       extract(epoch FROM pg_catalog.now() - a.xact_start)::bigint AS seconds,
       pg_catalog.left(a.query, 200) AS query
  FROM pg_catalog.pg_stat_activity a
 WHERE a.backend_xid IS NOT NULL AND a.pid <> pg_catalog.pg_backend_pid()
 ORDER BY a.xact_start
 LIMIT 1

-- name: prepared_transactions
-- A prepared transaction (PREPARE TRANSACTION) holds logical decoding back as an open one does,
-- until COMMIT PREPARED or ROLLBACK PREPARED, whoever's session is gone.
SELECT p.gid, p.database, p.owner, p.transaction::text AS transaction_id,
       p.prepared, extract(epoch FROM pg_catalog.now() - p.prepared)::bigint AS seconds
  FROM pg_catalog.pg_prepared_xacts p
 ORDER BY p.prepared

-- name: changes_partitions
SELECT n.nspname, c.relname,
       (pg_catalog.regexp_match(pg_catalog.pg_get_expr(c.relpartbound, c.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper_bound
  FROM pg_catalog.pg_inherits i
  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE i.inhparent = %(table)s::regclass
 ORDER BY upper_bound

-- name: capture_mode
SELECT coalesce(settings ->> 'capture_mode', 'wal') FROM bemi.installation

-- name: transaction_commit
-- Where a transaction's commit record starts and ends, found among the slot's pending transactions.
SELECT d.data::json ->> 'lsn' AS commit_lsn, d.data::json ->> 'nextlsn' AS end_lsn
  FROM pg_catalog.pg_logical_slot_peek_changes(%(slot)s, pg_catalog.pg_current_wal_lsn(), NULL,
         'format-version', '2', 'include-xids', '1', 'include-lsn', '1', 'filter-tables', '*.*') AS d
 WHERE d.xid = %(xid)s::text::xid AND d.data::json ->> 'action' = 'C'

-- name: capture_switch
SELECT transaction_id, from_mode, to_mode FROM bemi.capture_switch

-- name: record_capture_switch
INSERT INTO bemi.capture_switch (transaction_id, from_mode, to_mode)
VALUES (pg_catalog.pg_current_xact_id()::text::bigint %% 4294967296, %(from_mode)s, %(to_mode)s)
ON CONFLICT (singleton) DO UPDATE
  SET transaction_id = excluded.transaction_id, from_mode = excluded.from_mode, to_mode = excluded.to_mode,
      switched_at = excluded.switched_at

-- name: clear_capture_switch
DELETE FROM bemi.capture_switch

-- The explorer's reads (bemi_pg.explorer). {changes} is the changes table, {where} the filters
-- (each a parameter), all ANDed after the source's own; newest first on an index-backed order.

-- name: explorer_changes
-- The page's rows are chosen first and only they are turned into JSON: with the select list
-- beside the ORDER BY ... LIMIT, every row the sort takes in (all of a filter's matches when they
-- come from a bitmap, the GIN's) would be.
SELECT to_jsonb(p.*)::text AS change, p.committed_at, p.commit_position, p.seq
  FROM (SELECT c.* FROM {changes} AS c
         WHERE c.source = %(source)s AND {where}
         ORDER BY c.committed_at DESC, c.commit_position DESC, c.seq DESC
         LIMIT %(limit)s) AS p
 ORDER BY p.committed_at DESC, p.commit_position DESC, p.seq DESC

-- name: explorer_transaction_position
-- xids wrap: a transaction id names the most recent transaction that had it.
SELECT c.commit_position FROM {changes} AS c
 WHERE c.source = %(source)s AND c.transaction_id = %(xid)s
 ORDER BY c.committed_at DESC LIMIT 1

-- name: explorer_row_extent
SELECT min(c.committed_at) AS first_at, max(c.committed_at) AS last_at, count(*) AS changes,
       (array_agg(c.operation ORDER BY c.committed_at, c.commit_position, c.seq))[1] AS first_operation
  FROM {changes} AS c
 WHERE c.source = %(source)s AND c."table" = %(table)s AND (%(schema)s::text IS NULL OR c."schema" = %(schema)s)
   AND c.primary_key = %(pk)s

-- name: explorer_volume
SELECT c."schema" || '.' || c."table" AS relation, pg_catalog.date_trunc(%(unit)s, c.committed_at) AS bucket, count(*) AS changes
  FROM {changes} AS c
 WHERE c.source = %(source)s AND c.committed_at >= %(since)s
 GROUP BY 1, 2
 ORDER BY 1, 2

-- name: explorer_busiest_contexts
SELECT c.context::text AS context, count(*) AS changes, max(c.committed_at) AS last_at
  FROM {changes} AS c
 WHERE c.source = %(source)s AND c.committed_at >= %(since)s AND c.context <> '{{}}'::jsonb
 GROUP BY c.context
 ORDER BY count(*) DESC, c.context::text
 LIMIT 10

-- name: baseline_tables
-- The tables a baseline covers: the tracked ones, a partitioned table once (its partitions are
-- read through it), each with its primary key's columns in key order.
SELECT n.nspname, c.relname,
       coalesce((SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.n)
                   FROM pg_catalog.pg_index i
                   CROSS JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, n)
                   JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                  WHERE i.indrelid = c.oid AND i.indisprimary), '{}') AS key_columns,
       (SELECT pg_catalog.array_agg(a.attname::text ORDER BY a.attnum) FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns,
       greatest(c.reltuples, 0)::bigint AS estimate
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE NOT c.relispartition
   AND EXISTS (SELECT FROM pg_catalog.pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname IN ('bemi_capture', 'bemi_capture_truncate'))
 ORDER BY 1, 2

-- name: snapshot_moment
-- The first statement of the snapshot's transaction: what it stands for.
SELECT pg_catalog.clock_timestamp(), (pg_catalog.pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint

-- name: snapshot_discard_incomplete
DELETE FROM bemi.snapshot WHERE source = %(source)s AND "schema" = %(schema)s AND "table" = %(table)s AND completed_at IS NULL

-- name: snapshot_begin
INSERT INTO bemi.snapshot (source, "schema", "table", taken_at, wal_position)
VALUES (%(source)s, %(schema)s, %(table)s, %(taken_at)s, %(wal_position)s)
RETURNING id

-- name: snapshot_replace
-- The new baseline replaces the table's previous one, in the transaction of snapshot_complete.
DELETE FROM bemi.snapshot
 WHERE source = %(source)s AND "schema" = %(schema)s AND "table" = %(table)s AND completed_at IS NOT NULL

-- name: snapshot_complete
UPDATE bemi.snapshot SET completed_at = pg_catalog.now(), row_count = %(rows)s WHERE id = %(id)s

-- name: snapshot_tables
-- The tables of a source that have a complete baseline.
SELECT "schema", "table" FROM bemi.snapshot WHERE source = %(source)s AND completed_at IS NOT NULL

-- name: baselines
-- A source's complete baselines, for status.
SELECT "schema" || '.' || "table", row_count, taken_at FROM bemi.snapshot
 WHERE source = %(source)s AND completed_at IS NOT NULL ORDER BY 1

-- name: move_changes
-- Trigger mode: one batch of queued changes into the changes table (see bemi.move_changes).
SELECT bemi.move_changes(%(max_rows)s)

-- name: queue_backlog
-- Trigger mode: the changes waiting to be moved, and the mover's last runs.
SELECT b.queued AS rows, EXTRACT(epoch FROM pg_catalog.clock_timestamp() - b.oldest)::float8 AS oldest_age_seconds,
       b.ran_at AS mover_ran_at, b.moved_at AS mover_moved_at, b.moved_until
  FROM bemi.queue_backlog() AS b

-- name: seal
-- Seals what no seal covers of the source's changes (README, "A sealed trail"); the head hash.
SELECT pg_catalog.encode(bemi.seal(%(source)s, %(wal_upto)s), 'hex')

-- name: seal_batch
-- The same with the hashes the poller computed for the batch (bemi.seal_batch checks each against
-- the table's changes and hashes the rest itself).
SELECT pg_catalog.encode(bemi.seal_batch(%(source)s, %(wal_upto)s, NULL, %(supplied)b), 'hex')

-- name: seal_supplied
-- Whether the poller may compute its batches' hashes (README "A sealed trail"): bemi.seal_batch is
-- installed, the destination's text is UTF-8, the changes table's columns have the types it hashes
-- them as, created_at defaults to now() (the batch's transaction's start, which it reads), and
-- no trigger but the trail's own may alter a row on its way in.
SELECT pg_catalog.to_regprocedure('bemi.seal_batch(text,bigint,bigint,bytea)') IS NOT NULL
       AND pg_catalog.current_setting('server_encoding') = 'UTF8'
       AND (SELECT pg_catalog.count(*) FROM pg_catalog.pg_attribute AS a
             WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
               AND a.attname::text || ':' || a.atttypid::text = ANY (ARRAY[
                 'id:2950', 'source:25', 'database:25', 'schema:25', 'table:25', 'primary_key:25', 'operation:25',
                 'before:3802', 'after:3802', 'context:3802', 'committed_at:1184', 'queued_at:1184', 'created_at:1184',
                 'transaction_id:20', 'position:20', 'commit_position:20', 'seq:23'])) = 17
       AND (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef AS d
              JOIN pg_catalog.pg_attribute AS a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
             WHERE d.adrelid = t.oid AND a.attname = 'created_at') = 'now()'
       AND NOT EXISTS (SELECT FROM pg_catalog.pg_trigger AS g
                        WHERE g.tgrelid = t.oid AND NOT g.tgisinternal
                          AND g.tgname NOT IN ('bemi_append_only', 'bemi_append_only_truncate'))
  FROM pg_catalog.pg_class AS t JOIN pg_catalog.pg_namespace AS n ON n.oid = t.relnamespace
 WHERE n.nspname = %(schema)s AND t.relname = %(table)s

-- name: batch_started
-- When the batch's transaction began: the changes' created_at (its default, now()).
SELECT pg_catalog.now()

-- name: seal_head
SELECT s.seal_no, pg_catalog.encode(s.hash, 'hex') FROM bemi.seal AS s
 WHERE s.source = %(source)s ORDER BY s.seal_no DESC LIMIT 1

-- name: seals
-- Every seal of a source in chain order, with the hash recomputed from what it holds.
SELECT s.seal_no, s.kind, s.sealed_at, s.from_position, s.to_position, s.change_count, s.change_ids,
       s.change_hashes, s.pruned, s.prev_hash, s.hash,
       bemi.seal_hash(s.prev_hash, s.change_hashes, s.source, s.seal_no, s.kind, s.sealed_at, s.from_position,
                      s.to_position, s.change_count, s.pruned) AS recomputed
  FROM bemi.seal AS s WHERE s.source = %(source)s ORDER BY s.seal_no

-- name: sealed_sources
SELECT DISTINCT s.source FROM bemi.seal AS s

-- name: prune_sealed
SELECT bemi.prune_sealed(%(source)s, %(cutoff)s, %(batch)s)
