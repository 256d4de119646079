from __future__ import annotations

import pytest

from bemi_pg.config import default_slot_name, load_settings, split_qualified_name
from bemi_pg.db import resolve_dsn, scrub
from bemi_pg.errors import ConfigError


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BEMI_CONFIG", raising=False)
    s = load_settings()
    assert s.schemas == ("public",) and s.destination == ("public", "changes") and s.replica_identity_full


def test_toml_is_read(tmp_path):
    path = tmp_path / "bemi.toml"
    path.write_text('[source]\nschemas = ["app"]\nexclude_tables = ["app.sessions"]\n[slot]\nname = "my_slot"\n')
    s = load_settings(path)
    assert s.schemas == ("app",) and s.excluded() == (("app", "sessions"),) and s.slot_for("x") == "my_slot"


@pytest.mark.parametrize("text, message", [
    ("[source\n", "not valid TOML"),
    ("[nope]\n", "unknown section"),
    ("[source]\nschema = []\n", "unknown setting source.schema"),
    ("[capture]\nreplica_identity_full = 'yes'\n", "must be a bool"),
    ("[source]\nexclude_tables = ['sessions']\n", "schema.table"),
    ("[slot]\nname = 'Bad-Name'\n", "not a valid slot name"),
    ("[capture]\nmode = 'logical'\n", 'capture.mode must be "wal", "triggers" or "auto"'),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bemi.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(path)


def test_slot_name_differs_per_database():
    assert default_slot_name("shop") == "bemi_shop"
    assert default_slot_name("My-DB") == "bemi_my_db"


def test_quoted_qualified_names():
    assert split_qualified_name('"a.b"."c""d"', what="t") == ("a.b", 'c"d')


def test_dsn_precedence_and_scrubbing():
    env = {"BEMI_DSN": "postgresql://a@h/x", "DATABASE_URL": "postgresql://b@h/y"}
    assert resolve_dsn(None, env) == "postgresql://a@h/x"
    assert resolve_dsn("postgresql://c@h/z", env) == "postgresql://c@h/z"
    assert resolve_dsn(None, {"DATABASE_URL": "postgresql://b@h/y"}) == "postgresql://b@h/y"
    assert resolve_dsn(None, {}) == ""
    assert "secret" not in scrub("postgresql://u:secret@h/db")
    with pytest.raises(ConfigError, match="malformed DSN") as info:
        resolve_dsn("postgresql://u:secret@h:notaport/db", {})
    assert "secret" not in str(info.value)


def test_slot_failover_is_read_and_belongs_to_the_installation(tmp_path):
    path = tmp_path / "bemi.toml"
    path.write_text("[slot]\nfailover = true\n")
    s = load_settings(path)
    assert s.slot_failover and s.summary()["slot_failover"] is True
    assert not load_settings(None).slot_failover
    with pytest.raises(ConfigError, match=r'sets slot.failover = true, but the installation was installed with false'):
        s.with_installed({"slot_failover": False})
    path.write_text("[slot]\nfailover = 'yes'\n")
    with pytest.raises(ConfigError, match="slot.failover must be a bool"):
        load_settings(path)


def test_a_multi_host_dsn_asks_for_the_primary():
    from bemi_pg.db import primary_only

    assert primary_only("host=a,b port=1,2 dbname=x", env={}).endswith("target_session_attrs=read-write")
    assert "target_session_attrs=read-write" in primary_only("postgresql://u@a:1,b:2/db", env={})
    assert primary_only("host=a dbname=x", env={}) == "host=a dbname=x"  # one server: as given
    assert primary_only("host=a,b target_session_attrs=any", env={}) == "host=a,b target_session_attrs=any"
    assert primary_only("host=a,b", env={"PGTARGETSESSIONATTRS": "primary"}) == "host=a,b"
    assert "read-write" in primary_only("dbname=x", env={"PGHOST": "a,b"})
