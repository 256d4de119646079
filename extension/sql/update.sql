-- ALTER EXTENSION bemi_pg UPDATE from 0.1.0 (wal mode, the only one it had) keeps wal mode.
CREATE TABLE todo (id serial PRIMARY KEY, task text NOT NULL);
CREATE EXTENSION bemi_pg VERSION '0.1.0';
SELECT to_regprocedure('bemi.capture_mode()') IS NULL AS no_capture_mode_in_0_1_0;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'todo'::regclass ORDER BY 1;

ALTER EXTENSION bemi_pg UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'bemi_pg';
SELECT bemi.capture_mode(), (SELECT version FROM bemi.installation);
SELECT tgname FROM pg_trigger WHERE tgrelid = 'todo'::regclass ORDER BY 1;
SELECT relreplident FROM pg_class WHERE oid = 'todo'::regclass;

-- As many objects as CREATE EXTENSION bemi_pg makes at 0.4.0 (tests/integration/test_extension.py
-- compares them one by one with `bemi-pg install`).
SELECT count(*) AS members FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
   AND classid <> 'pg_type'::regclass  -- 17 and later also list the tables' row types
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'bemi_pg');

SET client_min_messages = warning;
DROP EXTENSION bemi_pg CASCADE;  -- the capture triggers depend on it
RESET client_min_messages;
DROP PUBLICATION bemi;
DROP TABLE todo;
