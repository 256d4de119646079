"""Ingest: `poll --once` draining a backlog, against the raw decode rate of the same slot.

    python bench/ingest.py [--inserts 200000] [--updates 100000] [--per-transaction 1000] [--rounds 3]
                           [--chart bench/batch-size.png] [--metrics-rounds 4] [--only-metrics]
                           [--sealing-rounds 4] [--only-sealing]

On a throwaway server: a 5-column table with REPLICA IDENTITY FULL, a backlog of inserts and
updates, then (1) the server decoding the slot by itself (`SELECT count(*) FROM
pg_logical_slot_peek_changes(...)` with the poller's options) and (2) bemi-pg draining the same
backlog into `changes`. Each round does this three times: the issue's backlog (the inserts in
one transaction, the updates in another) into the same database and into another one, and the
same rows in transactions of --per-transaction rows into the same database. Prints the rates,
their medians, the ratio of the medians and the median of each drain's ratio to the decode of
its own backlog; with --chart, also throughput against batch size (PNG).

It also measures the floor the destination sets: the same number of finished change rows
copied by the server itself (`INSERT … SELECT` from `changes`, no decoding, no Python) into a
table with the changes table's columns and indexes, and prints the ratio any poller could
reach at best, decoding and writing one after the other (as a peek does) or fully
overlapped.

First it measures what sealing each batch costs (issue 20): drains of backlogs in
--per-transaction-row transactions with and without sealing, alternating which goes first. Then
it measures what ``--metrics-port`` costs: drains of backlogs in --per-transaction-row
transactions, with and without the metrics (alternating which goes first), and prints the ratio.

``--shapes realistic,numeric,five`` measures only the table shapes (then exits): a new user's
table (bigserial key, text, boolean, jsonb, timestamptz), the same with a numeric and a text[],
and the 5-column one. Per round and shape, alternating the order: the raw decode counted by the
server and fetched by a client, then ``poll --once`` into the same database, with the CPU each
process spent per change (the poller's own process time; the decoding backend's and the
destination backend's from /proc), once for each conversion path (``--paths``)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bemi_pg import commands  # noqa: E402
from bemi_pg._localpg import throwaway_cluster  # noqa: E402
from bemi_pg.config import Settings, load_settings  # noqa: E402
from bemi_pg.metrics import PollerMetrics, serve  # noqa: E402
from bemi_pg.poller import FETCH_ROWS, Poller, PollStats, wal2json_options  # noqa: E402
from bemi_pg.service import Health, Monitor  # noqa: E402
from bemi_pg.wal2json import CONVERSION_ENV  # noqa: E402

SHAPES = {
    "five": ("item", "CREATE TABLE item (id bigint PRIMARY KEY, name text, qty integer, price numeric(12, 2), updated_at timestamptz)",
             "INSERT INTO item SELECT g, md5(g::text), g % 1000, g / 100.0, now() FROM generate_series({first}, {last}) g",
             "UPDATE item SET qty = qty + 1 WHERE id BETWEEN {first} AND {last}"),
    "realistic": ("task", "CREATE TABLE task (id bigserial PRIMARY KEY, task text, is_completed boolean, payload jsonb, "
                  "created_at timestamptz)",
                  "INSERT INTO task (id, task, is_completed, payload, created_at) SELECT g, 'task ' || g, g % 3 = 0, "
                  "jsonb_build_object('priority', g % 5, 'owner', 'user' || g % 100, 'tags', jsonb_build_array('a', 'b'), "
                  "'estimate', g / 7.0), now() - g * interval '1 second' FROM generate_series({first}, {last}) g",
                  "UPDATE task SET is_completed = NOT is_completed WHERE id BETWEEN {first} AND {last}"),
    "numeric": ("ledger", "CREATE TABLE ledger (id bigserial PRIMARY KEY, task text, is_completed boolean, payload jsonb, "
                "created_at timestamptz, amount numeric(14, 4), tags text[])",
                "INSERT INTO ledger SELECT g, 'task ' || g, g % 3 = 0, jsonb_build_object('priority', g % 5, 'owner', 'user' || g % 100), "
                "now() - g * interval '1 second', g * 1.2345, ARRAY['red', 'x' || g % 10, 'a b'] FROM generate_series({first}, {last}) g",
                "UPDATE ledger SET amount = amount + 1 WHERE id BETWEEN {first} AND {last}"),
}



def backlog(dsn: str, start: int, inserts: int, updates: int, per_transaction: int | None = None) -> int:
    """Insert then update rows, in one transaction each or in transactions of ``per_transaction`` rows."""
    step = per_transaction or max(inserts, updates, 1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for first in range(start, start + inserts, step):
            conn.execute("INSERT INTO item SELECT g, md5(g::text), g %% 1000, g / 100.0, now() "
                         "FROM generate_series(%s::bigint, %s::bigint) g", (first, min(first + step, start + inserts) - 1))
        for first in range(start, start + updates, step):
            conn.execute("UPDATE item SET qty = qty + 1 WHERE id BETWEEN %s::bigint AND %s::bigint",
                         (first, min(first + step, start + updates) - 1))
    return inserts + updates


def raw_decode(dsn: str, slot: str, options: list[str]) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        conn.execute("SELECT count(*) FROM pg_logical_slot_peek_changes(%s, NULL, NULL, VARIADIC %s::text[])", (slot, options))
        return time.perf_counter() - t0


@contextmanager
def conversion_path(path: str) -> Iterator[None]:
    """The poller's conversion path (compiled or pure) for the drains inside."""
    before = os.environ.get(CONVERSION_ENV)
    os.environ[CONVERSION_ENV] = path
    try:
        yield
    finally:
        if before is None:
            del os.environ[CONVERSION_ENV]
        else:
            os.environ[CONVERSION_ENV] = before


def shape_backlog(dsn: str, shape: str, start: int, inserts: int, updates: int) -> int:
    """The shape's inserts then updates, one transaction each (the issue's backlog)."""
    _, _, insert, update = SHAPES[shape]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(insert.format(first=start, last=start + inserts - 1).encode())
        conn.execute(update.format(first=start, last=start + updates - 1).encode())
    return inserts + updates


_TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) a server process has used, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def raw_decode_measured(dsn: str, slot: str, options: list[str], *, fetch: bool) -> tuple[float, float]:
    """Seconds to decode the slot (counted by the server, or every row fetched by this client as
    the poller fetches them) and the decoding backend's CPU seconds."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        pid = conn.info.backend_pid
        cpu = backend_cpu(pid)
        t0 = time.perf_counter()
        if fetch:
            with conn.transaction(), conn.cursor(name="bench_peek") as cur:
                cur.itersize = FETCH_ROWS
                cur.execute("SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, VARIADIC %s::text[])", (slot, options))
                n = 0
                while rows := cur.fetchmany(FETCH_ROWS):
                    n += len(rows)
        else:
            conn.execute("SELECT count(*) FROM pg_logical_slot_peek_changes(%s, NULL, NULL, VARIADIC %s::text[])", (slot, options))
        return time.perf_counter() - t0, backend_cpu(pid) - cpu


def measured_drain(src: str, settings: Settings) -> tuple[PollStats, float, float, float]:
    """``poll --once`` into the same database; its stats and the CPU seconds of this process (the
    poller), of its source backend (decoding) and of its destination backend."""
    with Poller(src, None, settings) as poller:
        source_pid, destination_pid = poller.source.info.backend_pid, poller.destination.info.backend_pid
        before = (time.process_time(), backend_cpu(source_pid), backend_cpu(destination_pid))
        stats = poller.run_once()
        after = (time.process_time(), backend_cpu(source_pid), backend_cpu(destination_pid))
    own, decoding, destination = (b - a for a, b in zip(before, after, strict=True))
    return stats, own, decoding, destination


def shapes(src: str, settings: Settings, args: argparse.Namespace) -> None:
    """Each shape's raw decode and drain, rounds alternating the order of shapes and paths."""
    slot, options = settings.slot_for("src"), wal2json_options(settings)
    names = args.shapes.split(",")
    paths = args.paths.split(",")
    runs = [(shape, path) for shape in names for path in paths]
    figures: dict[tuple[str, str], dict[str, list[float]]] = {run: {} for run in runs}
    next_id = 10_000_000
    for round_ in range(args.rounds):
        for shape, path in (runs if round_ % 2 == 0 else runs[::-1]):
            n = shape_backlog(src, shape, next_id, args.inserts, args.updates)
            next_id += args.inserts
            count_s, count_cpu = raw_decode_measured(src, slot, options, fetch=False)
            fetch_s, _ = raw_decode_measured(src, slot, options, fetch=True)
            with conversion_path(path):
                stats, own, decoding, destination = measured_drain(src, settings)
            assert stats.changes == n, (stats.changes, n)
            row = figures[(shape, path)]
            for key, value in (("count", n / count_s), ("fetch", n / fetch_s), ("poll", n / stats.seconds),
                               ("ratio", count_s / stats.seconds), ("decode_us", 1e6 * count_cpu / n),
                               ("poller_us", 1e6 * own / n), ("source_us", 1e6 * decoding / n),
                               ("destination_us", 1e6 * destination / n)):
                row.setdefault(key, []).append(value)
    print(f"shapes: {args.inserts:,} inserts + {args.updates:,} updates per drain (one transaction each), same database, "
          f"{args.rounds} rounds alternating the order; medians (CPU in us per change)")
    for (shape, path), row in figures.items():
        m = {key: statistics.median(values) for key, values in row.items()}
        print(f"{shape:<10} {path:<9} raw decode {m['count']:9,.0f}/s (fetched by a client {m['fetch']:9,.0f}/s)  "
              f"poll {m['poll']:8,.0f}/s  ratio {m['ratio']:.2f} (rounds {', '.join(f'{v:.2f}' for v in row['ratio'])})  "
              f"CPU: poller {m['poller_us']:.1f}, its decoding backend {m['source_us']:.1f}, destination backend "
              f"{m['destination_us']:.1f}, raw decode {m['decode_us']:.1f}")


def index_variants(src: str) -> dict[str, tuple[list[str], list[str]]]:
    """Each variant of the changes table's indexes: the statements that make it from the default
    set, and those that put the default back."""
    with psycopg.connect(src, autocommit=True) as conn:
        rows = conn.execute("""
            SELECT i.relname, pg_get_indexdef(i.oid), c.conname, pg_get_constraintdef(c.oid)
              FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
              LEFT JOIN pg_constraint c ON c.conindid = x.indexrelid AND c.conrelid = x.indrelid
             WHERE x.indrelid = 'public.changes'::regclass ORDER BY 1""").fetchall()
    variants: dict[str, tuple[list[str], list[str]]] = {"all": ([], [])}
    for name, definition, constraint, constraint_def in rows:
        if constraint:
            variants[f"without {name}"] = ([f"ALTER TABLE changes DROP CONSTRAINT {constraint}"],
                                           [f"ALTER TABLE changes ADD CONSTRAINT {constraint} {constraint_def}"])
        else:
            variants[f"without {name}"] = ([f"DROP INDEX {name}"], [definition])
        if name.endswith("_committed_at_idx") and "(committed_at)" in definition:
            brin = "CREATE INDEX changes_committed_at_brin ON changes USING brin (committed_at)"
            variants["committed_at as BRIN"] = ([f"DROP INDEX {name}", brin], ["DROP INDEX changes_committed_at_brin", definition])
        if "USING gin" in definition:
            variants[f"{name} fastupdate off"] = ([f"ALTER INDEX {name} SET (fastupdate = off)"],
                                                  [f"ALTER INDEX {name} RESET (fastupdate)"])
    return variants


def indexes(src: str, settings: Settings, args: argparse.Namespace) -> None:
    """The destination backend's CPU per change with each index left out in turn (or changed),
    on the realistic shape, into an emptied changes table each time; rounds alternate the order."""
    variants = index_variants(src)
    figures: dict[str, list[float]] = {name: [] for name in variants}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    next_id = 50_000_000
    for round_ in range(args.rounds):
        for name in (list(variants) if round_ % 2 == 0 else list(variants)[::-1]):
            make, undo = variants[name]
            with psycopg.connect(src, autocommit=True) as conn:
                conn.execute("TRUNCATE changes")
                for statement in make:
                    conn.execute(statement.encode())
            n = shape_backlog(src, "realistic", next_id, args.inserts, args.updates)
            next_id += args.inserts
            stats, _, _, destination = measured_drain(src, settings)
            assert stats.changes == n
            figures[name].append(1e6 * destination / n)
            rates[name].append(n / stats.seconds)
            with psycopg.connect(src, autocommit=True) as conn:
                conn.execute("TRUNCATE changes")
                for statement in undo:
                    conn.execute(statement.encode())
    base = statistics.median(figures["all"])
    print(f"indexes: destination backend CPU per change (us), realistic shape, {args.inserts + args.updates:,} changes a drain "
          f"into an emptied changes table, {args.rounds} rounds alternating the order; medians")
    for name, values in figures.items():
        m = statistics.median(values)
        print(f"{name:<58} {m:5.1f} us  ({m - base:+5.1f})  drain {statistics.median(rates[name]):8,.0f}/s   "
              f"rounds {', '.join(f'{v:.1f}' for v in values)}")


def destination_floor(dsn: str, rows: int, rounds: int) -> list[float]:
    """Rows per second the server writes finished change rows into a changes-shaped table."""
    result = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(rounds):
            conn.execute("DROP TABLE IF EXISTS changes_floor")
            conn.execute("CREATE TABLE changes_floor (LIKE changes INCLUDING ALL)")
            t0 = time.perf_counter()
            conn.execute("INSERT INTO changes_floor SELECT * FROM changes LIMIT %s", (rows,))
            result.append(rows / (time.perf_counter() - t0))
        conn.execute("DROP TABLE changes_floor")
    return result


class TimedMonitor(Monitor):
    """Monitor that adds up the time the poll loop spends in it."""

    seconds = 0.0

    def batch_written(self, stats: PollStats, seconds: float) -> None:
        t0 = time.perf_counter()
        super().batch_written(stats, seconds)
        self.seconds += time.perf_counter() - t0


def drain(src: str, settings: Settings, *, with_metrics: bool) -> tuple[float, float]:
    """Drain the slot as ``poll --once`` does, bare or with everything ``--metrics-port`` adds: the
    series updated per batch, the HTTP server, the slot probe, and a scrape every second.
    Changes/s, and the share of the drain's time the loop spent updating the metrics."""
    monitor = None
    with Poller(src, None, settings) as poller, ExitStack() as stack:
        if with_metrics:
            health = Health(1.0)
            registry = PollerMetrics(poller.source_id, poller.slot, version="bench", capture_mode="wal")
            monitor = poller.observer = TimedMonitor(health=health, metrics=registry)
            url = stack.enter_context(serve("127.0.0.1", 0, registry, health, source_dsn=src, slot=poller.slot, probe_every=1.0))
            done = threading.Event()
            stack.callback(done.set)

            def scrape() -> None:
                while not done.wait(1.0):
                    urllib.request.urlopen(url + "metrics", timeout=10).read()

            threading.Thread(target=scrape, daemon=True).start()
        stats = poller.run_once()
    return stats.changes / stats.seconds, (monitor.seconds / stats.seconds if monitor else 0.0)


def metrics_cost(src: str, settings: Settings, args: argparse.Namespace, next_id: int) -> None:
    """Drains with and without metrics, alternating which goes first, each of a backlog of its own."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    shares = []
    for round_ in range(args.metrics_rounds):
        for with_metrics in ((False, True) if round_ % 2 == 0 else (True, False)):
            backlog(src, next_id, args.inserts, args.updates, args.per_transaction)
            next_id += args.inserts
            rate, share = drain(src, settings, with_metrics=with_metrics)
            rates[with_metrics].append(rate)
            if with_metrics:
                shares.append(share)
    bare, metered = statistics.median(rates[False]), statistics.median(rates[True])
    paired = statistics.median(m / b for b, m in zip(rates[False], rates[True], strict=True))
    print(f"metrics: without {bare:,.0f} changes/s, with {metered:,.0f} changes/s (series, HTTP server, slot probe, "
          f"a scrape a second): ratio of the medians {metered / bare:.3f}, paired ratio median {paired:.3f}, "
          f"cost {100 * (1 - metered / bare):+.1f}%   rounds without {', '.join(f'{v:,.0f}' for v in rates[False])}; "
          f"with {', '.join(f'{v:,.0f}' for v in rates[True])}")
    print(f"metrics: the poll loop's own metric updates took {100 * statistics.median(shares):.4f}% of the drain's time (median)")


def _backend_cpu(pid: int) -> float | None:
    """CPU seconds a server process has used (user and system), where /proc shows it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sealed_drain(src: str, dst: str, settings: Settings, *, sealing: bool) -> tuple[float, float | None, float, int]:
    """Changes/s of a drain as ``poll --once`` does it, each batch sealed or not; the destination
    backend's and the poller's CPU µs per change (None where /proc does not show the backend's),
    and how many changes the poller hashed itself."""
    with Poller(src, dst, settings) as poller:
        poller.seal = sealing
        pid = poller.destination.info.backend_pid
        backend, own = _backend_cpu(pid), time.process_time()
        stats = poller.run_once()
        backend_after, own_after = _backend_cpu(pid), time.process_time()
    per = 1e6 / max(stats.changes, 1)
    server = (backend_after - backend) * per if backend is not None and backend_after is not None else None
    return stats.changes / stats.seconds, server, (own_after - own) * per, getattr(stats, "hashed", 0)  # (none before seal_batch)


def sealing_cost(src: str, dst: str, settings: Settings, args: argparse.Namespace, next_id: int) -> int:
    """Drains with and without sealing (issue 20, budget 5%), alternating which goes first, each
    of a backlog of its own in --per-transaction-row transactions, into the other database. After
    each drain without sealing, a `bemi-pg seal` (not timed) seals the batches it left, as a
    poller sealing every batch never leaves any: else the next sealed drain's first seal would
    cover them too, and the drain with sealing would be charged for hashing the other's changes."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    server: dict[bool, list[float]] = {False: [], True: []}
    poller: dict[bool, list[float]] = {False: [], True: []}
    hashed = changes = 0
    for round_ in range(args.sealing_rounds):
        for sealing in ((False, True) if round_ % 2 == 0 else (True, False)):
            backlog(src, next_id, args.inserts, args.updates, args.per_transaction)
            next_id += args.inserts
            rate, backend_us, poller_us, by_poller = sealed_drain(src, dst, settings, sealing=sealing)
            rates[sealing].append(rate)
            poller[sealing].append(poller_us)
            if backend_us is not None:
                server[sealing].append(backend_us)
            if sealing:
                hashed += by_poller
                changes += args.inserts + args.updates
            else:
                commands.seal(src, dst, settings)
    bare, sealed = statistics.median(rates[False]), statistics.median(rates[True])
    paired = statistics.median(s / b for b, s in zip(rates[False], rates[True], strict=True))
    print(f"sealing: without {bare:,.0f} changes/s, with {sealed:,.0f} changes/s: ratio of the medians {sealed / bare:.3f}, "
          f"paired ratio median {paired:.3f}, cost {100 * (1 - sealed / bare):+.1f}%   rounds without "
          f"{', '.join(f'{v:,.0f}' for v in rates[False])}; with {', '.join(f'{v:,.0f}' for v in rates[True])}")
    if server[False] and server[True]:
        print(f"sealing: the destination backend's CPU per change (medians): without {statistics.median(server[False]):.2f} µs, "
              f"with {statistics.median(server[True]):.2f} µs")
    print(f"sealing: the poller's CPU per change (medians): without {statistics.median(poller[False]):.2f} µs, "
          f"with {statistics.median(poller[True]):.2f} µs; hashes computed by the poller: {hashed:,} of about {changes:,} changes")
    return next_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inserts", type=int, default=200_000)
    parser.add_argument("--updates", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-transaction", type=int, default=1_000, help="rows per transaction of the second backlog")
    parser.add_argument("--chart", help="write throughput against batch size to this PNG")
    parser.add_argument("--metrics-rounds", type=int, default=4, help="drains with and without --metrics-port's work (0: none)")
    parser.add_argument("--only-metrics", action="store_true", help="measure only the metrics' cost")
    parser.add_argument("--sealing-rounds", type=int, default=4, help="drains with and without sealing each batch (0: none)")
    parser.add_argument("--only-sealing", action="store_true", help="measure only what sealing costs")
    parser.add_argument("--shapes", help="measure only these table shapes, e.g. realistic,numeric,five (see SHAPES)")
    parser.add_argument("--paths", default="compiled,pure", help="conversion paths for --shapes")
    parser.add_argument("--indexes", action="store_true", help="measure only each index's share of the destination's CPU")
    args = parser.parse_args()
    with throwaway_cluster("src", "dst", settings=(), prefix="bemi-pg-bench-") as cluster:
        src, dst = cluster.dsn("src"), cluster.dsn("dst")
        with psycopg.connect(src, autocommit=True) as conn:
            for _, create, _, _ in SHAPES.values():
                conn.execute(create.encode())
        settings = load_settings(None)
        if args.shapes or args.indexes:
            commands.install(src, None, settings)
            if args.shapes:
                shapes(src, settings, args)
            if args.indexes:
                indexes(src, settings, args)
            return 0
        commands.install(src, None, settings)
        commands.install(src, dst, settings)  # the destination objects in the other database too
        slot, options = settings.slot_for("src"), wal2json_options(settings)
        next_id = 1
        if args.sealing_rounds:
            next_id = sealing_cost(src, dst, settings, args, next_id)
        if args.only_sealing:
            return 0
        if args.metrics_rounds:
            metrics_cost(src, settings, args, next_id)
            next_id += 2 * args.metrics_rounds * args.inserts
        if args.only_metrics:
            return 0
        small = f"same db, {args.per_transaction:,}-row transactions"
        rates: dict[str, list[float]] = {"raw decode": [], "same database": [], "other database": [], small: []}
        ratios: dict[str, list[float]] = {name: [] for name in rates}
        for _ in range(args.rounds):
            for where, dest, per_transaction in (("same database", None, None), ("other database", dst, None),
                                                 (small, None, args.per_transaction)):
                n = backlog(src, next_id, args.inserts, args.updates, per_transaction)
                next_id += args.inserts
                raw_rate = n / raw_decode(src, slot, options)
                stats = commands.poll_once(src, dest, settings)
                rates["raw decode"].append(raw_rate)
                rates[where].append(stats.changes / stats.seconds)
                ratios[where].append(rates[where][-1] / raw_rate)  # against the decode of this very backlog
        raw = statistics.median(rates["raw decode"])
        rates["write only"] = destination_floor(src, args.inserts + args.updates, args.rounds)
        print(f"backlog: {args.inserts:,} inserts + {args.updates:,} updates per round (in one transaction each, "
              f"or in {args.per_transaction:,}-row transactions), {args.rounds} rounds")
        for name, values in rates.items():
            median = statistics.median(values)
            paired = f"  paired ratio median {statistics.median(ratios[name]):.2f}" if ratios.get(name) else ""
            print(f"{name:<38} median {median:9,.0f} changes/s  ratio to raw decode {median / raw:.2f}{paired}   "
                  f"rounds {', '.join(f'{v:,.0f}' for v in values)}")
        write = statistics.median(rates["write only"])
        print(f"ceiling with this destination: {1 / (1 / raw + 1 / write) / raw:.2f}x decoding then writing, "
              f"{min(raw, write) / raw:.2f}x fully overlapped (no conversion cost at all)")
        if args.chart:
            sizes = [500, 2_000, 10_000, 50_000]
            throughput = []
            for size in sizes:
                n = backlog(src, next_id, args.inserts // 2, args.updates // 2)
                next_id += args.inserts // 2
                stats = commands.poll_once(src, None, settings, batch_size=size)
                throughput.append(stats.changes / stats.seconds)
                print(f"batch size {size:>6,}: {throughput[-1]:,.0f} changes/s")
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(sizes, throughput, marker="o", label="bemi-pg poll --once")
            ax.axhline(raw, color="grey", linestyle="--", label="raw decode (server only)")
            ax.set_xscale("log")
            ax.set_xlabel("batch size (rows per destination transaction)")
            ax.set_ylabel("changes per second")
            ax.set_title("Ingest throughput against batch size")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.chart, dpi=120)
            print(f"chart: {args.chart}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
