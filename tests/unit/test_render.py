from __future__ import annotations

import pytest

from bemi_pg.config import load_settings
from bemi_pg.errors import BemiError
from bemi_pg.render import check_sql, glob_regex, quote_ident, render_extension, render_install, render_uninstall

SETTINGS = [
    load_settings(None),
    load_settings(None, capture_mode="triggers", ignore_columns=("*.updated_at",), exclude_columns=("users.pass[!w]?",)),
    load_settings(None, schemas=("public", "Sales Team"), exclude_tables=('public."Weird.Name"',),
                  destination_table='audit."Changes"', replica_identity_full=False, row_gin_indexes=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "triggers", "custom"])
@pytest.mark.parametrize("uninstall", [False, True], ids=["install", "uninstall"])
def test_every_statement_parses_and_render_is_deterministic(settings, uninstall):
    def once():
        r = render_uninstall(settings, drop_changes=True) if uninstall else render_install(settings)
        return r.combined()

    first = once()
    assert first == once()
    assert check_sql(first) > 5
    assert first.startswith("-- bemi-pg ")


def test_custom_settings_are_quoted_by_code():
    text = render_install(SETTINGS[-1]).combined()
    assert 'audit."Changes"' in text
    assert "'Sales Team'" in text
    assert "jsonb_path_ops" in text and "_after_idx" in text


def test_gin_on_rows_is_opt_in():
    assert "_after_idx" not in render_install(SETTINGS[0]).combined()


def test_quote_ident_quotes_only_where_needed():
    assert quote_ident("public", "changes") == "public.changes"
    assert quote_ident("table") == '"table"'
    assert quote_ident('we"ird; drop table x') == '"we""ird; drop table x"'
    assert quote_ident("Mixed") == '"Mixed"'


def test_check_sql_rejects_broken_plpgsql():
    bad = "CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1 +; END $$;"
    with pytest.raises(BemiError, match="PL/pgSQL does not parse"):
        check_sql(bad)


@pytest.mark.parametrize("pattern, matches, misses", [
    ("*.updated_at", ["public.users.updated_at", "users.updated_at"], ["users.updated_at2", "users.created_at"]),
    ("users.pass[!w]?", ["users.passxd"], ["users.passwd", "users.pass"]),
    ("a.b+c[", ["a.b+c["], ["a.bbc["]),
    ("t.[ab]_x", ["t.a_x", "t.b_x"], ["t.c_x"]),
])
def test_column_globs_become_the_same_regular_expressions(pattern, matches, misses):
    import fnmatch
    import re

    regex = re.compile(glob_regex(pattern))  # PostgreSQL and Python read these regular expressions alike
    for name in matches:
        assert fnmatch.fnmatchcase(name, pattern) and regex.match(name), name
    for name in misses:
        assert not fnmatch.fnmatchcase(name, pattern) and not regex.match(name), name


def test_render_refuses_auto_and_the_extension_is_deterministic():
    from bemi_pg import commands
    from bemi_pg.errors import ConfigError

    with pytest.raises(ConfigError, match="decided by `bemi-pg install`"):
        commands.render(load_settings(None, capture_mode="auto"))
    first = render_extension()
    assert first == render_extension()
    script = next(text for name, text in first.items() if name.endswith(".sql") and name.count("--") == 1)
    assert script.startswith('\\echo Use "CREATE EXTENSION bemi_pg"') and "pg_extension_config_dump" in script
    assert check_sql(script.split("\n", 1)[1]) > 5
