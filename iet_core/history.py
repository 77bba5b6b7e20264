"""A run's training history: one bounded, thread-safe store of its events, and the read-side
AGC queries the pages and the CLI ask of it.

The store is an event sink (a live run feeds it) and is rebuilt from a run folder by replaying
the events the folder's logs hold (`Run.read_events`), so a live run and the same run read
after a restart answer alike. The queries (share of visits below lambda, the training images
visited below lambda, the most skipped images, a summary) are where AGC's "would skip"
arithmetic lives; the pages only draw their answers.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .metrics import proportion_interval
from .runs import Run
from .telemetry import (CheckpointEvent, DriftEvent, Event, RoundEvent, RoundStartEvent, SampleEvent, SettingEvent, StatusEvent,
                        StepEvent)

# Loss-ratio histogram bins: RATIO_BIN_WIDTH wide on [0, RATIO_MAX); larger ratios land in the
# last bin. The skip rule compares ratios with lambda in (0, 1], so this resolves every useful
# threshold.
RATIO_BIN_WIDTH = 0.01
RATIO_MAX = 3.0
RATIO_EDGES = np.round(np.arange(0.0, RATIO_MAX + 1e-9, RATIO_BIN_WIDTH), 2)
STEP_COLUMNS = ("global_step", "round", "proxy", "local_step", "loss", "kept_fraction", "lr", "skip_lambda")
STEP_DTYPES = dict.fromkeys(STEP_COLUMNS[:4], np.int64) | dict.fromkeys(STEP_COLUMNS[4:], np.float32)  # as the events
PACE_FLUSHES = 50  # recent step flushes that set the pace for the time left
# Rounds timed before a shorter schedule is offered: the first round runs slower than the rest
# (start-up, pages loading beside it), and alone it offered a shorter demo on an idle machine.
TIMED_ROUNDS = 3
WINDOW_VISITS = 512  # a histogram window holds at least this many visits (one flush alone is noisy)


@dataclass
class RatioSnapshot:
    """The loss ratios (loss / bank[t]) of one flush of one proxy, binned by RATIO_EDGES."""

    round: int
    proxy: int
    first_step: int
    last_step: int
    counts: np.ndarray  # int64, len(RATIO_EDGES) - 1
    unseen: int  # visits at a timestep the bank had not seen yet (ratio inf or nan): kept
    skipped: int

    @classmethod
    def of(cls, ratios: np.ndarray, round: int = 0, proxy: int = 0, first_step: int = 0, last_step: int = 0,
           skipped: int | None = None) -> "RatioSnapshot":
        """A snapshot of given ratios (skipped: None counts none)."""
        counts, unseen = bin_ratios(ratios)
        return cls(round, proxy, first_step, last_step, counts, unseen, int(skipped or 0))

    @property
    def visits(self) -> int:
        return int(self.counts.sum()) + self.unseen

    def merged(self, other: "RatioSnapshot") -> "RatioSnapshot":
        return RatioSnapshot(self.round, self.proxy, self.first_step, other.last_step, self.counts + other.counts,
                             self.unseen + other.unseen, self.skipped + other.skipped)

    def share_below(self, skip_lambda: float) -> float:
        """Share of the window's visits whose ratio is below lambda: those AGC skips at lambda
        (visits at unseen timesteps are kept, so they count in the total only)."""
        below = self.counts[: int(round(skip_lambda / RATIO_BIN_WIDTH))].sum()
        return float(below / max(self.visits, 1))

    def values(self) -> np.ndarray:
        """The binned ratios as representative values (bin centres repeated)."""
        return np.repeat(ratio_bin_centres(), self.counts)


def ratio_bin_centres(group: int = 1) -> np.ndarray:
    """Centres of the histogram bins, `group` neighbouring bins taken as one."""
    return ((RATIO_EDGES[:-1] + RATIO_EDGES[1:]) / 2).reshape(-1, group).mean(1)


def bin_ratios(ratio: np.ndarray) -> tuple[np.ndarray, int]:
    """Histogram counts over RATIO_EDGES (ratios >= RATIO_MAX in the last bin) and the number
    of ratios that are not finite (timesteps the bank had not seen)."""
    ratio = np.asarray(ratio, dtype=np.float64)
    finite = np.isfinite(ratio)
    values = np.clip(ratio[finite], 0.0, RATIO_EDGES[-1] - 1e-9)
    counts = np.histogram(values, bins=RATIO_EDGES)[0].astype(np.int64)
    return counts, int((~finite).sum())


def window(snapshots: list[RatioSnapshot], end: int, min_visits: int = WINDOW_VISITS) -> RatioSnapshot | None:
    """Snapshot `end` merged with the ones just before it until it holds min_visits visits
    with a ratio."""
    if not snapshots:
        return None
    end = min(max(end, 0), len(snapshots) - 1)
    merged = snapshots[end]
    start = end
    while merged.visits - merged.unseen < min_visits and start > 0:
        start -= 1
        merged = snapshots[start].merged(merged)
    return merged


def early_window(snapshots: list[RatioSnapshot], min_visits: int = WINDOW_VISITS) -> RatioSnapshot | None:
    """The first window in which the memory bank has seen enough timesteps to give ratios."""
    merged = None
    for snapshot in snapshots:
        merged = snapshot if merged is None else merged.merged(snapshot)
        if merged.visits - merged.unseen >= min_visits:
            return merged
    return merged


class RunHistory:
    """A bounded, thread-safe store of one run's training history for a UI to poll.

    It is an event sink (call it with events) and can be filled from a run folder
    (`from_run`). Step series keep every `stride`-th step of each proxy, the stride doubling whenever
    they pass `max_steps`; ratio snapshots each cover `width` flushes, the width doubling
    (neighbours merged) past `max_snapshots`, so old and new history stay evenly sampled. Only the most
    recent `recent_visits` per-sample visits are kept raw (for the threshold what-if);
    per-image visit and skip counts are exact. `version` grows with every change.
    """

    def __init__(self, max_steps: int = 20_000, max_snapshots: int = 1_000, recent_visits: int = 4_096):
        self.max_steps, self.max_snapshots, self.recent_visits = max_steps, max_snapshots, recent_visits
        self._lock = threading.Lock()
        self.version = 0
        self._steps: list[dict[str, np.ndarray]] = []
        self._num_steps = 0
        self._stride = 1
        self._proxy_steps: dict[int, int] = {}  # steps seen per proxy
        self._last: dict | None = None  # the newest step, kept or thinned
        self._snapshots: list[RatioSnapshot] = []
        self._width, self._last_width = 1, 0  # flushes per snapshot, and in the newest one
        self._recent: collections.deque[dict[str, np.ndarray]] = collections.deque()
        self._num_recent = 0
        self._visits = np.zeros(0, np.int64)
        self._skips = np.zeros(0, np.int64)
        self._last_ratio = np.zeros(0, np.float64)
        self._shard = np.zeros(0, np.int64)
        self._proxies: dict[int, dict] = {}
        self._rounds: list[dict] = []
        self._drift: list[dict] = []  # DriftEvent rows, one per round and proxy
        self._plan: dict | None = None  # the current round's steps per proxy
        self._settings: list[dict] = []
        self._status: dict = {}
        self._checkpoint: str | None = None
        # (monotonic time, steps done) at each step flush since training last (re)started: the
        # pace behind the time left. A pause or resume starts it afresh.
        self._pace: collections.deque[tuple[float, int]] = collections.deque(maxlen=PACE_FLUSHES)

    # -- writing ---------------------------------------------------------------------------
    def __call__(self, event: Event) -> None:
        with self._lock:
            if isinstance(event, StepEvent):
                self._add_steps(event.columns())
                if len(event.global_step):
                    done = max(int(event.global_step[-1]) + 1, self._pace[-1][1] if self._pace else 0)
                    self._pace.append((time.monotonic(), done))
            elif isinstance(event, SampleEvent):
                self._add_samples(event.columns())
            elif isinstance(event, RoundEvent):
                self._rounds.append({"round": event.round, "global_step": event.global_step,
                                     "skip_rate": event.skip_rate, "moves": len(event.moves),
                                     "seconds": event.seconds, "shard_sizes": list(event.shard_sizes)})
            elif isinstance(event, DriftEvent):
                self._drift.extend(event.rows())
            elif isinstance(event, RoundStartEvent):
                self._plan = {"round": event.round, "steps_per_proxy": list(event.steps_per_proxy)}
                self._status.update(total_steps=event.total_steps, round=event.round)
            elif isinstance(event, SettingEvent):
                self._settings.append({"name": event.name, "value": event.value, "global_step": event.global_step})
            elif isinstance(event, StatusEvent):
                total = event.total_steps or self._status.get("total_steps")  # also set by each round's start
                self._status = {"state": event.state, "round": event.round, "global_step": event.global_step,
                                "message": event.message, "total_steps": total}
                self._pace.clear()
            elif isinstance(event, CheckpointEvent):
                self._checkpoint = event.path
            self.version += 1

    def _add_steps(self, columns: dict[str, np.ndarray]) -> None:
        if not len(columns["global_step"]):
            return
        proxy = int(columns["proxy"][-1])  # a chunk holds one proxy's steps
        self._proxies[proxy] = {"round": int(columns["round"][-1]), "local_step": int(columns["local_step"][-1]),
                                "global_step": int(columns["global_step"][-1])}
        # Thinned by each proxy's own step count: side-by-side proxies interleave global
        # steps, so thinning by global step would drop whole proxies.
        first = self._proxy_steps.get(proxy, 0)
        index = np.arange(first, first + len(columns["global_step"]))
        self._proxy_steps[proxy] = first + len(index)
        typed = {k: np.asarray(columns[k], STEP_DTYPES[k]) for k in STEP_COLUMNS}
        self._last = {k: v[-1].item() for k, v in typed.items()}
        keep = index % self._stride == 0
        self._steps.append({"index": index[keep]} | {k: v[keep] for k, v in typed.items()})
        self._num_steps += int(keep.sum())
        while self._num_steps > self.max_steps:
            self._stride *= 2
            merged = self._merged_steps()
            keep = merged["index"] % self._stride == 0
            self._steps = [{k: v[keep] for k, v in merged.items()}]
            self._num_steps = int(keep.sum())

    def _merged_steps(self) -> dict[str, np.ndarray]:
        """The step chunks joined into one, in global-step order (kept joined, so repeated
        reads are cheap)."""
        if len(self._steps) > 1:
            merged = {k: np.concatenate([c[k] for c in self._steps]) for k in self._steps[0]}
            order = np.argsort(merged["global_step"], kind="stable")
            self._steps = [{k: v[order] for k, v in merged.items()}]
        return self._steps[0]

    def _add_samples(self, columns: dict) -> None:
        """One flush of one proxy's visits (columns as in samples.csv)."""
        if not len(columns["sample_id"]):
            return
        global_step = np.asarray(columns["global_step"], np.int64)
        sample_id = np.asarray(columns["sample_id"], np.int64)
        ratio = np.asarray(columns["ratio"], np.float64)
        skipped = np.asarray(columns["skipped"], bool)
        snapshot = RatioSnapshot.of(ratio, int(columns["round"][0]), int(columns["proxy"][0]), int(global_step.min()),
                                    int(global_step.max()), int(skipped.sum()))
        if self._snapshots and self._last_width < self._width:
            self._snapshots[-1] = self._snapshots[-1].merged(snapshot)
            self._last_width += 1
        else:
            self._snapshots.append(snapshot)
            self._last_width = 1
        if len(self._snapshots) > self.max_snapshots:
            # All but the newest cover `width` flushes; merging neighbours doubles that.
            pairs = self._snapshots
            if len(pairs) % 2 == 0:
                self._last_width += self._width
            self._width *= 2
            self._snapshots = [pairs[i].merged(pairs[i + 1]) if i + 1 < len(pairs) else pairs[i]
                               for i in range(0, len(pairs), 2)]
        self._grow(int(sample_id.max()) + 1)
        np.add.at(self._visits, sample_id, 1)
        np.add.at(self._skips, sample_id, skipped.astype(np.int64))
        self._last_ratio[sample_id] = ratio  # later visits overwrite earlier ones
        self._shard[sample_id] = np.asarray(columns["shard"], np.int64)
        self._recent.append({"global_step": global_step, "sample_id": sample_id,
                             "ratio": ratio, "skipped": skipped})
        self._num_recent += len(sample_id)
        while self._num_recent - len(self._recent[0]["sample_id"]) >= self.recent_visits:
            self._num_recent -= len(self._recent.popleft()["sample_id"])

    def _grow(self, size: int) -> None:
        """Room for per-image counts of images 0 .. size - 1."""
        grow = size - len(self._visits)
        if grow > 0:
            self._visits = np.concatenate([self._visits, np.zeros(grow, np.int64)])
            self._skips = np.concatenate([self._skips, np.zeros(grow, np.int64)])
            self._last_ratio = np.concatenate([self._last_ratio, np.full(grow, np.nan)])
            self._shard = np.concatenate([self._shard, np.full(grow, -1, np.int64)])

    def _set_per_sample(self, frame: pd.DataFrame) -> None:
        """Visit and skip counts from the folder's per-image table, for runs that did not record
        every visit."""
        if not len(frame):
            return
        ids = frame["sample_id"].to_numpy(np.int64)
        self._grow(int(ids.max()) + 1)
        self._visits[ids] = frame["visits"].to_numpy(np.int64)
        self._skips[ids] = frame["skips"].to_numpy(np.int64)
        self._shard[ids] = frame["shard"].to_numpy(np.int64)
        self._last_ratio[ids] = frame["running_ratio"].to_numpy(np.float64)

    @classmethod
    def from_run(cls, run: Run, before_step: int | None = None) -> "RunHistory":
        """The history in a run folder (optionally only steps before `before_step`)."""
        store = cls()
        recorded_visits = False
        for event in run.read_events(before_step):
            store(event)
            recorded_visits |= isinstance(event, SampleEvent)
        if not recorded_visits:
            store._set_per_sample(run.per_sample())
        store.version = 1
        return store

    # -- reading (copies, safe to use while training goes on) -------------------------------
    def steps(self, max_points: int | None = None) -> pd.DataFrame:
        """Logged steps (global_step, round, proxy, local_step, loss, kept_fraction, lr,
        skip_lambda), evenly thinned to at most `max_points` rows."""
        with self._lock:
            merged = {k: v.copy() for k, v in self._merged_steps().items()} if self._steps else {}
        frame = pd.DataFrame(merged, columns=list(STEP_COLUMNS))
        if max_points and len(frame) > max_points:
            frame = frame.iloc[np.linspace(0, len(frame) - 1, max_points).round().astype(int)]
        return frame.reset_index(drop=True)

    def snapshots(self) -> list[RatioSnapshot]:
        with self._lock:
            return list(self._snapshots)

    def recent_visits_frame(self) -> pd.DataFrame:
        """The most recent raw visits: global_step, sample_id, ratio, skipped."""
        with self._lock:
            chunks = list(self._recent)
        if not chunks:
            return pd.DataFrame(columns=["global_step", "sample_id", "ratio", "skipped"])
        return pd.DataFrame({k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]})

    def per_sample(self) -> pd.DataFrame:
        """Per training image seen so far: sample_id, shard, visits, skips, skip_rate, last_ratio."""
        with self._lock:
            visits, skips = self._visits.copy(), self._skips.copy()
            last_ratio, shard = self._last_ratio.copy(), self._shard.copy()
        seen = np.flatnonzero(visits)
        return pd.DataFrame({"sample_id": seen, "shard": shard[seen], "visits": visits[seen], "skips": skips[seen],
                             "skip_rate": skips[seen] / visits[seen], "last_ratio": last_ratio[seen]})

    def proxies(self) -> dict[int, dict]:
        """Per proxy: the round, local step and global step of its latest logged step."""
        with self._lock:
            return {k: dict(v) for k, v in sorted(self._proxies.items())}

    def rounds(self) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._rounds]

    def drift(self) -> pd.DataFrame:
        """Per round and proxy: drift from the round's start, mean distance to the other proxies,
        loss on its own and on the other shards' probes, the average's loss on its shard, and the
        full distance_to_j / loss_on_j columns (see DriftEvent.rows). Empty before a round ends."""
        with self._lock:
            return pd.DataFrame(self._drift)

    def round_plan(self) -> dict | None:
        """The current round (or, read from a folder, the last complete one): round and
        steps_per_proxy. None before the first round starts."""
        with self._lock:
            return None if self._plan is None else {**self._plan, "steps_per_proxy": list(self._plan["steps_per_proxy"])}

    def settings(self) -> list[dict]:
        with self._lock:
            return [dict(s) for s in self._settings]

    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def last(self) -> dict | None:
        """The latest logged step (global_step, round, proxy, ..., skip_lambda), or None."""
        with self._lock:
            return dict(self._last) if self._last else None

    def seconds_left(self, until_step: int | None = None) -> float | None:
        """Time until the run's last step (or `until_step`) at the pace of its recent steps,
        measured on this machine (round ends, previews and checkpoints included); None until
        two flushes of the current stretch of training have been seen."""
        with self._lock:
            total = until_step or self._status.get("total_steps")
            if len(self._pace) < 2 or not total:
                return None
            (start, first), (now, done) = self._pace[0], self._pace[-1]
            if done <= first:
                return None
            return (now - start) / (done - first) * max(total - done, 0)

    def shorter_schedule(self, rounds: int, budget_minutes: float | None) -> dict | None:
        """When the rounds timed on this machine (their median, from TIMED_ROUNDS on) show that
        `rounds` rounds would take longer than the budget: the rounds that fit it (at least those
        done) and the minutes the run needs in all."""
        with self._lock:
            times = [r["seconds"] for r in self._rounds]
        if budget_minutes is None or len(times) < TIMED_ROUNDS:
            return None
        typical = float(np.median(times))
        fits = max(len(times), int(budget_minutes * 60 // typical)) if typical > 0 else rounds
        return {"rounds": fits, "minutes": typical * rounds / 60} if fits < rounds else None

    @property
    def last_step(self) -> int:
        last = self.last()
        return int(last["global_step"]) if last else -1

    # -- AGC queries -------------------------------------------------------------------------
    def skip_lambda(self, configured: float) -> float:
        """The lambda in force: the latest step's, or the configured one before any step."""
        last = self.last()
        return float(last["skip_lambda"]) if last else float(configured)

    def window(self, position: float = 1.0, min_visits: int = WINDOW_VISITS) -> RatioSnapshot | None:
        """The histogram window at a position in the history (0: the start, 1: the latest)."""
        snapshots = self.snapshots()
        if not snapshots:
            return None
        return window(snapshots, int(round(position * (len(snapshots) - 1))), min_visits)

    def early_window(self) -> RatioSnapshot | None:
        """The first window with enough ratios (None while the history has one snapshot or none)."""
        snapshots = self.snapshots()
        return early_window(snapshots) if len(snapshots) > 1 else None

    def visits_below(self, skip_lambda: float, limit: int = 18) -> pd.DataFrame:
        """The training images most often visited below lambda among the recent visits: those
        AGC would skip at lambda. Columns sample_id, below (visits below lambda), visits."""
        recent = self.recent_visits_frame()
        below = recent[recent["ratio"] < skip_lambda]["sample_id"].value_counts().head(limit)
        seen = recent["sample_id"].value_counts()
        return pd.DataFrame({"sample_id": below.index.to_numpy(np.int64), "below": below.to_numpy(np.int64),
                             "visits": seen.reindex(below.index).to_numpy(np.int64)})

    def most_skipped(self, limit: int = 20) -> tuple[bool, pd.DataFrame]:
        """(True, the most skipped images) when AGC skipped any, else (False, the images with the
        lowest last loss ratio: what AGC would skip first). Rows as `per_sample`."""
        stats = self.per_sample()
        if len(stats) and stats["skips"].sum() > 0:
            return True, stats[stats["skips"] > 0].sort_values(["skips", "skip_rate"], ascending=False).head(limit)
        return False, stats[np.isfinite(stats["last_ratio"])].sort_values("last_ratio").head(limit)

    def summary(self, confidence: float = 0.95) -> dict:
        """Steps, visits, skips and the skipped share of visits with its interval."""
        with self._lock:
            visits, skips = int(self._visits.sum()), int(self._skips.sum())
            images = int((self._visits > 0).sum())
        last = self.last()
        return {"steps": int(last["global_step"]) + 1 if last else 0, "rounds": len(self.rounds()), "images": images,
                "visits": visits, "skips": skips, "skipped_share": skips / visits if visits else None,
                "skipped_interval": proportion_interval(skips, visits, confidence)}
