"""The sealed trail: recompute a source's hash chain over the destination and say what is wrong.

Each seal covers the changes of one source with commit_position in an interval and lists their
ids and hashes in trail order (commit_position, seq); each seal's hash chains it to the one
before (README, "A sealed trail"). :func:`verify` reads the seals and the changes and compares.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from .queries import query

__all__ = ["Verdict", "seal", "verify"]

FETCH_ROWS = 10_000
SHOWN = 50  # problems listed; the rest are counted


@dataclass
class Verdict:
    """What ``bemi-pg verify`` found for one source."""

    source: str
    changes: int = 0  # sealed changes checked
    seals: int = 0
    last_position: int | None = None  # the highest commit position sealed
    head: str | None = None  # hex
    problems: list[str] = field(default_factory=list)
    unsealed: list[str] = field(default_factory=list)  # trigger mode's changes not sealed yet (not a problem)
    pruned: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """The report, one line each."""
        out = []
        if self.intact:
            upto = f", up to commit position {self.last_position}" if self.last_position is not None else ""
            out.append(f"trail of {self.source} intact: {self.changes} change{'s' * (self.changes != 1)} in "
                       f"{self.seals} seal{'s' * (self.seals != 1)}{upto}; head {self.head or 'none (nothing sealed yet)'}")
        else:
            out.append(f"trail of {self.source} NOT intact: {len(self.problems)} problem{'s' * (len(self.problems) != 1)}"
                       f" (head {self.head or 'none'})")
            out += [f"  {p}" for p in self.problems[:SHOWN]]
            if len(self.problems) > SHOWN:
                out.append(f"  ... and {len(self.problems) - SHOWN} more")
        out += [f"  {p}" for p in self.pruned]
        out += [f"  {u}" for u in self.unsealed]
        return out


def seal(dest: psycopg.Connection[Any], source: str) -> str | None:
    """Seal what no seal covers of ``source``'s changes (trigger mode's once every open
    transaction older than them has ended); the head hash, hex (None: nothing sealed)."""
    with dest.transaction():
        row = dest.execute(query("seal"), {"source": source, "wal_upto": None}).fetchone()
    return row[0] if row else None


def _where(position: int, seq: int) -> str:
    return f"commit position {position}, seq {seq}"


def verify(dest: psycopg.Connection[Any], changes: sql.Composable, source: str, *,
           since: datetime | None = None, head: str | None = None) -> Verdict:
    """Recompute ``source``'s chain and its changes' hashes; with ``since``, only the seals made
    since then are compared with their changes (the chain is checked whole); with ``head``, the
    chain must hold that hash (a head kept elsewhere: a rewritten chain does not)."""
    verdict = Verdict(source)
    with dest.transaction():
        dest.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")  # one snapshot for seals and changes
        seals = dest.execute(query("seals"), {"source": source}).fetchall()
        _check_chain(seals, verdict)
        hashes = {bytes(s[10]).hex() for s in seals}
        if head is not None:
            wanted = head.strip().lower()
            resumed = {str(s[8]["resume_hash"]) for s in seals if s[1] == "prune" and s[8]}
            if wanted not in hashes and wanted not in resumed:
                verdict.problems.append(f"head {wanted} is not in the chain: the chain was rewritten after that head "
                                        "was taken (or it is another source's)")
        covering = sorted((s[3], s[4], s) for s in seals if s[1] == "changes")
        starts = [c[0] for c in covering]
        found: dict[int, list[tuple[str, int, int, bytes]]] = {}
        stray: list[tuple[str, int, int]] = []
        with dest.cursor(name="bemi_verify") as cur:
            cur.itersize = FETCH_ROWS
            cur.execute(sql.SQL(
                "SELECT c.id::text, c.commit_position, c.seq, bemi.change_hash(c) FROM {} AS c "
                "WHERE c.source = %s ORDER BY c.commit_position, c.seq").format(changes), (source,))
            for id_, position, seq, digest in cur:
                at = bisect_right(starts, position) - 1
                if at >= 0 and position <= covering[at][1]:
                    found.setdefault(covering[at][2][0], []).append((id_, position, seq, bytes(digest)))
                else:
                    stray.append((id_, position, seq))
        for _, _, s in covering:
            if since is not None and s[2] < since:
                continue
            _compare(s, found.get(s[0], []), verdict)
    wal_top = max((c[1] for c in covering if c[1] >= 0), default=None)
    trigger_bottom = min((c[0] for c in covering if c[0] < 0), default=None)
    verdict.last_position = wal_top if wal_top is not None else (covering[0][1] if covering else None)
    pending = [x for x in stray if x[1] < 0 and (trigger_bottom is None or x[1] < trigger_bottom)]
    if not seals and len(stray) > len(pending):
        verdict.problems.append(f"none of this source's {len(stray) - len(pending)} wal-mode changes is sealed: its poller "
                                "is older than 0.4.0, or its destination was not upgraded (run `bemi-pg install` again)")
        stray = pending
    for id_, position, seq in stray:
        if position < 0 and (trigger_bottom is None or position < trigger_bottom):
            continue
        verdict.problems.append(f"change {id_} at {_where(position, seq)} is not sealed: the poller seals every batch "
                                "it writes in the same transaction, so this one was written by something else")
    if pending:
        verdict.unsealed.append(f"{len(pending)} trigger-mode change{'s' * (len(pending) != 1)} not sealed yet (transactions "
                                "newer than the last seal, or still open when it was made): `bemi-pg seal` seals them")
    return verdict


def _check_chain(seals: list[tuple[Any, ...]], verdict: Verdict) -> None:
    """Each seal's hash against its contents, and each seal's link to the one before."""
    prev: tuple[Any, ...] | None = None
    resume = {int(s[8]["last_seal"]): bytes.fromhex(str(s[8]["resume_hash"])) for s in seals if s[1] == "prune" and s[8]}
    for s in seals:
        seal_no, kind, sealed_at, prev_hash, stored, recomputed = s[0], s[1], s[2], s[9], s[10], s[11]
        verdict.seals += 1
        if bytes(recomputed) != bytes(stored):
            verdict.problems.append(f"seal {seal_no} altered: its hash does not match what it holds")
        if prev is None:
            expected = None if seal_no == 1 else resume.get(seal_no - 1)
            if seal_no != 1 and expected is None:
                verdict.problems.append(f"seals 1 to {seal_no - 1} are missing and no prune recorded their removal")
            elif (bytes(prev_hash) if prev_hash is not None else None) != expected:
                verdict.problems.append(f"seal {seal_no} does not continue the chain where "
                                        f"{'the prune left it' if seal_no != 1 else 'it starts'}")
        else:
            if seal_no != prev[0] + 1:
                verdict.problems.append(f"seals {prev[0] + 1} to {seal_no - 1} are missing")
            if prev_hash is None or bytes(prev_hash) != bytes(prev[10]):
                verdict.problems.append(f"seal {seal_no} does not follow seal {prev[0]}: a seal between or before was "
                                        "altered, removed or replaced")
        if kind == "prune" and s[8]:
            p = s[8]
            verdict.pruned.append(f"pruned at seal {seal_no} ({sealed_at.isoformat()}): {p['changes']} changes committed "
                                  f"before {p['before']} with seals {p['first_seal']} to {p['last_seal']}")
        prev = s
    verdict.head = bytes(prev[10]).hex() if prev is not None else None


def _compare(s: tuple[Any, ...], stored: list[tuple[str, int, int, bytes]], verdict: Verdict) -> None:
    """The changes a seal lists against those the table holds in its interval."""
    seal_no, low, high = s[0], s[3], s[4]
    listed = [str(i) for i in s[6]]
    digests = {i: bytes(h) for i, h in zip(listed, s[7], strict=True)}
    held = {row[0]: row for row in stored}
    verdict.changes += len(listed)
    for n, id_ in enumerate(listed):
        if id_ not in held:
            neighbours = [held[x] for x in listed[max(n - 1, 0):n + 2] if x in held]
            near = f", next to {_where(neighbours[0][1], neighbours[0][2])}" if neighbours else ""
            verdict.problems.append(f"change {id_} removed (sealed by seal {seal_no}, positions {low} to {high}{near})")
        elif held[id_][3] != digests[id_]:
            verdict.problems.append(f"change {id_} at {_where(held[id_][1], held[id_][2])} altered: "
                                    f"its hash differs from seal {seal_no}'s")
    for id_, position, seq, _ in stored:
        if id_ not in digests:
            verdict.problems.append(f"change {id_} at {_where(position, seq)} inserted: seal {seal_no} covers positions "
                                    f"{low} to {high} and does not list it")
    order = [row[0] for row in stored if row[0] in digests]
    expected = [i for i in listed if i in held]
    if order != expected:
        moved = [f"{i} (now at {_where(held[i][1], held[i][2])})" for i, j in zip(order, expected, strict=True) if i != j]
        verdict.problems.append(f"changes out of their sealed order in seal {seal_no}: {', '.join(moved)}")
