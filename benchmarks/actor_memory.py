"""Memory and open files of a running training job's processes, by role.

A local run (`ray.init(address="local")`, rl/cluster/runtime.py) makes every process of the job a
descendant of the driver: Ray's daemons (gcs_server, raylet, the dashboard, monitors) are its
children, the actors are children of the raylet, and the reward pool's workers (rewards/pool.py,
multiprocessing "spawn") are the driver's children. So walking the driver's process tree finds
them all, with no Ray API call (which would need to join the job's cluster).

Ray retitles a worker process (setproctitle) to `ray::<ActorClass>` while idle and
`ray::<ActorClass>.<method>` while a call runs (`ray::IDLE` for pooled workers with no actor
yet). The title replaces argv, so it is `cmdline()[0]`; `name()` only agrees when psutil reads
it back from the cmdline (the kernel's comm is cut at 15 characters). The title's class, not
the method, names the role, so a role holds still between calls.

Roles are stable across samples: a process keeps the role it got first while it lives and keeps
its kind, and a new process of a kind (a restarted engine) takes the lowest index that no live
process holds — so after a restart `engine0` is the new engine 0, not a new column.

RSS counts pages shared with other processes (Ray's object store mmaps, shared libraries), so
it overstates each process and a sum over processes double counts; USS (pages only this process
maps) is the leak signal, but psutil computes it by reading /proc/<pid>/smaps, which takes time
on a large process, hence optional.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import psutil

# Actor classes of this project → role names (rl/cluster/rollout_group.py, rl/cluster/learner_group.py,
# rl/methods/leaf/teacher.py); any other actor class is its own role, under its class name.
ACTOR_ROLES = {"VLLMEngine": "engine", "LearnerWorker": "learner", "TeacherWorker": "teacher",
               "IDLE": "ray_idle"}
# One of each per node: named without an index unless a second one shows up.
SINGLETON_ACTORS = {"DashboardAgent", "RuntimeEnvAgent"}


def process_kind(cmdline: list[str], parent_is_driver: bool = False) -> tuple[str, bool]:
    """(kind, indexed) of a process from its command line: `indexed` kinds get a number
    (engine0, engine1), the others a bare name. Pure, so it is tested on literal titles."""
    title = cmdline[0] if cmdline else ""
    if title.startswith("ray::"):
        cls = title[len("ray::"):].split(".", 1)[0].split(" ", 1)[0]
        return ACTOR_ROLES.get(cls, cls), cls not in SINGLETON_ACTORS
    line = " ".join(cmdline)
    if "multiprocessing.spawn" in line or "multiprocessing.forkserver" in line:
        # The driver's only spawned children are the reward pool's workers.
        return ("reward_worker" if parent_is_driver else "mp_worker"), True
    if "multiprocessing.resource_tracker" in line:
        return "mp_resource_tracker", False
    exe = os.path.basename(title)
    if exe in ("raylet", "gcs_server"):
        return exe, False
    script = next((a for a in cmdline[1:] if a.endswith(".py")), None)
    if script is not None:  # Ray's Python daemons: dashboard.py, monitor.py, log_monitor.py
        stem = Path(script).stem
        return (f"ray_{stem}" if f"{os.sep}ray{os.sep}" in script else stem), False
    return exe or "unknown", True


class RoleBook:
    """Sticky pid → role assignment (see the module docstring)."""

    def __init__(self):
        self.held: dict[int, tuple[str, str]] = {}  # pid → (kind, role)

    def assign(self, procs: list[tuple[int, str, bool]]) -> dict[int, str]:
        """Roles of this sample's (pid, kind, indexed) triples, lowest pid first for new ones."""
        live = {pid: (kind, indexed) for pid, kind, indexed in procs}
        self.held = {pid: kr for pid, kr in self.held.items()
                     if pid in live and live[pid][0] == kr[0]}
        taken = {role for _, role in self.held.values()}
        for pid in sorted(live):
            if pid in self.held:
                continue
            kind, indexed = live[pid]
            role = None if indexed or kind in taken else kind
            i = 0 if indexed else 1
            while role is None or role in taken:
                role, i = f"{kind}{i}", i + 1
            self.held[pid] = (kind, role)
            taken.add(role)
        return {pid: self.held[pid][1] for pid in live}


def _job_processes(driver_pid: int) -> list[tuple[psutil.Process, str, bool]]:
    driver = psutil.Process(driver_pid)
    found = [(driver, "driver", False)]
    for p in driver.children(recursive=True):
        try:
            kind, indexed = process_kind(p.cmdline(), p.ppid() == driver_pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue  # gone (or going) between the listing and the read
        found.append((p, kind, indexed))
    return found


def process_records(driver_pid: int, uss: bool = False, book: RoleBook | None = None) -> list[dict]:
    """One record per process of the job: {role, kind, pid, rss_bytes, num_fds[, uss_bytes]}.
    Pass the same `book` on every call to keep roles stable between calls."""
    book = book or RoleBook()
    procs = _job_processes(driver_pid)
    roles = book.assign([(p.pid, kind, indexed) for p, kind, indexed in procs])
    records = []
    for p, kind, _ in procs:
        try:
            with p.oneshot():
                mem = p.memory_full_info() if uss else p.memory_info()
                rec = {"role": roles[p.pid], "kind": kind, "pid": p.pid,
                       "rss_bytes": mem.rss, "num_fds": p.num_fds()}
                if uss:
                    rec["uss_bytes"] = mem.uss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        records.append(rec)
    return records


class Sampler:
    """Samples the job every `interval_s` in a daemon thread, keeping per-role peak RSS and the
    time series {t, role: rss_bytes}: the peaks catch what a once-per-N-steps snapshot misses
    (a spike during a checkpoint or an eval). `sample()` takes one now (from any thread) and
    returns its records. Stops by itself when the driver exits."""

    def __init__(self, driver_pid: int, interval_s: float = 5.0, uss: bool = False):
        self.driver_pid, self.interval_s, self.uss = driver_pid, interval_s, uss
        self.book = RoleBook()
        self.peaks: dict[str, int] = {}
        self.uss_peaks: dict[str, int] = {}
        self.series: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="actor-memory", daemon=True)

    def sample(self) -> list[dict]:
        with self._lock:
            try:
                records = process_records(self.driver_pid, self.uss, self.book)
            except psutil.NoSuchProcess:  # the driver is gone
                return []
            row = {"t": time.time()}
            for r in records:
                row[r["role"]] = r["rss_bytes"]
                self.peaks[r["role"]] = max(self.peaks.get(r["role"], 0), r["rss_bytes"])
                if "uss_bytes" in r:  # pages this process alone maps (no shared memory)
                    row[f"{r['role']} uss"] = r["uss_bytes"]
                    self.uss_peaks[r["role"]] = max(self.uss_peaks.get(r["role"], 0), r["uss_bytes"])
            self.series.append(row)
            return records

    def _loop(self) -> None:
        while not self._stop.is_set() and psutil.pid_exists(self.driver_pid):
            self.sample()
            self._stop.wait(self.interval_s)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def dir_bytes(path: str | os.PathLike) -> int:
    """Apparent size (st_size) of the files under `path`, symlinks not followed, a hard-linked
    file counted once. Tolerates files removed during the walk: a run rotates its checkpoints
    while we count."""
    total, seen = 0, set()
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
