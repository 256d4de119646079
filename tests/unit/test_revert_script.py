"""The printed revert script, without a database: one transaction, a guard per statement that
raises (or, skipping, notes), dollar quotes that no value can close."""

from __future__ import annotations

from bemi_pg.revert import RevertPlan, RevertStep


def _plan() -> RevertPlan:
    return RevertPlan({"since": "2024-01-01T00:00:00+00:00"}, [
        RevertStep("c1", "change c1: UPDATE public.t 1", "UPDATE public.t AS t SET v = 'a $bemi$ b'", "row 1 was changed"),
        RevertStep("c2", "change c2: TRUNCATE public.t", None, "a TRUNCATE cannot be reverted", refused=True),
        RevertStep("c3", "change c3: UPDATE public.t 2", None, "the change altered no column"),
    ])


def test_all_or_nothing_script_raises_on_every_guard_and_refusal():
    script = _plan().script()
    assert script.count("BEGIN;") == 1 and script.rstrip().endswith("COMMIT;")
    assert script.count("RAISE EXCEPTION USING ERRCODE = 'BEM04'") == 2 and "RAISE NOTICE" not in script
    assert "DO $bemi1$" in script and "$bemi1$;" in script  # the value holds $bemi$: another tag
    assert "-- nothing to undo: the change altered no column" in script
    assert "IF NOT FOUND THEN" in script


def test_skipping_script_notes_instead_and_survives_a_taken_key():
    script = _plan().script(skip_conflicts=True)
    assert "RAISE EXCEPTION" not in script and script.count("bemi-pg revert: skipped: ") == 3
    assert "EXCEPTION WHEN integrity_constraint_violation THEN" in script
