"""The pieces of running in production that need no database: the alert rules (checked and
unit-tested by promtool), the metric names they use, JSON log lines and secret masking,
the health verdict."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bemi_pg import logs
from bemi_pg.metrics import PollerMetrics
from bemi_pg.service import Health

generate_latest = pytest.importorskip("prometheus_client", reason="the metrics extra: pip install -e '.[metrics]'").generate_latest

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "docs" / "alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: apt-get install prometheus (make deps does it)")


@needs_promtool
def test_alert_rules_pass_promtool_check():
    result = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


@needs_promtool
def test_alerts_fire_on_the_series_that_should_fire_them():
    result = subprocess.run([PROMTOOL, "test", "rules", str(ROOT / "tests" / "fixtures" / "alerts.test.yml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_use_only_series_the_poller_exports():
    metrics = PollerMetrics("7/app", "bemi_app", version="0.4.0", capture_mode="wal")
    metrics.slot({"wal_status": "reserved", "lag_bytes": 10, "keep_size_bytes": 1 << 30})
    metrics.batch(3, 1, 0.02, 1_700_000_000.0)
    exported = {line.split("{")[0].split(" ")[0] for line in generate_latest(metrics.registry).decode().splitlines()
                if not line.startswith("#")}
    used = set(re.findall(r"\bbemi_pg_\w+", ALERTS.read_text()))
    assert used and used <= exported, used - exported
    assert 'bemi_pg_slot_lag_bytes{slot="bemi_app",source="7/app"} 10.0' in generate_latest(metrics.registry).decode()


def test_json_log_lines_carry_the_fields_and_mask_secrets():
    logs.forget_secrets()
    secrets = logs.known_secrets(["postgresql://bemi:s3cr3t%22pw@db/app", "host=db password=other-one", "not a dsn ::"],
                                 env={"PGPASSWORD": "from-env"})
    assert secrets == {'s3cr3t"pw', "other-one", "from-env"}
    logs._secrets.update(secrets)
    formatter = logs._JsonFormatter()
    record = logging.LogRecord("bemi_pg", logging.WARNING, __file__, 1, 'lost s3cr3t"pw and %s', ("other-one",), None)
    record.__dict__.update(slot="bemi_app", error_kind="destination", changes=4)
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "lost *** and ***" and entry["level"] == "warning"
    assert (entry["slot"], entry["error_kind"], entry["changes"]) == ("bemi_app", "destination", 4)
    assert entry["time"].endswith("+00:00") and "source" not in entry
    assert logs.redact("from-env") == "***"
    logs.forget_secrets()


def test_health_verdicts():
    health = Health(interval=1, stale_after=0.05)
    assert health.verdict() == (False, "no poll has succeeded yet") and not health.ready
    health.succeeded()
    assert health.verdict() == (True, "ok") and health.ready
    health.failed("the destination database is unreachable: connection refused")
    assert health.verdict() == (False, "the destination database is unreachable: connection refused")
    health.succeeded()
    health.slot("replication slot bemi_app is lost (wal_status lost)")
    assert health.verdict()[1] == "replication slot bemi_app is lost (wal_status lost)"
    health.slot(None)
    time.sleep(0.1)
    ok, reason = health.verdict()
    assert not ok and reason.startswith("no successful poll for ")
