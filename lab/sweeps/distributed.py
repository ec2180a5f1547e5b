"""A sweep spread over torch.distributed workers, each holding one replica of the model.

`lab sweep ... --nproc N` starts N workers through torch's elastic launcher; `torchrun ... -m lab sweep ...`
starts them itself (RANK and WORLD_SIZE are set), on one server or several. Every worker runs the same
command: rank 0 runs the sweep (lab.sweeps.run with this module's Execute), the others serve it.

Rank 0 is the only process that touches the results database. For each batch of runs it reads what is
stored, cuts the missing trials into tasks (slices of a probe's work: one batch, or up to AUTO_CHUNK trials
with an automatic batch size) and sends every worker the runs and the tasks; in round r, rank i answers task
r * N + i. The rows come back to rank 0 through gather_object and are stored through the same Store calls as a
sweep in one process, so a sweep cut short resumes the same way. A task that fails on any rank stops the
sweep after the round, with that rank named; what rank 0 stored stays.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Generator, Iterator

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

from lab.errors import LabError

AUTO_CHUNK = 64  # trials per task when the probe's batch size is automatic (the worker batches them itself)
TIMEOUT = timedelta(hours=1)  # the longest a rank waits for the others (its slowest round)
FAIL_RANK = "LAB_SWEEP_FAIL_RANK"  # tests: the worker of this rank fails its second task
KEPT = "what was stored is kept: run the same command again to resume"


def launched() -> bool:
    """Whether this process is a rank of a torch.distributed job (torchrun, or lab's own launch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def replicas() -> int:
    """How many workers share the sweep: WORLD_SIZE under a launcher, else 1."""
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (NVML: CUDA stays uninitialised)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [name for name in visible.split(",") if name.strip()][:torch.cuda.device_count()]
    return [str(i) for i in range(torch.cuda.device_count())]


def check_devices(spec, replicas: int, gpus_per_replica: int) -> bool:
    """Whether the replicas go on GPUs (else each on the CPU); a LabError when they cannot be placed."""
    if replicas < 1 or gpus_per_replica < 1:
        raise LabError("--nproc and --gpus-per-replica must be at least 1")
    if spec.device not in ("auto", "cpu", "cuda", "device_map"):
        raise LabError(f"the preset's model device {spec.device!r} does not fit --nproc: each worker places its "
                       "replica on its own GPUs (use device auto, cuda or device_map, or cpu)")
    on_gpus = spec.device != "cpu" and bool(gpus())
    if not on_gpus and (gpus_per_replica > 1 or spec.device in ("cuda", "device_map")):
        raise LabError(f"--gpus-per-replica {gpus_per_replica} with device {spec.device} needs GPUs; "
                       "none is visible here")
    if on_gpus and replicas * gpus_per_replica > len(gpus()):
        raise LabError(f"{replicas} replicas x {gpus_per_replica} GPUs need {replicas * gpus_per_replica} GPUs; "
                       f"{len(gpus())} are visible here")
    return on_gpus


def launch(command, args, nproc: int) -> int:
    """Run command(args) in `nproc` workers started by torch's elastic launcher (one server); returns rank 0's
    exit code. A worker that dies is a one-line LabError naming its rank."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):  # the launcher's failures become one line here
        if name.startswith(("torch.distributed.elastic", "torch.multiprocessing")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"lab-sweep-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    try:
        outcome = elastic_launch(config, _worker)(command, args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        raise LabError(f"sweep worker rank {rank} failed ({_why(failure)}); {KEPT}") from None
    except SignalException as error:  # Ctrl-C, SIGTERM, SIGHUP: the launcher stopped the workers
        interrupt = KeyboardInterrupt()
        interrupt.signum = error.sigval
        raise interrupt from None
    code, message = outcome[0]
    if message:
        raise LabError(message)
    return code


def _why(failure) -> str:
    """A dead worker's exception (recorded in its error file), else its exit code or signal."""
    if not os.path.isfile(failure.error_file):
        return f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    message = failure.message
    return " ".join(str(message.get("message", "") if isinstance(message, dict) else message).split())


@record
def _worker(command, args) -> tuple[int, str | None]:
    """A launched worker: command(args) as one rank (--nproc 1: it is a rank now); (exit code, error or None)."""
    try:
        return command(argparse.Namespace(**{**vars(args), "nproc": 1})), None
    except LabError as error:
        return 2, str(error)


@dataclass
class Task:
    job: int  # index into the round's runs
    probe: str
    start: int  # a slice of the probe's work items (Work.items, in run order)
    stop: int


@dataclass
class Runs:
    """What rank 0 sends for one Execute: the presets and their finished keys per probe, and the tasks."""

    presets: list
    done: list[dict[str, set[str]]]
    tasks: list[Task]


def _tasks(presets: list, missing: list[dict[str, int]], ranks: int) -> list[Task]:
    """Each run's missing trials per probe in slices: the probe's batch size, or when that is automatic an
    even share of all the trials, at most AUTO_CHUNK."""
    share = max(1, min(AUTO_CHUNK, math.ceil(sum(sum(m.values()) for m in missing) / ranks)))
    tasks = []
    for j, preset in enumerate(presets):
        for name, count in missing[j].items():
            size = preset.probes[name].batch_size or share
            tasks += [Task(j, name, start, min(start + size, count)) for start in range(0, count, size)]
    return tasks


class Replica:
    """One loaded model answering tasks: it keeps the probes prepared and the current run's plan and work."""

    def __init__(self, loaded):
        self.loaded = loaded
        self._prepared = {}
        self._current = None  # (Runs, run index, sites, means, {probe: (work, batch size)})
        self.attempts = 0

    def prepared(self, name: str, spec):
        from lab import probes

        if (name, spec) not in self._prepared:
            self._prepared[name, spec] = probes.get(name).prepare(self.loaded, spec)
        return self._prepared[name, spec]

    def answer(self, runs: Runs, task: Task) -> list[dict]:
        """The result rows of a task, in batches as the runner makes them (under the run's plan)."""
        from lab import runner
        from lab.interventions import apply_plan, resolve

        loaded, preset = self.loaded, runs.presets[task.job]
        if self._current is None or self._current[0] is not runs or self._current[1] != task.job:
            sites = resolve(preset.plan_for(loaded.anatomy), loaded.anatomy)
            self._current = (runs, task.job, sites, runner.calibrated_means(loaded, sites), {})
        _, _, sites, means, works = self._current
        with apply_plan(loaded.model, loaded.anatomy, sites, means) as tracker:
            if task.probe not in works:
                work = self.prepared(task.probe, preset.probes[task.probe]).work(runs.done[task.job][task.probe])
                works[task.probe] = work, runner.auto_batch_size(work.batch_size, loaded, work.tokens, work.row_bytes)
            work, size = works[task.probe]
            items = work.items[task.start:task.stop]
            return [row for i in range(0, len(items), size)
                    for row in runner.run_halving(work.answer, items[i:i + size], tracker)]

    def attempt(self, runs: Runs, task: Task) -> tuple[str, object]:
        """answer() as a message for rank 0: ("rows", rows) or ("error", one line)."""
        self.attempts += 1
        try:
            if os.environ.get(FAIL_RANK) == os.environ["RANK"] and self.attempts == 2:
                raise RuntimeError(f"failure injected by {FAIL_RANK}")
            return "rows", self.answer(runs, task)
        except Exception as error:  # any failure of this rank's task reaches rank 0 and ends the sweep there
            return "error", " ".join(f"{type(error).__name__}: {error}".split())


class World:
    """This process's place among the workers, its replica, and (rank 0) the session the sweep runs in."""

    def __init__(self, rank: int, size: int, replica: Replica):
        self.rank, self.size, self.replica = rank, size, replica
        self.session = None
        if rank == 0:
            from lab.session import Session

            self.session = Session(replica.loaded)

    # ---- rank 0 ------------------------------------------------------------------------------
    def execute(self, jobs: list, store) -> Generator:
        """lab.sweeps.run's Execute for rank 0: the jobs' missing trials spread over every rank, stored here."""
        from lab.sweeps.run import stored_done

        todo, runs_of, presets, done = {}, {}, [], []  # todo: index in jobs -> index in presets (a run to do)
        for i, job in enumerate(jobs):
            key = job.preset.fingerprint()  # jobs of one plan (a control that repeats a condition) share a run
            if key not in runs_of and stored_done(job, store) is None:
                stored = store.run_by_fingerprint(key)
                runs_of[key] = len(presets)
                presets.append(job.preset)
                done.append({name: store.done_keys(stored["id"], name) if stored else set()
                             for name in job.preset.probes})
            if key in runs_of:
                todo[i] = runs_of[key]
        missing = [{name: self.replica.prepared(name, spec).trials - len(keys[name])
                    for name, spec in preset.probes.items()} for preset, keys in zip(presets, done)]
        tasks = _tasks(presets, missing, self.size)
        runs = Runs(presets, done, tasks)
        self.say(runs)
        return (yield from _Rounds(self, store, jobs, todo, [sum(m.values()) for m in missing], runs).run())

    def say(self, message) -> None:
        """Rank 0: send `message` to every rank (what they wait for in _hear)."""
        dist.broadcast_object_list([message], src=0)

    # ---- every rank ----------------------------------------------------------------------------
    def round(self, runs: Runs, number: int, skip: bool = False) -> list | None:
        """This rank's task of round `number` answered (unless `skip`) and gathered at rank 0 (the list there)."""
        at = number * self.size + self.rank
        mine = None if skip or at >= len(runs.tasks) else self.replica.attempt(runs, runs.tasks[at])
        gathered = [None] * self.size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        return gathered

    def serve(self) -> None:
        """Ranks other than 0: answer rank 0's runs round by round until it says stop."""
        while (runs := self._hear()) is not None:
            for number in range(math.ceil(len(runs.tasks) / self.size)):
                self.round(runs, number)
                if not self._hear():
                    break

    def _hear(self):
        message = [None]
        dist.broadcast_object_list(message, src=0)
        return message[0]


class _Rounds:
    """Rank 0's side of one Execute: the rounds, the runs opened, stored and finished, the events."""

    def __init__(self, world: World, store, jobs: list, todo: dict[int, int], missing: list, runs: Runs):
        self.world, self.store, self.jobs, self.runs = world, store, jobs, runs
        self.todo, self.missing = todo, missing  # todo: index in jobs -> index in runs; missing trials per run
        self.run_ids: dict[int, int] = {}  # index in runs -> run id, once opened
        self.stored: dict[int, int] = {}  # index in runs -> trials stored by this Execute
        self.totals: dict[int, int] = {}  # index in runs -> trials of the run, stored before included
        self.begun = 0  # jobs whose Stage was yielded

    def run(self) -> Generator:
        rounds = math.ceil(len(self.runs.tasks) / self.world.size)
        first = {j: i for i, j in reversed(list(self.todo.items()))}  # index in runs -> index in jobs
        status = "failed"
        try:
            for number in range(rounds):
                tasks = self.runs.tasks[number * self.world.size:(number + 1) * self.world.size]
                try:  # nothing may raise before the gather: the other ranks wait in it
                    events, problem = list(self._begin(max(first[t.job] for t in tasks))), None
                except Exception as error:
                    events, problem = [], error
                yield from events
                gathered = self.world.round(self.runs, number, skip=problem is not None)
                carry_on = False
                try:
                    if problem is not None:
                        raise problem
                    for task, answer in zip(tasks, gathered):
                        if answer and answer[0] == "rows":
                            yield from self._store(task, answer[1])
                    failed = [(rank, answer[1]) for rank, answer in enumerate(gathered) if answer and answer[0] == "error"]
                    if failed:
                        raise LabError(f"sweep worker rank {failed[0][0]} failed ({failed[0][1]}); {KEPT}")
                    carry_on = number < rounds - 1
                finally:
                    if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                        self.world.say(carry_on)
            yield from self._begin(len(self.jobs) - 1)
            status = "done"
        except KeyboardInterrupt:
            status = "cancelled"
            raise
        finally:
            for j, run_id in self.run_ids.items():
                if self.stored[j] < self.missing[j]:
                    self.store.finish_run(run_id, status)
        return status

    def _begin(self, upto: int) -> Iterator:
        """Stages (and for runs with work, Started) of the jobs up to index `upto`, in order."""
        from lab import runner
        from lab.sweeps.run import stored_done

        for i in range(self.begun, upto + 1):
            job = self.jobs[i]
            self.begun = i + 1
            j = self.todo.get(i)
            if j is None or j in self.run_ids:  # finished before, or another job's run
                yield replace(job.stage, skipped=True)
                job.link(stored_done(job, self.store) if j is None else self.run_ids[j])
                continue
            loaded, preset = self.world.replica.loaded, job.preset
            yield job.stage
            plan = preset.plan_for(loaded.anatomy)
            runner.check_probes(plan, preset.probes)
            words = plan.describe(loaded.anatomy)
            self.run_ids[j] = self.store.open_run(preset.fingerprint(), f"{preset.name} · {words}", preset.model.name,
                                                  plan.to_dict(), preset.to_toml(), runner.versions())
            job.link(self.run_ids[j])
            self.stored[j] = 0
            self.totals[j] = sum(self.world.replica.prepared(name, spec).trials for name, spec in preset.probes.items())
            yield runner.Started(self.run_ids[j], self.totals[j], self.totals[j] - self.missing[j], words)
            if not self.missing[j]:
                yield from self._finish(j)

    def _store(self, task: Task, rows: list[dict]) -> Iterator:
        from lab import runner

        j = task.job
        self.store.add_trials(self.run_ids[j], task.probe, rows)
        self.stored[j] += len(rows)
        if max(self.run_ids) == j:  # the progress shown is the newest run's
            done = self.totals[j] - self.missing[j] + self.stored[j]
            yield runner.Progress(task.probe, rows, done, self.totals[j], None)
        if self.stored[j] == self.missing[j]:
            yield from self._finish(j)

    def _finish(self, j: int) -> Iterator:
        from lab import runner
        from lab.summary import summarize

        self.store.finish_run(self.run_ids[j], "done")
        yield runner.Finished(self.run_ids[j], "done", summarize(self.store.trials(self.run_ids[j])))


@contextmanager
def world(spec, gpus_per_replica: int) -> Iterator[World]:
    """Join the workers (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE from the launcher), each loading its
    replica: on GPUs its own CUDA_VISIBLE_DEVICES slice (nccl), else the CPU (gloo). Ranks other than 0 write
    nothing to stdout; rank 0 tells the others to stop when it leaves."""
    from lab.models import load

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank != 0:  # only rank 0 prints (the result, --json)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    on_gpus = check_devices(spec, local_size, gpus_per_replica)
    if on_gpus:
        mine = gpus()[local_rank * gpus_per_replica:(local_rank + 1) * gpus_per_replica]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(mine)  # before CUDA starts in this process
        torch.cuda.set_device(0)
        if torch.cuda.device_count() != len(mine):  # CUDA started earlier, seeing every GPU
            raise LabError(f"sweep worker rank {rank}: CUDA started before its GPUs ({', '.join(mine)}) were chosen")
        spec = replace(spec, device="cuda" if gpus_per_replica == 1 else "device_map")
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
        spec = replace(spec, device="cpu")
    dist.init_process_group("nccl" if on_gpus else "gloo", timeout=TIMEOUT)
    try:
        try:
            loaded, problem = load(spec), None
        except LabError as error:
            loaded, problem = None, str(error)
        problems = [None] * size
        dist.all_gather_object(problems, problem)
        failed = [(r, p) for r, p in enumerate(problems) if p]
        if failed:
            raise LabError(f"sweep worker rank {failed[0][0]} could not load the model: {failed[0][1]}")
        here = World(rank, size, Replica(loaded))
        try:
            yield here
        finally:
            if rank == 0 and not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                here.say(None)
    finally:
        dist.destroy_process_group()
