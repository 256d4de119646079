-- CREATE EXTENSION bemi_pg: trigger mode, Bemi's example of a todo list.
CREATE TABLE todo (id serial PRIMARY KEY, task text NOT NULL, done boolean NOT NULL DEFAULT false);
CREATE EXTENSION bemi_pg;
SELECT extversion FROM pg_extension WHERE extname = 'bemi_pg';
SELECT bemi.capture_mode();

BEGIN;
SELECT bemi.set_context('{"endpoint": "/todos", "method": "POST", "user_id": 1}') IS NOT NULL AS context_set;
INSERT INTO todo (task) VALUES ('Sleep'), ('Eat'), ('Repeat');
COMMIT;
UPDATE todo SET done = true WHERE id = 1 /*Bemi {"endpoint": "/todos/1/complete", "method": "PUT"} Bemi*/;
DELETE FROM todo WHERE id = 2;
SELECT bemi_set_context('{"job": "cleanup"}');
DELETE FROM todo WHERE done;
SELECT bemi_set_context(NULL);

-- A context that is not JSON never fails the write: it is recorded as an error.
SELECT bemi_set_context('not json');
INSERT INTO todo (task) VALUES ('Sleep again');
SELECT bemi_set_context(NULL);

-- The triggers queued the changes; the mover (`bemi-pg poll`, or pg_cron) moves them into changes,
-- here until the trail is complete up to the last of them.
SELECT count(*) AS queued FROM bemi.change_queue;
DO $$
BEGIN
  FOR i IN 1..1000 LOOP
    PERFORM bemi.move_changes();
    COMMIT;
    EXIT WHEN NOT EXISTS (SELECT FROM bemi.change_queue) AND bemi.moved_until() >= (SELECT max(committed_at) FROM changes);
    PERFORM pg_sleep(0.01);
  END LOOP;
END
$$;
SELECT count(*) AS queued FROM bemi.change_queue;

SELECT "table", primary_key, operation, before, after, context - 'client_addr' AS context
  FROM changes ORDER BY committed_at, commit_position, seq;

-- Time travel over the trail.
SELECT operation, changed FROM bemi.history('todo', '1');
SELECT bemi.as_of('todo', '2', (SELECT max(committed_at) FROM changes));

-- Tables created later are tracked by the event trigger.
CREATE TABLE tag (name text PRIMARY KEY);
INSERT INTO tag VALUES ('home');
TRUNCATE tag;
DO $$
BEGIN
  FOR i IN 1..1000 LOOP
    PERFORM bemi.move_changes();
    COMMIT;
    EXIT WHEN NOT EXISTS (SELECT FROM bemi.change_queue) AND bemi.moved_until() >= (SELECT max(committed_at) FROM changes);
    PERFORM pg_sleep(0.01);
  END LOOP;
END
$$;
SELECT "table", primary_key, operation, after FROM changes WHERE "table" = 'tag' ORDER BY committed_at, seq;

-- The objects the extension owns, by kind.
SELECT pg_describe_object(classid, objid, 0) AS object
  FROM pg_depend
 WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
   AND classid <> 'pg_type'::regclass  -- 17 and later also list the tables' row types
   AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'bemi_pg')
 ORDER BY 1;

SET client_min_messages = warning;
DROP EXTENSION bemi_pg CASCADE;  -- the capture triggers depend on it
RESET client_min_messages;
SELECT count(*) AS triggers_left FROM pg_trigger WHERE tgname LIKE 'bemi%';
DROP TABLE todo, tag;
