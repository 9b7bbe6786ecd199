"""What a runner does with its ``output_dir``: start fresh, resume, or leave a finished run alone.

:class:`RunFolder` is used the same way by both runners, in two phases so that every refusal
comes before any work and nothing is written before the decision:

1. ``check()`` (right after the config is parsed): reads the folder's status and compares the
   config and the init checkpoint's identity with the saved run's:

   - *empty*: a fresh start;
   - *in progress* (training states, no ``metrics.json``): resume from the newest readable state
     (an unreadable one is renamed ``*.corrupt`` and the next older one is used); keys that change
     the results must match (else :class:`ConfigError` naming each ``key: saved -> now``, unless
     ``init.allow_config_change``);
   - *finished* (``metrics.json``): the same check against the run's ``config.yaml`` and the
     provenance in ``metrics.json``; a finished run is never re-run;
   - ``init.resume=false`` on a folder that is not empty: refused (:class:`RunFolderError`) unless
     ``init.overwrite`` (``--overwrite``), which starts over after moving the old contents to
     ``previous-<time>/``. ``init.overwrite`` alone also starts over.

   ``init.checkpoint`` is identified by its file (absolute path) and SHA-256, recorded in every
   training state and in ``metrics.json``: a different file behind the same path is a changed key.
   The main process hashes it and shares the result (one read, not one per process).

2. ``begin(total_steps)`` (once the runner knows how many steps this config asks for and has
   loaded the init checkpoint, so a fresh start hashes the file it used): a finished
   run of that length prints where its results are and returns False (nothing is touched); a
   finished run asked for more steps continues from its newest state; fewer steps than a saved
   state or result already has is an error. Otherwise the folder is prepared (old contents moved
   aside when overwriting, temp files of an interrupted save removed, ``config.yaml`` written)
   and it returns True.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from multimae_att.config import ConfigError, config_to_dict, save_config
from multimae_att.run.folder import (
    CONFIG_FILE,
    PREVIOUS_PREFIX,
    STATES_DIR,
    RunStatus,
    move_to_previous,
    read_results,
    remove_temp_files,
    run_status,
)
from multimae_att.run.provenance import checkpoint_identity, describe_identity
from multimae_att.run.resume import flatten_config
from multimae_att.run.states import LoadedState, TrainStateStore

__all__ = ["RunFolder", "RunFolderError", "init_checkpoint_changes", "LENGTH_KEYS", "runner_parser"]

# Keys that set how many steps a run has (besides the data): a finished run re-invoked with the
# same values is done without looking at the data.
LENGTH_KEYS = ("train.max_steps", "train.epochs")
_MISSING = object()   # a state or result written before init checkpoints were identified
Changes = Callable[[dict, Any], "tuple[list[str], list[str]]"]


class RunFolderError(RuntimeError):
    """The run folder's contents forbid what the config asks (the message says what to do)."""


def init_checkpoint_changes(saved: Any, now: dict | None, saved_path: Any = None) -> tuple[list[str], list[str]]:
    """``(blocking, notes)`` for ``init.checkpoint``: ``saved`` is the identity recorded by the
    run (:func:`checkpoint_identity`; ``_MISSING`` for files written before identities were
    recorded, then only the path ``saved_path`` of the saved config is compared), ``now`` this
    invocation's. A different file or content blocks; the same file under another spelling, or
    a file that is gone (nothing to hash), is a note."""
    key = "init.checkpoint"
    if saved is _MISSING:
        old = saved_path or None
        new = now["path"] if now else None
        return ([f"{key}: {old!r} -> {new!r}"], []) if old != new else ([], [])
    if not saved and not now:
        return [], []
    line = f"{key}: {describe_identity(saved)} -> {describe_identity(now)}"
    if not saved or not now:
        return [line], []
    if now["sha256"] is None:   # the file is gone: nothing to compare but the path
        if os.path.abspath(os.path.expanduser(now["path"])) != saved.get("file"):
            return [line], []
        return [], [f"{key}: {now['path']!r} no longer exists; cannot check it is the file the run started from"]
    if now["file"] != saved.get("file") or now["sha256"] != saved.get("sha256"):
        same_path = now["file"] == saved.get("file")
        return [line + (" (a different file behind the same path)" if same_path else "")], []
    if now["path"] != saved.get("path"):
        return [], [f"{key}: {saved.get('path')!r} -> {now['path']!r} (the same file)"]
    return [], []


class RunFolder:
    """The lifecycle of ``cfg.output_dir`` for one invocation of a runner (see the module docstring).

    ``cfg`` needs ``output_dir``, ``init.{checkpoint, resume, overwrite, allow_config_change}``
    and ``train.keep_last``; ``changes(saved_config_dict, cfg) -> (blocking, notes)`` is the
    runner's config comparison. ``accelerator``: prints on the main process only, and all
    processes meet before and after the main process changes the folder.
    """

    def __init__(self, cfg: Any, changes: Changes, accelerator: Any, trains: bool = True) -> None:
        self.cfg, self.changes, self.acc, self.trains = cfg, changes, accelerator, trains
        self.out = Path(cfg.output_dir)
        self.store = TrainStateStore(self.out / STATES_DIR, keep_last=cfg.train.keep_last)
        self.status: RunStatus = run_status(self.out)
        self.state: LoadedState | None = None       # the state this invocation resumes from
        self.init: dict | None = None               # init checkpoint identity to record
        self.finished = False                       # a finished run (begin decides what to do)
        self.same_length = False                    # ... re-invoked with the same length keys
        self.fresh = True
        self._move_old = False
        self._checked = False
        self._finished_conflict: str | None = None   # allowed changes on a finished run

    # phase 1 ------------------------------------------------------------------------------
    def check(self) -> None:
        """Decide fresh / resume / finished and stop on a conflict, before any work."""
        cfg, st = self.cfg, self.status
        self._checked = True
        if cfg.init.overwrite:
            self._move_old = self.out.is_dir() and any(
                not e.name.startswith(PREVIOUS_PREFIX) for e in self.out.iterdir())
            return
        if st.empty:
            return
        if not cfg.init.resume:
            what = (f"a finished run ({st.where()})" if st.finished
                    else f"a run in progress (newest training state {st.latest_state}, step {st.step})")
            raise RunFolderError(
                f"init.resume=false, but output_dir={str(self.out)!r} holds {what}; starting over there "
                "would overwrite it. Add --overwrite (init.overwrite=true) to start over: the old "
                f"contents move to {self.out / (PREVIOUS_PREFIX + '<time>')}/ and nothing is deleted. "
                "Or drop init.resume=false to keep the run, or choose another output_dir.")
        self.fresh = False
        self.init = checkpoint_identity(cfg.init.checkpoint, self.acc)   # compared with the run's below
        if st.finished:
            self._check_finished()
        else:
            self._load_state()

    def _check_finished(self) -> None:
        saved = self._saved_config()
        results = read_results(self.out) or {}
        ident = (results.get("provenance") or {}).get("init_checkpoint", _MISSING) \
            if "provenance" in results else _MISSING
        blocking, _ = self._compare(saved, ident, f"the finished run's {CONFIG_FILE}")
        self.finished = True
        if blocking:
            listed = "\n  ".join(blocking)
            self._finished_conflict = (
                f"output_dir={str(self.out)!r} holds a finished run ({self.status.where()}) made with a "
                f"different config; these keys change the results (saved -> now):\n  {listed}\n"
                "Those results belong to the saved config. Run this config in another output_dir, or "
                "start over here with --overwrite (init.overwrite=true): the finished run moves to "
                f"{self.out / (PREVIOUS_PREFIX + '<time>')}/ and nothing is deleted. (To continue the "
                "run further with the new values instead: ask for more steps and add "
                "init.allow_config_change=true.)")
            if not self.cfg.init.allow_config_change:
                raise ConfigError(self._finished_conflict)
        if saved is not None:
            old, new = flatten_config(saved), flatten_config(config_to_dict(self.cfg))
            self.same_length = all(old.get(k, _MISSING) == new.get(k) for k in LENGTH_KEYS)

    def _saved_config(self) -> dict | None:
        try:
            saved = yaml.safe_load((self.out / CONFIG_FILE).read_text())
        except (OSError, yaml.YAMLError):
            return None
        return saved if isinstance(saved, dict) else None

    def _load_state(self) -> None:
        warn = self.acc.print if self.acc.is_main_process else (lambda *_: None)
        try:
            loaded = self.store.load_newest(warn=warn, quarantine=self.acc.is_main_process)
        except RuntimeError as e:
            raise RunFolderError(f"output_dir={str(self.out)!r}: {e}") from e
        if loaded is None:   # the states vanished since the status was read
            self.fresh = True
            return
        state = loaded.state
        blocking, notes = self._compare(state.get("config", {}), state.get("init_checkpoint", _MISSING),
                                        str(loaded.path))
        if blocking:
            listed = "\n  ".join(blocking)
            if not self.cfg.init.allow_config_change:
                raise ConfigError(
                    f"output_dir={str(self.out)!r} holds a run in progress (training state {loaded.path}, "
                    f"step {loaded.step}) made with a different config; these keys change the results "
                    f"(saved -> now):\n  {listed}\n"
                    "To continue it, use the saved values (or resume with the new ones anyway: "
                    "init.allow_config_change=true). To keep it and run this config elsewhere, choose "
                    "another output_dir. To start over here, add --overwrite (init.overwrite=true): the "
                    f"old run moves to {self.out / (PREVIOUS_PREFIX + '<time>')}/ and nothing is deleted.")
            self._print(f"warning: init.allow_config_change=true: resuming from {loaded.path} with new "
                        f"values for keys that change the results:\n  {listed}")
        self._print_notes(notes, str(loaded.path))
        saved_init = state.get("init_checkpoint", _MISSING)
        if saved_init is not _MISSING and saved_init and self.init and self.init["sha256"] is None:
            self.init = dict(saved_init)   # the file is gone: keep recording what the run started from
        self.state = loaded

    def _compare(self, saved_config: dict | None, saved_init: Any, source: str) -> tuple[list[str], list[str]]:
        if saved_config is None:
            return [], [f"no saved config in {source}: the config is not compared"]
        blocking, notes = self.changes(saved_config, self.cfg)
        saved_path = (saved_config.get("init") or {}).get("checkpoint")
        b, n = init_checkpoint_changes(saved_init, self.init, saved_path)
        # init.checkpoint is compared by identity, not as a free key of the init section
        notes = [line for line in notes if not line.startswith("init.checkpoint:")]
        return sorted(blocking + b), sorted(notes + n)

    def _print(self, text: str) -> None:
        if self.acc.is_main_process:
            self.acc.print(text)

    def _print_notes(self, notes: list[str], source: str) -> None:
        for line in notes:
            self._print(f"note: resuming from {source} with a changed config key: {line}")

    # phase 2 ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """A finished run re-invoked with the same run length: nothing to do (no data needed)."""
        return self.finished and self.same_length and self._finished_conflict is None

    def report_finished(self) -> None:
        """Print where a finished run's results are (nothing is touched)."""
        st = self.status
        self._print(f"output_dir={str(self.out)!r} holds a finished run (step {st.step}): {st.where()}. "
                    "Nothing to do; to run it again from scratch add --overwrite.")

    def begin(self, total_steps: int) -> bool:
        """Prepare the folder for ``total_steps`` steps; False when the run is already finished."""
        if not self._checked:
            raise RuntimeError("RunFolder.check() must run before begin()")
        st = self.status
        if self.finished:
            done_step = st.step if st.step is not None else total_steps
            if self.same_length or done_step == total_steps:
                if self._finished_conflict is not None:   # nothing to continue with the new values
                    raise ConfigError(self._finished_conflict)
                self.report_finished()
                return False
            if total_steps < done_step or not self.trains:
                raise RunFolderError(
                    f"output_dir={str(self.out)!r} holds a run finished at step {done_step}; this config "
                    f"asks for {total_steps} steps. Use the run's length ({CONFIG_FILE}), another "
                    "output_dir, or --overwrite to start over (the old run moves to previous-<time>/).")
            self._load_state()
            if self.state is None:
                raise RunFolderError(f"output_dir={str(self.out)!r}: the finished run has no training state "
                                     f"to continue from to step {total_steps}; use --overwrite to start over")
            self._print(f"output_dir={str(self.out)!r} holds a run finished at step {done_step}; "
                        f"continuing it to step {total_steps}")
        if self.state is not None and self.state.step > total_steps:
            raise RunFolderError(
                f"output_dir={str(self.out)!r} holds the training state {self.state.path} at step "
                f"{self.state.step}, beyond the {total_steps} steps this config asks for "
                "(train.max_steps / train.epochs). Ask for at least as many steps, use another "
                "output_dir, or --overwrite to start over (the old run moves to previous-<time>/).")
        if self.fresh:   # hashed now: the runner has loaded (and perhaps downloaded) it by now
            self.init = checkpoint_identity(self.cfg.init.checkpoint, self.acc)
        self.acc.wait_for_everyone()      # every process has read the folder
        if self.acc.is_main_process:
            for p in remove_temp_files(self.out):
                self.acc.print(f"removed {p} (temporary file of an interrupted save)")
            if self._move_old:
                moved = move_to_previous(self.out)
                if moved is not None:
                    self.acc.print(f"--overwrite: the previous contents of {self.out} are now in {moved}")
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out / CONFIG_FILE)
        if self.state is not None:
            self._print(f"resuming from {self.state.path} (step {self.state.step})")
        self.acc.wait_for_everyone()
        return True


def runner_parser(description: str | None = None):
    """The command-line parser both runners start from (``config.cli_config(..., parser=...)``):
    ``--overwrite`` stands for ``init.overwrite=true``."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--overwrite", action="append_const", dest="config_overrides",
                        const="init.overwrite=true",
                        help="start over in a used output_dir: its contents move to "
                             "output_dir/previous-<time>/, nothing is deleted (= init.overwrite=true)")
    return parser
