"""Roles as production has them: an application role writes, a table owner installs."""

from __future__ import annotations

import psycopg

from bemi_pg import commands


def test_an_application_role_writes_with_context(db):
    db.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
    db.install()
    db.execute("DROP ROLE IF EXISTS app; CREATE ROLE app LOGIN; GRANT ALL ON todo, todo_id_seq TO app")
    app = db.dsn.replace("user=postgres", "user=app")
    try:
        with psycopg.connect(app, autocommit=True) as conn:
            conn.execute("SELECT bemi_set_context('{\"user\": \"app\"}')")
            conn.execute("INSERT INTO todo (task) VALUES ('a') /*Bemi {\"via\": \"comment\"} Bemi*/")
            with conn.transaction():
                conn.execute("SELECT bemi.set_context('{\"tx\": 1}')")
                conn.execute("UPDATE todo SET task = 'b'")
            conn.execute("DELETE FROM todo")
        db.poll()
        assert [c["context"] for c in db.changes()] == [
            {"user": "app", "via": "comment"}, {"user": "app", "tx": 1}, {"user": "app"},
        ]
    finally:
        db.execute("DROP OWNED BY app; DROP ROLE app")


def test_a_table_owner_without_superuser_installs_and_tracks_by_hand(db):
    db.execute(f"""
        DROP ROLE IF EXISTS owner_role; CREATE ROLE owner_role LOGIN REPLICATION;
        GRANT CREATE ON DATABASE "{db.name}" TO owner_role; GRANT CREATE ON SCHEMA public TO owner_role;
    """)
    owner = db.dsn.replace("user=postgres", "user=owner_role")
    try:
        with psycopg.connect(owner, autocommit=True) as conn:
            conn.execute("CREATE TABLE todo (id bigserial PRIMARY KEY, task text)")
        commands.install(owner, None, db.settings)
        assert db.execute("SELECT count(*) FROM pg_event_trigger") == [(0,)]
        with psycopg.connect(owner, autocommit=True) as conn:
            conn.execute("CREATE TABLE later (id int PRIMARY KEY)")
            conn.execute("CALL bemi.track_tables()")
            conn.execute("INSERT INTO todo (task) VALUES ('a'); INSERT INTO later VALUES (1)")
        commands.poll_once(owner, None, db.settings)
        assert [c["table"] for c in db.changes()] == ["todo", "later"]
        commands.uninstall(owner, None, db.settings, drop_changes=True)
    finally:
        db.execute(f"""
            DROP OWNED BY owner_role CASCADE; REVOKE CREATE ON DATABASE "{db.name}" FROM owner_role;
            DROP ROLE owner_role;
        """)


def test_hostile_identifiers_end_to_end(db):
    db.execute('''
        CREATE SCHEMA "Sales Team";
        CREATE TABLE "Sales Team"."we""ird; drop table x" ("Id" int PRIMARY KEY, "a.b,c" text, "it's" int);
        CREATE TABLE "Sales Team"."Mixed*Case" (id int PRIMARY KEY);
    ''')
    db.install(schemas=("public", "Sales Team"), exclude_tables=('"Sales Team"."Mixed*Case"',))
    db.execute('''
        INSERT INTO "Sales Team"."we""ird; drop table x" VALUES (1, 'x', 2);
        UPDATE "Sales Team"."we""ird; drop table x" SET "a.b,c" = 'y';
        INSERT INTO "Sales Team"."Mixed*Case" VALUES (1);
    ''')
    db.poll()
    got = [(c["schema"], c["table"], c["primary_key"], c["after"]) for c in db.changes()]
    assert got == [
        ("Sales Team", 'we"ird; drop table x', "1", {"Id": 1, "a.b,c": "x", "it's": 2}),
        ("Sales Team", 'we"ird; drop table x', "1", {"Id": 1, "a.b,c": "y", "it's": 2}),
    ]
