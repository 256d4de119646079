from __future__ import annotations

import pytest

from bemi_pg.config import load_settings
from bemi_pg.errors import BemiError
from bemi_pg.render import check_sql, quote_ident, render_install, render_uninstall

SETTINGS = [
    load_settings(None),
    load_settings(None, schemas=("public", "Sales Team"), exclude_tables=('public."Weird.Name"',),
                  destination_table='audit."Changes"', replica_identity_full=False, row_gin_indexes=True),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "custom"])
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
    text = render_install(SETTINGS[1]).combined()
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
